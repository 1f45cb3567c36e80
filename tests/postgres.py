"""A throw-away PostgreSQL server for tests: initdb + pg_ctl on a free port, in a temp dir.

PostgreSQL 15 is part of this machine kind's image (Debian's postgresql package). initdb refuses to
run as root, so as root the server runs as the `postgres` system user.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ledger.anvil import free_port


def _bindir() -> Path | None:
    for candidate in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (candidate / "initdb").is_file() and (candidate / "pg_ctl").is_file():
            return candidate
    return None


def available() -> bool:
    return _bindir() is not None and (os.geteuid() != 0 or shutil.which("runuser") is not None)


@contextmanager
def postgres_server() -> Iterator[str]:
    """Yields a SQLAlchemy URL of a fresh database; stops and removes the server afterwards."""
    bindir = _bindir()
    assert bindir is not None, "PostgreSQL server binaries are not installed (apt-get install postgresql)"
    root = Path(tempfile.mkdtemp(prefix="pg-"))
    os.chmod(root, 0o777)  # noqa: S103 - a private temp dir the postgres user must write
    data, port = root / "data", free_port()
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    try:
        subprocess.run(
            [*as_user, str(bindir / "initdb"), "-D", str(data), "-U", "test", "--auth=trust", "-E", "UTF8"],
            check=True,
            capture_output=True,
        )
        subprocess.run(
            [
                *as_user,
                str(bindir / "pg_ctl"),
                "-D",
                str(data),
                "-w",
                "-l",
                str(root / "log"),
                "-o",
                f"-p {port} -k {root} -c listen_addresses=127.0.0.1",
                "start",
            ],
            check=True,
            capture_output=True,
        )
        deadline = time.monotonic() + 30
        while (
            subprocess.run(
                [str(bindir / "pg_isready"), "-h", "127.0.0.1", "-p", str(port)], capture_output=True, check=False
            ).returncode
            != 0
        ):
            if time.monotonic() > deadline:
                raise RuntimeError("PostgreSQL did not become ready")
            time.sleep(0.1)
        yield f"postgresql+psycopg://test@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(
            [*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
            capture_output=True,
            check=False,
        )
        shutil.rmtree(root, ignore_errors=True)
