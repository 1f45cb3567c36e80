"""`serve`'s Prometheus multiprocess directory (`api.cli._metrics_dir`): new for each run, earlier runs'
removed, a running service's kept."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client import values

from api.cli import MULTIPROC_ENV, _metrics_dir


def test_each_run_counts_afresh_and_leaves_a_running_services_counters(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Recorded as it is now (set or not) and put back after the test: `_metrics_dir` sets it in os.environ
    # itself, and left set it sent every later in-process service's /metrics to an empty directory.
    monkeypatch.setenv(MULTIPROC_ENV, "")
    monkeypatch.delenv(MULTIPROC_ENV)
    monkeypatch.setattr(values, "ValueClass", values.ValueClass)  # put back after the test
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = tmp_path / "metrics" / ended.stdout.strip()
    alive = tmp_path / "metrics" / str(os.getppid())  # pytest's parent: runs throughout
    for run in (dead, alive):
        run.mkdir(parents=True)
        (run / "counter_1.db").write_bytes(b"x")
    path = _metrics_dir(tmp_path)
    assert path == (tmp_path / "metrics" / str(os.getpid())).resolve()
    assert os.environ[MULTIPROC_ENV] == str(path)
    assert list(path.iterdir()) == []
    assert not dead.exists()
    assert (alive / "counter_1.db").exists()
    assert values.ValueClass.__name__ == "MmapedValue"  # chosen again: this process counts into files
