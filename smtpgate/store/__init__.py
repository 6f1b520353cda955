"""All SQL lives here (but status.py's read-only counts): the durable inbound queue (with group
commit), the outbox, the CRM records.

One write connection serialises every write (SQLite has one writer anyway); a second connection
serves reads. Intake requests are batched into shared commits so durability costs little. The
lookups a decision makes (accounts, tickets, employees: indexed reads of a few microseconds) run
on a third connection in the event loop's own thread, because a hand-off to a thread costs
~80 µs of CPU, several times the read (`Store._lookup`). For the same reason the small queue
bookkeeping transactions that need no fsync (a decision's records, outbox updates) run on the
write connection in the loop's thread too (`Store._write(inline=True)`); everything that may
wait (fsync, another process's lock, a WAL checkpoint, big rows) stays in the threads.

Each transaction is one plain function over the sqlite3 connection, run whole in the
connection's thread (`_in_thread`): one hand-off to that thread per transaction, not one per
statement. crm.py and records.py hold the record-level SQL those functions call.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import functools
import inspect
import json
import logging
import os
import re
import secrets
import sqlite3
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Generic, Literal, NamedTuple, TypeVar, cast

import aiosqlite

from smtpgate.config import ConfigError
from smtpgate.model import (
    AUTOMATIC_KINDS,
    REUSED_ID,
    Action,
    Applied,
    Decision,
    Envelope,
    Facts,
    Found,
    JobState,
    LineBudget,
    Lookup,
    MailKind,
    Needs,
    OutboundMail,
    Outcome,
    TicketRef,
    address_key,
    domain_spellings,
    is_account_email,
    is_bare_address,
    normalize_key,
)
from smtpgate.status import query_status, read_only_uri
from smtpgate.store import crm
from smtpgate.store.schema import check_version, migrate

log = logging.getLogger(__name__)

StoreError = sqlite3.Error
# The store could not do its work right now: retry, never blame the message. (An SQL error in
# our own code is an OperationalError too, but not one of these: it counts as a failed attempt.)
_TRANSIENT = ("SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_FULL", "SQLITE_IOERR", "SQLITE_CANTOPEN")

T = TypeVar("T")
U = TypeVar("U")

# An acknowledgement to an address that got ACK_BURST acknowledgements in the last
# ACK_BURST_SECONDS is not sent (its ticket is still opened): the brake on a responder that
# answers each acknowledgement with fresh mail (a ticket system, a challenge), a round every
# few seconds; the hourly cap alone let 20 such rounds open 20 tickets.
ACK_BURST = 3
ACK_BURST_SECONDS = 600.0
ACK_LOG_PREFIX = "ack:"  # auto_mail_log rows that count acknowledgements (no address starts so)
# A failed intake commit makes /healthz 503 until one succeeds, for at most this many seconds
# after it (Store.intake_failing).
INTAKE_FAILURE_SHOWN = 300.0
# Decisions of messages up to this size are written in the loop's thread (see Store._write).
INLINE_MAX_BYTES = 256 * 1024
# The decisions written in one shared transaction hold at most this many bytes of raw message
# (always at least one): a bigger group would hold the loop's thread for longer.
GROUP_MAX_BYTES = 1024 * 1024
# spec 2.4 without a Message-ID: the same content seen within this many seconds is a duplicate
# (a sender redelivering after a lost 250 does so within hours). A device that sends no
# Message-ID and no Date sends the same bytes for the same event every time; the next day's is
# new mail. A Message-ID is an identity and never expires.
CONTENT_DUPLICATE_SECONDS = 24 * 3600
_CONTENT_KEYS = "key >= 'sha256:' AND key < 'sha256;'"  # pipeline.dedupe_key's hashes, by index
# pipeline.fingerprint's rows, "fp:<the Message-ID's hash>:<fingerprint>": kept like the
# Message-ID they belong to
_REMEMBER = "INSERT OR IGNORE INTO seen_messages (key, inbound_id, seen_at) VALUES (?, ?, ?)"
_TOLD = (  # a fingerprint told again: its window starts anew
    "INSERT INTO seen_messages (key, inbound_id, seen_at) VALUES (?, ?, ?) ON CONFLICT (key)"
    " DO UPDATE SET inbound_id = excluded.inbound_id, seen_at = excluded.seen_at"
)


def _reused_id(db: sqlite3.Connection, fingerprint: str, now: float) -> bool:
    """Whether a copy of a duplicate Message-ID is other content: its Message-ID has
    fingerprints and this is none of them, or the Message-ID is known to be reused (another
    fingerprint beside this one) and this content was last told over CONTENT_DUPLICATE_SECONDS
    ago (a UPS on battery again next week). One first processed by a version that kept no
    fingerprints counts its next copy as the same message (a redelivery after the upgrade)."""
    prefix = fingerprint[: fingerprint.rindex(":") + 1]  # "fp:<the Message-ID's hash>:"
    others = db.execute(
        "SELECT 1 FROM seen_messages WHERE key >= ? AND key < ? AND key != ? LIMIT 1",
        (prefix, prefix[:-1] + ";", fingerprint),
    ).fetchone()
    mine = db.execute("SELECT seen_at FROM seen_messages WHERE key = ?", (fingerprint,)).fetchone()
    if mine is None:
        return others is not None
    return others is not None and mine[0] < now - CONTENT_DUPLICATE_SECONDS


def _is_busy(exc: sqlite3.Error) -> bool:
    """SQLite could not get a lock right now (SQLITE_BUSY, SQLITE_LOCKED and their variants)."""
    name = getattr(exc, "sqlite_errorname", None) or ""
    return name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED"))


def is_transient_error(exc: BaseException) -> bool:
    """A store failure that says nothing about the message: locked, full, or I/O."""
    name = getattr(exc, "sqlite_errorname", "") if isinstance(exc, sqlite3.Error) else ""
    return isinstance(name, str) and name.startswith(_TRANSIENT)


# --- one hand-off per transaction ------------------------------------------------------------
#
# aiosqlite's public API hands every statement to the connection's thread separately: ~70 µs of
# CPU and an event-loop wake-up each (docs/performance.md), ~14 of them per processed message.
# `_in_thread` instead runs one plain function over the underlying sqlite3 connection in that
# thread, so a whole transaction costs one hand-off. It uses aiosqlite's private API on purpose
# (aiosqlite 0.22; pinned in pyproject.toml): `Connection._execute(fn, *args)` queues fn on the
# connection's one worker thread, which runs queued calls in order, one at a time, and awaits its
# result; `Connection._conn` is the sqlite3 connection, used in that thread (the writer's also in
# the loop's thread, under the write lock: `Store._write(inline=True)`).
# `_check_aiosqlite` fails the import loudly if a new aiosqlite changed either;
# tests/test_store_hops.py checks the behaviour (one thread, in order, errors, cancellation).


def _check_aiosqlite() -> None:
    execute = getattr(aiosqlite.Connection, "_execute", None)
    conn = getattr(aiosqlite.Connection, "_conn", None)
    if not (
        inspect.iscoroutinefunction(execute)
        and list(inspect.signature(execute).parameters)[:2] == ["self", "fn"]
        and isinstance(conn, property)
    ):
        raise ImportError(
            "smtpgate.store needs aiosqlite's private Connection._execute(fn, ...) and"
            f" Connection._conn (as in aiosqlite 0.22); this is aiosqlite {aiosqlite.__version__}"
        )


_check_aiosqlite()


async def _in_thread(db: aiosqlite.Connection, fn: Callable[[sqlite3.Connection], T]) -> T:
    """fn(the sqlite3 connection), run in db's own thread after what is queued there: one hop.

    fn's exceptions (sqlite3.Error with its sqlite_errorname, or any other) are raised here. If
    the awaiting task is cancelled, fn still runs to its end in the thread.
    """
    return cast(T, await db._execute(fn, db._conn))  # type: ignore[no-untyped-call]


def _noop(_: sqlite3.Connection) -> None:
    return None


async def _outlast(db: aiosqlite.Connection) -> None:
    """Return when every call queued on db's thread so far has ended, despite cancellation.

    The thread runs calls in order, so a no-op queued now ends after them.
    """
    while True:
        try:
            await _in_thread(db, _noop)
            return
        except asyncio.CancelledError:
            continue  # the caller re-raises its own cancellation once this returns
        except Exception:  # closed meanwhile: its close is queued after everything else
            return


def _transaction(
    db: sqlite3.Connection,
    fn: Callable[[sqlite3.Connection], T],
    *,
    pragmas: Sequence[str] = (),
    commit: bool = True,
) -> T:
    """pragmas, BEGIN IMMEDIATE, fn, COMMIT (or ROLLBACK if commit is False); ROLLBACK on error."""
    for pragma in pragmas:
        db.execute(pragma)
    db.execute("BEGIN IMMEDIATE")
    try:
        result = fn(db)
        db.execute("COMMIT" if commit else "ROLLBACK")
    except BaseException:
        if db.in_transaction:  # not after a failed BEGIN, nor when SQLite already rolled back
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
        raise
    return result


class WriteLock:
    """The write lock, with a fast lane: waiting intake commits go before other transactions.

    A sender's 250 waits for its intake commit; a decision or an outbox update can wait. With an
    ordinary FIFO lock an intake commit queued behind every worker's and relay sender's
    transaction, so under load the senders' latency (and the accept rate) paid for processing.
    The record of relayed mail shares the fast lane: it is small (inline, no fsync) and every
    relay connection waits for it (RELAYED_UNRECORDED); behind the intake commits of a storm it
    let the outbox fall hundreds of mails behind. Within each lane: first come, first served.
    """

    def __init__(self) -> None:
        self._locked = False
        self._lanes: tuple[collections.deque[asyncio.Future[None]], ...] = (
            collections.deque(),  # urgent: intake, and the record of relayed mail
            collections.deque(),  # everything else
        )

    @contextlib.asynccontextmanager
    async def hold(self, *, urgent: bool = False) -> AsyncIterator[None]:
        if self._locked:
            lane = self._lanes[0 if urgent else 1]
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            lane.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._release()  # handed the lock just as we were cancelled: pass it on
                else:
                    with contextlib.suppress(ValueError):
                        lane.remove(waiter)
                raise
        else:
            self._locked = True
        try:
            yield
        finally:
            self._release()

    def locked(self) -> bool:
        return self._locked

    def _release(self) -> None:
        for lane in self._lanes:
            while lane:
                waiter = lane.popleft()
                if not waiter.done():
                    waiter.set_result(None)  # handed over: the lock stays held
                    return
        self._locked = False


# The due rows of a queue table (inbound, outbox) that fit in a byte budget: in the order they
# are due (rowid breaks ties), while the running total of their sizes fits, and always the first.
# Parameters: now, limit, budget, budget (a budget below 0: no budget).
_DUE_WITHIN_BUDGET = (
    "SELECT id FROM ("
    " SELECT id, size, sum(size) OVER (ORDER BY next_attempt_at, r ROWS UNBOUNDED PRECEDING)"
    "   - size AS before"
    # The size in a subquery of its own (its LIMIT keeps SQLite from merging it): with
    # length(data) in the window query itself, SQLite copied every scanned mail's data into
    # the window's temporary table and took its length there.
    " FROM (SELECT id, rowid AS r, next_attempt_at, {size} AS size FROM {table}"
    "   WHERE state = 'queued' AND next_attempt_at <= ? ORDER BY next_attempt_at, rowid LIMIT ?))"
    " WHERE ? < 0 OR before = 0 OR before + size <= ?"
)


class _IntakeLease(NamedTuple):
    """The lease an intake commit gives the messages it claims (Store.hand_over)."""

    until: float
    token: str
    received_at: float


# An intake row's values, the message, and its lease if its commit claims it.
_IntakeEntry = tuple[tuple[Any, ...], "_Intake", _IntakeLease | None]
# Intake row values for the state, attempts, lease_until and lease_token columns of a message
# not claimed by its intake commit (Store.hand_over).
_QUEUED = ("queued", 0, None, None)
# While messages claimed at intake keep coming, a claim still reads the table this often.
TABLE_CLAIM_SECONDS = 1.0
_ANY_DUE = "SELECT 1 FROM {} WHERE state = 'queued' AND next_attempt_at <= ? LIMIT 1"


class _Held(Generic[U]):
    """Rows leased by the transaction that queued them, waiting in memory to be handed out
    (`Store.hand_over`), oldest first; and whether a claim reads the table instead."""

    def __init__(self, size: Callable[[U], int]) -> None:
        self.rows: collections.deque[tuple[float, U]] = collections.deque()  # (lease end, row)
        self.limit = 0  # at most this many rows; 0: none are leased as they are queued
        # The last claim from the table found no other due row: new ones may skip the table.
        # Once one is queued (the workers or senders fell behind), the next ones queue too.
        self.clear = False
        self.read_at = 0.0  # when a claim last read the table (time.monotonic)
        self._size = size

    def table_due(self) -> bool:
        """A claim reads the table when no row is held and it may hold due ones, and at least
        every TABLE_CLAIM_SECONDS (then first), so a retry that has become due does not wait
        behind new mail."""
        recent = time.monotonic() - self.read_at < TABLE_CLAIM_SECONDS
        return not (recent and (self.rows or self.clear))

    def table_read(self, clear: bool) -> None:
        self.clear = clear
        self.read_at = time.monotonic()

    def take(
        self, limit: int, max_bytes: int | None, before: Sequence[U], lease_seconds: float
    ) -> tuple[list[U], list[U]]:
        """What fills a claim of `limit` rows within `max_bytes` after the rows `before` it
        from the table (at least one if there are none); and the rows that waited past half
        their lease, to be queued again: a worker might not finish them in time."""
        now = time.time()
        limit -= len(before)
        total = sum(self._size(row) for row in before)
        taken: list[U] = []
        stale: list[U] = []
        while self.rows and len(taken) < limit:
            lease_until, row = self.rows.popleft()
            if lease_until - now < lease_seconds / 2:
                stale.append(row)
                continue
            size = self._size(row)
            if max_bytes is not None and total + size > max_bytes and (taken or before):
                self.rows.appendleft((lease_until, row))
                break
            taken.append(row)
            total += size
        return taken, stale


class _TooBigHere(Exception):
    """A claim holds too many bytes to be read in the loop's thread."""


