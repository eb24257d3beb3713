"""Worker processes for a long benchmark's jobs, feeding its rows file (``rows_file``).

- Spawned, not forked: a child forked after torch's OpenMP ran in the parent (a target trained
  there) aborts with "fork() called from a process already using GNU OpenMP".
- Each finished job's rows are appended to the rows file at once, in job order, so an
  interrupted run loses only the jobs that were running.
- A plain ``kill`` (SIGTERM) of the benchmark stops it as Ctrl-C does, and the workers stop with
  it: without this they ran on, orphaned, to the end of their jobs (and a service the benchmark
  started stayed up).
"""

from __future__ import annotations

import json
import multiprocessing
import signal
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

Rows = list[dict[str, Any]]


def run_jobs(
    run_job: Callable[[dict[str, Any]], Rows],
    jobs: list[dict[str, Any]],
    *,
    workers: int,
    rows_path: Path,
) -> Iterator[Rows]:
    """Run ``jobs`` on ``workers`` processes; yield each job's rows, in job order, once they
    are in ``rows_path``. ``run_job`` must be importable (a module-level function)."""
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    before = set(multiprocessing.active_children())
    context = multiprocessing.get_context("spawn")
    try:
        with ProcessPoolExecutor(workers, mp_context=context) as pool, rows_path.open("a") as sink:
            try:
                for job_rows in pool.map(run_job, jobs):
                    sink.writelines(json.dumps(row) + "\n" for row in job_rows)
                    sink.flush()
                    yield job_rows
            except BaseException as exc:
                # the pool's exit would wait for the running jobs: stop them instead
                for worker in set(multiprocessing.active_children()) - before:
                    worker.terminate()
                if isinstance(exc, KeyboardInterrupt):
                    print(
                        f"stopped: finished jobs' rows are in {rows_path}; the same command "
                        "resumes from them",
                        file=sys.stderr,
                    )
                raise
    finally:
        signal.signal(signal.SIGTERM, previous)
