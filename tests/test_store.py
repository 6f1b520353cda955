"""The store's queue semantics on a real SQLite file: leases, exactly-once completion."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import unicodedata
from pathlib import Path

import pytest

from smtpgate.config import ConfigError
from smtpgate.model import Action, Decision, Envelope, NewTicket, normalize_key
from smtpgate.model import Path as Branch
from smtpgate.store import Store, new_queue_id


async def test_a_completion_after_the_lease_was_taken_over_applies_nothing(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "s.db")
    try:
        await store.import_accounts([(2, {"rec_id": "CRDACME0000000000001", "file_as": "Acme"})])
        env = Envelope("127.0.0.1", "helo", "a@example.org", ("connector@localhost",))
        await store.enqueue(env, b"Subject: x\r\n\r\nbody\r\n", "<x@example.org>", new_queue_id())
        (first,) = await store.claim(1, lease_seconds=-1)  # already expired
        assert await store.release_expired() == 1
        (second,) = await store.claim(1, lease_seconds=300)
        assert second.id == first.id
        assert second.token != first.token

        def decision() -> Decision:
            return Decision(
                Branch.AUTOMATED,
                Action.AUTOMATED_TICKET,
                account="CRDACME0000000000001",
                new_ticket=NewTicket("CRDACME0000000000001", None, "x", "body", "test", "note"),
            )

        stale = await store.complete(
            first, decision(), dedupe_key="<x@example.org>", auto_mail_hourly_limit=20
        )
        assert stale is None
        assert (await store.status())["tickets"] == 0
        fresh = await store.complete(
            second, decision(), dedupe_key="<x@example.org>", auto_mail_hourly_limit=20
        )
        assert fresh is not None
        assert fresh.ticket == 1
        status = await store.status()
        assert status["tickets"] == 1
        assert status["inbound"]["done"] == 1
    finally:
        await store.close()


async def test_savepoint_journals_stay_in_memory(tmp_path: Path) -> None:
    """Each decision of a group runs in a SAVEPOINT, whose journal of changed pages went to a
    temporary file page by page: ~12 write system calls a forwarded message, half of all the
    serve process's writes during a storm."""
    store = await Store.open(tmp_path / "s.db")
    try:
        async with store._db.execute("PRAGMA temp_store") as cursor:
            row = await cursor.fetchone()
        assert row is not None
        assert row[0] == 2  # MEMORY
    finally:
        await store.close()


async def test_claim_takes_only_what_fits_in_its_byte_budget_oldest_first(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "s.db")
    try:
        env = Envelope("127.0.0.1", "helo", "a@example.org", ("connector@localhost",))
        ids = []
        for size in (1000, 1000, 1000, 50):
            ids.append(new_queue_id())
            await store.enqueue(env, b"x" * size, None, ids[-1])
        # Messages are taken in order while the running total fits: 1000, 2000, not 3000.
        assert [j.id for j in await store.claim(10, 300, max_bytes=2500)] == ids[:2]
        # Always the first, however small the budget; the next does not fit.
        assert [j.id for j in await store.claim(10, 300, max_bytes=1)] == ids[2:3]
        assert [j.id for j in await store.claim(10, 300)] == ids[3:]
    finally:
        await store.close()


async def test_outbox_claims_take_only_what_fits_in_their_byte_budget(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "s.db")
    await store.close()
    with contextlib.closing(sqlite3.connect(tmp_path / "s.db")) as db, db:
        for size in (1000, 1000, 1000, 50):  # mails queued by earlier decisions
            db.execute(
                "INSERT INTO outbox (kind, mail_from, recipients, data, created_at,"
                " next_attempt_at) VALUES ('forward', 'c@x', '[\"s@x\"]', ?, 0, 0)",
                (b"x" * size,),
            )
    store = await Store.open(tmp_path / "s.db")
    try:
        sizes = [len(d.data) for d in await store.claim_deliveries(10, 300, max_bytes=2500)]
        assert sizes == [1000, 1000]  # 1000, 2000 fit; 3000 does not
        sizes = [len(d.data) for d in await store.claim_deliveries(10, 300, max_bytes=1)]
        assert sizes == [1000]  # always the first, however small the budget
        assert [len(d.data) for d in await store.claim_deliveries(10, 300)] == [50]
    finally:
        await store.close()


async def test_an_unclaimed_mail_is_queued_again_unless_claimed_anew(tmp_path: Path) -> None:
    """A sender gives back the mails of its lapsed claim; one that the sweeper released and
    another sender claimed meanwhile (another lease) is not taken from that sender."""
    store = await Store.open(tmp_path / "s.db")
    await store.close()
    with contextlib.closing(sqlite3.connect(tmp_path / "s.db")) as db, db:
        for _ in range(2):
            db.execute(
                "INSERT INTO outbox (kind, mail_from, recipients, data, created_at,"
                " next_attempt_at) VALUES ('forward', 'c@x', '[\"s@x\"]', x'00', 0, 0)"
            )
    store = await Store.open(tmp_path / "s.db")
    try:
        first, second = await store.claim_deliveries(10, lease_seconds=-1)  # lapsed at once
        assert first.lease_until == second.lease_until
        assert await store.release_expired(keep_outbox=[first.id]) == 1  # the second only
        (again,) = await store.claim_deliveries(10, 300)  # another sender's claim
        assert again.id == second.id
        assert await store.unclaim_deliveries([first, second]) == 1
        rows = {row["id"]: row for row in await store.list_outbox()}
        assert (rows[first.id]["state"], rows[first.id]["attempts"]) == ("queued", 0)
        assert (rows[second.id]["state"], rows[second.id]["attempts"]) == ("active", 2)
    finally:
        await store.close()


