"""`smtpgate status`: one definition of the status queries and output, and a fast path for the CLI.

Monitoring polls `smtpgate status`, so it has to start fast (< 200 ms with a million queued rows).
Its queries take 0.5 ms; pydantic-settings, asyncio and aiosqlite take ~150 ms to import. This
module therefore uses only the standard library:

- `query_status` is the status from an open sqlite3 connection: the CLI's read-only one here
  (`read_status`), and meant for the store's reader too (`Store.status`), so there is one
  definition of the queries and the result; `render_status` is the command's output for both.
- `fast_status` answers the command with the stdlib `sqlite3`, read-only. `status` reads only
  `SMTPGATE_DATA_DIR` (any text is a valid path) and does not judge the other settings: a typo in
  a relay setting must not blind the monitoring; `serve` and every other verb validate them all
  and exit 2 naming an invalid one. When the database does not exist yet (or lacks the tables
  and index it reads) it returns None and the CLI takes the full path, which says so (exit 1
  without a store, exit 2 for one that needs `serve` to migrate it).
"""

from __future__ import annotations

import json
import os
import sqlite3
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

# The names and defaults config.py uses (tests/test_cli_fast.py checks they agree).
ENV_PREFIX = "SMTPGATE_"
DATA_DIR_VARIABLE = "SMTPGATE_DATA_DIR"
DEFAULT_DATA_DIR = "./var"
DB_NAME = "smtpgate.db"  # Settings.db_path = data_dir / DB_NAME
ENV_FILE = ".env"  # pydantic-settings reads it from the working directory
SCHEMA_VERSION = 8  # store.schema.MIGRATIONS' last: a newer store is the full path's to refuse

STATES = ("queued", "active", "done", "dead")  # model.JobState, in order
QUEUES = ("inbound", "outbox")
TOTALS = ("accounts", "tickets")

COUNTS_SQL = "SELECT tbl, state, n FROM queue_counts"
# INDEXED BY: the planner would pick inbound_ready and scan every queued row.
OLDEST_QUEUED_SQL = (
    "SELECT min(received_at) FROM inbound INDEXED BY inbound_queued_received WHERE state = 'queued'"
)
TOTAL_SQL = {table: f"SELECT count(*) FROM {table}" for table in TOTALS}


def build_status(
    counts: Iterable[Iterable[Any]], oldest: float | None, totals: Mapping[str, int], now: float
) -> dict[str, Any]:
    """The status dict (`--json`, GET /status) from the rows of COUNTS_SQL, OLDEST_QUEUED_SQL's
    value and TOTAL_SQL's counts; `now` is time.time() when they were read."""
    queues: dict[str, dict[str, Any]] = {q: dict.fromkeys(STATES, 0) for q in QUEUES}
    for tbl, state, n in counts:
        queues[tbl][state] = n
    queues["inbound"]["oldest_queued_age_s"] = (
        round(max(0.0, now - oldest), 3) if oldest is not None else 0
    )
    result: dict[str, Any] = dict(queues)
    for table in TOTALS:
        result[table] = totals[table]
    return result


def render_status(status: Mapping[str, Any], as_json: bool) -> str:
    """The output of `smtpgate status [--json]`, without the final newline."""
    if as_json:
        return json.dumps(status, indent=2, ensure_ascii=False, default=str)
    i, o = status["inbound"], status["outbox"]
    return (
        f"inbound: {i['queued']} queued, {i['active']} active, {i['done']} done, "
        f"{i['dead']} dead; oldest queued {i['oldest_queued_age_s']} s\n"
        f"outbox:  {o['queued']} queued, {o['active']} active, {o['done']} done, "
        f"{o['dead']} dead\n"
        f"accounts: {status['accounts']}  tickets: {status['tickets']}"
    )


def query_status(db: sqlite3.Connection) -> dict[str, Any]:
    """The status dict from an open connection to the store (plain or sqlite3.Row rows)."""
    counts = db.execute(COUNTS_SQL).fetchall()
    oldest = db.execute(OLDEST_QUEUED_SQL).fetchone()[0]
    totals = {table: int(db.execute(sql).fetchone()[0]) for table, sql in TOTAL_SQL.items()}
    return build_status(counts, oldest, totals, time.time())


def read_only_uri(db_path: Path) -> str:
    """The store opened for reading only. On a file system mounted read-only (a disk
    remounted so after errors, a snapshot) SQLite cannot make the -shm file a WAL reader
    needs: without one there, the file is read as immutable, which it is there. Not merely
    where this user cannot write: a `serve` that can may change it meanwhile. A WAL without
    its -shm there could not be read: sqlite3.OperationalError says so."""
    uri = db_path.absolute().as_uri() + "?mode=ro"
    if _read_only_file_system(db_path.parent) and not Path(f"{db_path}-shm").exists():
        wal = Path(f"{db_path}-wal")
        if wal.exists() and wal.stat().st_size > 0:
            raise sqlite3.OperationalError(
                f"{wal} holds changes, but its -shm file is missing on this read-only file"
                " system: copy the store with both files to a writable place to read it"
            )
        uri += "&immutable=1"
    return uri


def _read_only_file_system(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def read_status(db_path: Path, *, busy_timeout: float = 5.0) -> dict[str, Any]:
    """The store's status, read through a read-only connection in one snapshot.

    Raises sqlite3.Error when the database is missing, lacks a table or index it reads, or
    was written by a newer smtpgate (whose counts may not mean what this version says).
    """
    db = sqlite3.connect(
        read_only_uri(db_path), uri=True, timeout=busy_timeout, isolation_level=None
    )
    try:
        db.execute("BEGIN")  # the counts and the age from the same snapshot
        (version,) = db.execute("SELECT max(version) FROM schema_migrations").fetchone()
        if (version or 0) > SCHEMA_VERSION:
            raise sqlite3.DatabaseError(f"schema version {version}")
        return query_status(db)
    finally:
        db.close()  # a read-only transaction: nothing to commit


def db_path_from_env(
    environ: Mapping[str, str] | None = None, env_file: str | os.PathLike[str] = ENV_FILE
) -> Path | None:
    """Settings().db_path as `status` needs it, or None when config.py must judge.

    `status` is polled by monitoring: it reads only SMTPGATE_DATA_DIR and does not validate the
    other settings (serve and every other verb still do, and fail naming the variable). None
    when the variable is given twice in different letter cases or a .env file may set it.
    Names are case-insensitive, as for pydantic-settings; the value means what it means there:
    any text but an empty one, as a Path.
    """
    env = os.environ if environ is None else environ
    given = [name for name in env if name.lower() == DATA_DIR_VARIABLE.lower()]
    if len(given) > 1 or _env_file_may_set(Path(env_file)):
        return None
    if given and not env[given[0]].strip():
        return None  # empty: config.py refuses it, naming the variable
    return Path(env[given[0]] if given else DEFAULT_DATA_DIR) / DB_NAME


def _env_file_may_set(path: Path) -> bool:
    """Whether a .env file may set SMTPGATE_DATA_DIR (unreadable: let config.py judge)."""
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        return False
    except (OSError, UnicodeDecodeError):
        return True
    return DATA_DIR_VARIABLE.lower() in text.lower()


def fast_status(as_json: bool) -> int | None:
    """Print the status and return 0, or return None (printing nothing) for the full path."""
    db_path = db_path_from_env()
    if db_path is None:
        return None
    try:
        status = read_status(db_path)
    except sqlite3.Error:
        return None  # missing, older or locked: the full path says which
    sys.stdout.write(render_status(status, as_json) + "\n")
    return 0
