"""The cluster deployment on one machine, for a trial: ``make cluster`` / ``make cluster-stop``.

    python -m userpilot_sync.cluster.trial start [--root .cluster] [--workers 2] [--port 3000]
    python -m userpilot_sync.cluster.trial stop  [--root .cluster]
    python -m userpilot_sync.cluster.trial status [--root .cluster]

``start`` brings up, under ``--root`` (default ``.cluster/`` in the project folder, git-ignored):

* PostgreSQL (Debian's server binaries) in ``<root>/postgres`` on a free loopback port, database
  ``dagster`` (run as the ``postgres`` system user when started by root: PostgreSQL refuses root);
* Redis (``redis-server``) on a free loopback port, no persistence: the Celery broker and result
  backend;
* N Celery workers (``celery -A userpilot_sync.cluster.worker worker``), one run at a time each,
  each with its own staging folder ``<root>/workers/<name>/staging`` — as if on separate machines;
* ``dagster-daemon`` (run queue, schedules, sensors, run monitoring, run retries) and
  ``dagster-webserver`` on http://127.0.0.1:<port>.

All share ``<root>/home`` as ``DAGSTER_HOME`` (``deploy/cluster/dagster.yaml``), the snapshot
state folder ``<root>/state`` (``USERPILOT_SYNC_STATE_DIR``: on one machine a shared folder; on
several, an S3/GCS state store) and the compute logs ``<root>/compute_logs``. What is running is
recorded in ``<root>/cluster.json`` (pids, ports, environment); ``stop`` ends every process of it
(SIGTERM, then SIGKILL after 20 s) and stops PostgreSQL; the data stays for the next ``start``.
Logs: ``<root>/logs/<process>.log``.

Nothing here is needed in production: there, each process is a service of its own (docs/deploy.md).
The test suite (``userpilot_sync_tests/fixtures_cluster.py``) builds its clusters with the same
functions.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
CLUSTER_CONFIG = REPO / "deploy" / "cluster" / "dagster.yaml"
PG_USER = "userpilot_sync"
PG_DB = "dagster"


class ClusterError(RuntimeError):
    """A process of the trial cluster could not be started (the message names it and its log)."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _wait(what: str, probe, timeout: float, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not probe():
        if time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
            raise ClusterError(f"{what} did not come up within {timeout:.0f} s" + (f"; log {log}:\n{tail}" if log else ""))
        time.sleep(0.2)


