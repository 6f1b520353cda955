"""Rows claimed by the transaction that queues them (`Store.hand_over`).

While the inbound queue has no other due message, an intake commit writes a new message already
leased and keeps its Job in memory for the next claim; a decision's outbox mails likewise. These
tests check that such rows are leased in the store exactly as a claim would lease them, that a
backlog is not overtaken, that a mail is never handed to the relay before its decision is
durable, and that nothing claimed this way is lost (close, a lapsed lease, a rolled-back
decision).
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from smtpgate.model import Applied, MailKind, OutboundMail
from smtpgate.store import GROUP_MAX_BYTES, Job, Store
from tests.test_store_hops import (
    Hops,
    alert,
    big_alert,
    complete_all,
    complete_ticket,
    enqueue,
    numbered_decision,
    open_with_accounts,
    writer_pragma,
)

LEASE = 300.0


async def open_store(path: Path, lease: float = LEASE) -> Store:
    store = await open_with_accounts(path)
    store.CHECKPOINT_SECONDS = float("inf")  # no checkpoint hop in the middle of a count
    store.hand_over(jobs=3, mails=2, lease_seconds=lease)
    return store


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    store = await open_store(tmp_path / "smtpgate.db")
    try:
        yield store
    finally:
        await store.close()


async def row(store: Store, table: str, key: object) -> sqlite3.Row:
    (found,) = await store._reader.execute_fetchall(
        f"SELECT state, attempts, lease_until{', lease_token' if table == 'inbound' else ''}"
        f" FROM {table} WHERE id = ?",
        (key,),
    )
    return found


async def clear_queue(store: Store) -> None:
    """Claims from the tables that find nothing due: from now on new messages and mails are
    claimed as they are queued."""
    assert await store.claim(10, LEASE) == []
    assert await store.claim_deliveries(16, LEASE) == []


def forwards(n: int, tag: str = "f") -> list[OutboundMail]:
    return [
        OutboundMail(MailKind.FORWARD, "c@localhost", ("s@msp.example",), b"x", f"<{tag}-{i}@x>")
        for i in range(n)
    ]


async def test_a_new_message_is_leased_by_its_intake_commit(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    await clear_queue(store)
    await enqueue(store, alert("Acme Corp", 1), "<a1@x>")
    hops = Hops(store, monkeypatch)
    with hops.measure() as claim:
        (job,) = await store.claim(10, LEASE)
    assert (claim["total"], claim["inline"]) == (0, 0)  # no transaction at all
    state, attempts, lease_until, token = await row(store, "inbound", job.id)
    assert (state, attempts, token) == ("active", 1, job.token)
    assert lease_until == pytest.approx(time.time() + LEASE, abs=5)
    assert job.raw == alert("Acme Corp", 1)
    assert job.attempts == 1
    assert job.message_id == "<a1@x>"
    outcome = await complete_ticket(store, job)  # its lease is a real one
    assert outcome is not None
    assert (await row(store, "inbound", job.id))[0] == "done"


async def test_new_messages_do_not_overtake_a_backlog(store: Store) -> None:
    """Before a claim has found the queue empty, and once one message had to be queued (the
    workers fell behind), new messages are queued behind it, and are not claimed before it."""
    await enqueue(store, alert("Acme Corp", 0), "<a0@x>")  # no claim yet: queued
    (first,) = await store.claim(1, LEASE)
    assert first.message_id == "<a0@x>"
    for n in range(1, 6):  # 3 are claimed as they come (the limit), then the rest queue
        await enqueue(store, alert("Acme Corp", n), f"<a{n}@x>")
    states = [
        (
            await store._reader.execute_fetchall(
                "SELECT state FROM inbound WHERE message_id = ?", (f"<a{n}@x>",)
            )
        )[0][0]
        for n in range(1, 6)
    ]
    assert states == ["active", "active", "active", "queued", "queued"]
    await enqueue(store, alert("Acme Corp", 6), "<a6@x>")  # behind the queued ones
    assert (
        await store._reader.execute_fetchall(
            "SELECT state FROM inbound WHERE message_id = '<a6@x>'"
        )
    )[0][0] == "queued"
    store._held_jobs.read_at = 0.0  # the table is read again (as it is every second)
    taken = await store.claim(10, LEASE)  # the table's first (a due retry may be there)
    assert [j.message_id for j in taken] == [f"<a{n}@x>" for n in (4, 5, 6, 1, 2, 3)]
    await enqueue(store, alert("Acme Corp", 7), "<a7@x>")  # that claim found none left
    (job,) = await store.claim(10, LEASE)
    assert job.message_id == "<a7@x>"


async def test_a_due_retry_is_claimed_within_a_second_of_new_mail(store: Store) -> None:
    await clear_queue(store)
    await enqueue(store, alert("Acme Corp", 1), "<a1@x>")
    (job,) = await store.claim(10, LEASE)
    await store.fail(job, "boom", max_attempts=5, backoff=0)  # due again at once
    await enqueue(store, alert("Acme Corp", 2), "<a2@x>")
    assert [j.message_id for j in await store.claim(10, LEASE)] == ["<a2@x>"]
    await enqueue(store, alert("Acme Corp", 3), "<a3@x>")
    store._held_jobs.read_at -= 1.0  # a second later
    taken = await store.claim(10, LEASE)
    assert sorted(j.message_id or "" for j in taken) == ["<a1@x>", "<a3@x>"]


async def test_close_queues_again_what_no_worker_or_sender_took(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    store = await open_store(path)
    await clear_queue(store)
    await enqueue(store, alert("Acme Corp", 1), "<a1@x>")
    (job,) = await store.claim(10, LEASE)
    await enqueue(store, alert("Acme Corp", 2), "<a2@x>")  # claimed by its commit, not taken
    assert await complete_ticket(store, job)  # its forward is claimed too, not taken
    await store.close()
    store = await Store.open(path)
    try:
        rows = await store._reader.execute_fetchall(
            "SELECT message_id, state, attempts, lease_until FROM inbound ORDER BY message_id"
        )
        assert [tuple(r) for r in rows] == [
            ("<a1@x>", "done", 1, None),
            ("<a2@x>", "queued", 0, None),
        ]
        rows = await store._reader.execute_fetchall(
            "SELECT state, attempts, lease_until FROM outbox"
        )
        assert [tuple(r) for r in rows] == [("queued", 0, None)]
    finally:
        await store.close()


async def test_a_decisions_mail_is_leased_by_its_transaction(store: Store) -> None:
    await clear_queue(store)
    await enqueue(store, alert("Acme Corp", 1), "<a1@x>")
    (job,) = await store.claim(10, LEASE)
    assert await complete_ticket(store, job, lambda _: forwards(3))
    rows = await store._reader.execute_fetchall(
        "SELECT id, state, attempts FROM outbox ORDER BY id"
    )
    assert [tuple(r)[1:] for r in rows] == [("active", 1), ("active", 1), ("queued", 0)]  # limit 2
    store._held_mail.read_at = time.monotonic()  # the table was read a moment ago
    fresh = await store.claim_deliveries(16, LEASE)
    assert [d.id for d in fresh] == [rows[0][0], rows[1][0]]
    assert all(d.attempts == 1 and d.inbound_id == job.id and d.data == b"x" for d in fresh)
    store._held_mail.read_at = 0.0
    (queued,) = await store.claim_deliveries(16, LEASE)
    assert queued.id == rows[2][0]


async def test_mail_claimed_by_its_decision_is_durable_before_the_relay_has_it(
    store: Store,
) -> None:
    """The decision committed without an fsync: with no intake commit to wait for, handing out
    its mail renews the lease in a durable commit (which fsyncs the WAL), and the lease the
    sender holds is the one in the store (its claim can be given back)."""
    await clear_queue(store)
    await enqueue(store, alert("Acme Corp", 1), "<a1@x>")
    (job,) = await store.claim(10, LEASE)
    assert await complete_ticket(store, job)
    (before,) = await store._reader.execute_fetchall("SELECT lease_until FROM outbox")
    assert writer_pragma(store, "synchronous") == 1  # the decision: NORMAL
    store._held_mail.read_at = time.monotonic()  # no claim from the table this time
    (delivery,) = await store.claim_deliveries(16, LEASE)
    assert writer_pragma(store, "synchronous") == 2  # FULL: the renewal fsynced the WAL
    (after,) = await store._reader.execute_fetchall("SELECT lease_until FROM outbox")
    assert after[0] == delivery.lease_until > before[0]
    assert await store.unclaim_deliveries([delivery]) == 1


async def test_mail_waits_for_the_intake_commit_being_written_instead(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While mail arrives an intake commit fsyncs the WAL anyway: the relay's claim waits for
    the one in flight and needs no transaction of its own."""
    await clear_queue(store)
    await enqueue(store, alert("Acme Corp", 1), "<a1@x>")
    (job,) = await store.claim(10, LEASE)
    assert await complete_ticket(store, job)
    (before,) = await store._reader.execute_fetchall("SELECT lease_until FROM outbox")
    hops = Hops(store, monkeypatch)
    store._held_mail.read_at = time.monotonic()  # no claim from the table this time
    with hops.measure() as seen:
        intake = asyncio.create_task(enqueue(store, alert("Acme Corp", 2), "<a2@x>"))
        await asyncio.sleep(0)  # the commit is on its way
        (delivery,) = await store.claim_deliveries(16, LEASE)
        await intake
    assert (seen["writer"], seen["inline"]) == (1, 0)  # the intake commit only
    assert not store._outbox_unsynced
    assert delivery.lease_until == before[0]


