"""Store and relay faults on a live gateway: a full or locked store answers 451 and recovers
without a restart; a refusing, slow, flapping or absent relay gets every mail delivered once it
recovers; `dead` messages and deliveries are brought back by the CLI.

Fault injection into the store uses the gateway's private writer connection (`store._db`): SQLite's
`PRAGMA max_page_count` is per connection, and a full disk is otherwise hard to make in a test.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import sqlite3
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import smtpgate.store as store_module
from smtpgate import app, front
from smtpgate.app import Gateway
from smtpgate.config import Rules
from smtpgate.model import Action, Applied, Decision, Envelope, LineBudget, MailKind, OutboundMail
from smtpgate.model import Path as Branch
from smtpgate.store import Store, StoreError, new_queue_id
from tests.conftest import (
    GatewayFactory,
    RecordingRelay,
    http_get,
    listening,
    make_settings,
    send,
    serving,
    simple_message,
    wait_outbox,
    wait_processed,
    wait_until,
)

UNLIMITED_PAGES = 1073741823


async def pragma(gw: Gateway, sql: str) -> int:
    assert gw.store is not None
    async with gw.store._db.execute(sql) as cur:  # fault injection: see the module docstring
        row = await cur.fetchone()
    return int(row[0]) if row else 0


async def cli(gw: Gateway, *args: str) -> tuple[int, str]:
    """Run the real `smtpgate` CLI against the running gateway's data directory."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMTPGATE_")}
    env["SMTPGATE_DATA_DIR"] = str(gw.settings.data_dir)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "smtpgate",
        *args,
        env=env,
        cwd=gw.settings.data_dir,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    return int(proc.returncode or 0), out.decode()


async def row_state(gw: Gateway, queue_id: str) -> str | None:
    assert gw.store is not None
    row = await gw.store.get_inbound(queue_id)
    return str(row["state"]) if row else None


async def wait_row_state(gw: Gateway, queue_id: str, state: str, what: str) -> None:
    async def reached() -> bool:
        return await row_state(gw, queue_id) == state

    await wait_until(reached, what=what)


async def healthz(gw: Gateway) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.http_port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    data = await reader.read()
    writer.close()
    await writer.wait_closed()
    return int(data.split()[1])


# In an intake process the listener hands the message to the serve process's commit: the same
# faults must give the same answers there (a failed commit, and a session that gave up waiting).
INTAKE_MODES = pytest.mark.parametrize(
    "intake_processes", [0, 1], ids=["in-process", "intake-process"]
)


@INTAKE_MODES
async def test_store_full_answers_451_and_recovers_without_restart(
    gateway_factory: GatewayFactory, relay: RecordingRelay, intake_processes: int
) -> None:
    gw = await gateway_factory(store_timeout=5.0, intake_processes=intake_processes)
    pages = await pragma(gw, "PRAGMA page_count")
    assert await pragma(gw, f"PRAGMA max_page_count = {pages}") == pages
    big = simple_message(subject="full", body="z" * 300_000, message_id="<full@example.org>")
    code, text = await send(gw.smtp_port, big)
    assert code == 451, text
    assert "4.3.0" in text
    assert gw.store is not None
    assert (await gw.store.status())["inbound"]["queued"] == 0
    # The health probe writes no page, so it went on saying 200 (a quota, a file size limit,
    # EIO: free space looks fine) while every message was deferred.
    assert await healthz(gw) == 503
    # Space again (the operator freed the disk): the same message is taken, no restart.
    await pragma(gw, f"PRAGMA max_page_count = {UNLIMITED_PAGES}")
    code, text = await send(gw.smtp_port, big)
    assert code == 250, text
    assert await healthz(gw) == 200
    await wait_processed(gw, 1)
    assert await row_state(gw, text.rsplit(" ", 1)[1]) == "done"
    await relay.wait_for(1)


