"""The store's transactions cost at most one hand-off to aiosqlite's thread each, and stay atomic.

Every store operation that is one transaction runs as one plain function over the sqlite3
connection: in aiosqlite's worker thread (`store._in_thread`, on aiosqlite's private API), or,
for a decision's lookups and small bookkeeping without fsync, in the loop's own thread. These
tests count the hand-offs on the processing path, check that private API, check that a lock
held by another process never makes the loop wait, and check that a transaction interrupted
anywhere (lost lease, exception, cancellation) leaves all or nothing.
"""

from __future__ import annotations

import asyncio
import csv
import itertools
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiosqlite
import pytest

import smtpgate.store as store_module
from smtpgate.config import load_rules, load_settings
from smtpgate.mail import parse_message
from smtpgate.model import (
    Action,
    Applied,
    Decision,
    Envelope,
    MailKind,
    Needs,
    NewTicket,
    OutboundMail,
    Outcome,
)
from smtpgate.model import Path as Branch
from smtpgate.pipeline import Context, decide, dedupe_key
from smtpgate.store import Job, Store, new_queue_id

FIXTURES = Path(__file__).parent / "fixtures"
ACME = "CRDACME0000000000001"
SENDER = "alerts@externalsystem.com"
ENV = Envelope("127.0.0.1", "rmm.example", SENDER, ("connector@localhost",))
RECORD_TABLES = ("tickets", "history", "message_links", "seen_messages", "outbox", "auto_mail_log")