def pg_bindir() -> Path:
    """The newest PostgreSQL server's binaries (Debian: ``/usr/lib/postgresql/<version>/bin``)."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=lambda p: int(Path(p).parts[-3]))
    if candidates:
        return Path(candidates[-1]).parent
    found = shutil.which("postgres") or shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    raise ClusterError("no PostgreSQL server found: install Debian's postgresql package (apt-get install postgresql)")


def _as_postgres(cmd: list[str]) -> list[str]:
    """Run ``cmd`` as the ``postgres`` user when we are root (PostgreSQL refuses to run as root)."""
    if os.geteuid() != 0:
        return cmd
    return ["runuser", "-u", "postgres", "--", *cmd]


@dataclass
class Postgres:
    """A PostgreSQL server in ``<folder>/data`` on 127.0.0.1:``port`` (trust authentication,
    loopback only), its log in ``<folder>/postgres.log``. When started by root, ``folder`` is
    given to the ``postgres`` user, who must be able to reach it (not under a 0700 folder)."""

    folder: Path
    port: int

    @property
    def data(self) -> Path:
        return self.folder / "data"

    @property
    def log(self) -> Path:
        return self.folder / "postgres.log"

    @property
    def env(self) -> dict[str, str]:
        return {"DAGSTER_PG_HOST": "127.0.0.1", "DAGSTER_PG_PORT": str(self.port), "DAGSTER_PG_USERNAME": PG_USER,
                "DAGSTER_PG_PASSWORD": "", "DAGSTER_PG_DB": PG_DB}

    @property
    def url(self) -> str:
        return f"postgresql://{PG_USER}@127.0.0.1:{self.port}/{PG_DB}"

    def start(self) -> "Postgres":
        bindir = pg_bindir()
        owner = "postgres" if os.geteuid() == 0 else None
        self.folder.mkdir(parents=True, exist_ok=True)
        if owner:
            shutil.chown(self.folder, owner, owner)
        if not (self.data / "PG_VERSION").exists():
            self.data.mkdir(exist_ok=True)
            if owner:
                shutil.chown(self.data, owner, owner)
            os.chmod(self.data, 0o700)
            subprocess.run(_as_postgres([str(bindir / "initdb"), "-D", str(self.data), "-U", PG_USER, "--auth=trust",
                                         "-E", "UTF8", "--no-sync"]), check=True, capture_output=True, cwd="/")
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.data} -c fsync=off -c max_connections=200"
        result = subprocess.run(_as_postgres([str(bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.log),
                                              "-o", options, "-w", "-t", "60", "start"]),
                                capture_output=True, text=True, cwd="/")
        if result.returncode != 0:
            raise ClusterError(f"PostgreSQL did not start ({result.stderr.strip() or result.stdout.strip()}); "
                               f"log {self.log}:\n{self.log.read_text(errors='replace')[-2000:]}")
        created = subprocess.run([str(bindir / "psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", PG_USER,
                                  "-d", "postgres", "-tAc", f"SELECT 1 FROM pg_database WHERE datname = '{PG_DB}'"],
                                 capture_output=True, text=True, check=True)
        if created.stdout.strip() != "1":
            subprocess.run([str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", PG_USER, PG_DB],
                           check=True, capture_output=True)
        return self

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            subprocess.run(_as_postgres([str(pg_bindir() / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w",
                                         "-t", "60", "stop"]), capture_output=True, cwd="/")


@dataclass
class Service:
    """One background process of the cluster (its own process group, output in ``log``)."""

    name: str
    cmd: list[str]
    env: dict[str, str]
    log: Path
    pid: int | None = None

    def start(self) -> "Service":
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as out:
            proc = subprocess.Popen(self.cmd, cwd=REPO, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        self.pid = proc.pid
        return self

    def alive(self) -> bool:
        if self.pid is None:
            return False
        try:
            os.killpg(self.pid, 0)
        except ProcessLookupError:
            return False
        try:  # reap it if it is our child and has exited
            done, _ = os.waitpid(self.pid, os.WNOHANG)
            return done == 0
        except ChildProcessError:
            return True

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to the whole process group (a Celery worker: main process and its children)."""
        if self.pid is None:
            return
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self, timeout: float = 20) -> None:
        self.kill(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while self.alive() and time.monotonic() < deadline:
            time.sleep(0.2)
        if self.alive():
            self.kill(signal.SIGKILL)


@dataclass
class Cluster:
    """Every process of a one-machine cluster under ``root`` (see the module docstring)."""

    root: Path
    workers: int = 2
    web_port: int = 3000
    redis_port: int = 0
    pg_port: int = 0
    extra_env: dict[str, str] = field(default_factory=dict)
    services: dict[str, Service] = field(default_factory=dict)
    pg_folder: Path | None = None

    @property
    def home(self) -> Path:
        return self.root / "home"

    @property
    def postgres(self) -> Postgres:
        return Postgres(self.pg_folder or self.root / "postgres", self.pg_port)

    def staging(self, worker: str) -> Path:
        return self.root / "workers" / worker / "staging"

    @property
    def worker_names(self) -> list[str]:
        return [f"worker{i}" for i in range(1, self.workers + 1)]

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of every process: the instance, its database, broker, shared folders."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DAGSTER_", "USERPILOT_SYNC_"))}
        env.update(self.postgres.env)
        env.update({
            "DAGSTER_HOME": str(self.home),
            "USERPILOT_SYNC_CELERY_BROKER": self.redis_url,
            "USERPILOT_SYNC_CELERY_BACKEND": self.redis_url,
            "USERPILOT_SYNC_COMPUTE_LOGS_DIR": str(self.root / "compute_logs"),
            "USERPILOT_SYNC_STATE_DIR": str(self.root / "state"),
            "USERPILOT_SYNC_STAGING_DIR": str(self.root / "staging"),
        })
        env.update(self.extra_env)
        env.update(extra)
        return env

    def _bin(self, name: str) -> str:
        return str(Path(sys.executable).parent / name)

    def start(self, *, ui: bool = True, daemon: bool = True, instance_config: Path | None = None) -> "Cluster":
        """Start PostgreSQL, Redis, the workers, the daemon and (``ui``) the webserver; returns
        when each answers (the webserver: its code location loaded). Raises ClusterError."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.pg_port = self.pg_port or free_port()
        self.redis_port = self.redis_port or free_port()
        self.home.mkdir(parents=True, exist_ok=True)
        config = yaml.safe_load((instance_config or CLUSTER_CONFIG).read_text())
        config.setdefault("concurrency", {}).setdefault("runs", {})["max_concurrent_runs"] = self.workers
        (self.home / "dagster.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        (self.root / "compute_logs").mkdir(exist_ok=True)
        self.postgres.start()
        self.save()  # from here on, stop() can find what runs
        redis_dir = self.root / "redis"
        redis_dir.mkdir(exist_ok=True)
        redis_bin = shutil.which("redis-server")
        if redis_bin is None:
            raise ClusterError("redis-server not found: install Debian's redis-server package "
                               "(apt-get install redis-server)")
        self._start(Service("redis", [redis_bin, "--port", str(self.redis_port), "--bind", "127.0.0.1",
                                      "--save", "", "--appendonly", "no", "--dir", str(redis_dir)],
                            self.env(), self.root / "logs" / "redis.log"))
        _wait("Redis", lambda: _port_open(self.redis_port), 30, self.root / "logs" / "redis.log")
        self._migrate()
        for name in self.worker_names:
            self.start_worker(name)
        if daemon:
            self._start(Service("daemon", [self._bin("dagster-daemon"), "run", "-w", "workspace.yaml"],
                                self.env(), self.root / "logs" / "daemon.log"))
        if ui:
            self._start(Service("webserver", [self._bin("dagster-webserver"), "-h", "127.0.0.1", "-p",
                                              str(self.web_port), "-w", "workspace.yaml"],
                                self.env(), self.root / "logs" / "webserver.log"))
        self.wait_workers()
        if ui:
            _wait(f"the webserver on port {self.web_port}", lambda: _port_open(self.web_port), 180,
                  self.root / "logs" / "webserver.log")
        self.save()
        return self

    def _migrate(self) -> None:
        """Create the instance's tables once, before several processes open the database at once."""
        code = "import dagster as dg\nwith dg.DagsterInstance.get() as i: i.get_run_ids(limit=1)"
        subprocess.run([sys.executable, "-c", code], env=self.env(), check=True, capture_output=True, cwd=REPO)

    def start_worker(self, name: str, **env: str) -> Service:
        """Start Celery worker ``name`` (one run at a time; staging ``<root>/workers/<name>/staging``)."""
        staging = self.staging(name)
        staging.mkdir(parents=True, exist_ok=True)
        worker_env = self.env(USERPILOT_SYNC_STAGING_DIR=str(staging), **env)
        service = Service(name, [self._bin("celery"), "-A", "userpilot_sync.cluster.worker", "worker",
                                 "-n", f"{name}@%h", "--concurrency", "1", "-Q", "dagster", "--loglevel", "INFO",
                                 "--without-gossip", "--without-mingle"],
                          worker_env, self.root / "logs" / f"{name}.log")
        return self._start(service)

    def wait_workers(self, names: list[str] | None = None, timeout: float = 120) -> None:
        """Wait until each worker's log says it is ready to take tasks."""
        for name in names or self.worker_names:
            service = self.services[name]
            log = service.log

            def ready() -> bool:
                if not service.alive():
                    raise ClusterError(f"Celery worker {name} exited; log {log}:\n"
                                       f"{log.read_text(errors='replace')[-3000:]}")
                return log.exists() and " ready." in log.read_text(errors="replace")

            _wait(f"Celery worker {name}", ready, timeout, log)

    def _start(self, service: Service) -> Service:
        if service.log.exists():  # a worker restarted under the same name: a fresh log
            service.log.write_text("")
        self.services[service.name] = service.start()
        return service

    # ------------------------------------------------------------------ the record in <root>/cluster.json
    def save(self) -> None:
        record = {"workers": self.workers, "web_port": self.web_port, "redis_port": self.redis_port,
                  "pg_port": self.pg_port, "extra_env": self.extra_env,
                  "pg_folder": str(self.pg_folder) if self.pg_folder else None,
                  "services": {n: asdict(s) | {"log": str(s.log)} for n, s in self.services.items()}}
        (self.root / "cluster.json").write_text(json.dumps(record, indent=2))

    @classmethod
    def load(cls, root: Path) -> "Cluster":
        record = json.loads((root / "cluster.json").read_text())
        services = {n: Service(n, s["cmd"], s["env"], Path(s["log"]), s["pid"]) for n, s in record["services"].items()}
        return cls(root, record["workers"], record["web_port"], record["redis_port"], record["pg_port"],
                   record.get("extra_env", {}), services,
                   Path(record["pg_folder"]) if record.get("pg_folder") else None)

    def stop(self) -> None:
        """Stop the webserver, daemon and workers, then Redis and PostgreSQL (data kept)."""
        order = ["webserver", "daemon", *[n for n in self.services if n.startswith("worker")], "redis"]
        for name in order + [n for n in self.services if n not in order]:
            if name in self.services:
                self.services[name].stop()
        self.postgres.stop()
        self.services.clear()
        if (self.root / "cluster.json").exists():
            self.save()

    def status(self) -> dict[str, bool]:
        state = {name: service.alive() for name, service in self.services.items()}
        state["postgres"] = (self.postgres.data / "postmaster.pid").exists() and _port_open(self.pg_port)
        return state


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m userpilot_sync.cluster.trial", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["start", "stop", "status"])
    parser.add_argument("--root", type=Path, default=REPO / ".cluster", help="folder of the trial cluster (.cluster)")
    parser.add_argument("--workers", type=int, default=2, help="Celery workers (one run at a time each)")
    parser.add_argument("--port", type=int, default=3000, help="webserver port")
    args = parser.parse_args(argv)
    root = args.root.resolve()
    if args.command == "start":
        if (root / "cluster.json").exists() and any(Cluster.load(root).status().values()):
            print(f"a trial cluster is already running in {root}: make cluster-stop first", file=sys.stderr)
            return 1
        cluster = Cluster(root, workers=args.workers, web_port=args.port)
        try:
            cluster.start()
        except (ClusterError, subprocess.CalledProcessError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            cluster.stop()
            return 1
        print(f"cluster up: webserver http://127.0.0.1:{args.port}, {args.workers} Celery workers "
              f"({', '.join(cluster.worker_names)}), PostgreSQL on port {cluster.pg_port}, Redis on port "
              f"{cluster.redis_port}; logs in {root / 'logs'}; stop with make cluster-stop")
        return 0
    if not (root / "cluster.json").exists():
        print(f"no trial cluster in {root}", file=sys.stderr)
        return 0 if args.command == "stop" else 1
    cluster = Cluster.load(root)
    if args.command == "stop":
        cluster.stop()
        print(f"cluster in {root} stopped (data kept; remove the folder to start afresh)")
        return 0
    for name, up in cluster.status().items():
        print(f"{name:<10} {'running' if up else 'stopped'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
