"""``python -m userpilot_sync.emulator``: run the Export API emulator until interrupted.

Serves one environment (``--app-token``, ``--api-key``) with the demo generator's events
(``--events-per-day``, ``--seed``; use the values of the sync job's demo source to get the same
data). Point a sync job at it with ``source: {kind: export_api, base_url: <printed URL>,
api_key_env: USERPILOT_API_KEY}`` and export the key into that variable.
"""

from __future__ import annotations

import argparse
import signal
import threading

from userpilot_sync.emulator.server import ExportApiEmulator


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m userpilot_sync.emulator", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8765, help="API port (default 8765; 0 = any free port)")
    parser.add_argument("--storage-port", type=int, default=0, help="port of the presigned-download host (0 = any)")
    parser.add_argument("--app-token", default="NX-demo0001")
    parser.add_argument("--api-key", default="emulator-key", help="the API key the emulator accepts")
    parser.add_argument("--events-per-day", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--chunks", type=int, default=3, help="chunk files per export job")
    parser.add_argument("--polls-to-complete", type=int, default=2, help="status polls a job stays pending")
    args = parser.parse_args(argv)

    emulator = ExportApiEmulator(
        api_key=args.api_key, app_token=args.app_token, events_per_day=args.events_per_day, seed=args.seed,
        chunks=args.chunks, polls_to_complete=args.polls_to_complete, host=args.host, port=args.port,
        storage_port=args.storage_port,
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with emulator:
        print(f"Userpilot Export API emulator: {emulator.base_url} (downloads: {emulator.storage_url}); "
              f"app token {args.app_token}; Ctrl-C to stop", flush=True)
        try:
            stop.wait()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