class _LeaseLost(Exception):
    """Another worker owns the message now (its lease expired and was taken)."""


@dataclass(frozen=True, slots=True)
class Job:
    """A claimed inbound message."""

    id: str
    token: str
    raw: bytes
    envelope: Envelope
    received_at: float
    attempts: int
    message_id: str | None = None


@dataclass(frozen=True, slots=True)
class Delivery:
    """A claimed outbox row."""

    id: int
    kind: str
    mail_from: str
    recipients: tuple[str, ...]
    data: bytes
    attempts: int
    created_at: float
    lease_until: float  # time.time() when the claim lapses: not to be sent from then on
    inbound_id: str | None = None  # the queue id of the message that caused it (for logs)


@dataclass(slots=True)
class _Completion:
    """A decision waiting for the shared transaction of `Store.complete`."""

    job: Job
    decision: Decision
    dedupe_key: str | None
    fingerprint: str | None
    hourly_limit: int
    future: asyncio.Future[Outcome | None]


@dataclass(slots=True)
class _Intake:
    id: str
    envelope: Envelope
    raw: bytes
    message_id: str | None
    future: asyncio.Future[None]


# How Store.open treats the schema: see its docstring.
SchemaMode = Literal["upgrade", "current", "any"]


def new_queue_id() -> str:
    """Sortable queue id: milliseconds since the epoch in base 36 plus 6 random characters."""
    # One draw from the system's randomness for the six characters (a draw each cost six
    # getrandom calls, 15 µs an accepted message).
    return _base36(int(time.time() * 1000)) + _base36(secrets.randbelow(36**6)).rjust(6, "0")


def _base36(n: int) -> str:
    out = ""
    while n:
        n, r = divmod(n, 36)
        out = _BASE36[r] + out
    return out


_BASE36 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"


WAL_SIZE_LIMIT = 64 * 1024 * 1024  # bytes the WAL file keeps once reset (journal_size_limit)
PURGE_BATCH = 1000  # rows of a table a retention transaction reads and deletes at most
PURGE_BATCH_BYTES = 4 * 1024 * 1024  # and bytes of mail (always at least one row)

# Per table: the rows a batch looks at with their sizes (by rowid, oldest first), the delete of
# those expired, and the age of a row (a batch whose last row is younger than the cutoff ends
# the sweep).
_PURGE_SQL = {
    "inbound_raw": (
        "SELECT r.rowid, i.size FROM inbound_raw r LEFT JOIN inbound i ON i.id = r.id"
        " WHERE r.rowid > ? ORDER BY r.rowid LIMIT ?",
        (
            "DELETE FROM inbound_raw WHERE rowid > ? AND rowid <= ? AND EXISTS (SELECT 1 FROM"
            " inbound i WHERE i.id = inbound_raw.id AND i.state = 'done' AND i.received_at < ?)",
        ),
        "SELECT i.received_at FROM inbound_raw r JOIN inbound i ON i.id = r.id WHERE r.rowid = ?",
    ),
    "outbox": (
        "SELECT id, size FROM outbox WHERE id > ? ORDER BY id LIMIT ?",
        (
            "DELETE FROM outbox_data WHERE id > ? AND id <= ? AND EXISTS (SELECT 1 FROM outbox o"
            " WHERE o.id = outbox_data.id AND o.state = 'done' AND o.created_at < ?)",
            "DELETE FROM outbox WHERE id > ? AND id <= ? AND state = 'done' AND created_at < ?",
        ),
        "SELECT created_at FROM outbox WHERE id = ?",
    ),
}


def _purge_batch(
    db: sqlite3.Connection, table: str, after: int, cutoff: float
) -> tuple[int, int, bool]:
    """One retention batch of `table` after rowid `after`: how many rows of it it deleted, the
    last rowid it looked at, and whether the sweep goes on."""
    rows_sql, deletes, age_sql = _PURGE_SQL[table]
    rows = db.execute(rows_sql, (after, PURGE_BATCH)).fetchall()
    if not rows:
        return 0, after, False
    upto, total = rows[0][0], 0
    for rowid, size in rows:  # up to PURGE_BATCH_BYTES of mail, at least one row
        total += size or 0
        if total > PURGE_BATCH_BYTES and rowid != rows[0][0]:
            break
        upto = rowid
    counts = [db.execute(sql, (after, upto, cutoff)).rowcount for sql in deletes]
    age = db.execute(age_sql, (upto,)).fetchone()
    return counts[0], upto, age is None or age[0] < cutoff


# The intake commit's error lines: a full disk fails a burst of commits, each a line onto it.
_INTAKE_FAILURE_LINES = LineBudget(5)


def _intake_failure_line(what: str, messages: int, why: str) -> None:
    unlogged = _INTAKE_FAILURE_LINES.take(time.monotonic())
    if unlogged is not None:
        log.error(
            "intake commit of %d message(s) %s: %s%s",
            messages,
            what,
            why,
            f" ({unlogged} more failed before it, not logged)" if unlogged else "",
        )


class Recovered(NamedTuple):
    """What `recover` found leased by a process that is gone."""

    inbound: list[str]  # the messages requeued, oldest first: to be processed one at a time
    outbox: int  # the mails requeued
    dead: list[tuple[str, str | None]]  # (id, Message-ID) of those set aside: crashes of theirs


def _job(row: sqlite3.Row, token: str, raw: bytes) -> Job:
    return Job(
        id=row["id"],
        token=token,
        raw=raw,
        envelope=Envelope(
            row["peer"], row["helo"], row["mail_from"], tuple(json.loads(row["rcpt_tos"]))
        ),
        received_at=row["received_at"],
        attempts=row["attempts"],
        message_id=row["message_id"],
    )


def _capped(
    db: sqlite3.Connection, mails: Sequence[OutboundMail], hourly_limit: int, now: float
) -> tuple[list[OutboundMail], list[str]]:
    """The mails of a decision that go, and notes on those the caps on automatic mail hold
    back; the ones that go are logged in auto_mail_log (the caps' count). Processing and
    explain's rolled-back rehearsal alike."""
    going: list[OutboundMail] = []
    suppressed: list[str] = []
    sent_before = True  # whether the mail before this one goes
    for mail in mails:
        if mail.kind is MailKind.BCC:
            # The operator's audit copy of the mail before it: it goes when that one goes,
            # and is not counted (its address is our own setting, not one a sender chose).
            if not sent_before:
                continue
        elif mail.kind in AUTOMATIC_KINDS:
            # Per-recipient cap on automatic mail: a runaway peer cannot make us a flood.
            # Counted per address whatever its case and spelling (address_key: Victim@ and
            # vIctim@, bücher.example composed, decomposed or xn--, are one mailbox), though
            # the mail goes out as addressed.
            over, burst = [], []
            for rcpt in mail.recipients:
                hour = db.execute(
                    "SELECT count(*) FROM auto_mail_log WHERE recipient = ? AND sent_at > ?",
                    (address_key(rcpt), now - 3600),
                ).fetchone()[0]
                if hour >= hourly_limit:
                    over.append(rcpt)
                elif mail.kind is MailKind.ACK and hour >= ACK_BURST:
                    # Acknowledgements alone (an XML integration's responses are none):
                    # logged a second time under "ack:" + the address.
                    acks = db.execute(
                        "SELECT count(*) FROM auto_mail_log WHERE recipient = ? AND sent_at > ?",
                        (ACK_LOG_PREFIX + address_key(rcpt), now - ACK_BURST_SECONDS),
                    ).fetchone()[0]
                    if acks >= ACK_BURST:
                        burst.append(rcpt)
            if over:
                suppressed.append(f"{mail.kind} to {', '.join(over)} suppressed: hourly cap")
                sent_before = False
                continue
            if burst:
                suppressed.append(
                    f"{mail.kind} to {', '.join(burst)} suppressed: {ACK_BURST}"
                    f" acknowledgements to it in the last {ACK_BURST_SECONDS / 60:.0f} min"
                )
                sent_before = False
                continue
            db.executemany(
                "INSERT INTO auto_mail_log (recipient, sent_at) VALUES (?, ?)",
                [(address_key(r), now) for r in mail.recipients]
                + (
                    [(ACK_LOG_PREFIX + address_key(r), now) for r in mail.recipients]
                    if mail.kind is MailKind.ACK
                    else []
                ),
            )
        going.append(mail)
        sent_before = True
    return going, suppressed


def mails_sent(mails: Iterable[OutboundMail]) -> list[dict[str, Any]]:
    """The outcome's `sent` entries: kind and recipients of each mail queued."""
    return [{"kind": str(m.kind), "to": list(m.recipients)} for m in mails]


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")[:-4] + "Z"


