"""Step failures whose first line is the cause: sync job, partition, what happened, what to do.

Raising ``dg.Failure`` (from the step or an IO manager) makes Dagster show its description as the
step's error without its own "Error occurred while ..." wrapper, and the run's failure event
carries that step failure; the metadata names the sync job and partitions for the UI.
"""

import dagster as dg


def failure(job_name: str, label: str | None, cause: str, **metadata) -> dg.Failure:
    """A ``dg.Failure`` whose description starts with ``sync job '<job>', partition <label>: ``
    (``sync job '<job>': `` when ``label`` is None, e.g. for the lookups).

    A ``cause`` that already names the sync job is used as it is (core errors do).
    """
    if label is not None and cause.startswith(f"sync job {job_name!r}: "):
        text = f"sync job {job_name!r}, partition {label}: " + cause[len(f"sync job {job_name!r}: "):]
    elif cause.startswith(f"sync job {job_name!r}"):
        text = cause
    elif label is None:
        text = f"sync job {job_name!r}: {cause}"
    else:
        text = f"sync job {job_name!r}, partition {label}: {cause}"
    return dg.Failure(description=text, metadata={"sync_job": job_name, "partitions": label or "", **metadata},
                      allow_retries=False)


def tag_run(instance: dg.DagsterInstance, run_id: str, exc: dg.Failure) -> None:
    """Put the failure's first line on the run as tag ``userpilot_sync/failure`` (shown on the run
    page and in the runs list, next to Dagster's "Steps failed" summary)."""
    from userpilot_sync.defs.keys import FAILURE_TAG

    first_line = (exc.description or "").splitlines()[0] if exc.description else ""
    if first_line:
        instance.add_run_tags(run_id, {FAILURE_TAG: first_line[:250]})