async def test_migration_5_composes_decomposed_account_keys(tmp_path: Path) -> None:
    """Keys imported before keys were kept in NFC: a decomposed one is composed on upgrade."""
    store = await Store.open(tmp_path / "smtpgate.db")
    acme = {"rec_id": "CRDCAFE0000000000001", "file_as": "Café Müller", "email1": "x@cafe.example"}
    await store.import_accounts([(2, acme)])
    await store.close()
    decomposed = unicodedata.normalize("NFD", "café müller")
    with contextlib.closing(sqlite3.connect(tmp_path / "smtpgate.db")) as db, db:
        # the store as an older version left it
        db.execute("UPDATE account_keys SET value = ? WHERE field = 'file_as'", (decomposed,))
        db.execute("DELETE FROM schema_migrations WHERE version >= 5")
        db.execute("ALTER TABLE history DROP COLUMN updated_by")  # migration 6 undone
    store = await Store.open(tmp_path / "smtpgate.db")
    try:
        [found] = await store.find_accounts([("file_as", [normalize_key("Café Müller")])])
        assert found == {"café müller": [("CRDCAFE0000000000001", None)]}
    finally:
        await store.close()
    with contextlib.closing(sqlite3.connect(tmp_path / "smtpgate.db")) as db:
        keys = sorted(db.execute("SELECT field, value FROM account_keys").fetchall())
    assert keys == [
        ("email", "x@cafe.example"),
        ("file_as", "café müller"),
        ("rec_id", "crdcafe0000000000001"),
    ]


async def test_close_lets_an_intake_commit_in_flight_finish_and_answers_it(tmp_path: Path) -> None:
    """Closing cancelled the group commit half-way: the thread still committed the message,
    and the SMTP session waiting for it was never answered (nor given 451)."""
    path = tmp_path / "s.db"
    store = await Store.open(path)
    env = Envelope("127.0.0.1", "helo", "a@example.org", ("connector@localhost",))
    queue_id = new_queue_id()
    blocker = sqlite3.connect(path, isolation_level=None)  # another process's write lock
    blocker.execute("BEGIN IMMEDIATE")
    try:
        enqueue = asyncio.create_task(
            store.enqueue(env, b"Subject: x\r\n\r\nx\r\n", None, queue_id)
        )
        await asyncio.sleep(0.2)  # the commit now waits for the lock in the writer's thread
        closing = asyncio.create_task(store.close())
        await asyncio.sleep(0.2)
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    async with asyncio.timeout(10):
        await enqueue  # answered: committed
        await closing
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert db.execute("SELECT id FROM inbound").fetchall() == [(queue_id,)]


async def test_status_reads_its_counts_and_the_oldest_age_in_one_snapshot(tmp_path: Path) -> None:
    """Store.status ran its queries one by one: a commit between them made it report one
    queued message and no oldest queued age (the /status page and /metrics disagreed)."""
    store = await Store.open(tmp_path / "smtpgate.db")
    try:
        envelope = Envelope("127.0.0.1", "h", "a@example.org", ("connector@localhost",))
        queue_id = new_queue_id()
        await store.enqueue(envelope, b"Subject: s\r\n\r\nb\r\n", None, queue_id)
        with contextlib.closing(sqlite3.connect(store.path, isolation_level=None)) as db:
            db.execute("UPDATE inbound SET received_at = received_at - 100")

        def between_the_queries(statement: str) -> None:
            # After the counts were read: the message is processed by another connection.
            if "received_at" in statement and "queue_counts" not in statement:
                other = sqlite3.connect(store.path, isolation_level=None, timeout=5)
                with contextlib.closing(other):
                    other.execute("UPDATE inbound SET state = 'done' WHERE id = ?", (queue_id,))

        await store._reader.set_trace_callback(between_the_queries)
        status = await store.status()
        await store._reader.set_trace_callback(None)
        assert status["inbound"]["queued"] == 1
        assert status["inbound"]["oldest_queued_age_s"] >= 100
        assert (await store.status())["inbound"]["queued"] == 0  # the commit is seen after
    finally:
        await store.close()


async def test_a_store_locked_by_another_process_at_open_says_so(tmp_path: Path) -> None:
    """Every SQLite error at open was reported as "cannot open the store", as if the data
    directory were wrong, also when another process held the write lock that the schema's
    set-up (or a migration) needs."""
    with contextlib.closing(sqlite3.connect(tmp_path / "smtpgate.db", isolation_level=None)) as db:
        db.execute("BEGIN IMMEDIATE")
        with pytest.raises(ConfigError, match="is locked by another process"):
            await Store.open(tmp_path / "smtpgate.db", busy_timeout=0.2)
        db.execute("ROLLBACK")
    store = await Store.open(tmp_path / "smtpgate.db")  # and opens once the lock is gone
    await store.close()