async def test_a_rolled_back_decision_hands_out_no_mail(store: Store) -> None:
    await clear_queue(store)
    for n in range(3):
        await enqueue(store, alert("Acme Corp", n), f"<a{n}@x>")
    jobs: list[Job] = await store.claim(10, LEASE)
    assert len(jobs) == 3

    def broken(_: Applied) -> list[OutboundMail]:
        raise RuntimeError("the mail builder broke")

    def late(_: Applied) -> list[OutboundMail]:  # queues its mail, then the decision fails
        return [OutboundMail(MailKind.FORWARD, "c@localhost", ("s@msp.example",), b"x", "<f9@x>")]

    await store._db.execute(
        "CREATE TEMP TRIGGER refuse_link AFTER INSERT ON outbox WHEN new.message_id = '<f9@x>'"
        " BEGIN SELECT RAISE(ABORT, 'refused after the insert'); END"
    )
    decisions = [numbered_decision(0), numbered_decision(1, broken), numbered_decision(2, late)]
    outcomes = await complete_all(store, sorted(jobs, key=lambda j: j.message_id or ""), decisions)
    assert [type(o).__name__ for o in outcomes] == ["Outcome", "RuntimeError", "IntegrityError"]
    store._held_mail.read_at = time.monotonic()
    handed = await store.claim_deliveries(16, LEASE)
    rows = await store._reader.execute_fetchall("SELECT id, message_id FROM outbox")
    assert [(d.id, d.kind) for d in handed] == [(rows[0][0], "forward")]
    assert [r[1] for r in rows] == ["<f0@x>"]


