"""A throwaway PostgreSQL server (with pgvector) for the tests, as pytest fixtures.

``pg_server`` (session) runs ``initdb`` into a temporary directory and starts a server on a free
loopback port, dropping to the ``postgres`` user (or ``nobody``) when the tests run as root,
since PostgreSQL refuses to. ``pg_url`` (per test) gives a URL whose ``search_path`` starts
with a fresh schema, so every test sees empty tables.

Without the server binaries, pgvector or psycopg the fixtures skip, except under CI
(``CI=true``), where they fail so that a missing install step cannot pass unnoticed. The
binaries are found in ``$SKINFLINT_PG_BINDIR``, ``/usr/lib/postgresql/*/bin`` (newest first),
then ``pg_config --bindir`` and the ``PATH``.

``tests/conftest.py`` registers the fixtures for every test, so that one server serves the
whole run.
"""

from __future__ import annotations

import contextlib
import importlib
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, NoReturn
from urllib.parse import quote

import pytest

__all__ = [
    "PgServer", "free_port", "import_or_skip", "pg_server_fixture", "pg_url_fixture", "unavailable",
]

_TOOLS = ("initdb", "pg_ctl", "postgres")
_schemas = itertools.count(1)


def unavailable(reason: str, server: str = "PostgreSQL") -> NoReturn:
    """Skip with ``reason``, or fail under CI, where a missing dependency is a broken build."""
    if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
        pytest.fail(f"{server} tests cannot run under CI: {reason}", pytrace=False)
    pytest.skip(f"{server} tests skipped: {reason}", allow_module_level=True)


def import_or_skip(name: str) -> ModuleType:
    """Import ``name``, or skip (fail under CI) when a PostgreSQL client package is missing."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        unavailable(f"{exc} (pip install 'psycopg[binary]' psycopg-pool pgvector)")


@dataclass(frozen=True)
class PgServer:
    bindir: Path
    port: int
    url: str  # the superuser's URL to the ``postgres`` database


def _candidates() -> Iterator[Path]:
    if env := os.environ.get("SKINFLINT_PG_BINDIR"):
        yield Path(env)

    def version(path: Path) -> tuple[int, ...]:
        return tuple(int(p) for p in path.parent.name.split(".") if p.isdigit())

    yield from sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=version, reverse=True)
    if pg_config := shutil.which("pg_config"):
        with contextlib.suppress(OSError, subprocess.CalledProcessError):
            out = subprocess.run([pg_config, "--bindir"], capture_output=True, check=True)
            yield Path(out.stdout.decode().strip())
    if initdb := shutil.which("initdb"):
        yield Path(initdb).resolve().parent


def find_bindir() -> Path | None:
    """The first directory holding ``initdb``, ``pg_ctl`` and ``postgres``."""
    for path in _candidates():
        if all((path / tool).is_file() for tool in _TOOLS):
            return path
    return None


def _server_user() -> dict[str, Any]:
    """subprocess arguments that drop root to an unprivileged user; {} when not root."""
    if os.geteuid() != 0:
        return {}
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            entry = pwd.getpwnam(name)
            return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
    unavailable("running as root and there is neither a 'postgres' nor a 'nobody' user")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _run(args: list[str], user: dict[str, Any]) -> None:
    done = subprocess.run(args, capture_output=True, check=False, **user)
    if done.returncode != 0:
        output = (done.stdout + done.stderr).decode(errors="replace").strip()
        raise RuntimeError(f"{' '.join(args[:2])} failed ({done.returncode}): {output[-2000:]}")


def _start(bindir: Path, root: Path, user: dict[str, Any]) -> int:
    """initdb and start a server in ``root``; returns its port."""
    data = root / "data"
    _run([str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
          "--encoding=UTF8", "--locale=C", "--no-sync", "--no-instructions"], user)
    port = free_port()
    # Durability is pointless for a throwaway server and costs seconds of fsync.
    options = (f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
               " -c synchronous_commit=off -c full_page_writes=off")
    _run([str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-o", options,
          "-w", "-t", "30", "start"], user)
    return port


def _stop(bindir: Path, root: Path, user: dict[str, Any]) -> None:
    with contextlib.suppress(RuntimeError):
        _run([str(bindir / "pg_ctl"), "-D", str(root / "data"), "-m", "immediate", "stop"], user)
    shutil.rmtree(root, ignore_errors=True)


def _create_vector_extension(url: str) -> str | None:
    """Create pgvector in the ``public`` schema; returns why it failed, or None."""
    psycopg = import_or_skip("psycopg")
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
    except psycopg.Error as exc:
        return f"pgvector is not installed for this server ({str(exc).strip()})"
    return None


@pytest.fixture(scope="session", name="pg_server")
def pg_server_fixture() -> Iterator[PgServer]:
    bindir = find_bindir()
    if bindir is None:
        unavailable("no PostgreSQL server binaries (initdb, pg_ctl, postgres) found;"
                    " apt-get install postgresql")
    user = _server_user()
    root = Path(tempfile.mkdtemp(prefix="skinflint-pg-"))
    if user:
        os.chown(root, user["user"], user["group"])
    try:
        port = _start(bindir, root, user)
    except (RuntimeError, OSError) as exc:
        shutil.rmtree(root, ignore_errors=True)
        unavailable(f"could not start PostgreSQL from {bindir}: {exc}")
    try:
        server = PgServer(bindir, port, f"postgresql://postgres@127.0.0.1:{port}/postgres")
        if reason := _create_vector_extension(server.url):
            unavailable(reason)
        yield server
    finally:
        _stop(bindir, root, user)


@pytest.fixture(name="pg_url")
def pg_url_fixture(pg_server: PgServer) -> Iterator[str]:
    """A URL whose tables land in a new, empty schema (``public`` stays on the path, for the
    ``vector`` type); the schema is dropped afterwards."""
    psycopg = import_or_skip("psycopg")
    schema = f"test_{os.getpid()}_{next(_schemas)}"
    with psycopg.connect(pg_server.url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    yield pg_server.url + "?options=" + quote(f"-csearch_path={schema},public", safe="")
    with psycopg.connect(pg_server.url, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA {schema} CASCADE")
