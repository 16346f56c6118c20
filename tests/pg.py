"""PostgreSQL for the tests: one server per session, started by the suite with Debian's server
binaries (`initdb` + `pg_ctl`, the newest /usr/lib/postgresql/*/bin) on a free loopback port,
its data and unix socket in a temporary directory; one new database per test.

    pg_server            # the session's server (a fixture): .url(db), .admin()
    pg_url               # a fresh, empty database of its own for one test (a fixture)

As root (initdb refuses root), the server runs as the `postgres` user (or `nobody`) through
`runuser`, in a directory it owns. Roles: `opsbay` (trust, a superuser) and `opsbay_pw`, who
must give a password (scram-sha-256) for the tests of secrets.

OPSBAY_TEST_PG_URL=postgresql://USER@HOST:PORT/DB names an existing server instead (USER may
create databases; the tests that need this file's roles and pg_hba are skipped there). It is
never the default: the suite never uses a server it did not start unless told to, and never the
host's own service on 5432."""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.harness import HOST, free_port, wait_until

INSTALL_HINT = "sudo apt-get install -y postgresql"
USER = "opsbay"
PASSWORD_USER, PASSWORD = "opsbay_pw", "s3cret-Pa55:w@rd/%"
START_S = 60.0
SERVER_SETTINGS = {
    "listen_addresses": f"'{HOST}'",
    "fsync": "off",  # a test server: nothing to keep over a crash of the machine
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "deadlock_timeout": "'100ms'",  # the deadlock test waits for the detector
    "max_connections": "200",
    "log_min_messages": "warning",
}


def find_bin_dir() -> Path:
    """The newest PostgreSQL server binaries: /usr/lib/postgresql/N/bin, or initdb on PATH."""
    found = sorted(
        (p for p in Path("/usr/lib/postgresql").glob("*/bin") if (p / "initdb").is_file()),
        key=lambda p: [int(x) for x in re.findall(r"\d+", p.parent.name)] or [0],
    )
    if found:
        return found[-1]
    initdb = shutil.which("initdb")
    if initdb is None:
        raise RuntimeError(f"PostgreSQL's server binaries are not installed: {INSTALL_HINT}")
    return Path(initdb).parent