async def test_a_failing_relay_stops_the_claims_until_a_mail_is_delivered(store: Store) -> None:
    """A sender waiting out a failing relay would otherwise hold the mails claimed for it,
    shown as being sent: they go back to the queue, and new mail is queued, not claimed."""
    await clear_queue(store)
    for n in range(3):
        await enqueue(store, alert("Acme Corp", n), f"<a{n}@x>")
    jobs = sorted(await store.claim(10, LEASE), key=lambda j: j.message_id or "")

    async def complete(n: int) -> None:
        decision = numbered_decision(n)
        assert await store.complete(
            jobs[n], decision, dedupe_key=f"<a{n}@x>", auto_mail_hourly_limit=20
        )

    await complete(0)
    held = store.pause_mail_hand_over()
    assert len(held) == 1
    assert await store.unclaim_deliveries(held) == 1
    await complete(1)
    rows = await store._reader.execute_fetchall("SELECT state, attempts FROM outbox ORDER BY id")
    assert [tuple(r) for r in rows] == [("queued", 0), ("queued", 0)]
    store._held_mail.read_at = 0.0
    first, _ = await store.claim_deliveries(16, LEASE)
    await store.delivery_done([first.id])  # the relay works again
    await complete(2)
    rows = await store._reader.execute_fetchall("SELECT state FROM outbox ORDER BY id")
    assert [r[0] for r in rows] == ["done", "active", "active"]


# --- found by review --------------------------------------------------------------------------