class Store:
    """The SQLite store. Build with `await Store.open(path)`; close with `await store.close()`."""

    # The write connection does not checkpoint the WAL in its commits (they may run in the
    # loop's thread); a checkpoint runs in its thread after this many commits or seconds.
    CHECKPOINT_COMMITS = 100
    CHECKPOINT_SECONDS = 1.0

    def __init__(
        self,
        path: Path,
        writer: aiosqlite.Connection,
        reader: aiosqlite.Connection,
        lookups: sqlite3.Connection,
        busy_timeout: float,
    ):
        self.path = path
        # The file this store opened: removed or replaced under it (rm, a restore copied over
        # it), every write would go to a file no later process opens (`file_replaced`).
        self._identity = _file_identity(path)
        self._db = writer
        self._reader = reader
        self._lookups = lookups
        self._busy_ms = int(busy_timeout * 1000)
        # The writer's PRAGMA busy_timeout: True = busy_timeout (in the thread), False = 0 (in the
        # loop, never waits), None = unknown (a PRAGMA failed part-way).
        self._waits: bool | None = True
        self._commits = 0  # since the last checkpoint
        self._checkpointed_at = time.monotonic()
        self._checkpointer: asyncio.Task[None] | None = None
        # After a complete checkpoint the next write restarts the WAL and fsyncs its header:
        # that write goes to the thread.
        self._restart_due = False
        self._closed = False
        self._write_lock = WriteLock()
        self._pending: list[_Intake] = []
        self._pending_event = asyncio.Event()
        self._committing: asyncio.Future[None] | None = None  # the intake batch being written
        # (monotonic time, error) of the last intake commit the store could not write (not
        # for a lock held elsewhere), until one succeeds.
        self._intake_failed: tuple[float, str] | None = None
        self._committer: asyncio.Task[None] | None = None
        self._completions: list[_Completion] = []
        self._completions_event = asyncio.Event()
        self._completing: asyncio.Future[None] | None = None  # the decisions being written
        self._completer: asyncio.Task[None] | None = None
        self._sync = "FULL"  # the writer's PRAGMA synchronous (set in _connect)
        # Outbox mail may have been committed without an fsync (a decision, synchronous=NORMAL)
        # and not fsynced by a durable commit since. The relay claims it with a durable commit
        # first: an OS crash must not roll back a decision whose mail is already sent, or the
        # mail would be sent again when the message is processed anew. True at start-up: the
        # last process may have left such mail in the WAL. Set and cleared under the write
        # lock: set by a decision that queues mail (before its COMMIT), cleared by a durable
        # commit that wrote to the WAL (`_write(fsynced=…)`: intake, a claim, recovery).
        self._outbox_unsynced = True
        self.new_work = asyncio.Event()  # set after an intake commit: wakes the workers
        # Called as an intake batch's commit ends, once its futures are resolved: the queue ids
        # of the messages whose senders still waited, and the error (None: committed). Intake
        # processes answer their children from it (see `enqueue_nowait`).
        self.on_committed: Callable[[list[str], str | None], None] | None = None
        # Messages leased by their intake commit and outbox mails leased by their decision,
        # waiting for a worker or a sender (see `hand_over`).
        self._held_jobs: _Held[Job] = _Held(lambda job: len(job.raw))
        self._held_mail: _Held[Delivery] = _Held(lambda mail: len(mail.data))
        self._held_lease = 0.0
        self._staged_mail: list[Delivery] = []  # by the decisions being written
        self._mail_paused = False  # the relay failed: queue new mail until one is delivered

    @classmethod
    async def open(
        cls, path: Path, *, busy_timeout: float = 5.0, schema: SchemaMode = "upgrade"
    ) -> Store:
        """`schema`: "upgrade" applies pending migrations (serve, a new store); "current"
        refuses a store that needs one (ConfigError); "any" takes the schema as it is (backup).
        A store written by a newer version is refused unless "any"."""
        path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
        # A new store is made 0640 (before the umask), not readable by other users: it holds
        # customer mail. SQLite gives its -wal and -shm files the store's mode. (There already,
        # a directory, no permission: said below, by SQLite's open.)
        with contextlib.suppress(OSError):
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640))
        try:
            # aiosqlite, when the open fails, leaves its thread to stop by itself and to tell
            # the event loop later (an error in that thread once the loop is gone): fail here.
            sqlite3.connect(path, timeout=busy_timeout).close()
        except sqlite3.Error as exc:  # a directory, no permission
            raise _cannot_open(path, exc, busy_timeout) from exc
        writer = await _connect(path, busy_timeout, any_thread=True)
        reader: aiosqlite.Connection | None = None
        try:
            await writer.execute("PRAGMA journal_mode = WAL")
            await writer.execute("PRAGMA wal_autocheckpoint = 0")  # see CHECKPOINT_COMMITS
            # Freed pages are overwritten, whatever the platform's default: mail the retention
            # purge removed must not stay in free pages, nor in the backups copied from them
            # (the purge goes in small batches for that reason, see `purge`). And the WAL is
            # cut back to 64 MiB when reset, not kept at the size of its biggest transaction.
            await writer.execute("PRAGMA secure_delete = ON")
            await writer.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}")
            if schema != "any":
                await migrate(writer, apply=schema == "upgrade")
            # After the migrations (a table rebuilt keeps its old pages in a statement journal):
            # a decision group's SAVEPOINTs keep the pages they change as they were in a
            # sub-journal, which SQLite writes to a temporary file past 64 KiB, page by page:
            # ~12 write system calls a forwarded message, half of the serve process's writes
            # during a storm. No statement now rewrites a message's bytes (they have tables of
            # their own) or keeps them in a temporary table (the outbox claim reads them apart).
            await writer.execute("PRAGMA temp_store = MEMORY")
            reader = await _connect(path, busy_timeout)
            return cls(path, writer, reader, _connect_lookups(path), busy_timeout)
        except BaseException as exc:
            if reader is not None:
                await reader.close()
            await writer.close()
            if isinstance(exc, sqlite3.Error):  # locked, not a database, a failed migration
                raise _cannot_open(path, exc, busy_timeout) from exc
            raise

    @classmethod
    async def open_read_only(
        cls, path: Path, *, busy_timeout: float = 5.0, any_schema: bool = False
    ) -> Store:
        """The store of a data directory that cannot be written (a disk remounted read-only
        after errors, a snapshot mounted to look at): for the commands that only read, and
        `backup`, which is when an operator needs them most. Every write fails."""
        try:
            uri = read_only_uri(path)
            reader = await aiosqlite.connect(
                uri, uri=True, isolation_level=None, timeout=busy_timeout
            )
        except sqlite3.Error as exc:
            raise _cannot_open(path, exc, busy_timeout) from exc
        reader.row_factory = aiosqlite.Row
        try:
            rows = await reader.execute_fetchall("SELECT max(version) FROM schema_migrations")
            version = next(iter(rows))[0] or 0
            if not any_schema:
                check_version(int(version), apply=False)
            lookups = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=0)
        except sqlite3.Error as exc:
            await reader.close()
            raise _cannot_open(path, exc, busy_timeout) from exc
        except BaseException:
            await reader.close()
            raise
        return cls(path, reader, reader, lookups, busy_timeout)

    async def close(self) -> None:
        self._closed = True  # no new checkpoint from here
        writing = [f for f in (self._committing, self._completing) if f is not None]
        if writing:
            # An intake batch being written may finish, so that its senders get their answer
            # (250, or 451): cancelled half-way, the thread would still commit it, and the
            # sessions waiting for it were never answered. Decisions being written likewise
            # (their workers learn whether the message is done).
            await asyncio.wait(writing, timeout=self._busy_ms / 1000 + 1.0)
        tasks = [t for t in (self._committer, self._completer, self._checkpointer) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._committer = self._completer = self._checkpointer = None
        self._intake_ended(self._pending, "store closed")
        for item in self._completions:
            if not item.future.done():
                item.future.set_exception(StoreError("store closed"))
        self._pending.clear()
        self._completions.clear()
        jobs = [job for _, job in self._held_jobs.rows]
        mails = [mail for _, mail in self._held_mail.rows]
        self._held_jobs.rows.clear()
        self._held_mail.rows.clear()
        if jobs or mails:  # the next start would do it too; till then they would look busy
            await self._release(jobs, mails)
        self._lookups.close()
        await self._reader.close()
        if self._db is self._reader:  # opened read-only: one connection
            return
        # Under the write lock: a transaction still running (in the thread or waiting for the
        # lock) ends before the connection closes.
        async with self._write_lock.hold(urgent=True):
            await self._db.close()

    async def _write(
        self,
        fn: Callable[[sqlite3.Connection], T],
        *,
        durable: bool | Callable[[], bool] = True,
        urgent: bool = False,
        inline: bool = False,
        fsynced: Callable[[T], bool] | None = None,
    ) -> T:
        """fn inside BEGIN IMMEDIATE … COMMIT on the write connection, rolled back on any error.

        One hand-off to the writer's thread, under the write lock. durable=False commits with
        synchronous=NORMAL (no fsync of its own; WAL mode keeps it safe from a process crash and
        the next durable commit fsyncs it too). Only for queue bookkeeping whose loss to an OS
        crash means re-doing work; intake is always durable. See docs/performance.md.

        inline=True (with durable=False, for small transactions): run in the loop's own thread
        instead, which saves the hand-off (~80 µs of CPU and the GIL going back and forth). There
        SQLite never waits for a lock (busy timeout 0): if another process holds the write lock,
        the transaction goes to the thread and waits there, as any other.

        A callable `durable` is asked once the write lock is held: what it depends on may change
        while the write waits for the lock. `fsynced(result)` tells whether a durable commit
        certainly wrote to the WAL, and so fsynced every commit before it too: see
        `_outbox_unsynced`. (Rows changed are not proof: an UPDATE that leaves every byte as it
        was writes no page, and its COMMIT fsyncs nothing.)
        """
        async with self._write_lock.hold(urgent=urgent):
            if callable(durable):
                durable = durable()
            want = "FULL" if durable else "NORMAL"
            if inline and not durable and not self._restart_due:
                try:
                    result = self._write_here(fn)
                except sqlite3.OperationalError as exc:
                    if not _is_busy(exc):
                        raise
                else:
                    self._committed()
                    return result
            # The PRAGMAs run in the same hand-off, only when the kind of transaction changes.
            pragmas = self._pragmas(want, waits=True)
            result = await self._on_writer(lambda db: _transaction(db, fn, pragmas=pragmas))
            self._sync, self._waits, self._restart_due = want, True, False
            if durable and fsynced is not None and fsynced(result):
                self._outbox_unsynced = False
            self._committed()
            return result

    def _write_here(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """A non-durable transaction in the loop's thread; the caller holds the write lock."""
        pragmas = self._pragmas("NORMAL", waits=False)
        result = _transaction(self._db._conn, fn, pragmas=pragmas)
        self._sync, self._waits = "NORMAL", False
        return result

    def _pragmas(self, synchronous: str | None, *, waits: bool) -> list[str]:
        """The PRAGMAs that set the writer up for the next transaction (synchronous None: as it
        is); its state is unknown until that transaction succeeds (a failure part-way leaves it
        unknown: set again)."""
        pragmas = []
        if self._waits is not waits:
            pragmas.append(f"PRAGMA busy_timeout = {self._busy_ms if waits else 0}")
            self._waits = None
        if synchronous is not None and self._sync != synchronous:
            pragmas.append(f"PRAGMA synchronous = {synchronous}")
            self._sync = ""
        return pragmas

    def _committed(self) -> None:
        """Count a commit; start a WAL checkpoint in the writer's thread when one is due."""
        self._commits += 1
        if self._closed or (self._checkpointer is not None and not self._checkpointer.done()):
            return
        now = time.monotonic()
        if (
            self._commits >= self.CHECKPOINT_COMMITS
            or now - self._checkpointed_at >= self.CHECKPOINT_SECONDS
        ):
            self._commits, self._checkpointed_at = 0, now
            self._checkpointer = asyncio.create_task(self._checkpoint(), name="wal-checkpoint")

    async def _checkpoint(self) -> None:
        """A PASSIVE checkpoint in the writer's thread, under the write lock as SQLite's own
        (which runs inside a commit): with writes going on it could never copy the whole WAL,
        and SQLite restarts the WAL from its beginning only after a complete checkpoint."""
        try:
            async with self._write_lock.hold():
                if self._closed:
                    return
                busy, frames, copied = await self._on_writer(_passive_checkpoint)
                if not busy and frames > 0 and frames == copied:
                    self._restart_due = True
        except (sqlite3.Error, ValueError) as exc:  # ValueError: closed meanwhile
            log.warning("WAL checkpoint failed (tried again later): %s", exc)

    async def _on_writer(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """fn in the writer's thread; the caller holds the write lock.

        Cancelled, fn still runs to its end (COMMIT or ROLLBACK) in the thread: wait for that
        before letting the cancellation through, so the write lock is released only after it.
        """
        try:
            return await _in_thread(self._db, fn)
        except asyncio.CancelledError:
            await _outlast(self._db)
            raise

    # --- intake: group commit ----------------------------------------------------------------

    async def enqueue(
        self, envelope: Envelope, raw: bytes, message_id: str | None, queue_id: str
    ) -> None:
        """Return once the message is committed; raise StoreError if it could not be."""
        await self.enqueue_nowait(envelope, raw, message_id, queue_id)

    def enqueue_nowait(
        self, envelope: Envelope, raw: bytes, message_id: str | None, queue_id: str
    ) -> asyncio.Future[None]:
        """`enqueue` without waiting: the future ends with the commit (StoreError if it failed);
        cancelled before its batch is written, the message is not written. `on_committed`, if
        set, hears of it first, in the same pass of the event loop as the commit ends."""
        if self._committer is None or self._committer.done():
            self._committer = asyncio.create_task(self._commit_loop(), name="group-commit")
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append(_Intake(queue_id, envelope, raw, message_id, future))
        self._pending_event.set()
        return future

    async def _commit_loop(self) -> None:
        while True:
            await self._pending_event.wait()
            self._pending_event.clear()
            # Requests whose SMTP session gave up (timeout → 451) are not written.
            batch = [item for item in self._pending if not item.future.done()]
            self._pending = []
            if not batch:
                continue
            now = time.time()
            lease = _IntakeLease(now + self._held_lease, secrets.token_hex(8), now)
            held = self._held_jobs
            room = held.limit - len(held.rows) if held.clear else 0
            entries: list[_IntakeEntry] = []
            for item in batch:
                claimed = room > 0 and len(item.raw) <= GROUP_MAX_BYTES
                if claimed:
                    room -= 1
                else:
                    room = 0  # the rest queue behind this one
                row = (
                    item.id,
                    now,
                    item.envelope.peer,
                    item.envelope.helo,
                    item.envelope.mail_from,
                    json.dumps(item.envelope.rcpt_tos),
                    len(item.raw),
                    item.message_id,
                    now,
                    *(("active", 1, lease.until, lease.token) if claimed else _QUEUED),
                )
                entries.append((row, item, lease if claimed else None))
            self._committing = asyncio.get_running_loop().create_future()
            try:
                await self._commit_intake(batch, entries)
            finally:
                self._committing.set_result(None)
                self._committing = None
                # Only if cancelled (close) half-way: its outcome is unknown.
                self._intake_ended(batch, "store closed during the commit")

    async def _commit_intake(self, batch: list[_Intake], entries: list[_IntakeEntry]) -> None:
        replaced = self.file_replaced()
        if replaced:  # not written at all: this serve would process what its senders retry
            _intake_failure_line("refused", len(batch), replaced)
            self._intake_ended(batch, replaced)
            return
        try:
            inserted = await self._write(
                functools.partial(_insert_intake, entries=entries), urgent=True, fsynced=bool
            )
        except (sqlite3.Error, ValueError) as exc:  # ValueError: text SQLite cannot encode
            _intake_failure_line("failed", len(batch), str(exc))
            if isinstance(exc, sqlite3.Error) and not _is_busy(exc):
                # The store cannot take mail (full, a quota, a file size limit, I/O): only
                # intake shows it (intake_failing). A lock held elsewhere the probe sees itself.
                self._intake_failed = (time.monotonic(), str(exc))
            self._intake_ended(batch, str(exc))
            return
        replaced = self.file_replaced()
        if replaced:  # replaced during the commit (the check before cannot close that window)
            _intake_failure_line("not acknowledged", len(batch), replaced)
            self._intake_ended(batch, replaced)
            return
        self._intake_ended(batch, None)
        for _, item, lease in entries:
            if lease is None:
                self._held_jobs.clear = False
            elif item.id in inserted:
                self._held_jobs.rows.append((lease.until, _held_job(item, lease)))
        self.new_work.set()

    def _intake_ended(self, batch: list[_Intake], error: str | None) -> None:
        """Resolve the futures of a batch whose senders still wait (StoreError(error) if it
        failed), then tell `on_committed`."""
        waiting = [item for item in batch if not item.future.done()]
        if waiting and error is None:
            self._intake_failed = None
        for item in waiting:
            if error is None:
                item.future.set_result(None)
            else:
                item.future.set_exception(StoreError(error))
        if self.on_committed is not None and waiting:
            try:
                self.on_committed([item.id for item in waiting], error)
            except Exception:  # a defect of the caller's; the futures tell the outcome too
                log.exception("on_committed failed")

    def hand_over(self, jobs: int, mails: int, lease_seconds: float) -> None:
        """Let the transaction that queues a message or a mail claim it too (`claim` and
        `claim_deliveries` hand them out).

        A claim from the table is a transaction of its own (~50 µs of CPU a message during a
        storm, in claims of a few): while the queue holds no other due message, an intake commit
        instead writes a message already leased (state active, attempts 1), which waits here, in
        memory, for a worker; at most `jobs` of up to GROUP_MAX_BYTES each. Once one is queued
        (the workers fall behind), the next ones are too, until a claim from the table finds no
        due message left. A decision's outbox mails likewise, at most `mails`. Either way a row
        is leased before it is worked on, so a crash or an expired lease requeues it as before
        (`recover`, `release_expired`)."""
        self._held_jobs.limit = jobs
        self._held_mail.limit = mails
        self._held_lease = lease_seconds

    # --- inbound queue -----------------------------------------------------------------------

    async def recover(self, max_crashes: int) -> Recovered:
        """At start-up of the only server: every lease belongs to a dead process; requeue it.

        A message claimed alone (`claim_alone`) and still active was being processed when the
        process died, and by nothing else: the crash is its own. After `max_crashes` of them it
        goes dead instead, so a message that kills the process (the OOM killer, a crash in a C
        extension) cannot keep it in a crash loop. The messages requeued otherwise are the ones
        to process alone before the rest (`Recovered.inbound`)."""

        def requeue(db: sqlite3.Connection) -> Recovered:
            dead = db.execute(
                "UPDATE inbound SET state = 'dead', lease_until = NULL, lease_token = NULL,"
                " last_error = 'the serve process stopped ' || crashes || ' times while"
                " processing it (a crash, the OOM killer): set aside; smtpgate queue retry ID"
                " once the cause is fixed' WHERE state = 'active' AND crashes >= ?"
                " RETURNING id, message_id",
                (max_crashes,),
            ).fetchall()
            inbound = db.execute(
                "UPDATE inbound SET state = 'queued', lease_until = NULL, lease_token = NULL"
                " WHERE state = 'active' RETURNING id, received_at"
            ).fetchall()
            outbox = db.execute(
                "UPDATE outbox SET state = 'queued', lease_until = NULL WHERE state = 'active'"
            ).rowcount
            return Recovered(
                [row[0] for row in sorted(inbound, key=lambda row: row[1])],
                outbox,
                [(row[0], row[1]) for row in dead],
            )

        return await self._write(requeue, fsynced=lambda r: bool(r.inbound or r.outbox or r.dead))

    async def claim_alone(self, queue_id: str, lease_seconds: float) -> Job | None:
        """Lease one queued message to be processed with nothing else in flight, its crash
        counted before it starts (durably: it must survive the crash it counts); `fail` and
        `release_alone` take the count back, and a message done needs it no more."""
        token = secrets.token_hex(8)

        def take(db: sqlite3.Connection) -> Job | None:
            row = db.execute(
                "UPDATE inbound SET state = 'active', attempts = attempts + 1,"
                " crashes = crashes + 1, lease_until = ?, lease_token = ?"
                " WHERE id = ? AND state = 'queued'"
                " RETURNING id, peer, helo, mail_from, rcpt_tos, received_at, attempts,"
                " message_id",
                (time.time() + lease_seconds, token, queue_id),
            ).fetchone()
            if row is None:
                return None
            raws = _kept_apart(db, "inbound_raw", [queue_id])
            return _job(row, token, raws.get(queue_id, b""))

        return await self._write(take)

    async def release_alone(self, job: Job) -> None:
        """Queue again a message claimed alone and not processed (a shutdown came first): no
        attempt and no crash counted."""

        def release(db: sqlite3.Connection) -> None:
            db.execute(
                "UPDATE inbound SET state = 'queued', attempts = attempts - 1,"
                " crashes = crashes - 1, lease_until = NULL, lease_token = NULL"
                " WHERE id = ? AND lease_token = ? AND state = 'active'",
                (job.id, job.token),
            )

        await self._write(release)

    async def release_expired(self, keep_outbox: Collection[int] = ()) -> int:
        """Queue again the messages and mails whose lease has lapsed, except the outbox mails
        in `keep_outbox` (being sent, or sent and not yet recorded: never to be sent twice)."""
        now = time.time()
        keep = tuple(keep_outbox)

        def release(db: sqlite3.Connection) -> int:
            n = db.execute(
                "UPDATE inbound SET state = 'queued', lease_until = NULL, lease_token = NULL"
                " WHERE state = 'active' AND lease_until < ?",
                (now,),
            ).rowcount
            n += db.execute(
                "UPDATE outbox SET state = 'queued', lease_until = NULL"
                " WHERE state = 'active' AND lease_until < ?"
                f" AND id NOT IN ({', '.join('?' * len(keep))})",
                (now, *keep),
            ).rowcount
            return n

        released = await self._write(release, durable=False)
        if released:
            self._held_jobs.clear = self._held_mail.clear = False
        return released

    async def claim(
        self, limit: int, lease_seconds: float, max_bytes: int | None = None
    ) -> list[Job]:
        """Lease up to `limit` due messages, oldest first; with `max_bytes`, only those that fit
        in that many bytes of raw message, in order (always at least the first).

        Claims of up to GROUP_MAX_BYTES of raw message run in the loop's thread (no fsync, and
        the hand-off cost more than the claim); a bigger first message is claimed in the
        writer's thread, where reading it does not hold the loop.

        Messages leased by their intake commit (`hand_over`) are handed out without a
        transaction. The table is read when there are none and it may hold due messages, and
        at least every TABLE_CLAIM_SECONDS (then first), so a retry that has become due does not
        wait behind new mail."""
        jobs: list[Job] = []
        if self._held_jobs.table_due():
            jobs = await self._claim_table(limit, lease_seconds, max_bytes)
        held, stale = self._held_jobs.take(limit, max_bytes, jobs, self._held_lease)
        if stale:
            await self._release(jobs=stale)
        return jobs + held

    async def _claim_table(
        self, limit: int, lease_seconds: float, max_bytes: int | None
    ) -> list[Job]:
        token = secrets.token_hex(8)
        budget = max_bytes if max_bytes is not None else -1

        def take(
            db: sqlite3.Connection, *, budget: int, inline_bytes: int | None
        ) -> tuple[list[Job], bool]:
            """The jobs, and whether no other message is due (`_Held.clear`)."""
            # The time of the claim, not of the call: a message committed while this waited
            # for the write lock is due too.
            now = time.time()
            rows = db.execute(
                "UPDATE inbound SET state = 'active', attempts = attempts + 1,"
                " lease_until = ?, lease_token = ?"
                # rowid breaks ties (a whole intake batch shares next_attempt_at) the same way
                # in the running total and the LIMIT; the index (state, next_attempt_at) has it.
                f" WHERE id IN ({_DUE_WITHIN_BUDGET.format(table='inbound', size='size')})"
                " RETURNING id, peer, helo, mail_from, rcpt_tos, received_at, attempts,"
                " message_id, size",
                (now + lease_seconds, token, now, limit, budget, budget),
            ).fetchall()
            clear = not db.execute(_ANY_DUE.format("inbound"), (now,)).fetchone()
            if not rows:
                return [], clear
            if inline_bytes is not None and sum(row["size"] for row in rows) > inline_bytes:
                raise _TooBigHere  # rolled back; claimed again in the writer's thread
            raws = _kept_apart(db, "inbound_raw", [row["id"] for row in rows])
            return [_job(row, token, raws.get(row["id"], b"")) for row in rows], clear

        here = GROUP_MAX_BYTES if budget < 0 else min(budget, GROUP_MAX_BYTES)
        try:
            jobs, clear = await self._write(
                functools.partial(take, budget=here, inline_bytes=GROUP_MAX_BYTES),
                durable=False,
                inline=True,
            )
        except _TooBigHere:
            jobs, clear = await self._write(
                functools.partial(take, budget=budget, inline_bytes=None), durable=False
            )
        self._held_jobs.table_read(clear)
        jobs.sort(key=lambda j: j.received_at)
        return jobs

    async def _release(self, jobs: Sequence[Job] = (), mails: Sequence[Delivery] = ()) -> None:
        """Queue again messages and mails claimed as they were queued and not worked on
        (`hand_over`), their attempt not counted; a row leased to another since stays."""
        job_keys = [(job.id, job.token) for job in jobs]

        def release(db: sqlite3.Connection) -> None:
            db.executemany(
                "UPDATE inbound SET state = 'queued', attempts = attempts - 1,"
                " lease_until = NULL, lease_token = NULL"
                " WHERE id = ? AND lease_token = ? AND state = 'active'",
                job_keys,
            )
            _requeue_mails(db, mails)

        try:
            await self._write(release, durable=False)
        except (sqlite3.Error, ValueError) as exc:  # ValueError: the connection is gone
            log.warning(
                "%d row(s) left leased till their lease ends: %s", len(jobs) + len(mails), exc
            )
        if jobs:
            self._held_jobs.clear = False  # new messages queue behind these
        if mails:
            self._held_mail.clear = False

    async def fail(
        self, job: Job, error: str, *, max_attempts: int, backoff: float, transient: bool = False
    ) -> bool:
        """Record a processing failure: retry later, or dead after max_attempts. True if dead.

        A transient failure (the store itself: full, locked, I/O) is not the message's fault: it
        does not use up an attempt, so it can never make the message dead.
        """
        dead = not transient and job.attempts >= max_attempts
        params = (
            JobState.DEAD if dead else JobState.QUEUED,
            error[:2000],
            time.time() + backoff,
            1 if transient else 0,
            job.id,
            job.token,
        )

        def record(db: sqlite3.Connection) -> None:
            db.execute(
                "UPDATE inbound SET state = ?, last_error = ?, next_attempt_at = ?,"
                " attempts = attempts - ?, crashes = 0, lease_until = NULL, lease_token = NULL"
                " WHERE id = ? AND lease_token = ?",
                params,
            )

        await self._write(record, durable=False, inline=True)
        return dead

    async def complete(
        self,
        job: Job,
        decision: Decision,
        *,
        dedupe_key: str | None,
        fingerprint: str | None = None,
        auto_mail_hourly_limit: int,
    ) -> Outcome | None:
        """Apply a decision exactly once: records, outbox rows and the outcome in one transaction.

        Returns None when the lease was lost (another worker owns the message now): all the
        decision wrote is rolled back.

        The decisions of small messages that are ready together (the workers that finished
        deciding in the same pass of the event loop) share one transaction, each in its own
        savepoint: a commit costs ~150 µs of CPU in the loop's thread whatever it holds, and
        shared pages (the queue's, the indexes') are written once. One decision's failure rolls
        back its savepoint only; when the whole transaction fails, nothing of it is kept and
        its decisions are written again one by one (`_complete_group`).
        """
        if len(job.raw) > INLINE_MAX_BYTES:  # alone, in the writer's thread
            try:
                return await self._write_decisions(
                    functools.partial(
                        self._complete,
                        job=job,
                        decision=decision,
                        dedupe_key=dedupe_key,
                        fingerprint=fingerprint,
                        hourly_limit=auto_mail_hourly_limit,
                    ),
                    inline=False,
                )
            except _LeaseLost:
                return None
        future: asyncio.Future[Outcome | None] = asyncio.get_running_loop().create_future()
        self._completions.append(
            _Completion(job, decision, dedupe_key, fingerprint, auto_mail_hourly_limit, future)
        )
        if self._completer is None or self._completer.done():
            self._completer = asyncio.create_task(self._complete_loop(), name="group-complete")
        self._completions_event.set()
        return await future

    async def _complete_loop(self) -> None:
        while True:
            await self._completions_event.wait()
            self._completions_event.clear()
            # A decision whose worker was cancelled before its group was taken is not written
            # (its lease lapses; one taken already is written whole).
            waiting = [item for item in self._completions if not item.future.done()]
            group: list[_Completion] = []
            size = 0
            for item in waiting:
                if group and size + len(item.job.raw) > GROUP_MAX_BYTES:
                    break
                group.append(item)
                size += len(item.job.raw)
            self._completions = waiting[len(group) :]
            if not group:
                continue
            self._completing = asyncio.get_running_loop().create_future()
            try:
                await self._complete_group(group)
            except Exception:  # a defect of ours: its decisions fail, the next groups go on
                log.exception("writing %d decision(s) failed", len(group))
            finally:
                self._completing.set_result(None)
                self._completing = None
                for item in group:  # cancelled (close) half-way, or the defect above
                    if not item.future.done():
                        item.future.set_exception(
                            StoreError("the decision's transaction did not finish")
                        )
            if self._completions:
                # The rest in a later pass of the loop: a group written in the loop's thread
                # never waits, and back to back they would keep intake waiting.
                self._completions_event.set()
                await asyncio.sleep(0)

    async def _write_decisions(self, fn: Callable[[sqlite3.Connection], T], *, inline: bool) -> T:
        """A transaction of decisions; the outbox mails it claimed are handed out once it has
        committed (`hand_over`). Its own list collects them: a big message's decision runs in
        the writer's thread while the next group waits for the write lock."""
        staged: list[Delivery] = []

        def write(db: sqlite3.Connection) -> T:
            staged.clear()  # run again (the write lock of another process): from the start
            self._staged_mail = staged  # under the write lock: the only writer now
            return fn(db)

        result = await self._write(write, durable=False, inline=inline)
        self._held_mail.rows.extend((mail.lease_until, mail) for mail in staged)
        return result

    async def _complete_group(self, group: list[_Completion]) -> None:
        try:
            results = await self._write_decisions(
                functools.partial(self._complete_each, group=group), inline=True
            )
        except Exception as exc:  # the transaction failed: none of them is applied
            if len(group) > 1:
                # Each in a transaction of its own, so that only the decision at fault fails
                # (and uses up an attempt); a full disk fails each of them, as transient.
                for item in group:
                    await self._complete_group([item])
                return
            results = [exc]
        for item, result in zip(group, results, strict=True):
            if item.future.done():
                continue
            if isinstance(result, BaseException):
                item.future.set_exception(result)
            else:
                item.future.set_result(result)

    def _complete_each(
        self, db: sqlite3.Connection, group: list[_Completion]
    ) -> list[Outcome | Exception | None]:
        """Each decision of a group in its own savepoint: its outcome, None for a lost lease, or
        the exception that rolled it back. An error that ended the whole transaction (SQLite
        rolls back by itself on a full disk or an I/O error) is raised: nothing is kept."""
        results: list[Outcome | Exception | None] = []
        for item in group:
            db.execute("SAVEPOINT decision")
            staged = len(self._staged_mail)
            try:
                outcome = self._complete(
                    db,
                    item.job,
                    item.decision,
                    item.dedupe_key,
                    item.hourly_limit,
                    item.fingerprint,
                )
            except Exception as exc:
                if not db.in_transaction:
                    raise
                db.execute("ROLLBACK TO decision")
                db.execute("RELEASE decision")
                del self._staged_mail[staged:]
                if isinstance(exc, StopIteration):  # a future cannot hold one; as a coroutine
                    wrapped = RuntimeError(f"decision raised {exc!r}")  # would have it
                    wrapped.__cause__ = exc
                    exc = wrapped
                results.append(None if isinstance(exc, _LeaseLost) else exc)
            else:
                db.execute("RELEASE decision")
                results.append(outcome)
        return results

    def _complete(
        self,
        db: sqlite3.Connection,
        job: Job,
        decision: Decision,
        dedupe_key: str | None,
        hourly_limit: int,
        fingerprint: str | None = None,
    ) -> Outcome:
        """One decision's part of a transaction (see `complete`)."""
        # The lease is checked by the final UPDATE (_finish): a lost lease raises _LeaseLost
        # there and rolls everything back.
        if dedupe_key is not None and decision.action != Action.IGNORED:
            now = time.time()
            cur = db.execute(
                "INSERT INTO seen_messages (key, inbound_id, seen_at) VALUES (?, ?, ?)"
                " ON CONFLICT (key) DO UPDATE SET inbound_id = excluded.inbound_id,"
                f" seen_at = excluded.seen_at WHERE {_CONTENT_KEYS} AND seen_at < ?",
                (dedupe_key, job.id, now, now - CONTENT_DUPLICATE_SECONDS),
            )
            if cur.rowcount == 0:
                # spec 2.4: already processed → no ticket, no transaction, no mail.
                first = db.execute(
                    "SELECT inbound_id FROM seen_messages WHERE key = ?", (dedupe_key,)
                ).fetchone()
                first_id = first[0] if first else None
                notes = [f"first processed as {first_id}" if first_id else "seen before"]
                reason = "message_id" if dedupe_key.startswith("<") else "content_hash"
                sent: list[dict[str, Any]] = []
                reused = fingerprint is not None and _reused_id(db, fingerprint, now)
                if fingerprint is not None:  # this content's next copy is the same message
                    db.execute(_TOLD if reused else _REMEMBER, (fingerprint, job.id, now))
                if reused:
                    # The Message-ID came before with other content (pipeline.fingerprint): a device
                    # reusing one fixed id, whose later alerts were recorded and seen by no one.
                    # It is forwarded untouched, where this decision would forward it.
                    sent, notes = self._queue_mails(
                        db, job.id, decision.reused_id_mails(Applied()), Applied(), hourly_limit
                    )
                    if sent:
                        self._outbox_unsynced = True
                    reason = REUSED_ID
                    done = (
                        "forwarded untouched"
                        if sent
                        else "recorded only (an XML transaction is never forwarded: its password)"
                    )
                    notes.insert(
                        0,
                        f"Message-ID {dedupe_key} was first processed as {first_id} with other"
                        f" content: {done}",
                    )
                outcome = Outcome(
                    path=decision.path,
                    action=Action.DUPLICATE,
                    reason=reason,
                    account=None,
                    ticket=None,
                    rules_hit=[],
                    rules_missed=[],
                    error_code=None,
                    sent=sent,
                    notes=notes,
                )
                self._finish(db, job, outcome)
                return outcome
            if fingerprint is not None:
                db.execute(_REMEMBER, (fingerprint, job.id, now))
        applied = self._apply(db, job, decision)
        mails = decision.mails(applied)
        sent, suppressed = self._queue_mails(db, job.id, mails, applied, hourly_limit)
        if sent:  # set under the write lock, before COMMIT: see claim_deliveries
            self._outbox_unsynced = True
        outcome = self._outcome(decision, applied, sent, list(decision.notes) + suppressed)
        self._finish(db, job, outcome)
        return outcome

    async def simulate(
        self,
        decision: Decision,
        message_id: str | None,
        fingerprint: str | None = None,
        *,
        content_key: str | None = None,
        hourly_limit: int,
    ) -> Outcome:
        """What `complete` would do, inside a transaction that is rolled back (explain): the
        mails the caps on automatic mail (`hourly_limit`, the acknowledgement brake) would
        hold back are noted, not said to be sent. `content_key`: a message without a
        Message-ID is a duplicate of content processed within CONTENT_DUPLICATE_SECONDS."""
        job = Job("explain", "", b"", Envelope("", "", "", ()), time.time(), 0, message_id)

        def explain(db: sqlite3.Connection) -> tuple[Applied, list[OutboundMail], list[str]]:
            def rehearse(
                db: sqlite3.Connection,
            ) -> tuple[Applied, list[OutboundMail], list[str]]:
                applied = self._apply(db, job, decision)
                going, suppressed = _capped(db, decision.mails(applied), hourly_limit, time.time())
                return applied, going, suppressed

            applied, mails, suppressed = _transaction(db, rehearse, pragmas=pragmas, commit=False)
            notes = list(decision.notes) + suppressed
            if message_id:  # spec 2.4: say so when this message would now be a duplicate
                seen = db.execute(
                    "SELECT inbound_id FROM seen_messages WHERE key = ?", (message_id,)
                ).fetchone()
                if seen and fingerprint is not None and _reused_id(db, fingerprint, time.time()):
                    to = ", ".join(
                        r for m in decision.reused_id_mails(applied) for r in m.recipients
                    )
                    notes.append(
                        f"already processed as {seen[0]} with other content: a"
                        f" new copy would be a duplicate forwarded untouched to {to} ({REUSED_ID})"
                    )
                elif seen:
                    notes.append(f"already processed as {seen[0]}: a new copy would be a duplicate")
            elif content_key:
                seen = db.execute(
                    "SELECT inbound_id, seen_at FROM seen_messages WHERE key = ? AND seen_at >= ?",
                    (content_key, time.time() - CONTENT_DUPLICATE_SECONDS),
                ).fetchone()
                if seen:  # (the window runs from the copy processed: copies do not extend it)
                    until = datetime.fromtimestamp(seen[1] + CONTENT_DUPLICATE_SECONDS, UTC)
                    notes.append(
                        f"already processed as {seen[0]}: a new copy would be a duplicate"
                        f" until {until:%Y-%m-%d %H:%M} UTC (content_hash)"
                    )
            return applied, mails, notes

        async with self._write_lock.hold():
            pragmas = self._pragmas(None, waits=True)  # waits for another process's lock
            applied, mails, notes = await self._on_writer(explain)
            self._waits = True
        return self._outcome(decision, applied, mails_sent(mails), notes)

    def _outcome(
        self, decision: Decision, applied: Applied, sent: list[dict[str, Any]], notes: list[str]
    ) -> Outcome:
        record = None
        if applied.record_kind and applied.record_id:
            record = {"kind": applied.record_kind, "rec_id": applied.record_id}
        failed_xml = decision.transaction is not None and applied.error_code not in (None, 1)
        return Outcome(
            path=decision.path,
            action=Action.XML_REJECTED if failed_xml else decision.action,
            reason=decision.reason,
            account=decision.account or applied.account,
            ticket=applied.ticket_number,
            rules_hit=decision.rules_hit,
            rules_missed=decision.rules_missed,
            error_code=decision.error_code
            if decision.error_code is not None
            else (applied.error_code if failed_xml else None),
            sent=sent,
            record=record,
            notes=notes,
        )

    def _apply(self, db: sqlite3.Connection, job: Job, decision: Decision) -> Applied:
        if decision.new_ticket is not None:
            t = decision.new_ticket
            rec_id, number = crm.create_ticket(
                db,
                account=t.account,
                contact=t.contact,
                description=t.description,
                details=t.details,
                source=t.source,
                inbound_id=job.id,
            )
            crm.add_history(
                db,
                ticket=rec_id,
                account=t.account,
                description=t.note,
                inbound_id=job.id,
                attachments=t.attachments,
            )
            self._link(db, t.message_id, rec_id)
            return Applied(ticket_number=number, ticket_rec_id=rec_id)
        if decision.reply is not None:
            r = decision.reply
            crm.add_history(
                db,
                ticket=r.ticket_rec_id,
                description=r.note,
                inbound_id=job.id,
                attachments=r.attachments,
            )
            self._link(db, r.message_id, r.ticket_rec_id)
            return Applied(ticket_number=r.ticket_number, ticket_rec_id=r.ticket_rec_id)
        if decision.transaction is not None:
            from smtpgate.store import records

            return records.apply(db, decision.transaction, inbound_id=job.id)
        return Applied()

    def _link(self, db: sqlite3.Connection, message_id: str | None, ticket: str) -> None:
        """Remember a Message-ID filed or sent for a ticket (threading by In-Reply-To)."""
        if message_id:
            db.execute(
                "INSERT OR IGNORE INTO message_links (message_id, ticket) VALUES (?, ?)",
                (message_id, ticket),
            )

    def _queue_mails(
        self,
        db: sqlite3.Connection,
        inbound_id: str,
        mails: Sequence[OutboundMail],
        applied: Applied,
        hourly_limit: int,
    ) -> tuple[list[dict[str, Any]], list[str]]:
        now = time.time()
        sent: list[dict[str, Any]] = []
        going, suppressed = _capped(db, mails, hourly_limit, now)
        for mail in going:
            held = self._held_mail
            claimed = (
                held.clear
                and not self._mail_paused
                and len(held.rows) + len(self._staged_mail) < held.limit
                and len(mail.data) <= GROUP_MAX_BYTES
            )
            if not claimed:
                held.clear = False  # the next ones queue behind it, oldest sent first
            lease_until = now + self._held_lease
            cur = db.execute(
                "INSERT INTO outbox (inbound_id, kind, mail_from, recipients, message_id, size,"
                " created_at, next_attempt_at, state, attempts, lease_until)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    inbound_id,
                    mail.kind,
                    mail.mail_from,
                    json.dumps(mail.recipients),
                    mail.message_id,
                    len(mail.data),
                    now,
                    now,
                    *(("active", 1, lease_until) if claimed else ("queued", 0, None)),
                ),
            )
            db.execute(
                "INSERT INTO outbox_data (id, data) VALUES (?, ?)", (cur.lastrowid, mail.data)
            )
            if claimed:
                self._staged_mail.append(
                    Delivery(
                        id=cast(int, cur.lastrowid),
                        kind=str(mail.kind),
                        mail_from=mail.mail_from,
                        recipients=tuple(mail.recipients),
                        data=mail.data,
                        attempts=1,
                        created_at=now,
                        lease_until=lease_until,
                        inbound_id=inbound_id,
                    )
                )
            if applied.ticket_rec_id:
                self._link(db, mail.message_id, applied.ticket_rec_id)
            sent.extend(mails_sent([mail]))
        return sent, suppressed

    def _finish(self, db: sqlite3.Connection, job: Job, outcome: Outcome) -> None:
        cur = db.execute(
            "UPDATE inbound SET state = 'done', outcome = ?, processed_at = ?, last_error = NULL,"
            " lease_until = NULL, lease_token = NULL"
            " WHERE id = ? AND lease_token = ? AND state = 'active'",
            (json.dumps(outcome.to_json()), time.time(), job.id, job.token),
        )
        if cur.rowcount != 1:
            raise _LeaseLost(job.id)

    async def retry_inbound(self, queue_id: str | None = None) -> int:
        """Operator retry: dead messages (one, or all) whose bytes are kept go back to queued."""
        sql = (
            "UPDATE inbound SET state = 'queued', next_attempt_at = ?, attempts = 0,"
            " crashes = 0, last_error = NULL"
            " WHERE state = 'dead' AND id IN (SELECT id FROM inbound_raw)"
        )
        now = time.time()
        if queue_id is not None:
            return await self._write(
                lambda db: db.execute(sql + " AND id = ?", (now, queue_id)).rowcount
            )
        return await self._write(lambda db: db.execute(sql, (now,)).rowcount)

    # --- outbox ------------------------------------------------------------------------------

    async def claim_deliveries(
        self, limit: int, lease_seconds: float, max_bytes: int | None = None
    ) -> list[Delivery]:
        """Lease up to `limit` due mails, oldest first; with `max_bytes`, only those that fit in
        that many bytes of data, in order (always at least the first).

        Mail is claimed to be sent, so the decision that queued it must survive an OS crash:
        when a decision with mail has committed without an fsync since the last durable commit,
        the claim's own commit is durable (fsyncing the WAL makes every commit before it
        durable too). While mail arrives, intake commits usually have done it already.

        Mails leased by the decision that queued them (`hand_over`) are handed out without a
        claim of their own, made durable likewise (`_sync_mail`). The table is read when there
        are none and it may hold due mails, and at least every TABLE_CLAIM_SECONDS (then
        first)."""
        out: list[Delivery] = []
        if self._held_mail.table_due():
            out = await self._claim_mail_table(limit, lease_seconds, max_bytes)
        held, stale = self._held_mail.take(limit, max_bytes, out, self._held_lease)
        if stale:
            await self._release(mails=stale)
        if held:
            try:
                held = await self._sync_mail(held)
            except BaseException:  # kept for the next claim (those from the table are durable)
                self._held_mail.rows.extendleft((m.lease_until, m) for m in reversed(out + held))
                raise
        return out + held

    async def _claim_mail_table(
        self, limit: int, lease_seconds: float, max_bytes: int | None
    ) -> list[Delivery]:
        budget = max_bytes if max_bytes is not None else -1

        def take(db: sqlite3.Connection) -> tuple[list[Delivery], bool]:
            """The mails, and whether no other mail is due (`_Held.clear`)."""
            # The time of the claim, not of the call: mail committed while this waited for the
            # write lock is due too, and the lease starts when the claim is made.
            now = time.time()
            due = _DUE_WITHIN_BUDGET.format(table="outbox", size="size")
            rows = db.execute(
                "UPDATE outbox SET state = 'active', attempts = attempts + 1, lease_until = ?"
                f" WHERE id IN ({due})"
                " RETURNING id, kind, mail_from, recipients, attempts, created_at, inbound_id",
                (now + lease_seconds, now, limit, budget, budget),
            ).fetchall()
            clear = not db.execute(_ANY_DUE.format("outbox"), (now,)).fetchone()
            if not rows:
                return [], clear
            data = _kept_apart(db, "outbox_data", [row["id"] for row in rows])
            return [
                Delivery(
                    id=row["id"],
                    kind=row["kind"],
                    mail_from=row["mail_from"],
                    recipients=tuple(json.loads(row["recipients"])),
                    data=data[row["id"]],
                    attempts=row["attempts"],
                    created_at=row["created_at"],
                    lease_until=now + lease_seconds,
                    inbound_id=row["inbound_id"],
                )
                for row in rows
            ], clear

        # Asked under the write lock: a decision may be committing mail while this waits for it.
        out, clear = await self._write(
            take, durable=lambda: self._outbox_unsynced, fsynced=lambda taken: bool(taken[0])
        )
        self._held_mail.table_read(clear)
        out.sort(key=lambda d: d.id)
        return out

    async def _sync_mail(self, mails: list[Delivery]) -> list[Delivery]:
        """`mails` once the decisions that queued them survive an OS crash (see
        `claim_deliveries`). While mail arrives the next intake commit fsyncs them anyway: wait
        for one being written. Otherwise (or if that did not do it) their lease is renewed in a
        durable commit, which certainly writes to the WAL: the new lease ends later than the old.
        """
        for _ in range(3):  # the batch waiting, then the commit it is in
            if not self._outbox_unsynced:
                return mails
            if self._committing is not None:
                await asyncio.wait([self._committing], timeout=self._busy_ms / 1000 + 1.0)
            elif self._pending:
                await asyncio.sleep(0)  # the committer takes the waiting batch
            else:
                break
        now = time.time()
        renewed = [
            dataclasses.replace(m, lease_until=max(now + self._held_lease, m.lease_until + 0.001))
            for m in mails
        ]

        def renew(db: sqlite3.Connection) -> list[Delivery]:
            """The mails still leased as handed out (a lapsed one may be another's now)."""
            return [
                new
                for new, old in zip(renewed, mails, strict=True)
                if db.execute(
                    "UPDATE outbox SET lease_until = ? WHERE id = ? AND state = 'active'"
                    " AND lease_until = ?",
                    (new.lease_until, old.id, old.lease_until),
                ).rowcount
            ]

        return await self._write(renew, durable=lambda: self._outbox_unsynced, fsynced=bool)

    async def unclaim_deliveries(self, mails: Sequence[Delivery]) -> int:
        """Give back claimed mails not tried: queued again, the claim's attempt not counted. One
        another sender has claimed since (another lease) stays."""
        self._held_mail.clear = False  # new mails queue behind these (and once they are queued:
        n = await self._write(
            functools.partial(_requeue_mails, mails=mails), durable=False, inline=True
        )
        self._held_mail.clear = False  # a table claim meanwhile may have found none yet)
        return n

    def pause_mail_hand_over(self) -> list[Delivery]:
        """The relay connection failed: new mail is queued, not claimed, until a mail has been
        delivered again (`delivery_done`); returns the mails claimed and not yet handed out,
        for the caller to give back (`unclaim_deliveries`). A sender waiting out a failing relay
        would otherwise hold them, shown as being sent."""
        self._mail_paused = True
        mails = [mail for _, mail in self._held_mail.rows]
        self._held_mail.rows.clear()
        return mails

    async def delivery_done(self, ids: Iterable[int]) -> None:
        now = time.time()
        params = [(now, i) for i in ids]
        if params:
            self._mail_paused = False

        def done(db: sqlite3.Connection) -> None:
            db.executemany(
                "UPDATE outbox SET state = 'done', sent_at = ?, last_error = NULL,"
                " lease_until = NULL WHERE id = ?",
                params,
            )

        # Urgent (WriteLock): every relay connection waits for this record.
        await self._write(done, durable=False, inline=True, urgent=True)

    async def delivery_failed(self, delivery_id: int, error: str, retry_at: float | None) -> None:
        """A failed attempt: retry at `retry_at`, or dead when it is None."""
        params = (
            JobState.QUEUED if retry_at is not None else JobState.DEAD,
            error[:2000],
            retry_at if retry_at is not None else time.time(),
            delivery_id,
        )

        def record(db: sqlite3.Connection) -> None:
            db.execute(
                "UPDATE outbox SET state = ?, last_error = ?, next_attempt_at = ?,"
                " lease_until = NULL WHERE id = ?",
                params,
            )

        await self._write(record, durable=False, inline=True)

    async def expire_deliveries(self, created_before: float, error: str) -> int:
        """Queued mails created before `created_before` go dead (SMTPGATE_RETRY_MAX_AGE): with
        the relay unreachable they were never tried, so none failed for its age."""

        def expire(db: sqlite3.Connection) -> int:
            return db.execute(
                "UPDATE outbox SET state = 'dead', last_error = ?, lease_until = NULL"
                " WHERE state = 'queued' AND created_at < ?",
                (error[:2000], created_before),
            ).rowcount

        return await self._write(expire, durable=False, inline=True)

    async def retry_outbox(self, delivery_id: int | None = None) -> int:
        sql = (
            "UPDATE outbox SET state = 'queued', next_attempt_at = ?, attempts = 0,"
            " created_at = ?, last_error = NULL WHERE state = 'dead'"
        )
        now = time.time()
        if delivery_id is not None:
            return await self._write(
                lambda db: db.execute(sql + " AND id = ?", (now, now, delivery_id)).rowcount
            )
        return await self._write(lambda db: db.execute(sql, (now, now)).rowcount)

    # --- facts for decisions (reads) -----------------------------------------------------------

    async def _lookup(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """fn over the lookup connection, in the loop's thread; on the reader's thread if busy.

        A WAL reader is almost never blocked; when it is (a recovery, another process in
        exclusive locking mode), the lookup connection fails at once (busy timeout 0) and the
        read waits on the reader's thread instead, never in the event loop.
        """
        try:
            return fn(self._lookups)
        except sqlite3.OperationalError as exc:
            if not _is_busy(exc):
                raise
        return await _in_thread(self._reader, fn)

    async def look_up(self, needs: Needs) -> Facts:
        """Everything a decision may need (`Needs`), in one round trip: the accounts each
        search finds, the sender's employee standing, the tagged tickets and the threaded one.
        Nothing asked, no trip."""
        if not (
            any(values for _, values in (*needs.by_rule, *needs.by_sender))
            or needs.employee
            or needs.ticket_numbers
            or needs.message_ids
        ):
            return Facts(
                needs, tuple({} for _ in needs.by_rule), tuple({} for _ in needs.by_sender)
            )

        def look(db: sqlite3.Connection) -> Facts:
            tickets = (_ticket(db, _TICKET_BY_NUMBER, n) for n in needs.ticket_numbers)
            return Facts(
                needs,
                by_rule=tuple(_accounts_found(db, lookup) for lookup in needs.by_rule),
                by_sender=tuple(_accounts_found(db, lookup) for lookup in needs.by_sender),
                employee=bool(needs.employee) and _is_active_employee(db, needs.employee),
                tickets=tuple(t for t in tickets if t is not None),
                threaded=next(
                    (
                        t
                        for mid in needs.message_ids
                        if (t := _ticket(db, _TICKET_BY_MESSAGE_ID, mid)) is not None
                    ),
                    None,
                ),
            )

        return await self._lookup(look)

    # --- operator views ----------------------------------------------------------------------

    async def status(self) -> dict[str, Any]:
        """What `smtpgate status` shows: one definition of it, in smtpgate.status. Its queries
        read one snapshot (a read transaction), as `read_status` does: counts and the oldest
        queued age taken between two commits could disagree (queued 0, oldest 30 s)."""

        def snapshot(db: sqlite3.Connection) -> dict[str, Any]:
            db.execute("BEGIN")
            try:
                return query_status(db)
            finally:
                db.execute("COMMIT")  # nothing written: this only ends the snapshot

        return await _in_thread(self._reader, snapshot)

    async def list_inbound(self, state: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        sql = (
            "SELECT id, message_id, mail_from, rcpt_tos, state, attempts, received_at,"
            " last_error, outcome FROM inbound"
        )
        params: tuple[Any, ...] = ()
        if state:
            sql += " WHERE state = ?"
            params = (state,)
        sql += " ORDER BY received_at DESC LIMIT ?"
        async with self._reader.execute(sql, (*params, limit)) as cur:
            rows = await cur.fetchall()
        return [_inbound_view(row) for row in rows]

    async def get_inbound(self, queue_id: str) -> dict[str, Any] | None:
        async with self._reader.execute(
            "SELECT id, message_id, mail_from, rcpt_tos, state, attempts, received_at,"
            " last_error, outcome, peer, helo, size, processed_at,"
            " EXISTS (SELECT 1 FROM inbound_raw r WHERE r.id = inbound.id) AS raw_kept"
            " FROM inbound WHERE id = ?",
            (queue_id,),
        ) as cur:
            row = await cur.fetchone()
        if row is None:
            return None
        view = _inbound_view(row)
        view.update(
            peer=row["peer"],
            helo=row["helo"],
            size=row["size"],
            processed_at=iso(row["processed_at"]),
            raw_kept=bool(row["raw_kept"]),
        )
        return view

    async def raw_message(self, queue_id: str) -> bytes | None:
        async with self._reader.execute(
            "SELECT raw FROM inbound_raw WHERE id = ?", (queue_id,)
        ) as cur:
            row = await cur.fetchone()
        return bytes(row[0]) if row and row[0] is not None else None

    async def list_outbox(self, state: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        sql = (
            "SELECT id, inbound_id, kind, mail_from, recipients, state, attempts, created_at,"
            " next_attempt_at, last_error, sent_at FROM outbox"
        )
        params: tuple[Any, ...] = ()
        if state:
            sql += " WHERE state = ?"
            params = (state,)
        sql += " ORDER BY id DESC LIMIT ?"
        async with self._reader.execute(sql, (*params, limit)) as cur:
            rows = await cur.fetchall()
        return [
            {
                "id": r["id"],
                "inbound_id": r["inbound_id"],
                "kind": r["kind"],
                "mail_from": r["mail_from"],
                "recipients": json.loads(r["recipients"]),
                "state": r["state"],
                "attempts": r["attempts"],
                "created_at": iso(r["created_at"]),
                "next_attempt_at": iso(r["next_attempt_at"]),
                "last_error": r["last_error"],
                "sent_at": iso(r["sent_at"]),
            }
            for r in rows
        ]

    async def list_tickets(self, limit: int = 100) -> list[dict[str, Any]]:
        async with self._reader.execute(
            "SELECT t.number, t.rec_id, t.account, a.file_as AS account_name, t.description,"
            " t.details, t.status, t.source, t.created_at"
            " FROM tickets t LEFT JOIN accounts a ON a.rec_id = t.account"
            " ORDER BY t.number DESC LIMIT ?",
            (limit,),
        ) as cur:
            return [dict(r) for r in await cur.fetchall()]

    async def get_ticket(self, number: int) -> dict[str, Any] | None:
        async with self._reader.execute(
            "SELECT t.*, a.file_as AS account_name FROM tickets t"
            " LEFT JOIN accounts a ON a.rec_id = t.account WHERE t.number = ?",
            (number,),
        ) as cur:
            row = await cur.fetchone()
        if row is None:
            return None
        ticket = dict(row)
        async with self._reader.execute(
            "SELECT rec_id, note_at, description, kind, inbound_id, attachments FROM history"
            " WHERE ticket = ? ORDER BY note_at, rowid",
            (ticket["rec_id"],),
        ) as cur:
            notes = [dict(r) for r in await cur.fetchall()]
        for note in notes:
            note["attachments"] = json.loads(note["attachments"]) if note["attachments"] else []
        ticket["history"] = notes
        return ticket

    async def list_accounts(self, limit: int = 1000) -> list[dict[str, Any]]:
        async with self._reader.execute(
            "SELECT rec_id, file_as, company, account_number, account_id, email1, email2, status"
            " FROM accounts ORDER BY file_as COLLATE NOCASE LIMIT ?",
            (limit,),
        ) as cur:
            return [dict(r) for r in await cur.fetchall()]

    def file_replaced(self) -> str | None:
        """Why the store's file is no longer the one this store writes to (removed, or another
        file put in its place), or None. Mail committed then would be lost at the next start:
        intake answers 451 and /healthz 503 until serve is restarted."""
        now = _file_identity(self.path)
        if now == self._identity:
            return None
        what = "was removed" if now is None else "was replaced by another file"
        return f"the store file {self.path} {what} while serve ran: restart serve"

    def intake_failing(self) -> str | None:
        """Why incoming mail is being deferred: the error of the last intake commit the store
        could not write (not a lock held elsewhere), when no intake commit has succeeded since
        and it was at most INTAKE_FAILURE_SHOWN seconds ago (mail would have come and shown a
        repair by then). `can_write`'s probe writes no page, so a quota, a file size limit or
        an I/O error shows only here."""
        failed = self._intake_failed
        if failed is None or time.monotonic() - failed[0] > INTAKE_FAILURE_SHOWN:
            return None
        return failed[1]

    async def can_write(self, min_free_bytes: int = 0) -> bool:
        """Health probe: the disk has `min_free_bytes` free for the store, and a write
        transaction can be begun and committed.

        Bounded by the connection's busy_timeout; the HTTP endpoint answers 503 sooner and lets
        the probe finish in the background, so probes never pile up on the write lock. (The
        transaction changes no byte, so it writes no page: a full disk shows in the free space
        only.)
        """

        replaced = self.file_replaced()
        if replaced:
            log.error("health: %s", replaced)
            return False

        def probe(db: sqlite3.Connection) -> bool:
            disk = os.statvfs(self.path.parent)
            if disk.f_bavail * disk.f_frsize < min_free_bytes:
                return False
            db.execute("UPDATE queue_counts SET n = n WHERE tbl = 'health'")
            return True

        try:
            return await self._write(probe)
        except (sqlite3.Error, OSError):
            return False

    # --- imports (operators) -----------------------------------------------------------------

    async def import_accounts(self, rows: Sequence[tuple[int, Mapping[str, Any]]]) -> Imported:
        """Upsert accounts in one transaction; rows are (line, values); ValueError names it."""
        warnings: list[str] = []

        def upsert(db: sqlite3.Connection) -> None:
            seen: dict[str, int] = {}
            warnings.clear()  # (a transaction written again says them again)
            for line, values in rows:
                v = _clean(values)
                _check_rec_id(line, v, ACCOUNT_ID)
                for field in ("email1", "email2"):
                    value = str(v.get(field) or "")
                    if value and not is_account_email(value):
                        raise ValueError(
                            f"line {line}: {field} {value!r} is not one address or domain"
                            " (write jane@example.com or example.com, no name, no second one)"
                        )
                if not v.get("file_as"):
                    # An update by rec_id may leave file_as out; a new account needs it.
                    v.pop("file_as", None)
                    if not v.get("rec_id") or not crm.account_exists(db, str(v["rec_id"])):
                        raise ValueError(f"line {line}: file_as is required")
                if v.get("rec_id") and v.get("file_as"):
                    named = crm.account_named(db, str(v["file_as"]))
                    if named is not None and named != v["rec_id"]:
                        new = not crm.account_exists(db, str(v["rec_id"]))
                        warnings.append(
                            f"line {line}: {'a new' if new else 'the'} account {v['rec_id']}"
                            f" has the name of account {named} ({v['file_as']!r}): alerts"
                            " naming it find both (ambiguous)"
                            + (
                                " — imported before without its rec_id? import without the"
                                " rec_id column to update that account instead"
                                if new
                                else ""
                            )
                        )
                try:
                    rec_id = crm.save_account(db, v, actor="import")
                except sqlite3.IntegrityError as exc:
                    raise ValueError(f"line {line}: {exc}") from None
                _once(seen, rec_id, line, "account")

        await self._write(upsert)
        return Imported(len(rows), warnings)

    async def import_contacts(self, rows: Sequence[tuple[int, Mapping[str, Any]]]) -> Imported:
        def upsert(db: sqlite3.Connection) -> None:
            seen: dict[str, int] = {}
            for line, values in rows:
                v = _clean(values)
                _check_rec_id(line, v, RECORD_ID)
                account = v.get("account_rec_id")
                if not account and v.get("account_file_as"):
                    account = crm.account_named(db, str(v["account_file_as"]))
                if not account or not crm.account_exists(db, str(account)):
                    raise ValueError(f"line {line}: the contact's account does not exist")
                email = str(v.get("email") or "").strip().lower() or None
                if email and not is_bare_address(email):
                    raise ValueError(f"line {line}: email {_not_one_address(email)}")
                rec_id = v.get("rec_id")
                if not rec_id and (email or v.get("name")):
                    # Without a rec_id, the same contact is the one with its address on the
                    # account, or, with no address (a phone-only contact), its name: else each
                    # re-import of the same file added a copy (spec 3).
                    found = db.execute(
                        "SELECT rec_id FROM contacts WHERE account = ? AND email = ?"
                        if email
                        else "SELECT rec_id FROM contacts WHERE account = ? AND email IS NULL"
                        " AND name = ? ORDER BY rec_id LIMIT 1",
                        (account, email or v.get("name")),
                    ).fetchone()
                    rec_id = found[0] if found else None
                rec_id = rec_id or crm.new_rec_id("CON")
                _once(seen, rec_id, line, "contact")
                # A contact re-imported under another account (same rec_id) leaves the keys of
                # the account it was on: its address named both accounts (ambiguous).
                before = db.execute(
                    "SELECT account FROM contacts WHERE rec_id = ?", (rec_id,)
                ).fetchone()
                now = crm.now_iso()
                db.execute(
                    "INSERT INTO contacts (rec_id, account, name, email, created_at, updated_at)"
                    " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (rec_id) DO UPDATE SET"
                    " account = excluded.account, name = excluded.name, email = excluded.email,"
                    " updated_at = excluded.updated_at",
                    (rec_id, account, v.get("name"), email, now, now),
                )
                crm.refresh_account_keys(db, str(account))
                if before is not None and before[0] != account:
                    crm.refresh_account_keys(db, str(before[0]))

        await self._write(upsert)
        return Imported(len(rows), [])

    async def import_employees(self, rows: Sequence[tuple[int, Mapping[str, Any]]]) -> Imported:
        def upsert(db: sqlite3.Connection) -> None:
            seen: dict[str, int] = {}
            # Matched on rec_id, else on the name as names are compared (`normalize_key`).
            by_name = {
                normalize_key(name): rec_id
                for rec_id, name in db.execute(
                    "SELECT rec_id, name FROM employees ORDER BY rowid DESC"
                ).fetchall()
            }
            for line, values in rows:
                v = _clean(values)
                _check_rec_id(line, v, RECORD_ID)
                name = str(v.get("name") or "").strip()
                if not name:
                    raise ValueError(f"line {line}: name is required")
                emails = [crm.address_value(v.get(k)) or None for k in ("email1", "email2")]
                for field, e in zip(("email1", "email2"), emails, strict=True):
                    if e and not is_bare_address(e):
                        raise ValueError(f"line {line}: {field} {_not_one_address(e)}")
                active = _flag(v.get("active", "Y"))
                if active is None:
                    raise ValueError(f"line {line}: active must be Y/N, true/false or 1/0")
                rec_id = v.get("rec_id") or by_name.get(normalize_key(name))
                rec_id = rec_id or crm.new_rec_id("EMP")
                _once(seen, rec_id, line, "employee")
                by_name[normalize_key(name)] = rec_id
                now = crm.now_iso()
                db.execute(
                    "INSERT INTO employees (rec_id, name, email1, email2, active, created_at,"
                    " updated_at) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (rec_id) DO UPDATE SET"
                    " name = excluded.name, email1 = excluded.email1, email2 = excluded.email2,"
                    " active = excluded.active, updated_at = excluded.updated_at",
                    (rec_id, name, emails[0], emails[1], int(active), now, now),
                )

        await self._write(upsert)
        return Imported(len(rows), [])

    # --- retention ---------------------------------------------------------------------------

    async def purge(self, retention_days: int) -> int:
        """Drop raw bytes of done messages older than the retention, and done outbox mails;
        outcomes stay. In transactions of at most PURGE_BATCH rows and PURGE_BATCH_BYTES of
        mail, oldest first, each checkpointed: intake commits between two (one transaction of
        700,000 held the write lock past SMTPGATE_STORE_TIMEOUT, and every sender got 451),
        and the freed pages, overwritten through the WAL, need free disk for one batch, not
        for all that is removed. Rows are read in the order they were written, which is the
        order they were received in: a batch ending at a row still kept ends the sweep."""
        now = time.time()
        cutoff = now - retention_days * 86400
        removed = 0
        for table in ("inbound_raw", "outbox"):
            after = 0
            while True:
                batch = functools.partial(_purge_batch, table=table, after=after, cutoff=cutoff)
                n, after, more = await self._write(batch)
                removed += n if table == "inbound_raw" else 0
                if n:
                    await self._checkpoint()  # the WAL starts again from its beginning
                if not more:
                    break

        def drop_logs(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM auto_mail_log WHERE sent_at < ?", (now - 7200,))
            db.execute(
                f"DELETE FROM seen_messages WHERE {_CONTENT_KEYS} AND seen_at < ?",
                (now - CONTENT_DUPLICATE_SECONDS,),
            )

        await self._write(drop_logs)
        return removed

    async def backup(self, target: Path) -> None:
        """A consistent online copy of the store (SQLite backup API).

        Written to a new file beside the target, readable by its owner only (it holds customer
        mail), fsynced, then renamed over the target: an interrupted backup or a full disk never
        leaves a partial file under the target's name, nor destroys the backup there."""
        part = await asyncio.to_thread(_new_private_file, target)
        try:
            async with aiosqlite.connect(part) as dest:
                await self._reader.backup(dest)
            await asyncio.to_thread(_fsync_and_rename, part, target)
        except BaseException:
            await asyncio.to_thread(part.unlink, missing_ok=True)
            raise


def _new_private_file(target: Path) -> Path:
    """An empty file beside `target`, mode 0600 (tempfile.mkstemp)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    return Path(name)


def _fsync_and_rename(part: Path, target: Path) -> None:
    with part.open("rb") as f:
        os.fsync(f.fileno())
    part.replace(target)
    directory = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _insert_intake(db: sqlite3.Connection, entries: Sequence[_IntakeEntry]) -> set[str]:
    """Insert the messages whose sessions still wait; return their ids."""
    # Here BEGIN IMMEDIATE holds the database's write lock. Waiting for it (the write lock, or
    # another process's transaction) can outlast the session, which answered 451: a message
    # answered 451 must not be stored, or a regenerated retry doubles it. (Future.done() only
    # reads the future's state: safe from this thread.)
    live = [(row, item) for row, item, _ in entries if not item.future.done()]
    db.executemany(
        "INSERT INTO inbound (id, received_at, peer, helo, mail_from, rcpt_tos,"
        " size, message_id, next_attempt_at, state, attempts, lease_until, lease_token)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [row for row, _ in live],
    )
    db.executemany(
        "INSERT INTO inbound_raw (id, raw) VALUES (?, ?)", [(item.id, item.raw) for _, item in live]
    )
    return {item.id for _, item in live}


def _requeue_mails(db: sqlite3.Connection, mails: Sequence[Delivery]) -> int:
    """Queue again claimed mails not tried, the claim's attempt not counted; a mail another
    sender has claimed since (another lease) stays. Returns how many were queued."""
    return db.executemany(
        "UPDATE outbox SET state = 'queued', attempts = attempts - 1, lease_until = NULL"
        " WHERE id = ? AND lease_until = ? AND state = 'active'",
        [(mail.id, mail.lease_until) for mail in mails],
    ).rowcount


def _kept_apart(db: sqlite3.Connection, table: str, ids: list[Any]) -> dict[Any, bytes]:
    """The bytes of these rows from the table that keeps them apart from the queue's rows
    (migrations 4 and 7: an UPDATE rewrites a whole row), by id."""
    column = {"inbound_raw": "raw", "outbox_data": "data"}[table]
    marks = ", ".join("?" for _ in ids)
    sql = f"SELECT id, {column} FROM {table} WHERE id IN ({marks})"
    return {row_id: bytes(blob) for row_id, blob in db.execute(sql, ids)}


def _file_identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _held_job(item: _Intake, lease: _IntakeLease) -> Job:
    """The Job a claim would read back for a message committed already leased (`hand_over`)."""
    return Job(
        id=item.id,
        token=lease.token,
        raw=item.raw,
        envelope=item.envelope,
        received_at=lease.received_at,
        attempts=1,
        message_id=item.message_id,
    )


def _cannot_open(path: Path, exc: sqlite3.Error, busy_timeout: float) -> ConfigError:
    """Store.open's error for what SQLite said, naming the setting that points at the store."""
    if getattr(exc, "sqlite_errorname", "") in ("SQLITE_BUSY", "SQLITE_LOCKED"):
        return ConfigError(
            f"SMTPGATE_DATA_DIR: the store {path} is locked by another process"
            f" (a running import or backup?) for over {busy_timeout:g} s: {exc}"
        )
    return ConfigError(f"SMTPGATE_DATA_DIR: cannot open the store {path}: {exc}")


_TICKET_BY_NUMBER = "SELECT rec_id, number, account FROM tickets WHERE number = ?"
_TICKET_BY_MESSAGE_ID = (
    "SELECT t.rec_id, t.number, t.account FROM message_links m"
    " JOIN tickets t ON t.rec_id = m.ticket WHERE m.message_id = ?"
)


def _ticket(db: sqlite3.Connection, sql: str, param: object) -> TicketRef | None:
    row = db.execute(sql, (param,)).fetchone()
    return (row[0], row[1], row[2]) if row else None


def _accounts_found(db: sqlite3.Connection, lookup: Lookup) -> Found:
    """normalized value → [(account, contact)] for one search, in chunks of 200 values."""
    field, values = lookup
    found: Found = {}
    for chunk_start in range(0, len(values), 200):
        chunk = values[chunk_start : chunk_start + 200]
        marks = ", ".join("?" for _ in chunk)
        for value, account, contact in db.execute(
            f"SELECT value, account, contact FROM account_keys"
            f" WHERE field = ? AND value IN ({marks})",
            (field, *chunk),
        ):
            found.setdefault(value, []).append((account, contact))
    return found


def _is_active_employee(db: sqlite3.Connection, address: str) -> bool:
    """Whether an active employee has this address, its domain in either IDNA spelling."""
    local, at, domain = address.lower().rpartition("@")
    spellings = [f"{local}@{d}" for d in domain_spellings(domain)] if at else [domain]
    marks = ", ".join("?" for _ in spellings)
    row = db.execute(
        f"SELECT 1 FROM employees WHERE active = 1"
        f" AND (email1 IN ({marks}) OR email2 IN ({marks})) LIMIT 1",
        (*spellings, *spellings),
    ).fetchone()
    return row is not None


def _connect_lookups(path: Path) -> sqlite3.Connection:
    """The decisions' read connection: the loop's thread only, never waits for a lock."""
    db = sqlite3.connect(path, isolation_level=None, timeout=0)
    try:
        db.execute("PRAGMA query_only = ON")
    except BaseException:
        db.close()
        raise
    return db


def _passive_checkpoint(db: sqlite3.Connection) -> tuple[int, int, int]:
    """(busy, frames in the WAL, frames copied to the database)."""
    busy, frames, copied = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    return int(busy), int(frames), int(copied)


async def _connect(
    path: Path, busy_timeout: float, *, any_thread: bool = False
) -> aiosqlite.Connection:
    """An aiosqlite connection; any_thread: also usable from the loop's thread (the writer)."""
    db = await aiosqlite.connect(
        path, isolation_level=None, timeout=busy_timeout, check_same_thread=not any_thread
    )
    db.row_factory = aiosqlite.Row
    try:
        await db.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
        # 250 means durable: fsync the WAL on every commit.
        await db.execute("PRAGMA synchronous = FULL")
        await db.execute("PRAGMA foreign_keys = ON")
    except BaseException:
        await db.close()  # its thread would keep the process alive
        raise
    return db


class Imported(NamedTuple):
    """What an import did: rows imported, and what the operator should hear of."""

    rows: int
    warnings: list[str]


# spec 3: RangerMSP's record ids, 20 characters: a 3-letter prefix per kind (CRD for
# accounts; contacts and employees as the CRM that exported them names them) and 17 more.
ACCOUNT_ID = re.compile(r"CRD[0-9A-Z]{17}")
RECORD_ID = re.compile(r"[A-Z]{3}[0-9A-Z]{17}")


def _check_rec_id(line: int, values: Mapping[str, Any], shape: re.Pattern[str]) -> None:
    rec_id = values.get("rec_id")
    if rec_id is not None and not shape.fullmatch(str(rec_id)):
        raise ValueError(
            f"line {line}: rec_id {str(rec_id)!r} is not a record id (20 characters: "
            f"{'CRD' if shape is ACCOUNT_ID else 'a 3-letter prefix'} and 17 upper-case"
            " letters or digits; leave it empty to match on the name)"
        )


def _once(seen: dict[str, int], rec_id: str, line: int, kind: str) -> None:
    """Two rows of one file for one record: the second would overwrite the first unseen."""
    if rec_id in seen:
        raise ValueError(
            f"line {line}: the same {kind} as line {seen[rec_id]} (rows are matched on"
            " rec_id, else on the name): one row a record"
        )
    seen[rec_id] = line


def _not_one_address(value: str) -> str:
    return f"{value!r} is not one address (write jane@example.com, no name, no second one)"


def _clean(values: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        key = str(key).strip().lower()
        if isinstance(value, str):
            value = value.strip()
            if value == "":
                value = None
        out[key] = value
    return out


def _flag(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    text = str(value if value is not None else "Y").strip().lower()
    if text in ("y", "yes", "true", "1", ""):
        return True
    if text in ("n", "no", "false", "0"):
        return False
    return None


def _inbound_view(row: Any) -> dict[str, Any]:
    return {
        "id": row["id"],
        "message_id": row["message_id"],
        "mail_from": row["mail_from"],
        "rcpt_tos": json.loads(row["rcpt_tos"]),
        "state": row["state"],
        "attempts": row["attempts"],
        "received_at": iso(row["received_at"]),
        "last_error": row["last_error"],
        "outcome": json.loads(row["outcome"]) if row["outcome"] else None,
    }
