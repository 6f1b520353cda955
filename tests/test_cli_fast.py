"""`smtpgate status` without pydantic, asyncio or aiosqlite (smtpgate/status.py): the same output
as the store's path, byte for byte, and the full path whenever the fast one could differ."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import logging
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from smtpgate import cli, status
from smtpgate.config import ENV_PREFIX, ConfigError, Settings, load_settings
from smtpgate.model import Action, Decision, Envelope, JobState, MailKind, NewTicket, OutboundMail
from smtpgate.model import Path as Branch
from smtpgate.store import Store, new_queue_id
from smtpgate.store.schema import MIGRATIONS

ROOT = Path(__file__).resolve().parent.parent
ACME, GLOBEX = "CRDACME0000000000001", "CRDGLOBEX00000000002"
HEAVY = (
    "pydantic",
    "pydantic_settings",
    "asyncio",
    "aiosqlite",
    "smtpgate.config",
    "smtpgate.store",
)


async def populate(db_path: Path) -> None:
    """Every state in both queues, accounts and tickets, all through the Store API."""
    store = await Store.open(db_path)
    try:
        await store.import_accounts(
            [(2, {"rec_id": ACME, "file_as": "Acme"}), (3, {"rec_id": GLOBEX, "file_as": "Globex"})]
        )
        env = Envelope("127.0.0.1", "helo", "a@example.org", ("connector@localhost",))
        for i in range(6):
            raw = f"Subject: m{i}\r\n\r\nbody {i}\r\n".encode()
            await store.enqueue(env, raw, f"<m{i}@example.org>", new_queue_id())
        done1, done2, dead, retried, active = await store.claim(5, lease_seconds=300)

        def ticket(account: str, i: int) -> Decision:
            def mails(_: Any) -> list[OutboundMail]:
                return [
                    OutboundMail(MailKind.FORWARD, "c@localhost", (f"r{i}{k}@x.example",), b"x")
                    for k in range(2)
                ]

            return Decision(
                Branch.AUTOMATED,
                Action.AUTOMATED_TICKET,
                account=account,
                new_ticket=NewTicket(account, None, f"t{i}", "body", "test", "note"),
                mails=mails,
            )

        for i, (job, account) in enumerate([(done1, ACME), (done2, GLOBEX)]):
            outcome = await store.complete(
                job, ticket(account, i), dedupe_key=job.message_id, auto_mail_hourly_limit=20
            )
            assert outcome is not None
        assert await store.fail(dead, "broken", max_attempts=1, backoff=60)
        assert not await store.fail(retried, "later", max_attempts=5, backoff=60)
        assert active.id  # stays active (leased)
        sent, failed, retry, leased = await store.claim_deliveries(4, lease_seconds=300)
        await store.delivery_done([sent.id])
        await store.delivery_failed(failed.id, "550 no", None)
        await store.delivery_failed(retry.id, "451 later", time.time() + 60)
        assert leased.id  # stays active
    finally:
        await store.close()


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    data = tmp_path / "var"
    asyncio.run(populate(data / "smtpgate.db"))
    return data


@pytest.fixture
def only_data_dir(monkeypatch: pytest.MonkeyPatch, clean_env: None, data_dir: Path) -> Path:
    """The environment of a monitoring probe: SMTPGATE_DATA_DIR only, no .env."""
    monkeypatch.setenv("SMTPGATE_DATA_DIR", str(data_dir))
    return data_dir


def frozen_now(monkeypatch: pytest.MonkeyPatch, db_path: Path) -> float:
    """Freeze time.time() (both paths compute the oldest queued age from it)."""
    with contextlib.closing(sqlite3.connect(db_path)) as db:
        (oldest,) = db.execute(
            "SELECT min(received_at) FROM inbound WHERE state = 'queued'"
        ).fetchone()
    now = float(oldest) + 12.3456
    monkeypatch.setattr(time, "time", lambda: now)
    return now


def captured(fn: Any, *args: Any) -> tuple[Any, str]:
    """fn(*args) and its stdout; the logging set-up of main() is undone for the test runner."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            result = fn(*args)
    finally:
        root.handlers[:], root.level = handlers, level
    return result, out.getvalue()


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No inherited SMTPGATE_* variable, and a working directory without a .env file."""
    for key in [k for k in os.environ if k.upper().startswith(ENV_PREFIX)]:
        monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)


def full_path_output(data_dir: Path, as_json: bool) -> str:
    """What `smtpgate status` printed before the fast path: cmd_status on the Store."""
    settings = Settings(data_dir=data_dir, _env_file=None)
    args = argparse.Namespace(json=as_json)
    code, out = captured(asyncio.run, cli.cmd_status(settings, None, args))
    assert code == 0
    return str(out)


def heavy_modules_after(args: list[str], env: dict[str, str], cwd: Path) -> tuple[int, str, str]:
    """Run cli.main(args) in a fresh interpreter; stderr's last line lists heavy imports."""
    code = (
        "import sys\nfrom smtpgate.cli import main\nrc = main(sys.argv[1:])\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules), file=sys.stderr)\n"
        "sys.exit(rc)\n"
    )
    environ = {k: v for k, v in os.environ.items() if not k.upper().startswith(ENV_PREFIX)}
    environ.update(PYTHONPATH=str(ROOT), **env)
    done = subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=cwd,
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return done.returncode, done.stdout, done.stderr


