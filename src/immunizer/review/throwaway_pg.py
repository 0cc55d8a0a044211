"""A throwaway PostgreSQL cluster on loopback, for the tests and the throughput benchmark.

`initdb` into a temporary folder, `pg_ctl start` on a free port with the unix socket in that
folder, stop and delete on exit. initdb refuses to run as root, so as root the server runs as
the `postgres` system user (the Debian package creates it).
"""
from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import uuid

from immunizer.errors import ImmunizerError


def postgres_bindir() -> str | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    return os.path.dirname(found[-1]) if found else (os.path.dirname(shutil.which("initdb")) if shutil.which("initdb") else None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    def __init__(self, port: int):
        self.port = port
        self.url = f"postgresql://postgres@127.0.0.1:{port}/postgres"

    def create_database(self, name: str | None = None) -> str:
        """A new empty database; returns its URL."""
        import psycopg

        name = name or f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres", autocommit=True) as c:
            c.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"


@contextlib.contextmanager
def throwaway_postgres(fsync: bool = True):
    bindir = postgres_bindir()
    if bindir is None:
        raise ImmunizerError("PostgreSQL server binaries not found (/usr/lib/postgresql/*/bin/initdb): "
                             "`apt-get install -y postgresql` (make test does it)")
    as_root = os.geteuid() == 0
    # as root the server runs as `postgres`, which must reach the folder: /tmp, not a private $TMPDIR
    root = tempfile.mkdtemp(prefix="immunizer-pg-", dir="/tmp" if as_root else None)
    run_as = []
    if as_root:
        os.chmod(root, 0o755)
        shutil.chown(root, "postgres", "postgres")
        run_as = ["runuser", "-u", "postgres", "--"]
    data, port = os.path.join(root, "data"), free_port()
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c max_connections=100"
    if not fsync:
        options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"

    def pg(*args):
        # cwd: the server user may not be allowed into the caller's folder
        result = subprocess.run(run_as + list(args), capture_output=True, text=True, cwd=root)
        if result.returncode != 0:
            log = open(os.path.join(root, "log")).read()[-2000:] if os.path.exists(os.path.join(root, "log")) else ""
            raise ImmunizerError(f"{' '.join(args[:2])} failed: {result.stderr.strip()[-2000:]}\n{log}")

    try:
        pg(f"{bindir}/initdb", "-D", data, "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync")
        pg(f"{bindir}/pg_ctl", "-D", data, "-l", os.path.join(root, "log"), "-w", "-t", "60", "-o", options, "start")
        try:
            yield Cluster(port)
        finally:
            pg(f"{bindir}/pg_ctl", "-D", data, "-m", "fast", "-w", "stop")
    finally:
        shutil.rmtree(root, ignore_errors=True)
