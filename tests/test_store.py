"""The store's queue semantics on a real SQLite file: leases, exactly-once completion."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import sqlite3
import unicodedata
from pathlib import Path
from typing import Any

import pytest

import smtpgate.status as status_module
import smtpgate.store as store_module
from smtpgate.config import ConfigError
from smtpgate.model import (
    Action,
    Applied,
    Decision,
    Envelope,
    MailKind,
    Needs,
    NewTicket,
    OutboundMail,
    normalize_key,
)
from smtpgate.model import Path as Branch
from smtpgate.store import Recovered, Store, StoreError, new_queue_id
from tests.test_store_hops import ENV, alert, enqueue, numbered_decision, open_with_accounts


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


def _forward_decision(n: int, data: bytes) -> Decision:
    def mails(_: Applied) -> list[OutboundMail]:
        return [
            OutboundMail(MailKind.FORWARD, "c@localhost", ("s@msp.example",), data, f"<f{n}@x>")
        ]

    return numbered_decision(n, mails)


async def _store_with_forwards(path: Path, datas: list[bytes]) -> Store:
    store = await open_with_accounts(path)
    for n, data in enumerate(datas):
        await enqueue(store, alert("Acme Corp", n), f"<a{n}@x>")
        (job,) = await store.claim(1, 300)
        outcome = await store.complete(
            job, _forward_decision(n, data), dedupe_key=f"<a{n}@x>", auto_mail_hourly_limit=20
        )
        assert outcome is not None
    return store


async def test_each_claimed_mail_carries_its_own_data(tmp_path: Path) -> None:
    """The outbox claim reads the data apart from its UPDATE … RETURNING (whose rows SQLite
    keeps in a temporary table: one more copy of every mail)."""
    datas = [f"Subject: {n}\r\n\r\n".encode() + bytes([65 + n]) * (1000 * n + 1) for n in range(6)]
    store = await _store_with_forwards(tmp_path / "s.db", datas)
    try:
        first = await store.claim_deliveries(4, 300, max_bytes=3000)
        got = first + await store.claim_deliveries(16, 300)
        assert len(first) == 2  # what fits in 3,000 bytes, oldest first
        assert [d.id for d in got] == sorted({d.id for d in got})
        for d in got:
            (row,) = await store._reader.execute_fetchall(
                "SELECT data FROM outbox_data WHERE id = ?", (d.id,)
            )
            assert d.data == bytes(row[0])
        assert sorted(d.data for d in got) == sorted(datas)
    finally:
        await store.close()


def _sqlite_library() -> Any:
    """The SQLite library the sqlite3 module runs on, for its memory statistics (or skip)."""
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("sqlite3") or "libsqlite3.so.0")
    except OSError:
        pytest.skip("no shared SQLite library to read memory statistics from")
    lib.sqlite3_libversion.restype = ctypes.c_char_p
    if lib.sqlite3_libversion().decode() != sqlite3.sqlite_version:
        pytest.skip("the sqlite3 module does not use the shared SQLite library")
    lib.sqlite3_memory_highwater.restype = ctypes.c_int64
    lib.sqlite3_memory_highwater.argtypes = [ctypes.c_int]
    lib.sqlite3_memory_used.restype = ctypes.c_int64
    return lib


async def test_requeueing_big_mails_does_not_hold_their_bytes(tmp_path: Path) -> None:
    """With the data in the outbox row, every state change rewrote it, and a statement's
    journal kept the old pages of each row it changed: with the journals in memory, recover()
    over eight 5 MB mails held +51 MB (found by a review; +10 MB with them in files). The data
    has a table of its own now, and a requeue touches a few small rows."""
    lib = _sqlite_library()
    mb = 1 << 20
    store = await _store_with_forwards(tmp_path / "s.db", [b"x" * (5 * mb)] * 8)
    try:
        claimed = []
        while got := await store.claim_deliveries(16, 300):
            claimed += got
        assert len(claimed) == 8
        del claimed, got
        lib.sqlite3_memory_highwater(1)  # reset
        before = lib.sqlite3_memory_used()
        assert await store.recover(max_crashes=5) == ([], 8, [])
        grown = lib.sqlite3_memory_highwater(1) - before
    finally:
        await store.close()
    assert grown < 2 * mb


async def test_a_claim_does_not_read_the_mails_it_leaves_in_the_queue(tmp_path: Path) -> None:
    """Four 10 MB forwards wait (a relay outage); a claim of 16 MB takes one. With length(data)
    in the window function that picks them, SQLite copied each scanned mail's data into the
    window's temporary table (found by a review). SQLite's own peak: 75 MB then, 43 now (the
    claimed mail's row rewritten by its UPDATE, and read)."""
    lib = _sqlite_library()
    mb = 1 << 20
    store = await _store_with_forwards(tmp_path / "s.db", [b"x" * (10 * mb)] * 4)
    try:
        lib.sqlite3_memory_highwater(1)  # reset
        got = await store.claim_deliveries(16, 300, max_bytes=16 * mb)
        peak = lib.sqlite3_memory_highwater(1)
    finally:
        await store.close()
    assert len(got) == 1
    assert peak < 55 * mb


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


def queue_mail(db: sqlite3.Connection, data: bytes) -> None:
    """An outbox mail as an earlier decision queued it."""
    cur = db.execute(
        "INSERT INTO outbox (kind, mail_from, recipients, size, created_at, next_attempt_at)"
        " VALUES ('forward', 'c@x', '[\"s@x\"]', ?, 0, 0)",
        (len(data),),
    )
    db.execute("INSERT INTO outbox_data (id, data) VALUES (?, ?)", (cur.lastrowid, data))


async def test_outbox_claims_take_only_what_fits_in_their_byte_budget(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "s.db")
    await store.close()
    with contextlib.closing(sqlite3.connect(tmp_path / "s.db")) as db, db:
        for size in (1000, 1000, 1000, 50):  # mails queued by earlier decisions
            queue_mail(db, b"x" * size)
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
            queue_mail(db, b"\x00")
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


def undo_migration_8(db: sqlite3.Connection) -> None:
    """The inbound table before migration 8: no crash count."""
    db.execute("DELETE FROM schema_migrations WHERE version = 8")
    db.execute("ALTER TABLE inbound DROP COLUMN crashes")


def undo_migration_7(db: sqlite3.Connection) -> None:
    """The outbox as versions before migration 7 kept it: the data in the row (and what came
    after undone first)."""
    undo_migration_8(db)
    db.execute("DELETE FROM schema_migrations WHERE version = 7")
    db.execute("ALTER TABLE outbox ADD COLUMN data BLOB NOT NULL DEFAULT x''")
    db.execute("UPDATE outbox SET data = (SELECT d.data FROM outbox_data d WHERE d.id = outbox.id)")
    db.execute("ALTER TABLE outbox DROP COLUMN size")
    db.execute("DROP TABLE outbox_data")


async def test_migration_7_moves_the_outbox_data_out_of_the_rows(tmp_path: Path) -> None:
    """Queued, claimed and delivered mails keep their bytes and sizes across the upgrade."""
    datas = [b"Subject: a\r\n\r\nfirst\r\n", b"x" * 100_000, b"\x00\xff" * 10]
    store = await _store_with_forwards(tmp_path / "s.db", datas)
    (delivered,) = await store.claim_deliveries(1, 300)
    await store.delivery_done([delivered.id])
    await store.close()
    with contextlib.closing(sqlite3.connect(tmp_path / "s.db")) as db, db:
        undo_migration_7(db)
        assert db.execute("SELECT count(*) FROM outbox WHERE length(data) > 0").fetchone() == (3,)
    store = await Store.open(tmp_path / "s.db")
    try:
        rest = await store.claim_deliveries(16, 300)
        assert sorted([delivered.data, *(d.data for d in rest)]) == sorted(datas)
        rows = await store._reader.execute_fetchall(
            "SELECT o.size, length(d.data) FROM outbox o JOIN outbox_data d USING (id)"
        )
        assert sorted(tuple(r) for r in rows) == sorted((len(d), len(d)) for d in datas)
        columns = [r[1] for r in await store._reader.execute_fetchall("PRAGMA table_info(outbox)")]
        assert "data" not in columns
    finally:
        await store.close()


async def test_purge_drops_the_data_of_the_mails_it_drops(tmp_path: Path) -> None:
    store = await _store_with_forwards(tmp_path / "s.db", [b"one\r\n", b"two\r\n"])
    try:
        (sent,) = await store.claim_deliveries(1, 300)
        await store.delivery_done([sent.id])
        await store.purge(retention_days=-1)  # everything done is past its retention
        ids = [r[0] for r in await store._reader.execute_fetchall("SELECT id FROM outbox_data")]
        left = [r[0] for r in await store._reader.execute_fetchall("SELECT id FROM outbox")]
        assert ids == left
        assert sent.id not in ids
        assert len(ids) == 1
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
        undo_migration_7(db)
        db.execute("ALTER TABLE history DROP COLUMN updated_by")  # migration 6 undone
    store = await Store.open(tmp_path / "smtpgate.db")
    try:
        facts = await store.look_up(Needs(by_rule=(("file_as", (normalize_key("Café Müller"),)),)))
        assert facts.by_rule[0] == {"café müller": [("CRDCAFE0000000000001", None)]}
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


async def test_a_lock_held_elsewhere_is_no_lasting_intake_failure(tmp_path: Path) -> None:
    """An intake commit that found the store locked (a big import in another process) set the
    flag that makes /healthz 503, and only a later intake commit cleared it: taken out of a
    load balancer, the gateway got no mail and stayed 503. A lock is what the health probe's
    own write sees; a store that cannot grow (full, quota, file size limit) is what only intake
    shows, and that flag stays until a commit succeeds."""
    store = await Store.open(tmp_path / "s.db", busy_timeout=0.2)
    try:
        env = Envelope("127.0.0.1", "h", "a@example.org", ("connector@localhost",))
        other = sqlite3.connect(tmp_path / "s.db", timeout=0.1, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(StoreError, match="locked"):
            await store.enqueue(env, b"Subject: x\r\n\r\nbody\r\n", None, new_queue_id())
        other.execute("ROLLBACK")
        other.close()
        assert store.intake_failing() is None
        assert await store.can_write()

        pages = (await (await store._db.execute("PRAGMA page_count")).fetchone())[0]
        await store._db.execute(f"PRAGMA max_page_count = {pages}")
        with pytest.raises(StoreError, match="full"):
            await store.enqueue(env, b"x" * 300_000, None, new_queue_id())
        assert store.intake_failing() is not None
        await store._db.execute("PRAGMA max_page_count = 1073741823")
        await store.enqueue(env, b"Subject: y\r\n\r\nbody\r\n", None, new_queue_id())
        assert store.intake_failing() is None
    finally:
        await store.close()


async def test_the_retention_purge_lets_intake_commit_between_its_batches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The purge deleted every expired raw message in one transaction under the write lock:
    700,000 (a lowered SMTPGATE_RETENTION_DAYS, a first start after a long stop) held intake
    for longer than SMTPGATE_STORE_TIMEOUT, and every sender meanwhile got 451. It deletes in
    batches, and a message that arrives meanwhile is committed between two of them: each batch
    notes whether it sees that message's row."""
    monkeypatch.setattr(store_module, "PURGE_BATCH", 5)
    new_id = new_queue_id()
    seen: list[bool] = []
    batch = store_module._purge_batch

    def noting(db: sqlite3.Connection, **kw: Any) -> tuple[int, int, bool]:
        if kw["table"] == "inbound_raw":
            seen.append(
                bool(db.execute("SELECT 1 FROM inbound WHERE id = ?", (new_id,)).fetchone())
            )
        return batch(db, **kw)

    monkeypatch.setattr(store_module, "_purge_batch", noting)
    store = await Store.open(tmp_path / "s.db")
    try:
        for n in range(100):
            await enqueue(store, alert("Acme", n))
        with contextlib.closing(sqlite3.connect(tmp_path / "s.db")) as db, db:
            db.execute("UPDATE inbound SET state = 'done', received_at = received_at - 86400")
        if store._checkpointer is not None:  # (the enqueues' WAL checkpoint: the lock free)
            await store._checkpointer
        purge = asyncio.create_task(store.purge(retention_days=0))  # takes the lock first
        arriving = asyncio.create_task(store.enqueue(ENV, alert("Acme", 100), None, new_id))
        assert await purge == 100
        await arriving
        assert len(seen) == 21  # 20 batches of 5, and the one that finds no more
        # Committed between two batches: after the first, before the last.
        assert seen[0] is False
        assert seen[-1] is True
    finally:
        await store.close()


async def test_only_a_message_processed_alone_is_charged_the_crash_it_was_in(
    tmp_path: Path,
) -> None:
    """Store.recover after a crash: the messages leased beside others are requeued (to be
    processed alone, oldest first) and charged nothing; one claimed alone is charged, and goes
    dead at the limit. A shutdown's release and a processing error take the charge back."""
    path = tmp_path / "s.db"
    store = await Store.open(path)

    async def restart(max_crashes: int) -> Recovered:  # as the next `serve` after a crash
        nonlocal store
        await store.close()
        store = await Store.open(path)
        return await store.recover(max_crashes=max_crashes)

    try:
        for n in range(3):
            await enqueue(store, alert("Acme", n))
        first = await store.claim(3, 300)
        recovered = await restart(max_crashes=1)
        assert recovered.inbound == [job.id for job in first]  # oldest first
        assert recovered.dead == []
        poison, other, third = recovered.inbound
        assert await store.claim_alone(poison, 300) is not None
        assert len(await store.claim(3, 300)) == 2  # the others, claimed beside it meanwhile
        recovered = await restart(max_crashes=1)
        assert recovered.dead == [(poison, None)]  # (enqueued without its Message-ID)
        assert sorted(recovered.inbound) == sorted([other, third])
        row = await store.get_inbound(poison)
        assert row is not None
        assert row["state"] == "dead"
        assert "stopped 1 times while processing it" in row["last_error"]
        job = await store.claim_alone(other, 300)
        assert job is not None
        await store.release_alone(job)  # a shutdown came first: no crash counted
        job = await store.claim_alone(other, 300)
        assert job is not None
        await store.fail(job, "ValueError: x", max_attempts=5, backoff=0)  # an error, no crash
        assert (await restart(max_crashes=1)).dead == []
        assert await store.retry_inbound(poison) == 1
        assert (await store.claim_alone(poison, 300)) is not None  # its count starts again
        assert (await restart(max_crashes=2)).dead == []
    finally:
        await store.close()


async def test_mail_the_retention_purge_removed_is_not_in_a_backup_taken_after_it(
    tmp_path: Path,
) -> None:
    """With freed pages left as they were (secure_delete FAST), a purged message's bytes stayed
    in the file's free pages and the backup API copied them into every later backup, shipped
    off-site by an operator who set SMTPGATE_RETENTION_DAYS to be rid of them."""
    mark = b"CUSTOMER-SECRET-" * 4000  # 64 KB: overflow pages, as every real message has
    store = await Store.open(tmp_path / "s.db")
    try:
        await store.enqueue(ENV, b"Subject: x\r\n\r\n" + mark + b"\r\n", "<x@x>", new_queue_id())
        with contextlib.closing(sqlite3.connect(tmp_path / "s.db")) as db, db:
            db.execute("UPDATE inbound SET state = 'done', received_at = received_at - 86400")
        assert await store.purge(retention_days=0) == 1
        await store.backup(tmp_path / "backup.db")
    finally:
        await store.close()
    assert b"CUSTOMER-SECRET-" not in (tmp_path / "backup.db").read_bytes()
    assert b"CUSTOMER-SECRET-" not in (tmp_path / "s.db").read_bytes()


async def test_a_store_is_read_as_immutable_only_on_a_read_only_file_system(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`immutable=1` was used wherever this user could not write the directory: for an operator
    in the service's group, whenever serve had stopped, so a serve started meanwhile changed a
    file SQLite read without locks (stale counts, a torn backup). And a WAL without its -shm
    was then ignored: committed mail missing from `status` and from a backup."""
    store = await Store.open(tmp_path / "s.db")
    await store.close()
    db = tmp_path / "s.db"
    monkeypatch.setattr(status_module, "_read_only_file_system", lambda path: False)
    assert "immutable" not in status_module.read_only_uri(db)
    monkeypatch.setattr(status_module, "_read_only_file_system", lambda path: True)
    assert status_module.read_only_uri(db).endswith("&immutable=1")
    Path(f"{db}-wal").write_bytes(b"\0" * 32)  # a WAL left without its -shm
    with pytest.raises(sqlite3.OperationalError, match="its -shm file is missing"):
        status_module.read_only_uri(db)
    with pytest.raises(ConfigError, match="its -shm file is missing"):
        await Store.open_read_only(db)


SAME_NAME_A = "CRDAAAA0000000000001"
SAME_NAME_B = "CRDBBBB0000000000002"


async def _two_accounts_of_one_name(tmp_path: Path) -> Store:
    store = await Store.open(tmp_path / "smtpgate.db")
    imported = await store.import_accounts(
        [
            (2, {"rec_id": SAME_NAME_A, "file_as": "Acme Corp"}),
            (3, {"rec_id": SAME_NAME_B, "file_as": "Acme Corp"}),
        ]
    )
    assert imported.warnings  # allowed, with a warning
    return store


async def test_contacts_of_one_file_naming_one_account_land_on_one_account(
    tmp_path: Path,
) -> None:
    """Two accounts of one name (allowed, with a warning): "the first" was the first row of
    account_keys, rewritten by every refresh of an account's keys, so the contacts of one file
    were spread over both, and each re-import by name updated the other account."""
    store = await _two_accounts_of_one_name(tmp_path)
    try:
        await store.import_contacts(
            [
                (2, {"account_file_as": "Acme Corp", "email": "one@acme.example"}),
                (3, {"account_file_as": "Acme Corp", "email": "two@acme.example"}),
                (4, {"account_file_as": "Acme Corp", "email": "three@acme.example"}),
            ]
        )
        async with store._reader.execute("SELECT email, account FROM contacts") as cur:
            placed = {row[0]: row[1] for row in await cur.fetchall()}
    finally:
        await store.close()
    assert set(placed.values()) == {SAME_NAME_A}, placed  # the older of the two


async def test_reimporting_an_accounts_file_by_name_updates_the_same_account(
    tmp_path: Path,
) -> None:
    store = await _two_accounts_of_one_name(tmp_path)
    updated = []
    try:
        for phone in ("111", "222"):
            await store.import_accounts([(2, {"file_as": "Acme Corp", "phone": phone})])
            async with store._reader.execute(
                "SELECT rec_id FROM accounts WHERE phone = ?", (phone,)
            ) as cur:
                updated.append((await cur.fetchone())[0])
    finally:
        await store.close()
    assert updated == [SAME_NAME_A, SAME_NAME_A]