def _server_user() -> str | None:
    """Who runs the server: None (us) unless we are root, whom initdb and postgres refuse."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    raise RuntimeError("running as root, and there is neither a postgres nor a nobody user")


@dataclass
class PgServer:
    """A server the suite started (`own`), or the one OPSBAY_TEST_PG_URL names."""

    host: str
    port: int
    admin_url: str
    own: bool
    directory: Path | None = None
    bin_dir: Path | None = None
    run_as: str | None = None
    password_user: str = PASSWORD_USER
    password: str = PASSWORD
    databases: list[str] = field(default_factory=list)

    def url(self, db: str, user: str = USER, password: str | None = None) -> str:
        if not self.own:
            parts = psycopg.conninfo.conninfo_to_dict(self.admin_url)
            parts["dbname"] = db
            return psycopg.conninfo.make_conninfo(**parts)  # type: ignore[arg-type]
        who = user if password is None else f"{user}:{_quote(password)}"
        return f"postgresql://{who}@{self.host}:{self.port}/{db}"

    def admin(self) -> psycopg.Connection[tuple[Any, ...]]:
        return psycopg.connect(self.admin_url, autocommit=True, connect_timeout=10)

    def create_database(self, owner: str = USER) -> str:
        name = f"t_{uuid.uuid4().hex[:16]}"
        with self.admin() as db:
            db.execute(f'CREATE DATABASE "{name}" OWNER "{owner}"')  # type: ignore[arg-type]
        self.databases.append(name)
        return name

    def drop_database(self, name: str) -> None:
        with self.admin() as db:
            db.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')  # type: ignore[arg-type]

    def stop(self) -> None:
        """pg_ctl stop -m fast; then SIGKILL of the postmaster if it is still there."""
        if not self.own or self.directory is None or self.bin_dir is None:
            return
        data = self.directory / "data"
        try:
            self._run([str(self.bin_dir / "pg_ctl"), "stop", "-D", str(data), "-m", "fast",
                       "-w", "-t", "30"], timeout=40)  # fmt: skip
        except (subprocess.SubprocessError, OSError):
            pid_file = data / "postmaster.pid"
            if pid_file.exists():
                pid = int(pid_file.read_text().split()[0])
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.directory, ignore_errors=True)

    def _run(self, argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
        prefix = ["runuser", "-u", self.run_as, "--"] if self.run_as else []
        return subprocess.run(
            prefix + argv,
            check=True,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )


def _quote(text: str) -> str:
    from urllib.parse import quote

    return quote(text, safe="")


def start_pg(bin_dir: Path | None = None) -> PgServer:
    """initdb a new cluster in a new temporary directory and start it on a free loopback port
    (pg_ctl -w waits until it accepts connections, at most START_S); try three ports."""
    bin_dir = bin_dir or find_bin_dir()
    run_as = _server_user()
    directory = Path(tempfile.mkdtemp(prefix="opsbay-pg-"))
    if run_as is not None:  # its own directory: root's pytest tmp folders are closed to others
        entry = pwd.getpwnam(run_as)
        os.chown(directory, entry.pw_uid, entry.pw_gid)
    server = PgServer(HOST, 0, "", True, directory, bin_dir, run_as)
    data = directory / "data"
    try:
        server._run([str(bin_dir / "initdb"), "-D", str(data), "-U", USER, "--auth=trust",
                     "-E", "UTF8", "--no-locale", "--no-sync"], timeout=120)  # fmt: skip
        (data / "pg_hba.conf").write_text(
            "local all all trust\n"
            f"host all {PASSWORD_USER} {HOST}/32 scram-sha-256\n"
            f"host all all {HOST}/32 trust\n"
        )
        last = ""
        for _attempt in range(3):  # a free port can be taken between the probe and the bind
            port = free_port()
            settings = {**SERVER_SETTINGS, "port": str(port),
                        "unix_socket_directories": f"'{directory}'"}  # fmt: skip
            with open(data / "postgresql.conf", "a") as conf:
                conf.write("".join(f"{k} = {v}\n" for k, v in settings.items()))
            try:
                server._run([str(bin_dir / "pg_ctl"), "start", "-D", str(data), "-w",
                             "-t", str(int(START_S)), "-l", str(directory / "server.log")],
                            timeout=START_S + 10)  # fmt: skip
            except subprocess.CalledProcessError as e:
                last = (directory / "server.log").read_text(errors="replace")[-2000:] or e.stderr
                continue
            server.port = port
            server.admin_url = f"postgresql://{USER}@{HOST}:{port}/postgres"
            break
        else:
            raise RuntimeError(f"PostgreSQL did not start: {last}")
        with server.admin() as db:
            db.execute(
                f"CREATE ROLE {PASSWORD_USER} LOGIN CREATEDB PASSWORD '{PASSWORD}'"  # type: ignore[arg-type]
            )
        return server
    except BaseException:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)
        raise


def external_pg(url: str) -> PgServer:
    parts = psycopg.conninfo.conninfo_to_dict(url)
    server = PgServer(str(parts.get("host", "")), int(parts.get("port") or 5432), url, False)
    wait_until(lambda: _answers(url), 10, "the PostgreSQL of OPSBAY_TEST_PG_URL to answer")
    return server


def _answers(url: str) -> bool:
    try:
        psycopg.connect(url, connect_timeout=2).close()
        return True
    except psycopg.OperationalError:
        return False


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    given = os.environ.get("OPSBAY_TEST_PG_URL")
    if given:
        yield external_pg(given)
        return
    try:
        bin_dir = find_bin_dir()
    except RuntimeError as e:  # fail, never skip: the record's second backend is tested here
        pytest.fail(f"{e} (or run ./scripts/test.sh, which installs it)")
    server = start_pg(bin_dir)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def pg_url(pg_server: PgServer) -> Iterator[str]:
    """A new, empty database for one test (dropped after it)."""
    name = pg_server.create_database()
    yield pg_server.url(name)
    pg_server.drop_database(name)


@pytest.fixture
def own_pg(pg_server: PgServer) -> PgServer:
    """The suite's own server (its roles and pg_hba), or a skip under OPSBAY_TEST_PG_URL."""
    if not pg_server.own:
        pytest.skip("needs the suite's own PostgreSQL (its password role), not OPSBAY_TEST_PG_URL")
    return pg_server