async def test_a_big_decisions_mail_is_handed_out_though_a_group_was_written_meanwhile(
    store: Store,
) -> None:
    """A big message's decision runs in the writer's thread while the next group waits for the
    write lock: the group must not take the big decision's claimed mail with it (it was left
    leased, held by nobody)."""
    await clear_queue(store)
    await enqueue(store, big_alert("Acme Corp", 0), "<a0@x>")
    await enqueue(store, alert("Acme Corp", 1), "<a1@x>")
    jobs = sorted(await store.claim(10, LEASE), key=lambda j: j.message_id or "")
    assert len(jobs) == 2
    store._held_mail.read_at = time.monotonic()
    go = threading.Event()

    def blocking(_: Applied) -> Iterator[OutboundMail]:  # runs in the writer's thread
        yield OutboundMail(MailKind.FORWARD, "c@localhost", ("s@msp.example",), b"x", "<f0@x>")
        go.wait(5)

    big = asyncio.create_task(
        store.complete(
            jobs[0], numbered_decision(0, blocking), dedupe_key="<a0@x>", auto_mail_hourly_limit=20
        )
    )
    while not store._staged_mail:  # the thread has claimed the big decision's mail
        await asyncio.sleep(0.001)
    small = asyncio.create_task(
        store.complete(
            jobs[1], numbered_decision(1), dedupe_key="<a1@x>", auto_mail_hourly_limit=20
        )
    )
    for _ in range(5):
        await asyncio.sleep(0)  # the group writer is on its way, waiting for the lock
    go.set()
    assert await big
    assert await small
    rows = await store._reader.execute_fetchall("SELECT id FROM outbox WHERE state = 'active'")
    assert len(rows) == 2
    handed = await store.claim_deliveries(16, LEASE)
    assert {d.id for d in handed} == {r[0] for r in rows}


async def test_a_due_retry_is_claimed_within_a_second_though_new_mail_fills_every_claim(
    store: Store,
) -> None:
    await clear_queue(store)
    await enqueue(store, alert("Acme Corp", 1), "<a1@x>")
    (job,) = await store.claim(1, LEASE)
    await store.fail(job, "boom", max_attempts=5, backoff=0)  # due again at once
    seen = []
    for n in range(2, 4):
        await enqueue(store, alert("Acme Corp", n), f"<a{n}@x>")
        store._held_jobs.read_at -= 2.0  # more than a second since the table was read
        seen += [j.message_id for j in await store.claim(1, LEASE)]  # one free worker
    assert seen == ["<a1@x>", "<a2@x>"]