async def test_a_full_store_refusing_a_burst_logs_a_few_lines_not_two_a_message(
    gateway_factory: GatewayFactory,
    relay: RecordingRelay,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every 451 of a full disk wrote two ERROR lines (the listener's, the commit's): 273 and
    255 in one second of a burst, onto the disk that was full. At most a few a second now."""
    monkeypatch.setattr(front, "_STORE_FAILURE_LINES", LineBudget(2))
    monkeypatch.setattr(store_module, "_INTAKE_FAILURE_LINES", LineBudget(2))
    gw = await gateway_factory(store_timeout=5.0)
    pages = await pragma(gw, "PRAGMA page_count")
    assert await pragma(gw, f"PRAGMA max_page_count = {pages}") == pages
    started = time.monotonic()
    for n in range(12):
        big = simple_message(subject=f"full {n}", body="z" * 300_000, message_id=f"<f{n}@x>")
        assert (await send(gw.smtp_port, big))[0] == 451
    seconds = time.monotonic() - started
    for said in ("could not store", "intake commit"):
        lines = [r for r in caplog.records if said in r.getMessage()]
        assert 1 <= len(lines) <= 2 * (int(seconds) + 2), (said, seconds, len(lines))
        assert len(lines) < 12, (said, len(lines))


async def test_store_full_after_intake_stalls_processing_which_resumes_with_space(
    gateway_factory: GatewayFactory, relay: RecordingRelay, caplog: pytest.LogCaptureFixture
) -> None:
    gw = await gateway_factory(process_max_attempts=1)
    # Room for the intake of a 200 KB message, not for what processing writes.
    pages = await pragma(gw, "PRAGMA page_count")
    await pragma(gw, f"PRAGMA max_page_count = {pages + 60}")
    data = simple_message(subject="stalls", body="q" * 200_000, message_id="<stall@example.org>")
    code, text = await send(gw.smtp_port, data)
    assert code == 250, text
    queue_id = text.rsplit(" ", 1)[1]

    async def stalled() -> bool:
        return any("full" in r.getMessage() for r in caplog.records)

    await wait_until(stalled, what="processing failing on the full store")
    assert await row_state(gw, queue_id) in ("queued", "active")
    await pragma(gw, f"PRAGMA max_page_count = {UNLIMITED_PAGES}")
    await wait_row_state(gw, queue_id, "done", "the message done once there is space")
    (fwd,) = await relay.wait_for(1)
    assert fwd.message["Subject"] == "stalls"


async def test_processing_failure_goes_dead_and_cli_retry_finishes_it(
    gateway_factory: GatewayFactory, relay: RecordingRelay, caplog: pytest.LogCaptureFixture
) -> None:
    gw = await gateway_factory(process_max_attempts=1)
    assert gw.store is not None
    store = gw.store
    # A write fault inside the decision's transaction (a failing disk, say): a TEMP trigger lives
    # only on the gateway's writer connection. Fault injection: see the module docstring.
    await store._db.execute(
        "CREATE TEMP TRIGGER fail_outbox BEFORE INSERT ON main.outbox"
        " BEGIN SELECT RAISE(ABORT, 'injected write fault'); END"
    )
    data = simple_message(subject="dies", message_id="<dies@example.org>")
    code, text = await send(gw.smtp_port, data)
    assert code == 250, text
    queue_id = text.rsplit(" ", 1)[1]
    await wait_row_state(gw, queue_id, "dead", "the message dead after a failed attempt")
    row = await store.get_inbound(queue_id)
    assert row is not None
    assert "injected write fault" in str(row["last_error"])
    assert row["outcome"] is None
    assert relay.messages == []
    # One ERROR line, naming the message, with the traceback (the pool's own line named none).
    (error,) = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert queue_id in error.getMessage()
    assert error.exc_info is not None

    await store._db.execute("DROP TRIGGER temp.fail_outbox")
    code, out = await cli(gw, "queue", "retry", "--dead")
    assert code == 0, out
    assert "requeued 1 message" in out
    await wait_row_state(gw, queue_id, "done", "the retried message done")
    row = await store.get_inbound(queue_id)
    assert row is not None
    assert row["outcome"]["action"] == "forwarded"  # not "duplicate": the failure left no trace
    (fwd,) = await relay.wait_for(1)
    assert fwd.message["Subject"] == "dies"


@INTAKE_MODES
async def test_store_locked_answers_451_stores_nothing_and_recovers_without_restart(
    gateway_factory: GatewayFactory, relay: RecordingRelay, intake_processes: int
) -> None:
    gw = await gateway_factory(store_timeout=1.0, intake_processes=intake_processes)
    assert gw.store is not None
    store = gw.store
    code, _ = await send(gw.smtp_port, simple_message(message_id="<before@example.org>"))
    assert code == 250
    await wait_processed(gw, 1)
    other = sqlite3.connect(store.path, timeout=0.1, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    try:
        # An RMM alert without a Message-ID: its retry is generated afresh (a new Date), so
        # only "451 means not stored" keeps it from being processed twice.
        alert = simple_message(subject="disk full", extra={"Date": "Thu, 26 Nov 2026 10:00:00"})
        code, text = await send(gw.smtp_port, alert)
        assert code == 451, text
        assert "4.3.0" in text
        assert await healthz(gw) == 503
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert await healthz(gw) == 200
    retry = simple_message(subject="disk full", extra={"Date": "Thu, 26 Nov 2026 10:05:00"})
    code, text = await send(gw.smtp_port, retry)
    assert code == 250, text
    # Intake commits are sequential: once the retry is committed, a late commit of the 451'd
    # copy (its INSERT was waiting for the lock) would be in the store too.
    await wait_processed(gw, 2)
    rows = await store.list_inbound()
    assert len(rows) == 2, [r["outcome"] for r in rows]
    assert sorted(r["outcome"]["action"] for r in rows) == ["forwarded", "forwarded"]
    await relay.wait_for(2)
    assert sorted(m.message["Subject"] for m in relay.messages) == ["Hello", "disk full"]


async def test_relay_refusing_permanently_goes_dead_and_cli_retry_delivers(
    gateway_factory: GatewayFactory, relay: RecordingRelay
) -> None:
    gw = await gateway_factory()
    assert gw.store is not None
    store = gw.store
    relay.fail_with = "554 5.7.1 policy says no"
    for i in range(3):
        code, _ = await send(gw.smtp_port, simple_message(subject=f"p{i}", message_id=f"<p{i}@x>"))
        assert code == 250
    await wait_outbox(store, "dead", 3, "three dead deliveries")
    assert relay.messages == []
    relay.fail_with = None
    code, out = await cli(gw, "outbox", "retry", "--dead")
    assert code == 0, out
    assert "requeued 3" in out
    await relay.wait_for(3)
    assert sorted(m.message["Subject"] for m in relay.messages) == ["p0", "p1", "p2"]
    await wait_outbox(store, "done", 3, "the deliveries done")


async def test_a_mail_past_its_max_age_goes_dead_and_says_why(
    gateway_factory: GatewayFactory, relay: RecordingRelay
) -> None:
    """SMTPGATE_RETRY_MAX_AGE: a mail the relay keeps deferring goes dead, and its last error
    says it expired (the relay's last answer alone read like any transient failure)."""
    gw = await gateway_factory(retry_max_age=1, retry_schedule="1")
    assert gw.store is not None
    store = gw.store
    relay.fail_with = "451 4.3.0 try later"
    assert (await send(gw.smtp_port, simple_message(subject="old")))[0] == 250
    await wait_outbox(store, "dead", 1, "the delivery dead for its age")
    [row] = await store.list_outbox()
    assert row["attempts"] >= 2  # retried while young enough
    assert row["last_error"].startswith("undelivered after ")
    assert "SMTPGATE_RETRY_MAX_AGE" in row["last_error"]
    assert "451 4.3.0 try later" in row["last_error"]
    assert relay.messages == []


async def test_mails_past_their_max_age_go_dead_while_the_relay_stays_down(
    tmp_path: Path, gateway_to: GatewayFactory
) -> None:
    """SMTPGATE_RETRY_MAX_AGE with the relay unreachable: each failed connection charged only
    the first mail of a claim; the rest went back unsent, never checked for their age, while
    the sender backed off 5, 10, 20 … 300 s. Four mails 1 s past their max age were still
    queued 12 s on; now all go dead after the next failed connection."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])  # nothing listens here
    gw = await gateway_to(port, retry_max_age=1, retry_schedule="1", relay_connections=1)
    assert gw.store is not None
    for i in range(4):
        assert (await send(gw.smtp_port, simple_message(subject=f"m{i}")))[0] == 250
    await wait_processed(gw, 4)
    await wait_outbox(gw.store, "dead", 4, "all four mails dead for their age", timeout=12)
    rows = await gw.store.list_outbox()
    assert all("SMTPGATE_RETRY_MAX_AGE" in row["last_error"] for row in rows)


async def test_a_store_locked_after_a_relay_send_stops_neither_the_sender_nor_the_record(
    gateway_factory: GatewayFactory, relay: RecordingRelay, caplog: pytest.LogCaptureFixture
) -> None:
    """The relay took the mail, then the store could not record it (locked past its 5 s busy
    timeout): the sender keeps trying to record it, is not lost, and sends nothing twice."""
    gw = await gateway_factory(relay_connections=1)
    assert gw.store is not None
    store = gw.store
    relay.delay = 0.5  # the relay takes its time over DATA: the test locks the store meanwhile
    code, _ = await send(gw.smtp_port, simple_message(subject="first", message_id="<f@x>"))
    assert code == 250

    async def at_the_relay() -> bool:
        return relay.attempts >= 1

    await wait_until(at_the_relay, what="the forward at the relay")
    other = sqlite3.connect(store.path, timeout=5, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")

    async def record_failed() -> bool:
        return any("not recorded yet" in r.getMessage() for r in caplog.records)

    try:
        # Held past the store's 5 s busy timeout until recording the relayed mail has failed
        # (the sender's next claim may fail first, then the record).
        await wait_until(record_failed, timeout=30, what="a failed record of the relayed mail")
    finally:
        other.execute("ROLLBACK")
        other.close()
    relay.delay = 0
    code, _ = await send(gw.smtp_port, simple_message(subject="second", message_id="<s@x>"))
    assert code == 250

    async def both_done() -> bool:
        return bool((await store.status())["outbox"]["done"] == 2)

    await wait_until(both_done, what="both deliveries recorded done")
    assert sorted(m.message["Subject"] for m in relay.messages) == ["first", "second"]


async def test_a_relayed_mail_is_never_sent_again_however_long_its_record_takes(
    gateway_factory: GatewayFactory,
    relay: RecordingRelay,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The relay took the mail, then the store could not record it (a full disk, say) for
    longer than the mail's lease: the lease sweeper leaves it alone, so no sender sends it
    again, and it is recorded done once the store writes again."""
    monkeypatch.setattr(app, "LEASE_SECONDS", 0.5)
    monkeypatch.setattr(app, "SWEEP_SECONDS", 0.05)
    gw = await gateway_factory(relay_connections=2)
    assert gw.store is not None
    await pragma(  # the fault: recording a delivery done fails, on the writer's connection only
        gw,
        "CREATE TEMP TRIGGER unrecordable BEFORE UPDATE OF state ON outbox"
        " WHEN NEW.state = 'done' BEGIN SELECT RAISE(ABORT, 'injected: cannot record'); END",
    )
    code, _ = await send(gw.smtp_port, simple_message(subject="once", message_id="<once@x>"))
    assert code == 250
    await relay.wait_for(1)

    async def failed_three_times() -> bool:  # ~1.5 s: three leases, thirty sweeps
        return sum("not recorded yet" in r.getMessage() for r in caplog.records) >= 3

    await wait_until(failed_three_times, what="three failed records of the relayed mail")
    await pragma(gw, "DROP TRIGGER unrecordable")
    await wait_outbox(gw.store, "done", 1, "the delivery recorded done")
    assert relay.attempts == 1
    assert [m.message["Subject"] for m in relay.messages] == ["once"]


@pytest.mark.parametrize("sweep", [0.05, 30.0], ids=["sweeper-first", "sender-first"])
async def test_mails_whose_claim_lapsed_before_their_turn_are_sent_once(
    tmp_path: Path,
    gateway_factory: GatewayFactory,
    relay: RecordingRelay,
    monkeypatch: pytest.MonkeyPatch,
    sweep: float,
) -> None:
    """A slow relay: one sender claimed five mails, and its claim lapses before it gets to the
    last ones. It does not send those (the sweeper may have given them to another sender), the
    sweeper never takes back the one it is sending, and each mail arrives once. If the sender
    notices first, it queues them again itself, without counting an attempt."""
    monkeypatch.setattr(app, "LEASE_SECONDS", 1.0)
    monkeypatch.setattr(app, "SWEEP_SECONDS", sweep)
    store = await Store.open(make_settings(tmp_path, relay.port).db_path)
    env = Envelope("127.0.0.1", "test", "someone@elsewhere.example", ("connector@localhost",))
    subjects = [f"slow{i}" for i in range(5)]
    for subject in subjects:
        message = simple_message(subject=subject, message_id=f"<{subject}@x>")
        await store.enqueue(env, message, f"<{subject}@x>", new_queue_id())
    for job in await store.claim(5, 300):  # five mails in the outbox before the gateway starts

        def forward(_: Applied, raw: bytes = job.raw) -> list[OutboundMail]:
            return [OutboundMail(MailKind.FORWARD, "c@localhost", ("s@msp.example",), raw)]

        decision = Decision(Branch.REGULAR, Action.FORWARDED, mails=forward)
        assert await store.complete(job, decision, dedupe_key=None, auto_mail_hourly_limit=20)
    await store.close()
    relay.delay = 0.4  # the first sender's claim of all five lapses during its third mail
    gw = await gateway_factory(relay_connections=2)
    assert gw.store is not None
    await wait_outbox(gw.store, "done", 5, "every mail delivered")
    received = sorted(m.message["Subject"] for m in relay.messages)
    assert received == subjects
    assert relay.attempts == 5
    if sweep > 1:  # given back untried: no attempt counted (it would lengthen the backoff)
        assert [row["attempts"] for row in await gw.store.list_outbox()] == [1] * 5


async def test_relay_timing_out_then_recovering_delivers_everything(
    gateway_factory: GatewayFactory, relay: RecordingRelay, caplog: pytest.LogCaptureFixture
) -> None:
    gw = await gateway_factory(relay_timeout=0.5, relay_data_timeout=0.5)
    assert gw.store is not None
    store = gw.store
    relay.delay = 3.0  # longer than the gateway waits: every attempt times out
    for i in range(4):
        assert (await send(gw.smtp_port, simple_message(subject=f"t{i}")))[0] == 250

    async def timed_out() -> bool:
        # Each mail failed at least once and waits for (or is in) its next attempt. Not "all
        # queued at once": the four retries drift apart and that moment may never come.
        rows = await store.list_outbox()
        return len(rows) == 4 and all(
            r["attempts"] >= 1 and r["last_error"] and r["state"] in ("queued", "active")
            for r in rows
        )

    await wait_until(timed_out, what="timed-out attempts")
    relay.delay = 0.0
    await relay.wait_for(4)
    await wait_outbox(store, "done", 4, "the deliveries done")
    subjects = [m.message["Subject"] for m in relay.messages]
    assert sorted(set(subjects)) == ["t0", "t1", "t2", "t3"]
    # An attempt the gateway gave up on is cut off at the relay too: no duplicates.
    assert len(subjects) == 4
    # A timeout is an ordinary transient failure, not a crash of the sender.
    assert not [r for r in caplog.records if "crashed" in r.getMessage()]


async def test_relay_flapping_delivers_every_mail_once_it_settles(
    gateway_factory: GatewayFactory, relay: RecordingRelay
) -> None:
    gw = await gateway_factory(relay_connections=2)
    assert gw.store is not None
    store = gw.store
    relay.fail_with = "451 4.3.0 try later"
    n = 20
    for i in range(n):
        assert (await send(gw.smtp_port, simple_message(subject=f"f{i}")))[0] == 250
    for fault in ("421 4.3.2 shutting down", "452 4.3.1 out of space", None):

        async def attempted(before: int = relay.attempts) -> bool:
            return relay.attempts > before

        await wait_until(attempted, what=f"an attempt before switching to {fault}")
        relay.fail_with = fault
    await wait_outbox(store, "done", n, "every delivery done after the flapping", timeout=30)
    subjects = [m.message["Subject"] for m in relay.messages]
    assert sorted(subjects) == sorted(f"f{i}" for i in range(n))
    assert (await store.status())["outbox"]["dead"] == 0


async def test_relay_down_then_up_delivers_everything(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    gw = Gateway(make_settings(tmp_path, port), Rules())
    await gw.start()
    try:
        await _relay_down_then_up(gw, port)
    finally:
        await gw.stop(grace=2)


async def _relay_down_then_up(gw: Gateway, port: int) -> None:
    assert gw.store is not None
    store = gw.store
    for i in range(3):
        assert (await send(gw.smtp_port, simple_message(subject=f"d{i}")))[0] == 250

    async def refused() -> bool:
        rows = await store.list_outbox()
        return len(rows) == 3 and all(r["attempts"] >= 1 for r in rows)

    await wait_until(refused, what="failed connection attempts")
    assert all(r["state"] == "queued" for r in await store.list_outbox())
    late = RecordingRelay()
    async with serving(late, port=port, hostname="late.test"):
        await late.wait_for(3, timeout=20)
    assert sorted(m.message["Subject"] for m in late.messages) == ["d0", "d1", "d2"]


async def test_an_unstorable_intake_fails_fast_and_the_commit_loop_survives(
    tmp_path: Path,
) -> None:
    store = await Store.open(tmp_path / "s.db")
    try:
        # Text SQLite cannot encode (a lone surrogate, as aiosmtpd decodes non-UTF-8 bytes).
        bad = Envelope("127.0.0.1", "h", "\udcff@example.org", ("connector@localhost",))
        with pytest.raises(StoreError):
            async with asyncio.timeout(5):
                await store.enqueue(bad, b"Subject: x\r\n\r\nx\r\n", None, new_queue_id())
        good = Envelope("127.0.0.1", "h", "a@example.org", ("connector@localhost",))
        async with asyncio.timeout(5):
            await store.enqueue(good, b"Subject: y\r\n\r\ny\r\n", None, new_queue_id())
        assert (await store.status())["inbound"]["queued"] == 1
    finally:
        await store.close()


def test_only_store_conditions_count_as_transient(tmp_path: Path) -> None:
    """Full, locked and I/O errors never use up a message's attempts; our own SQL bugs do."""
    import sqlite3

    from smtpgate.store import is_transient_error

    db = sqlite3.connect(tmp_path / "t.db", isolation_level=None, timeout=0)
    db.execute("CREATE TABLE t (x BLOB)")
    errors: list[sqlite3.Error] = []
    db.execute(f"PRAGMA max_page_count = {db.execute('PRAGMA page_count').fetchone()[0]}")
    try:
        db.execute("INSERT INTO t VALUES (zeroblob(100000))")
    except sqlite3.Error as exc:
        errors.append(exc)
    other = sqlite3.connect(tmp_path / "t.db", isolation_level=None, timeout=0)
    other.execute("BEGIN EXCLUSIVE")
    try:
        sqlite3.connect(tmp_path / "t.db", timeout=0).execute("BEGIN IMMEDIATE")
    except sqlite3.Error as exc:
        errors.append(exc)
    other.execute("ROLLBACK")
    assert [is_transient_error(e) for e in errors] == [True, True]
    with pytest.raises(sqlite3.OperationalError) as bug:
        db.execute("SELECT no_such_column FROM t")
    assert not is_transient_error(bug.value)
    assert not is_transient_error(ValueError("not a store error"))


# --- a relay that misbehaves in ways aiosmtpd will not (scripted replies, hang-ups) ----------


@dataclass
class ScriptedRelay:
    """A raw SMTP relay. `reply(conn_mails, verb, line)` may override the reply to a command:
    bytes to answer, None for the default. After an overriding reply to a verb in `hang_up_after`
    (and after any 421) the connection is closed. `ehlo` lists the extensions offered."""

    ehlo: list[bytes] = field(
        default_factory=lambda: [b"PIPELINING", b"8BITMIME", b"SIZE 10000000"]
    )
    reply: Callable[[int, str, bytes], bytes | None] = lambda mails, verb, line: None
    hang_up_after: set[str] = field(default_factory=set)
    got: list[bytes] = field(default_factory=list)  # data answered 250
    port: int = 0

    async def session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        mails = 0  # transactions this connection has completed
        try:
            writer.write(b"220 scripted.test ESMTP\r\n")
            while line := await reader.readline():
                verb = line[:4].upper().decode("latin-1")
                custom = self.reply(mails, verb, line)
                if custom is not None:
                    writer.write(custom)
                    await writer.drain()
                    if verb in self.hang_up_after or custom.startswith(b"421"):
                        return
                    if not (verb == "DATA" and custom.startswith(b"354")):
                        continue
                elif verb == "EHLO":
                    ext = [b"scripted.test", *self.ehlo]
                    writer.write(b"".join(b"250-" + e + b"\r\n" for e in ext[:-1]))
                    writer.write(b"250 " + ext[-1] + b"\r\n")
                elif verb == "QUIT":
                    writer.write(b"221 bye\r\n")
                    await writer.drain()
                    return
                elif verb == "DATA":
                    writer.write(b"354 go on\r\n")
                else:  # MAIL, RCPT, RSET, NOOP, HELO
                    writer.write(b"250 ok\r\n")
                await writer.drain()
                if verb == "DATA":
                    data = bytearray()
                    while not data.endswith(b"\r\n.\r\n"):
                        if not (chunk := await reader.readline()):
                            return
                        data += chunk
                    self.got.append(bytes(data[:-3]))
                    mails += 1
                    writer.write(b"250 2.0.0 queued\r\n")
                    await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()


@pytest.fixture
async def scripted() -> AsyncIterator[ScriptedRelay]:
    relay = ScriptedRelay()
    async with listening(relay.session) as relay.port:
        yield relay


async def settled_outbox(gw: Gateway, count: int) -> list[dict[str, Any]]:
    """The outbox rows once each is done, dead, or queued again after a failed attempt."""
    assert gw.store is not None
    store = gw.store

    async def settled() -> bool:
        rows = await store.list_outbox()
        return len(rows) == count and all(
            r["state"] in ("done", "dead") or (r["state"] == "queued" and r["last_error"])
            for r in rows
        )

    await wait_until(settled, what=f"{count} outbox rows settled")
    return sorted(await store.list_outbox(), key=lambda r: r["id"])


@pytest.mark.parametrize(
    ("verb", "answer", "state"),
    [
        ("MAIL", b"550 5.7.1 sender not allowed to relay\r\n", "dead"),
        ("RCPT", b"550 5.1.1 no such user\r\n", "dead"),
        ("MAIL", b"421 4.3.2 service shutting down\r\n", "queued"),
    ],
)
async def test_a_pipelined_refusal_followed_by_a_hang_up_keeps_the_relays_answer(
    scripted: ScriptedRelay, gateway_to: GatewayFactory, verb: str, answer: bytes, state: str
) -> None:
    """The relay offers PIPELINING, answers MAIL (or RCPT) with a refusal and closes: its
    answer decides, as without PIPELINING ('550 5.7.1 …': dead; a 421: queued, the 421 its
    last_error). The replies already read were dropped when the next one in the group was
    missing: 'SMTPServerDisconnected: Unexpected EOF received', a 5xx retried for three days."""
    scripted.reply = lambda mails, v, line: answer if v == verb else None
    scripted.hang_up_after = {verb}
    gw = await gateway_to(scripted.port, relay_connections=1, retry_schedule="60")
    assert (await send(gw.smtp_port, simple_message(subject="refused")))[0] == 250
    [row] = await settled_outbox(gw, 1)
    assert answer.decode().split()[1] in (row["last_error"] or ""), row["last_error"]
    assert row["state"] == state, row["last_error"]
    assert scripted.got == []


@pytest.mark.parametrize("path", ["pipelining", "lockstep", "smtputf8"])
async def test_a_relay_limiting_mails_per_connection_delays_no_mail(
    scripted: ScriptedRelay, gateway_to: GatewayFactory, path: str
) -> None:
    """A relay that takes one mail per connection and answers the next MAIL on it with 421 and
    closes (Exim's smtp_accept_max_per_connection; many smarthosts have such a limit). Nothing
    of the refused mail was taken: it goes on a new connection at once. (It was charged an
    attempt and waited a whole SMTPGATE_RETRY_SCHEDULE step: every second mail of a backlog.)
    On every path: pipelined, lockstep, and aiosmtplib's sendmail for a UTF-8 address."""
    if path == "lockstep":
        scripted.ehlo = [b"8BITMIME", b"SIZE 10000000"]
    if path == "smtputf8":
        scripted.ehlo = [b"PIPELINING", b"8BITMIME", b"SMTPUTF8"]
    scripted.reply = lambda mails, v, line: (
        b"421 4.7.0 too many messages in this connection\r\n" if v == "MAIL" and mails else None
    )
    support = {"internal_support_address": "jörg@msp.example"} if path == "smtputf8" else {}
    gw = await gateway_to(scripted.port, relay_connections=1, retry_schedule="60", **support)
    for i in range(2):
        assert (await send(gw.smtp_port, simple_message(subject=f"m{i}")))[0] == 250
    await wait_processed(gw, 2)
    rows = await settled_outbox(gw, 2)
    assert [(r["state"], r["attempts"], r["last_error"]) for r in rows] == [("done", 1, None)] * 2
    assert len(scripted.got) == 2


async def test_a_refusal_stays_permanent_when_the_relay_ignores_rset(
    scripted: ScriptedRelay, gateway_to: GatewayFactory
) -> None:
    """A mail whose envelope needs SMTPUTF8 goes through aiosmtplib's sendmail, which sends RSET
    after a refusal and waits for its reply. A relay that does not answer RSET must not turn
    the 550 into a (transient) 'SMTPReadTimeoutError': the mail goes dead."""
    scripted.ehlo = [b"PIPELINING", b"8BITMIME", b"SMTPUTF8"]
    scripted.reply = lambda mails, v, line: (
        b"550 5.1.1 no such user\r\n" if v == "RCPT" else b"" if v == "RSET" else None
    )
    gw = await gateway_to(
        scripted.port,
        relay_connections=1,
        retry_schedule="60",
        internal_support_address="jörg@msp.example",  # forwards go to a UTF-8 address
        relay_timeout=1,
        relay_data_timeout=2,
    )
    assert (await send(gw.smtp_port, simple_message(subject="utf8")))[0] == 250
    [row] = await settled_outbox(gw, 1)
    assert row["state"] == "dead", row["last_error"]
    assert "550" in row["last_error"]


@pytest.mark.parametrize("how", ["removed", "replaced"])
async def test_a_store_file_removed_or_replaced_under_the_gateway_is_never_acknowledged(
    gateway_factory: GatewayFactory, tmp_path: Path, how: str
) -> None:
    """`rm -rf var/*`, or a backup copied over the live file: the open connection kept writing
    to the old file, answering 250 and /healthz 200, and the next start lost all of it."""
    gw = await gateway_factory()
    assert gw.store is not None
    path = gw.store.path
    code, text = await send(gw.smtp_port, simple_message(message_id="<before@example.org>"))
    assert code == 250, text
    await wait_processed(gw, 1)
    copy = tmp_path / "copy.db"
    with (
        contextlib.closing(sqlite3.connect(path)) as db,
        contextlib.closing(sqlite3.connect(copy)) as target,
    ):
        db.backup(target)
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    if how == "replaced":
        os.replace(copy, path)
    code, text = await send(
        gw.smtp_port,
        simple_message(message_id="<after@example.org>"),
        mail_from="after@example.org",
    )
    assert code == 451, text
    status, _, body = await http_get(gw.http_port, "/healthz")
    assert status == 503, body
    # Not written either (checked before the write): this serve would have processed it, and
    # the sender's retry after the restart a second time, the new file knowing nothing of it.
    rows = await gw.store.list_inbound(limit=100)
    assert "after@example.org" not in [r["mail_from"] for r in rows]


async def test_messages_a_crash_left_are_processed_even_if_one_cannot_be_claimed_alone(
    gateway_factory: GatewayFactory,
    relay: RecordingRelay,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """After a crash the messages it left are processed one at a time, and only then do the
    workers start: a claim that failed there (a full disk) ended that task, and the workers
    never started; nothing more was processed until a restart."""
    store = await Store.open(tmp_path / "data" / "smtpgate.db")
    for n in range(2):
        raw = simple_message(subject=f"left {n}", message_id=f"<left{n}@x>")
        await store.enqueue(
            Envelope("127.0.0.1", "h", "a@example.org", ("connector@localhost",)),
            raw,
            f"<left{n}@x>",
            new_queue_id(),
        )
    assert len(await store.claim(2, 300)) == 2  # in processing when the process died
    await store.close()
    failed: list[str] = []

    async def cannot(self: Store, queue_id: str, lease_seconds: float) -> None:
        failed.append(queue_id)
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(Store, "claim_alone", cannot)
    gw = await gateway_factory()
    await wait_processed(gw, 2)
    assert len(failed) == 2
    await relay.wait_for(2)


async def _five_mails_in_the_outbox(settings_path: Path) -> None:
    store = await Store.open(settings_path)
    env = Envelope("127.0.0.1", "test", "someone@elsewhere.example", ("connector@localhost",))
    for i in range(5):
        await store.enqueue(env, simple_message(subject=f"s{i}"), f"<s{i}@x>", new_queue_id())
    for job in await store.claim(5, 300):

        def forward(_: Applied, raw: bytes = job.raw) -> list[OutboundMail]:
            return [OutboundMail(MailKind.FORWARD, "c@localhost", ("s@msp.example",), raw)]

        decision = Decision(Branch.REGULAR, Action.FORWARDED, mails=forward)
        assert await store.complete(job, decision, dedupe_key=None, auto_mail_hourly_limit=20)
    await store.close()


class SlowRelay(RecordingRelay):
    """Answers RCPT only after `rcpt_delay` seconds (a greylisting or slow policy check), the
    end of data after `delay` (RecordingRelay's)."""

    rcpt_delay: float = 0.0
    rcpts: int = 0

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: Any
    ) -> str:
        self.rcpts += 1
        if self.rcpt_delay:
            await asyncio.sleep(self.rcpt_delay)
        envelope.rcpt_tos.append(address)
        return "250 OK"


@pytest.mark.parametrize(
    ("slow", "grace"),
    [
        ("delay", 2.0),  # the stop comes while the first mail's data is answered: then no more
        ("rcpt_delay", 0.5),  # the grace ends while the sender waits: it is cancelled
    ],
    ids=["between-two-mails", "sender-cancelled"],
)
async def test_a_stop_does_not_charge_an_attempt_to_mails_never_tried(
    tmp_path: Path, slow: str, grace: float
) -> None:
    """A graceful stop left the rest of a sender's claim active, its attempt counted: each
    restart while a backlog drained added an attempt to up to 16 mails a connection (a later
    step of the retry schedule at their first real failure). They are given back untried,
    whether the stop comes between two mails or cancels a sender waiting on a slow relay."""
    relay = SlowRelay()
    async with serving(relay, hostname="relay.test") as port:
        relay.port = port
        settings = make_settings(tmp_path, port, relay_connections=1)
        await _five_mails_in_the_outbox(settings.db_path)
        setattr(relay, slow, 5.0 if slow == "rcpt_delay" else 0.5)
        gw = Gateway(settings, Rules())
        await gw.start()
        try:

            async def first_at_relay() -> bool:
                return relay.rcpts >= 1

            await wait_until(first_at_relay, what="the first mail at the relay")
        finally:
            await gw.stop(grace=grace)
        # The first mail's data reached the relay (or not: its RCPT hung); no other's did.
        assert relay.attempts == (1 if slow == "delay" else 0)
        setattr(relay, slow, 0.0)
        gw = Gateway(settings, Rules())
        await gw.start()
        try:
            assert gw.store is not None
            await wait_outbox(gw.store, "done", 5, "all delivered after the restart")
            rows = sorted(await gw.store.list_outbox(), key=lambda r: r["id"])
        finally:
            await gw.stop(grace=2)
    # The first was tried when the stop came (a second attempt after it is fair); the other
    # four were not tried before the restart: one attempt each.
    assert [r["attempts"] for r in rows[1:]] == [1] * 4