# --- same answer ---------------------------------------------------------------------------------


async def test_read_status_equals_store_status(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    db_path = tmp_path / "var" / "smtpgate.db"
    await populate(db_path)
    frozen_now(monkeypatch, db_path)
    store = await Store.open(db_path)
    try:
        expected = await store.status()
    finally:
        await store.close()
    fast = status.read_status(db_path)
    assert fast == expected
    with contextlib.closing(sqlite3.connect(db_path)) as db:
        db.row_factory = sqlite3.Row  # as on the store's reader (for Store.status)
        assert status.query_status(db) == expected
    assert json.dumps(fast) == json.dumps(expected)  # key order too
    assert fast["inbound"] == {
        "queued": 2, "active": 1, "done": 2, "dead": 1, "oldest_queued_age_s": 12.346,
    }  # fmt: skip
    assert fast["outbox"] == {"queued": 1, "active": 1, "done": 1, "dead": 1}
    assert (fast["accounts"], fast["tickets"]) == (2, 2)


@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
def test_fast_path_output_is_byte_identical_to_the_full_path(
    monkeypatch: pytest.MonkeyPatch, only_data_dir: Path, as_json: bool
) -> None:
    frozen_now(monkeypatch, only_data_dir / "smtpgate.db")
    expected = full_path_output(only_data_dir, as_json)

    async def no_store(*_: Any) -> int:
        raise AssertionError("status took the full path")

    monkeypatch.setattr(cli, "_with_store", no_store)
    code, out = captured(cli.main, ["status", *(["--json"] if as_json else [])])
    assert code == 0
    assert out == expected


def test_text_output_is_unchanged() -> None:
    """The exact lines `smtpgate status` has always printed (monitoring parses them)."""
    data = {
        "inbound": {"queued": 2, "active": 1, "done": 30, "dead": 4, "oldest_queued_age_s": 1.5},
        "outbox": {"queued": 5, "active": 6, "done": 7, "dead": 0},
        "accounts": 3,
        "tickets": 9,
    }
    assert status.render_status(data, as_json=False) == (
        "inbound: 2 queued, 1 active, 30 done, 4 dead; oldest queued 1.5 s\n"
        "outbox:  5 queued, 6 active, 7 done, 0 dead\n"
        "accounts: 3  tickets: 9"
    )
    assert status.render_status(data, as_json=True) == json.dumps(data, indent=2)


def test_empty_queue_reports_age_0(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    db_path = tmp_path / "smtpgate.db"

    async def create() -> None:
        await (await Store.open(db_path)).close()

    asyncio.run(create())
    assert status.read_status(db_path)["inbound"] == {
        "queued": 0, "active": 0, "done": 0, "dead": 0, "oldest_queued_age_s": 0,
    }  # fmt: skip


def test_names_and_defaults_agree_with_config() -> None:
    assert status.ENV_PREFIX == ENV_PREFIX
    assert MIGRATIONS[-1][0] == status.SCHEMA_VERSION
    assert tuple(s.value for s in JobState) == status.STATES
    assert Settings.model_fields["data_dir"].default == Path(status.DEFAULT_DATA_DIR)
    assert Settings.model_config.get("env_file") == status.ENV_FILE
    assert not Settings.model_config.get("case_sensitive")  # so names are matched in any case
    assert Settings(data_dir=Path("x"), _env_file=None).db_path == Path("x") / status.DB_NAME


# --- the fast path in a real process -------------------------------------------------------------


@pytest.mark.parametrize("args", [["status"], ["status", "--json"]], ids=["text", "json"])
def test_fast_path_imports_neither_pydantic_nor_asyncio(data_dir: Path, args: list[str]) -> None:
    rc, out, err = heavy_modules_after(args, {"SMTPGATE_DATA_DIR": str(data_dir)}, data_dir)
    assert rc == 0, err
    assert err.strip().splitlines()[-1] == "[]"
    assert "2 queued, 1 active, 2 done, 1 dead" in out or '"queued": 2' in out


def test_status_answers_despite_an_invalid_unrelated_setting_which_other_verbs_refuse(
    data_dir: Path,
) -> None:
    env = {"SMTPGATE_DATA_DIR": str(data_dir), "SMTPGATE_WORKERS": "0"}
    rc, out, err = heavy_modules_after(["status"], env, data_dir)
    assert rc == 0, err
    assert err.strip().splitlines()[-1] == "[]"  # and quickly: no pydantic, no asyncio
    assert "2 queued, 1 active, 2 done, 1 dead" in out
    rc, out, err = heavy_modules_after(["queue", "list"], env, data_dir)
    assert rc == 2
    assert "SMTPGATE_WORKERS" in err
    assert "Traceback" not in err


def test_help_still_lists_every_verb(tmp_path: Path) -> None:
    rc, out, _ = heavy_modules_after(["--help"], {}, tmp_path)
    assert rc == 0
    for verb in ("serve", "status", "explain", "queue", "outbox", "tickets", "accounts",
                 "contacts", "employees", "rules", "backup"):  # fmt: skip
        assert verb in out


# --- when the full path answers ------------------------------------------------------------------


@pytest.mark.parametrize("args", [["status"], ["queue", "list"]])
def test_a_dot_env_that_cannot_be_read_is_one_line(
    monkeypatch: pytest.MonkeyPatch, clean_env: None, data_dir: Path, args: list[str]
) -> None:
    """`sudo -u smtpgate smtpgate status` from /root (mode 0700, where `sudo -i` leaves an
    admin): looking for ./.env fails with EACCES, and every verb ended in a traceback."""
    monkeypatch.setenv("SMTPGATE_DATA_DIR", str(data_dir))
    is_file = Path.is_file

    def denied(path: Path) -> bool:  # what stat(2) answers there (root itself is never denied)
        if path.name == ".env":
            raise PermissionError(13, "Permission denied", str(path))
        return is_file(path)

    monkeypatch.setattr(Path, "is_file", denied)
    read_bytes = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda path: denied(path) and read_bytes(path))
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code, out = captured(cli.main, args)
    assert code == 2
    assert out == ""
    (line,) = err.getvalue().strip().splitlines()
    assert ".env" in line
    assert "Permission denied" in line
    assert "directory" in line  # what to do: start it from a directory its user can read


def test_a_missing_database_is_an_error_not_an_empty_healthy_queue(
    monkeypatch: pytest.MonkeyPatch, clean_env: None, tmp_path: Path
) -> None:
    """A mistyped SMTPGATE_DATA_DIR must not look to monitoring like an idle gateway."""
    data = tmp_path / "fresh" / "var"
    monkeypatch.setenv("SMTPGATE_DATA_DIR", str(data))
    assert status.fast_status(as_json=False) is None
    assert not data.exists()  # the fast path creates nothing
    code, out = captured(cli.main, ["status"])
    assert code == 1
    assert out == ""
    assert not (data / "smtpgate.db").exists()  # nor does the full path


def test_an_empty_database_file_is_no_store(
    monkeypatch: pytest.MonkeyPatch, clean_env: None, tmp_path: Path
) -> None:
    """An empty file was given the schema by `status` (which only reads): now it is reported
    as no store, as a missing one is (test_cli.test_an_empty_store_file_is_no_store)."""
    data = tmp_path / "var"
    data.mkdir()
    sqlite3.connect(data / "smtpgate.db").close()
    monkeypatch.setenv("SMTPGATE_DATA_DIR", str(data))
    assert status.fast_status(as_json=True) is None
    code, out = captured(cli.main, ["status", "--json"])
    assert (code, out) == (1, "")
    assert (data / "smtpgate.db").stat().st_size == 0


@pytest.mark.parametrize(
    "environ",
    [
        {"SMTPGATE_DATA_DIR": "/d", "SMTPGATE_LOG_LEVEL": "INFO"},
        {"SMTPGATE_DATA_DIR": "/d", "smtpgate_workers": "0"},
        {"SMTPGATE_DATA_DIR": "/d", "SMTPGATE_NOT_A_SETTING": "x"},
    ],
)
def test_status_reads_only_the_data_dir(tmp_path: Path, environ: dict[str, str]) -> None:
    assert status.db_path_from_env(environ, tmp_path / "none") == Path("/d/smtpgate.db")


def test_the_data_dir_given_twice_needs_the_full_path(tmp_path: Path) -> None:
    environ = {"SMTPGATE_DATA_DIR": "/d", "smtpgate_data_dir": "/e"}
    assert status.db_path_from_env(environ, tmp_path / "none") is None


@pytest.mark.parametrize("value", ["", " "])
def test_an_empty_data_dir_is_refused_naming_it(
    monkeypatch: pytest.MonkeyPatch, clean_env: None, tmp_path: Path, value: str
) -> None:
    """It would quietly mean the current directory."""
    monkeypatch.setenv("SMTPGATE_DATA_DIR", value)
    with pytest.raises(ConfigError, match="SMTPGATE_DATA_DIR"):
        load_settings(_env_file=None)
    assert status.db_path_from_env({"SMTPGATE_DATA_DIR": value}, tmp_path / "none") is None


@pytest.mark.parametrize("value", ["var", " /tmp/a ", "a//b/", "~/x", "/tmp/$HOME"])
def test_the_data_dir_means_what_config_says(
    monkeypatch: pytest.MonkeyPatch, clean_env: None, tmp_path: Path, value: str
) -> None:
    monkeypatch.setenv("SMTPGATE_DATA_DIR", value)
    expected = Settings(_env_file=None).db_path
    assert status.db_path_from_env({"SMTPGATE_DATA_DIR": value}, tmp_path / "none") == expected
    assert status.db_path_from_env({"Smtpgate_Data_Dir": value}, tmp_path / "none") == expected


def test_the_default_data_dir(clean_env: None, tmp_path: Path) -> None:
    expected = Settings(_env_file=None).db_path
    assert status.db_path_from_env({"PATH": "/bin"}, tmp_path / "none") == expected


def test_a_dot_env_file_that_may_set_the_data_dir_needs_the_full_path(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    environ = {"SMTPGATE_DATA_DIR": "/d"}
    env_file.write_text("OTHER_TOOL=1\n", encoding="utf-8")
    assert status.db_path_from_env(environ, env_file) == Path("/d/smtpgate.db")
    env_file.write_text("smtpgate_workers=0\n", encoding="utf-8")
    assert status.db_path_from_env(environ, env_file) == Path("/d/smtpgate.db")
    for text in ("smtpgate_data_dir=/e\n", "export SMTPGATE_DATA_DIR=/e\n"):
        env_file.write_text(text, encoding="utf-8")
        assert status.db_path_from_env(environ, env_file) is None
    env_file.write_bytes(b"\xff\xfe")  # not UTF-8: config.py reports it
    assert status.db_path_from_env(environ, env_file) is None
    env_file.unlink()
    env_file.mkdir()
    assert status.db_path_from_env(environ, env_file) is None


# --- read-only -----------------------------------------------------------------------------------


def test_the_fast_path_changes_nothing_and_waits_for_no_writer(
    monkeypatch: pytest.MonkeyPatch, only_data_dir: Path
) -> None:
    db_path = only_data_dir / "smtpgate.db"
    with contextlib.closing(sqlite3.connect(db_path)) as db:
        before = list(db.iterdump())
    writer = sqlite3.connect(db_path, isolation_level=None)
    try:
        writer.execute("BEGIN IMMEDIATE")  # a server committing right now
        writer.execute(
            "INSERT INTO accounts (rec_id, file_as, created_at, updated_at)"
            " VALUES ('CRDNEW00000000000003', 'New', 'x', 'x')"
        )
        t = time.monotonic()
        code, out = captured(status.fast_status, True)
        assert time.monotonic() - t < 2
        assert code == 0
        assert json.loads(out)["accounts"] == 2  # the committed snapshot
    finally:
        writer.execute("ROLLBACK")
        writer.close()
    with contextlib.closing(sqlite3.connect(db_path)) as db:
        assert list(db.iterdump()) == before


def test_text_log_lines_carry_each_records_utc_time() -> None:
    """The text format's time (its strftime kept for the second) follows every record: across
    a second's end, and the milliseconds of each line."""
    formatter = cli.TextFormatter("%(asctime)s %(message)s")
    for created in (1795781087.001, 1795781087.999, 1795781088.0, 1795781088.5, 86400.25):
        record = logging.LogRecord("smtpgate", logging.INFO, "", 0, "m", None, None)
        record.created = created
        record.msecs = (created - int(created)) * 1000
        expected = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(created))
        assert formatter.format(record) == f"{expected},{int(record.msecs):03d} m"