class Hops:
    """Counts hand-offs to the store's threads (aiosqlite's `_execute`), per connection, and
    the write transactions run in the loop's thread ("inline", no hand-off)."""

    def __init__(self, store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
        self.counts: Counter[str] = Counter()
        for name, conn in (("writer", store._db), ("reader", store._reader)):
            monkeypatch.setattr(conn, "_execute", self._spy(name, conn._execute))
        write_here = store._write_here

        def inline(fn: Callable[..., Any]) -> Any:
            self.counts["inline"] += 1
            return write_here(fn)

        monkeypatch.setattr(store, "_write_here", inline)

    def _spy(self, name: str, execute: Callable[..., Any]) -> Callable[..., Any]:
        async def spy(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            self.counts[name] += 1
            return await execute(fn, *args, **kwargs)

        return spy

    @contextmanager
    def measure(self) -> Iterator[Counter[str]]:
        before = Counter(self.counts)
        seen: Counter[str] = Counter()
        yield seen
        seen.update({k: self.counts[k] - before[k] for k in self.counts})
        seen["total"] = seen["writer"] + seen["reader"]


async def open_with_accounts(path: Path) -> Store:
    """The store at `path`, holding the accounts of tests/fixtures/accounts.csv."""
    store = await Store.open(path)
    with (FIXTURES / "accounts.csv").open() as f:
        await store.import_accounts(list(enumerate(csv.DictReader(f), 2)))
    return store


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    store = await open_with_accounts(tmp_path / "smtpgate.db")
    # WAL checkpoints by commit count only: one started by the clock (a hop to the writer's
    # thread) must not land in the middle of a count on a slow machine.
    store.CHECKPOINT_SECONDS = float("inf")
    try:
        yield store
    finally:
        await store.close()


def alert(site: str, n: int) -> bytes:
    return (
        f"From: {SENDER}\r\nTo: connector@localhost\r\nMessage-ID: <a{n}@externalsystem.com>\r\n"
        f"Subject: Alert for Site {site}, Disk C: low on free space\r\n\r\nDisk C: 2 %\r\n"
    ).encode()


def big_alert(site: str, n: int) -> bytes:
    """Too big for its decision to be written in the loop's thread."""
    return alert(site, n) + b"x" * store_module.INLINE_MAX_BYTES + b"\r\n"


async def enqueue(store: Store, raw: bytes, message_id: str | None = None) -> None:
    await store.enqueue(ENV, raw, message_id, new_queue_id())


async def one_job(store: Store, lease_seconds: float = 300) -> Job:
    (job,) = await store.claim(1, lease_seconds)
    return job


async def counts(store: Store) -> dict[str, int]:
    out = {}
    for table in RECORD_TABLES:
        rows = await store._reader.execute_fetchall(f"SELECT count(*) FROM {table}")
        out[table] = next(iter(rows))[0]
    return out


async def states(store: Store, jobs: list[Job]) -> list[str | None]:
    """Each job's message's queue state (None: no such message)."""
    return [(await store.get_inbound(job.id) or {}).get("state") for job in jobs]


def ticket_decision(mails: Callable[[Applied], list[OutboundMail]] | None = None) -> Decision:
    """A ticket, its note, a Message-ID link and (by default) one forward: rows in every table."""

    def forward(_: Applied) -> list[OutboundMail]:
        return [OutboundMail(MailKind.FORWARD, "c@localhost", ("s@msp.example",), b"x", "<f@x>")]

    return Decision(
        Branch.AUTOMATED,
        Action.AUTOMATED_TICKET,
        account=ACME,
        new_ticket=NewTicket(ACME, None, "disk", "details", "test", "note", message_id="<a1@x>"),
        mails=mails or forward,
    )


def complete_ticket(
    store: Store, job: Job, mails: Callable[[Applied], list[OutboundMail]] | None = None
) -> Coroutine[Any, Any, Outcome | None]:
    """`store.complete` of `ticket_decision(mails)` for the message <a1@x>."""
    return store.complete(
        job, ticket_decision(mails), dedupe_key="<a1@x>", auto_mail_hourly_limit=20
    )


# --- aiosqlite's private API, as the store uses it ---------------------------------------------


def test_aiosqlite_still_has_the_private_api_the_store_uses() -> None:
    store_module._check_aiosqlite()  # what the import ran


def test_the_import_check_fails_loudly_without_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(aiosqlite.Connection, "_execute")
    with pytest.raises(ImportError, match="aiosqlite"):
        store_module._check_aiosqlite()


async def test_in_thread_runs_in_order_in_the_connections_thread(tmp_path: Path) -> None:
    async with aiosqlite.connect(tmp_path / "x.db", isolation_level=None) as db:
        threads = []

        def fn(conn: sqlite3.Connection) -> int:
            threads.append(threading.get_ident())
            return int(conn.execute("SELECT count(*) FROM t").fetchone()[0])

        await db.execute("CREATE TABLE t (x)")
        pending = db.execute("INSERT INTO t VALUES (1)")  # queued before, not yet awaited
        task = asyncio.ensure_future(pending)
        await asyncio.sleep(0)
        assert await store_module._in_thread(db, fn) == 1
        await task
        assert threads == [db._thread.ident]
        assert threads[0] != threading.get_ident()

        def broken(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT INTO missing VALUES (1)")

        with pytest.raises(sqlite3.OperationalError) as caught:
            await store_module._in_thread(db, broken)
        assert caught.value.sqlite_errorname == "SQLITE_ERROR"


# --- one hand-off per transaction on the processing path ----------------------------------------


@pytest.mark.parametrize(
    ("site", "action"),
    [
        ("Acme Corp", Action.AUTOMATED_TICKET),  # the site rule finds it
        ("Nowhere Ltd", Action.AUTOMATED_NO_ACCOUNT),  # site, then sender address and domain
    ],
)
async def test_a_processed_alert_costs_one_hop_per_transaction(
    store: Store,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    site: str,
    action: Action,
) -> None:
    hops = Hops(store, monkeypatch)
    settings = load_settings(
        _env_file=None, data_dir=tmp_path, internal_support_address="support@msp.example"
    )
    ctx = Context(settings, load_rules(FIXTURES / "rules.toml"))
    raw = alert(site, 1)

    with hops.measure() as intake:
        await enqueue(store, raw, "<a1@externalsystem.com>")
    with hops.measure() as claim:
        job = await one_job(store)
    msg = parse_message(job.raw)
    with hops.measure() as decided:
        decision = await decide(job.raw, job.envelope.mail_from, msg, ctx, store)
    with hops.measure() as completed:
        outcome = await store.complete(
            job, decision, dedupe_key=dedupe_key(msg.message_id, job.raw), auto_mail_hourly_limit=20
        )
    with hops.measure() as outbox:
        deliveries = await store.claim_deliveries(16, 300)
        if deliveries:
            await store.delivery_done([d.id for d in deliveries])

    assert outcome is not None
    assert outcome.action == action
    assert intake["total"] == 1  # the group commit, in the thread: it fsyncs
    assert (claim["total"], claim["inline"]) == (0, 1)  # in the loop's thread (was one hop)
    assert decided["total"] == 0  # lookups run in the loop's thread (were one hop each)
    # One transaction, in the loop's thread. Was one hop, and ~6 before that (one per statement).
    assert (completed["total"], completed["inline"]) == (0, 1)
    if action == Action.AUTOMATED_TICKET:
        assert outcome.ticket is not None
        assert deliveries == []
        assert (outbox["total"], outbox["inline"]) == (1, 0)
    else:
        assert [d.kind for d in deliveries] == ["forward"]
        assert outcome.sent == [{"kind": "forward", "to": ["support@msp.example"]}]
        # claim_deliveries reads the mails in the thread; delivery_done is inline
        assert (outbox["total"], outbox["inline"]) == (1, 1)


async def test_a_claim_too_big_for_the_loop_is_made_in_the_thread(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reading a big message would hold the loop: a claim holds at most GROUP_MAX_BYTES of raw
    message in the loop's thread, and one bigger message is claimed in the writer's thread."""
    small = alert("Acme Corp", 1)
    await enqueue(store, small, "<a1@x>")
    await enqueue(store, big_alert("Acme Corp", 2), "<a2@x>")
    await enqueue(store, small, "<a3@x>")
    monkeypatch.setattr(store_module, "GROUP_MAX_BYTES", 10 * len(small))
    hops = Hops(store, monkeypatch)
    with hops.measure() as first:
        (job,) = await store.claim(10, 300)  # the big one does not fit in the budget
    with hops.measure() as second:
        big, last = await store.claim(10, 300)  # always at least the first: not in the loop
    assert (job.message_id, big.message_id, last.message_id) == ("<a1@x>", "<a2@x>", "<a3@x>")
    assert (first["inline"], first["writer"]) == (1, 0)
    assert (second["inline"], second["writer"]) == (1, 1)  # tried here, rolled back
    assert len(big.raw) > store_module.INLINE_MAX_BYTES
    assert (big.attempts, last.attempts) == (1, 1)  # the attempt here was rolled back whole
    assert await store.claim(10, 300) == []


async def test_a_big_messages_decision_is_written_in_the_thread(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its rows (a forward of the whole message) take time to write: not in the loop."""
    await enqueue(store, big_alert("Acme Corp", 1), "<a1@x>")
    job = await one_job(store)
    hops = Hops(store, monkeypatch)
    with hops.measure() as seen:
        assert await complete_ticket(store, job)
    assert (seen["writer"], seen["inline"]) == (1, 0)


async def test_every_bookkeeping_transaction_is_one_hop(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    await enqueue(store, alert("Acme Corp", 1), "<a1@x>")
    await enqueue(store, alert("Acme Corp", 2), "<a2@x>")
    hops = Hops(store, monkeypatch)
    first, second = await store.claim(2, 300)
    assert await complete_ticket(store, first)
    (delivery,) = await store.claim_deliveries(4, 300)
    calls: list[tuple[Callable[[], Any], str]] = [
        (lambda: store.fail(second, "boom", max_attempts=5, backoff=0), "inline"),
        (lambda: store.delivery_failed(delivery.id, "451 later", 0.0), "inline"),
        (lambda: store.release_expired(), "writer"),
        (lambda: store.simulate(ticket_decision(), "<a1@x>", hourly_limit=20), "writer"),
        (lambda: store.can_write(), "writer"),
    ]
    for call, where in calls:
        with hops.measure() as seen:
            await call()
        assert seen[where] == 1, call
        assert seen["total"] + seen["inline"] == 1, call


async def test_decision_lookups_run_in_the_loops_thread_and_see_the_latest_commit(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    await enqueue(store, alert("Acme Corp", 1), "<a1@x>")
    job = await one_job(store)
    hops = Hops(store, monkeypatch)
    with hops.measure() as seen:
        assert (await store.look_up(Needs(message_ids=("<a1@x>",)))).threaded is None
        assert await complete_ticket(store, job)
        # The ticket committed a moment ago on the writer is visible to every lookup.
        facts = await store.look_up(
            Needs(
                # 3 chunks of values, and a second search
                by_rule=(("file_as", tuple(f"v{i}" for i in range(450))),),
                by_sender=(("email", ()), ("domain", ("acme.example",))),
                employee="nobody@example.org",
                ticket_numbers=(1, 2),
                message_ids=("<x@y>", "<a1@x>", "<f@x>"),
            )
        )
        assert facts.threaded is not None
        assert facts.threaded[1:] == (1, ACME)
        assert facts.tickets == (facts.threaded,)  # ticket 2 does not exist
        assert facts.by_rule == ({},)
        assert facts.by_sender[0] == {}
        assert {a for matches in facts.by_sender[1].values() for a, _ in matches} == {ACME}
        assert not facts.employee
    assert (seen["total"], seen["inline"]) == (0, 1)  # the completion only, in the loop


async def test_a_busy_lookup_waits_on_the_readers_thread(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lookup connection never waits for a lock in the loop: busy, the read is handed off."""

    class Busy:
        def __init__(self, name: str) -> None:
            self.calls = 0
            self.name = name

        def execute(self, *_: Any) -> Any:
            self.calls += 1
            exc = sqlite3.OperationalError("database is locked")
            exc.sqlite_errorname = self.name
            raise exc

    hops = Hops(store, monkeypatch)
    busy = Busy("SQLITE_BUSY")
    monkeypatch.setattr(store, "_lookups", busy)
    with hops.measure() as seen:
        facts = await store.look_up(Needs(by_sender=(("domain", ("acme.example",)),)))
    assert {a for matches in facts.by_sender[0].values() for a, _ in matches} == {ACME}
    assert (busy.calls, seen["reader"]) == (1, 1)

    broken = Busy("SQLITE_CORRUPT")  # anything but busy is the store's error, raised as it is
    monkeypatch.setattr(store, "_lookups", broken)
    with hops.measure() as seen, pytest.raises(sqlite3.OperationalError):
        await store.look_up(Needs(ticket_numbers=(1,)))
    assert (broken.calls, seen["total"]) == (1, 0)


def writer_pragma(store: Store, name: str) -> int:
    return int(store._db._conn.execute(f"PRAGMA {name}").fetchone()[0])


async def test_a_lock_held_by_another_process_never_stops_the_loop(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Inline, SQLite does not wait for a lock: the transaction waits in the thread instead."""
    await enqueue(store, alert("Acme Corp", 1), "<a1@x>")
    job = await one_job(store)
    hops = Hops(store, monkeypatch)
    other = sqlite3.connect(store.path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # e.g. a CLI command writing right now
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.01)

    ticking = asyncio.create_task(ticker())
    try:
        with hops.measure() as seen:
            task = asyncio.create_task(complete_ticket(store, job))
            await asyncio.sleep(0.3)
            assert not task.done()  # waiting for the lock, in the thread
            assert ticks >= 10  # while the loop runs on
            other.execute("COMMIT")
            outcome = await task
    finally:
        ticking.cancel()
        other.close()
    assert outcome is not None
    assert outcome.ticket == 1
    assert (seen["inline"], seen["writer"]) == (1, 1)  # tried inline: busy; then the thread
    assert writer_pragma(store, "busy_timeout") == 5000  # the thread waits, as before
    await store.delivery_done([])
    assert writer_pragma(store, "busy_timeout") == 0  # inline again: never waits
    await enqueue(store, alert("Acme Corp", 2), "<a2@x>")
    assert writer_pragma(store, "busy_timeout") == 5000  # an intake commit waits again
    await store.delivery_done([])
    await store.simulate(ticket_decision(), None, hourly_limit=20)
    assert writer_pragma(store, "busy_timeout") == 5000  # so does explain's rehearsal


async def test_an_intake_commit_is_durable_after_an_inline_attempt_failed(
    tmp_path: Path,
) -> None:
    """An inline transaction that fails part-way leaves the writer's settings unknown: the
    next durable commit sets synchronous=FULL again rather than trusting what it last set."""
    store = await Store.open(tmp_path / "smtpgate.db", busy_timeout=0.05)
    try:
        await enqueue(store, alert("Acme Corp", 1), "<a1@x>")
        (job,) = await store.claim(1, 300)  # synchronous=NORMAL from here
        await enqueue(store, alert("Acme Corp", 2), "<a2@x>")
        assert writer_pragma(store, "synchronous") == 2  # FULL
        other = sqlite3.connect(store.path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            await store.fail(job, "boom", max_attempts=5, backoff=0)  # inline, then the thread
        other.execute("COMMIT")
        other.close()
        await enqueue(store, alert("Acme Corp", 3), "<a3@x>")
        assert writer_pragma(store, "synchronous") == 2  # FULL: the intake was fsynced
    finally:
        await store.close()


async def test_the_wal_is_checkpointed_off_the_loop_and_stays_small(store: Store) -> None:
    """No commit checkpoints (it may run in the loop's thread); a checkpoint in the writer's
    thread does, so the WAL is reset and reused instead of growing with every commit."""
    assert writer_pragma(store, "wal_autocheckpoint") == 0
    wal = store.path.with_name(store.path.name + "-wal")
    row = "x" * 3000

    def insert(db: sqlite3.Connection) -> None:
        db.execute(
            "INSERT INTO auto_mail_log (recipient, sent_at) VALUES (?, ?)", (row, time.time())
        )

    for _ in range(1500):  # ~2 pages each: ~12 MB of WAL if nothing checkpointed it
        await store._write(insert, durable=False, inline=True)
        await asyncio.sleep(0)  # workers always await something between transactions
    assert store._checkpointer is not None
    await store._checkpointer
    assert wal.stat().st_size < 4_000_000


async def test_the_write_after_a_complete_checkpoint_goes_to_the_thread(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It restarts the WAL, and SQLite fsyncs the new WAL header: never in the loop."""
    await enqueue(store, alert("Acme Corp", 1), "<a1@x>")
    job = await one_job(store)
    hops = Hops(store, monkeypatch)
    await store._checkpoint()  # copies the whole WAL: nobody else writes
    with hops.measure() as restart:
        await store.fail(job, "boom", max_attempts=5, backoff=0)
    with hops.measure() as after:
        await store.delivery_done([])
    assert (restart["writer"], restart["inline"]) == (1, 0)
    assert (after["writer"], after["inline"]) == (0, 1)


async def test_mail_goes_to_the_relay_only_once_its_decision_is_fsynced(store: Store) -> None:
    """A decision commits without an fsync. Were an OS crash to roll it back after its forward
    was relayed, the message would be processed again and the forward sent twice; so the claim
    that takes such mail for the relay commits durably (its fsync covers the decision), and a
    claim with no such mail before it does not."""
    for n in (1, 2):
        await enqueue(store, alert("Acme Corp", n), f"<a{n}@x>")
    first, second = await store.claim(2, 300)  # synchronous=NORMAL from here
    assert await complete_ticket(store, first)  # one forward, not yet fsynced
    assert await store.claim_deliveries(0, 300) == []  # took nothing: fsynced nothing either
    assert writer_pragma(store, "synchronous") == 2  # FULL
    (delivery,) = await store.claim_deliveries(4, 300)
    assert writer_pragma(store, "synchronous") == 2  # FULL: it wrote, so the WAL is fsynced
    await store.delivery_done([delivery.id])
    assert await store.complete(
        second, ticket_decision(lambda _: []), dedupe_key="<a2@x>", auto_mail_hourly_limit=20
    )  # no mail
    assert await store.claim_deliveries(4, 300) == []
    assert writer_pragma(store, "synchronous") == 1  # NORMAL: nothing to make durable


async def test_a_relay_claim_waiting_for_a_decision_with_mail_is_durable(store: Store) -> None:
    """Whether the claim must fsync is asked once it holds the write lock: a decision that
    queues mail may commit while the claim waits for the lock (here: a message too big for
    the loop's thread, its decision queued in the writer's thread behind a blocker)."""
    await enqueue(store, big_alert("Acme Corp", 1), "<a1@x>")
    (job,) = await store.claim(1, 300)
    await enqueue(store, alert("Acme Corp", 2), "<a2@x>")  # durable: nothing waits for an fsync
    gate = threading.Event()
    blocker = asyncio.ensure_future(store_module._in_thread(store._db, lambda _: gate.wait(5)))
    decision = asyncio.create_task(complete_ticket(store, job))  # takes the lock, then waits
    claim = asyncio.create_task(store.claim_deliveries(4, 300))  # waits for the lock
    await asyncio.sleep(0.05)
    assert not decision.done()  # its transaction waits behind the blocker
    assert not claim.done()  # waits for the write lock
    gate.set()
    await blocker
    assert await decision
    (delivery,) = await claim
    assert delivery.kind == "forward"  # the decision's, claimed in the same wait
    assert writer_pragma(store, "synchronous") == 2  # FULL: the decision is on disk


async def test_the_first_relay_claim_after_a_restart_is_durable(tmp_path: Path) -> None:
    """The last process may have left decisions with mail in the WAL without an fsync."""
    path = tmp_path / "smtpgate.db"
    store = await open_with_accounts(path)
    await enqueue(store, alert("Acme Corp", 1), "<a1@x>")
    assert await complete_ticket(store, await one_job(store))
    await store.close()
    store = await Store.open(path)
    try:
        await store.delivery_done([])  # synchronous=NORMAL
        assert len(await store.claim_deliveries(4, 300)) == 1
        assert writer_pragma(store, "synchronous") == 2
    finally:
        await store.close()


async def test_close_waits_for_a_running_write_and_starts_no_checkpoint(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    store.CHECKPOINT_COMMITS = 1  # every commit would start one
    writing = asyncio.create_task(store.can_write())  # in the writer's thread
    await asyncio.sleep(0)
    await store.close()
    assert await writing
    assert store._checkpointer is None
    assert "checkpoint failed" not in caplog.text


# --- all or nothing ------------------------------------------------------------------------------


async def test_a_lost_lease_rolls_back_the_whole_decision(store: Store) -> None:
    await enqueue(store, alert("Acme Corp", 1), "<a1@x>")
    stale = await one_job(store, lease_seconds=-1)  # already expired
    assert await store.release_expired() == 1
    fresh = await one_job(store)
    before = await counts(store)

    outcome = await complete_ticket(store, stale)

    assert outcome is None
    assert await counts(store) == before == dict.fromkeys(RECORD_TABLES, 0)
    assert await states(store, [fresh]) == ["active"]
    outcome = await complete_ticket(store, fresh)
    assert outcome is not None
    assert outcome.ticket == 1


async def test_an_exception_mid_transaction_leaves_no_partial_rows(store: Store) -> None:
    await enqueue(store, alert("Acme Corp", 1), "<a1@x>")
    job = await one_job(store)

    def mails(_: Applied) -> list[OutboundMail]:
        # By now seen_messages, the ticket, its note and the link are written (uncommitted).
        raise RuntimeError("the mail builder broke")

    with pytest.raises(RuntimeError, match="broke"):
        await complete_ticket(store, job, mails)
    assert await counts(store) == dict.fromkeys(RECORD_TABLES, 0)
    assert not store._db._conn.in_transaction
    assert await states(store, [job]) == ["active"]

    # An SQLite error half-way (the outbox insert) is raised as itself, and rolls back as well.
    await store._db.execute(
        "CREATE TEMP TRIGGER fail_outbox BEFORE INSERT ON outbox"
        " BEGIN SELECT RAISE(ABORT, 'outbox refused'); END"
    )
    with pytest.raises(sqlite3.IntegrityError, match="outbox refused") as caught:
        await complete_ticket(store, job)
    assert caught.value.sqlite_errorname == "SQLITE_CONSTRAINT_TRIGGER"
    assert await counts(store) == dict.fromkeys(RECORD_TABLES, 0)
    assert not store._db._conn.in_transaction

    await store._db.execute("DROP TRIGGER temp.fail_outbox")
    outcome = await complete_ticket(store, job)
    assert outcome is not None
    assert (await counts(store))["outbox"] == 1


async def test_a_decision_cancelled_mid_transaction_commits_whole_and_holds_the_lock(
    store: Store,
) -> None:
    await enqueue(store, big_alert("Acme Corp", 1), "<a1@x>")  # a decision written in the thread
    job = await one_job(store)
    entered, release = threading.Event(), threading.Event()

    def slow_mails(applied: Applied) -> list[OutboundMail]:  # runs in the writer's thread
        entered.set()
        assert release.wait(10)
        return [OutboundMail(MailKind.FORWARD, "c@localhost", ("s@msp.example",), b"x")]

    task = asyncio.create_task(complete_ticket(store, job, slow_mails))
    assert await asyncio.to_thread(entered.wait, 10)
    task.cancel()
    await asyncio.sleep(0.05)
    # The thread function runs on: the next writer must not get the lock before it has ended.
    assert store._write_lock.locked()
    assert not task.done()
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not store._write_lock.locked()
    # It had begun, so it finished: committed whole (the message is done, not half-applied).
    assert await counts(store) == {**dict.fromkeys(RECORD_TABLES, 1), "auto_mail_log": 0}
    assert await states(store, [job]) == ["done"]


async def test_explain_rolls_back_in_one_hop(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    hops = Hops(store, monkeypatch)
    with hops.measure() as seen:
        outcome = await store.simulate(ticket_decision(), None, hourly_limit=20)
    assert seen["total"] == 1
    assert outcome.ticket == 1
    assert outcome.sent == [{"kind": "forward", "to": ["s@msp.example"]}]
    assert await counts(store) == dict.fromkeys(RECORD_TABLES, 0)
    assert not store._db._conn.in_transaction


# --- decisions ready together share one transaction --------------------------------------------


def numbered_decision(
    n: int, mails: Callable[[Applied], list[OutboundMail]] | None = None
) -> Decision:
    """A ticket for the message <a{n}@x>, with one forward unless `mails` says otherwise."""

    def forward(_: Applied) -> list[OutboundMail]:
        return [
            OutboundMail(MailKind.FORWARD, "c@localhost", ("s@msp.example",), b"x", f"<f{n}@x>")
        ]

    return Decision(
        Branch.AUTOMATED,
        Action.AUTOMATED_TICKET,
        account=ACME,
        new_ticket=NewTicket(
            ACME, None, f"disk {n}", "details", "test", "note", message_id=f"<a{n}@x>"
        ),
        mails=mails or forward,
    )


async def claim_many(store: Store, n: int) -> list[Job]:
    for i in range(n):
        await enqueue(store, alert("Acme Corp", i), f"<a{i}@x>")
    jobs = await store.claim(n, 300)
    assert len(jobs) == n
    return jobs


def complete_all(
    store: Store, jobs: list[Job], decisions: list[Decision]
) -> Coroutine[Any, Any, list[Outcome | BaseException | None]]:
    """The workers that finished deciding in the same pass of the loop, each completing."""
    return asyncio.gather(
        *(
            store.complete(job, d, dedupe_key=f"<a{i}@x>", auto_mail_hourly_limit=20)
            for i, (job, d) in enumerate(zip(jobs, decisions, strict=True))
        ),
        return_exceptions=True,
    )


async def test_decisions_ready_together_share_one_transaction(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    jobs = await claim_many(store, 6)
    hops = Hops(store, monkeypatch)
    with hops.measure() as seen:
        outcomes = await complete_all(store, jobs, [numbered_decision(i) for i in range(6)])
    assert (seen["inline"], seen["total"]) == (1, 0)  # was one transaction each
    assert sorted(o.ticket for o in outcomes if isinstance(o, Outcome)) == [1, 2, 3, 4, 5, 6]
    assert await counts(store) == {
        **dict.fromkeys(RECORD_TABLES, 6),
        "message_links": 12,  # the alert's and the forward's Message-ID
        "auto_mail_log": 0,
    }
    assert await states(store, jobs) == ["done"] * len(jobs)


async def test_a_group_holds_at_most_a_mebibyte_of_messages(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each transaction runs in the loop's thread: a bigger group would hold the loop longer."""
    jobs = await claim_many(store, 5)
    monkeypatch.setattr(store_module, "GROUP_MAX_BYTES", 2 * len(alert("Acme Corp", 1)))
    hops = Hops(store, monkeypatch)
    with hops.measure() as seen:
        outcomes = await complete_all(store, jobs, [numbered_decision(i) for i in range(5)])
    assert all(isinstance(o, Outcome) for o in outcomes)
    assert seen["inline"] == 3  # 2 + 2 + 1
    assert await states(store, jobs) == ["done"] * len(jobs)


async def test_groups_written_back_to_back_let_the_loop_run_between_them(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    jobs = await claim_many(store, 4)
    monkeypatch.setattr(store_module, "GROUP_MAX_BYTES", 1)  # one decision per group
    seen: list[str] = []
    write_here = store._write_here

    def inline(fn: Callable[..., Any]) -> Any:
        seen.append("write")
        return write_here(fn)

    monkeypatch.setattr(store, "_write_here", inline)

    async def ticker() -> None:
        while True:
            seen.append("tick")
            await asyncio.sleep(0)

    ticking = asyncio.create_task(ticker())
    try:
        outcomes = await complete_all(store, jobs, [numbered_decision(i) for i in range(4)])
    finally:
        ticking.cancel()
    assert all(isinstance(o, Outcome) for o in outcomes)
    writes = [i for i, what in enumerate(seen) if what == "write"]
    assert len(writes) == 4
    assert all(b - a > 1 for a, b in itertools.pairwise(writes)), seen  # a tick between


async def test_one_failed_decision_in_a_group_rolls_back_alone(store: Store) -> None:
    """A broken mail builder, a lost lease and an SQLite error each undo their own decision
    only; the others in the transaction are applied whole."""
    jobs = await claim_many(store, 5)
    stale = jobs[2]
    # Its lease lapses and another worker takes it: the stale worker's decision must not count.
    await store._db.execute("UPDATE inbound SET lease_token = 'other' WHERE id = ?", (stale.id,))

    def broken(_: Applied) -> list[OutboundMail]:
        raise RuntimeError("the mail builder broke")

    await store._db.execute(
        "CREATE TEMP TRIGGER refuse_f3 BEFORE INSERT ON outbox WHEN new.message_id = '<f3@x>'"
        " BEGIN SELECT RAISE(ABORT, 'outbox refused'); END"
    )
    decisions = [numbered_decision(i) for i in range(5)]
    decisions[1] = numbered_decision(1, broken)
    outcomes = await complete_all(store, jobs, decisions)

    assert isinstance(outcomes[1], RuntimeError)
    assert outcomes[2] is None  # lease lost
    assert isinstance(outcomes[3], sqlite3.IntegrityError)
    assert [isinstance(o, Outcome) for o in outcomes] == [True, False, False, False, True]
    assert not store._db._conn.in_transaction
    assert await counts(store) == {
        **dict.fromkeys(RECORD_TABLES, 2),
        "message_links": 4,
        "auto_mail_log": 0,
    }
    rows = await store._reader.execute_fetchall("SELECT message_id FROM message_links")
    assert {r[0] for r in rows} == {"<a0@x>", "<f0@x>", "<a4@x>", "<f4@x>"}
    assert await states(store, jobs) == ["done", "active", "active", "active", "done"]


async def test_an_error_that_ends_the_transaction_fails_only_its_own_decision(
    store: Store,
) -> None:
    """SQLite rolls the whole transaction back by itself on some errors (a full disk, an I/O
    error; here a trigger): the group's decisions are then written one by one, so that only the
    one at fault fails and uses up an attempt."""
    jobs = await claim_many(store, 3)
    await store._db.execute(
        "CREATE TEMP TRIGGER break_all AFTER INSERT ON outbox WHEN new.message_id = '<f1@x>'"
        " BEGIN SELECT RAISE(ROLLBACK, 'disk on fire'); END"
    )
    outcomes = await complete_all(store, jobs, [numbered_decision(i) for i in range(3)])
    assert isinstance(outcomes[1], sqlite3.IntegrityError)
    assert [isinstance(o, Outcome) for o in outcomes] == [True, False, True]
    assert not store._db._conn.in_transaction
    assert (await counts(store))["tickets"] == 2
    assert await states(store, jobs) == ["done", "active", "done"]


async def test_a_decision_raising_stopiteration_does_not_stop_the_group_writer(
    store: Store,
) -> None:
    """A future cannot hold StopIteration: it fails its own decision as a RuntimeError (as in
    a coroutine), and the decisions after it, in this group and the next, are written."""
    jobs = await claim_many(store, 4)

    def empty(_: Applied) -> list[OutboundMail]:
        return [next(iter([]))]

    decisions = [numbered_decision(i) for i in range(4)]
    decisions[0] = numbered_decision(0, empty)
    outcomes = await complete_all(store, jobs[:2], decisions[:2])
    assert isinstance(outcomes[0], RuntimeError)
    assert isinstance(outcomes[1], Outcome)
    outcomes = await complete_all(store, jobs[2:], decisions[2:])
    assert all(isinstance(o, Outcome) for o in outcomes)


async def test_a_group_waits_in_the_thread_while_another_process_writes(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tried in the loop's thread first (busy: rolled back whole), then written once in the
    writer's thread: one ticket each."""
    jobs = await claim_many(store, 3)
    hops = Hops(store, monkeypatch)
    other = sqlite3.connect(store.path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        with hops.measure() as seen:
            task = asyncio.ensure_future(
                complete_all(store, jobs, [numbered_decision(i) for i in range(3)])
            )
            await asyncio.sleep(0.2)
            assert not task.done()
            other.execute("COMMIT")
            outcomes = await task
    finally:
        other.close()
    assert (seen["inline"], seen["writer"]) == (1, 1)
    assert sorted(o.ticket for o in outcomes if isinstance(o, Outcome)) == [1, 2, 3]
    assert (await counts(store))["outbox"] == 3


async def test_a_cancelled_worker_s_decision_is_left_out_of_the_group(store: Store) -> None:
    jobs = await claim_many(store, 2)
    kept = asyncio.ensure_future(
        store.complete(
            jobs[0], numbered_decision(0), dedupe_key="<a0@x>", auto_mail_hourly_limit=20
        )
    )
    gone = asyncio.ensure_future(
        store.complete(
            jobs[1], numbered_decision(1), dedupe_key="<a1@x>", auto_mail_hourly_limit=20
        )
    )
    await asyncio.sleep(0)  # both queued their decision
    gone.cancel()
    assert isinstance(await kept, Outcome)
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert (await counts(store))["tickets"] == 1
    assert await states(store, jobs[1:]) == ["active"]  # its lease lapses; processed again then


async def test_close_lets_the_group_being_written_finish(store: Store) -> None:
    """As an intake batch: its workers learn whether their messages are done."""
    jobs = await claim_many(store, 1)
    task = asyncio.ensure_future(
        store.complete(
            jobs[0], numbered_decision(0), dedupe_key="<a0@x>", auto_mail_hourly_limit=20
        )
    )
    async with store._write_lock.hold():  # the group waits for the lock …
        await asyncio.sleep(0.01)
        closing = asyncio.ensure_future(store.close())
        await asyncio.sleep(0.01)
        assert not closing.done()  # … and close waits for the group
    await closing
    outcome = await task
    assert isinstance(outcome, Outcome)
    assert outcome.ticket == 1
