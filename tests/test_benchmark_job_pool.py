"""benchmarks/job_pool.py: rows reach the rows file in job order, and a plain ``kill`` of a
benchmark stops its workers too (they used to run on, orphaned, to the end of their jobs)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.job_pool import run_jobs
from benchmarks.rows_file import read_rows

ROOT = Path(__file__).resolve().parents[1]


SET_BY_THE_PARENT_AT_RUN_TIME: str | None = None


def napping_job(job: dict) -> list[dict]:
    """A job for the pool: leave a '<job>-<pid>' file, sleep, return one row."""
    Path(job["folder"], f"{job['name']}-{os.getpid()}").touch()
    time.sleep(job["seconds"])
    return [{"job": job["name"]}]


def forked_or_spawned_job(job: dict) -> list[dict]:
    """A forked worker inherits what its parent set at run time; a spawned one imports afresh."""
    return [{"seen": SET_BY_THE_PARENT_AT_RUN_TIME}]


def alive(pid: int) -> bool:
    """Running, not gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_for(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


def test_rows_reach_the_file_in_job_order_even_when_a_later_job_finishes_first(tmp_path):
    jobs = [
        {"name": i, "seconds": 1.0 if i == 0 else 0.0, "folder": str(tmp_path)} for i in range(4)
    ]
    rows_path = tmp_path / "rows.jsonl"
    yielded = [row for job_rows in run_jobs(napping_job, jobs, workers=2, rows_path=rows_path)
               for row in job_rows]  # fmt: skip
    assert [row["job"] for row in yielded] == [0, 1, 2, 3]
    assert read_rows(rows_path) == yielded
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored


def test_workers_are_spawned_not_forked(tmp_path, monkeypatch):
    """A child forked after torch's OpenMP ran in the parent aborts."""
    monkeypatch.setattr(sys.modules[__name__], "SET_BY_THE_PARENT_AT_RUN_TIME", "parent")
    rows = list(run_jobs(forked_or_spawned_job, [{}], workers=1, rows_path=tmp_path / "r.jsonl"))
    assert rows == [[{"seen": None}]]


def test_a_plain_kill_of_the_benchmark_stops_its_workers_and_keeps_finished_rows(tmp_path):
    rows_path = tmp_path / "rows.jsonl"
    jobs = [{"name": i, "seconds": 0 if i == 0 else 600, "folder": str(tmp_path)} for i in range(3)]
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from benchmarks.job_pool import run_jobs\n"
        "from tests.test_benchmark_job_pool import napping_job\n"
        f"for rows in run_jobs(napping_job, {jobs!r}, workers=2, rows_path=Path(sys.argv[1])):\n"
        "    print(rows, flush=True)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    benchmark = subprocess.Popen(
        [sys.executable, "-c", script, str(rows_path)], cwd=ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    sleepers: list[int] = []
    try:

        def both_sleepers_started() -> bool:
            sleepers[:] = [int(p.name.split("-")[1]) for p in tmp_path.glob("[12]-*")]
            return len(sleepers) == 2 and rows_path.exists() and len(read_rows(rows_path)) == 1

        assert wait_for(both_sleepers_started, 120), benchmark.stderr and benchmark.poll()
        assert all(alive(pid) for pid in sleepers)

        benchmark.send_signal(signal.SIGTERM)
        _, stderr = benchmark.communicate(timeout=60)
        assert benchmark.returncode != 0
        assert "the same command resumes" in stderr
        assert wait_for(lambda: not any(alive(pid) for pid in sleepers), 10), sleepers
        assert read_rows(rows_path) == [{"job": 0}]
    finally:
        benchmark.kill()
        for pid in sleepers:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