async def test_a_failed_claim_from_the_table_keeps_the_messages_held(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    await clear_queue(store)
    await enqueue(store, alert("Acme Corp", 1), "<a1@x>")
    store._held_jobs.read_at = 0.0
    real = store._write

    async def locked(fn: object, **kw: object) -> None:
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(store, "_write", locked)
    with pytest.raises(sqlite3.OperationalError):
        await store.claim(10, LEASE)
    monkeypatch.setattr(store, "_write", real)
    (job,) = await store.claim(10, LEASE)
    assert job.message_id == "<a1@x>"


async def test_a_mail_whose_lease_was_lost_while_it_waited_is_not_handed_out(
    store: Store,
) -> None:
    """Its lease lapsed, the sweeper queued it again and another sender claimed it: renewing
    the lease finds another one, and the mail is not handed out a second time."""
    await clear_queue(store)
    await enqueue(store, alert("Acme Corp", 1), "<a1@x>")
    (job,) = await store.claim(10, LEASE)
    assert await store.complete(
        job, numbered_decision(1), dedupe_key="<a1@x>", auto_mail_hourly_limit=20
    )
    await store._write(lambda db: db.execute("UPDATE outbox SET lease_until = lease_until + 7"))
    store._held_mail.read_at = time.monotonic()
    assert store._outbox_unsynced
    assert await store.claim_deliveries(16, LEASE) == []


async def test_a_row_that_waited_past_half_its_lease_is_queued_again_at_once(
    tmp_path: Path,
) -> None:
    """Not left leased for the other half: queued again with its attempt given back, and
    new messages queue behind it."""
    store = await open_store(tmp_path / "s.db", lease=0.2)
    try:
        await clear_queue(store)
        await enqueue(store, alert("Acme Corp", 1), "<a1@x>")
        await asyncio.sleep(0.12)
        assert await store.claim(10, 0.2) == []
        rows = await store._reader.execute_fetchall("SELECT state, attempts FROM inbound")
        assert [tuple(r) for r in rows] == [("queued", 0)]
        await enqueue(store, alert("Acme Corp", 2), "<a2@x>")
        store._held_jobs.read_at = 0.0
        taken = await store.claim(10, 300)
        assert [(j.message_id, j.attempts) for j in taken] == [("<a1@x>", 1), ("<a2@x>", 1)]
    finally:
        await store.close()


async def test_mails_queued_behind_a_full_hand_over_go_before_newer_ones(store: Store) -> None:
    """Once a mail had to be queued (the senders fell behind), the next ones queue too and
    go oldest first, until a claim from the outbox finds none left: a newer mail never
    overtakes a queued one (they waited up to two seconds behind new mail)."""
    await clear_queue(store)
    for n in range(3):
        await enqueue(store, alert("Acme Corp", n), f"<a{n}@x>")
    jobs = sorted(await store.claim(10, LEASE), key=lambda j: j.message_id or "")

    async def complete(n: int, mails: int) -> None:
        assert await store.complete(
            jobs[n],
            numbered_decision(n, lambda _: forwards(mails, f"m{n}")),
            dedupe_key=f"<a{n}@x>",
            auto_mail_hourly_limit=20,
        )

    async def handed() -> list[str]:
        rows = {d.id for d in await store.claim_deliveries(16, LEASE)}
        found = await store._reader.execute_fetchall("SELECT id, message_id FROM outbox")
        return sorted(mid for i, mid in found if i in rows)

    await complete(0, 3)  # two claimed at once (the limit), the third queued
    assert await handed() == ["<m0-0@x>", "<m0-1@x>"]
    await complete(1, 1)  # there is room again, but it queues behind the third
    assert await handed() == ["<m0-2@x>", "<m1-0@x>"]  # oldest first, from the table
    await complete(2, 1)  # that claim found none left: claimed at once again
    assert (await store._reader.execute_fetchall("SELECT state FROM outbox ORDER BY id"))[-1][
        0
    ] == "active"
    assert await handed() == ["<m2-0@x>"]


# --- found by the second review -------------------------------------------------------------


async def test_a_queued_message_committed_while_a_claim_waits_is_not_overtaken(
    store: Store,
) -> None:
    """The claim's time is taken once it holds the write lock: a message queued by an intake
    commit that went before it (intake goes first) is due to it, not left behind while the
    queue is marked clear and new messages are claimed at intake ahead of it."""
    await clear_queue(store)
    store._held_jobs.clear = False  # the workers fell behind: new messages are queued
    async with store._write_lock.hold():  # e.g. a decision group being written
        claim = asyncio.create_task(store.claim(10, LEASE))
        await asyncio.sleep(0.01)  # the claim waits for the lock
        first = asyncio.create_task(enqueue(store, alert("Acme Corp", 1), "<a1@x>"))
        await asyncio.sleep(0.01)  # the batch is built, waiting in the urgent lane
    await first
    got = [j.message_id for j in await claim]
    await enqueue(store, alert("Acme Corp", 2), "<a2@x>")
    got += [j.message_id for j in await store.claim(1, LEASE)]
    assert got == ["<a1@x>", "<a2@x>"]


async def test_mails_given_back_while_a_table_claim_runs_are_not_overtaken(store: Store) -> None:
    await clear_queue(store)
    for n in (1, 2):
        await enqueue(store, alert("Acme Corp", n), f"<a{n}@x>")
    jobs = sorted(await store.claim(10, LEASE), key=lambda j: j.message_id or "")
    assert await store.complete(
        jobs[0],
        numbered_decision(1, lambda _: forwards(1, "old")),
        dedupe_key="<a1@x>",
        auto_mail_hourly_limit=20,
    )
    (old,) = await store.claim_deliveries(16, LEASE)  # sender A has it
    store._held_mail.read_at = 0.0
    async with store._write_lock.hold():
        other = asyncio.create_task(store.claim_deliveries(16, LEASE))  # sender B, the table
        await asyncio.sleep(0.01)
        back = asyncio.create_task(store.unclaim_deliveries([old]))  # A: its turn came too late
        await asyncio.sleep(0.01)
    assert await other == []
    assert await back == 1
    assert await store.complete(
        jobs[1],
        numbered_decision(2, lambda _: forwards(1, "new")),
        dedupe_key="<a2@x>",
        auto_mail_hourly_limit=20,
    )
    handed = await store.claim_deliveries(16, LEASE)
    assert [d.id for d in handed][:1] == [old.id]


async def test_a_table_claim_that_failed_does_not_mark_the_queue_clear(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Too big for the loop's thread, the claim is rolled back and made again in the writer's
    thread; when that one fails, the big message is still queued and due."""
    await clear_queue(store)
    store._held_jobs.clear = False
    await enqueue(store, alert("Acme Corp", 1) + b"x" * GROUP_MAX_BYTES, "<big@x>")  # queued
    real = store._write
    calls = 0

    async def second_fails(fn: Any, **kw: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise sqlite3.OperationalError("database is locked")
        return await real(fn, **kw)

    monkeypatch.setattr(store, "_write", second_fails)
    with pytest.raises(sqlite3.OperationalError):
        await store.claim(10, LEASE)
    monkeypatch.setattr(store, "_write", real)
    assert not store._held_jobs.clear
