"""Crash safety: the real `smtpgate serve` killed with SIGKILL at chosen points, restarted on the
same data directory, over several rounds under load.

Kill points, each round: (1) under intake load, with one session stopped half-way through DATA
(kills land during DATA and between commit and 250); (2) while a worker holds a message
(`active` seen in the store); (3) while the relay holds a delivery open (it has recorded the mail
but not answered). A sender treats a missing reply as "try again later", like an MTA, and sends
those messages again after the last restart.

Promises checked: every message answered 250 ends `done`; nothing half-sent is queued; every
ticket and XML transaction is applied once; every mail the gateway owes reaches the relay at
least once, and the duplicates that crashes cause are counted and bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import signal
import socket
import sqlite3
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session

from smtpgate.app import RELAYED_UNRECORDED, Gateway
from tests.conftest import FIXTURES, serving
from tests.hostile import RawSession, SessionClosed, dot_stuff

pytestmark = pytest.mark.slow

ROUNDS = 3
SESSIONS = 4
RELAY_CONNECTIONS = 2
SUPPORT = "support@msp.example"
FORMS = "forms@example.org"
ACME = "CRDACME0000000000001"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- the upstream relay: records on arrival, may hold its answer ---------------------------------


@dataclass
class HoldingRelay:
    deliveries: list[tuple[tuple[str, ...], bytes]] = field(default_factory=list)
    hold: bool = False
    held: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        # Recorded before the answer: a gateway killed now has delivered without knowing it.
        self.deliveries.append((tuple(envelope.rcpt_tos), envelope.original_content or b""))
        if self.hold:
            self.held.set()
            await self.release.wait()
        return "250 2.0.0 OK"

    def unhold(self) -> None:
        self.hold = False
        self.release.set()
        self.held = asyncio.Event()
        self.release = asyncio.Event()


# --- the server under test -----------------------------------------------------------------------


class Server:
    def __init__(self, tmp: Path, relay_port: int, intake_processes: int = 0) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.log = tmp / "serve.log"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("SMTPGATE_")}
        self.env.update(
            SMTPGATE_DATA_DIR=str(tmp / "data"),
            SMTPGATE_SMTP_PORT=str(self.port),
            SMTPGATE_HTTP_PORT=str(free_port()),
            SMTPGATE_RELAY_PORT=str(relay_port),
            SMTPGATE_RELAY_CONNECTIONS=str(RELAY_CONNECTIONS),
            SMTPGATE_CONNECTOR_ADDRESSES="connector@localhost",
            SMTPGATE_INTERNAL_SUPPORT_ADDRESS=SUPPORT,
            SMTPGATE_HOSTNAME="gateway.test",
            SMTPGATE_RULES_FILE=str(FIXTURES / "rules.toml"),
            SMTPGATE_API_ENABLED="true",
            SMTPGATE_AUTO_MAIL_HOURLY_LIMIT="100000",
            SMTPGATE_RETRY_SCHEDULE="1",
            SMTPGATE_WORKERS="2",
            SMTPGATE_LOG_LEVEL="WARNING",
            SMTPGATE_INTAKE_PROCESSES=str(intake_processes),
        )
        self.proc: asyncio.subprocess.Process | None = None
        self.starts = 0

    @property
    def db(self) -> Path:
        return self.tmp / "data" / "smtpgate.db"

    async def cli(self, *args: str) -> str:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "smtpgate",
            *args,
            env=self.env,
            cwd=self.tmp,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()
        return out.decode()

    async def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "smtpgate",
                "serve",
                env=self.env,
                cwd=self.tmp,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=log,
            )
        self.starts += 1
        deadline = time.monotonic() + 30
        while True:
            assert self.proc.returncode is None, self.log.read_text()[-3000:]
            try:
                session = await RawSession.open(self.port, ehlo=False, timeout=5)
            except OSError:
                assert time.monotonic() < deadline, self.log.read_text()[-3000:]
                await asyncio.sleep(0.05)
                continue
            await session.close()
            assert session.greeting is not None
            assert session.greeting.code == 220
            return

    async def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        assert await self.proc.wait() == -signal.SIGKILL

    async def terminate(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            return await self.proc.wait()

    async def query(self, sql: str, *args: object) -> list[tuple[object, ...]]:
        def run() -> list[tuple[object, ...]]:
            con = sqlite3.connect(self.db, timeout=10)
            try:
                return con.execute(sql, args).fetchall()
            finally:
                con.close()

        return await asyncio.to_thread(run)


# --- the mail -------------------------------------------------------------------------------------


@dataclass
class Mail:
    key: str
    kind: str  # alert (ticket), stranger (forward), xml (ticket + response)
    mail_from: str
    data: bytes
    state: str = "new"  # new → accepted | refused | unknown (no reply: send again later)
    queue_ids: list[str] = field(default_factory=list)

    @property
    def subject(self) -> str:
        return {
            "alert": f"Alert for Site Acme Corp, check {self.key}",
            "stranger": f"question {self.key}",
            "xml": f"xml {self.key}",
        }[self.kind]


def make_mail(key: str, kind: str) -> Mail:
    sender = {"alert": "alerts@externalsystem.com", "stranger": "s@elsewhere.example"}.get(
        kind, FORMS
    )
    mail = Mail(key, kind, sender, b"")
    body = f"details of {key}\r\n".encode()
    if kind == "xml":
        body = (
            "<CommitCRMTransaction><ExternalApplicationName>crash</ExternalApplicationName>"
            f"<SendResponseToEmail>{FORMS}</SendResponseToEmail>"
            f"<ReturnTransactionID>{key}</ReturnTransactionID><DataKind>TICKET</DataKind>"
            f"<RecordData><FLDTKTCARDID>{ACME}</FLDTKTCARDID>"
            f"<FLDTKTPROBLEM>{mail.subject}</FLDTKTPROBLEM></RecordData>"
            "</CommitCRMTransaction>\r\n"
        ).encode()
    mail.data = (
        f"From: <{sender}>\r\nTo: connector@localhost\r\nSubject: {mail.subject}\r\n"
        f"Message-ID: <{key}@crash.test>\r\n\r\n"
    ).encode() + body
    return mail


def batch(prefix: str, n: int, kinds: tuple[str, ...] = ("alert", "stranger", "xml")) -> list[Mail]:
    return [make_mail(f"{prefix}-{i}", kinds[i % len(kinds)]) for i in range(n)]


async def load(port: int, mails: list[Mail], sessions: int = SESSIONS) -> None:
    """Send over concurrent sessions until done or the server dies (then stop quietly)."""
    queue = list(reversed(mails))

    async def worker() -> None:
        try:
            session = await RawSession.open(port, timeout=10)
        except (OSError, SessionClosed, TimeoutError):
            return
        try:
            while queue:
                mail = queue.pop()
                mail.state = "unknown"  # until the server answers
                reply = await session.send_message(mail.data, mail_from=mail.mail_from)
                if reply.code == 250 and reply.queue_id:
                    mail.state = "accepted"
                    mail.queue_ids.append(reply.queue_id)
                else:
                    mail.state = "refused" if reply.code >= 500 else "unknown"
        except (OSError, SessionClosed, TimeoutError, asyncio.IncompleteReadError):
            return
        finally:
            with contextlib.suppress(Exception):
                await session.close()

    await asyncio.gather(*(worker() for _ in range(sessions)))


async def wait_for(predicate_sql: str, server: Server, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not (await server.query(predicate_sql))[0][0]:
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


@pytest.fixture
async def holding_relay() -> AsyncIterator[tuple[HoldingRelay, int]]:
    relay = HoldingRelay()
    async with serving(relay, hostname="relay.test") as port:
        yield relay, port
        relay.unhold()


@pytest.fixture
async def servers() -> AsyncIterator[list[Server]]:
    """Servers a test started; any still running when it ends (a failure) is killed."""
    started: list[Server] = []
    yield started
    for server in started:
        if server.proc is not None and server.proc.returncode is None:
            server.proc.kill()
            await server.proc.wait()


# With intake processes the SIGKILL hits the serve process only: its intake child notices, stops
# accepting and finishes the commits in flight; the next serve must bind the port again at once.
@pytest.mark.parametrize("intake_processes", [0, 1], ids=["in-process", "intake-process"])
async def test_sigkill_at_each_stage_loses_nothing_and_applies_nothing_twice(
    tmp_path: Path,
    holding_relay: tuple[HoldingRelay, int],
    servers: list[Server],
    intake_processes: int,
) -> None:
    relay, relay_port = holding_relay
    server = Server(tmp_path, relay_port, intake_processes)
    servers.append(server)
    await server.cli("accounts", "import", str(FIXTURES / "accounts.csv"))
    mails: list[Mail] = []
    kills: Counter[str] = Counter()
    partial_keys: list[str] = []
    in_flight_at_kill = 0
    backlog_at_kill = 0

    for r in range(ROUNDS):
        # 1. Under intake load, one session half-way through DATA.
        await server.start()
        intake = batch(f"r{r}-intake", 240)
        mails += intake
        sender = asyncio.create_task(load(server.port, intake))
        partial = await RawSession.open(server.port)
        key = f"partial-r{r}"
        partial_keys.append(key)
        await partial.start_data("p@example.org")
        half = dot_stuff(make_mail(key, "stranger").data)
        await partial.send_raw(half[: len(half) // 2])
        deadline = time.monotonic() + 30
        while sum(m.state == "accepted" for m in intake) < 40 + 20 * r:
            assert time.monotonic() < deadline, "intake too slow"
            await asyncio.sleep(0.005)
        # A message committed whose 250 never reaches the sender (the kill comes first).
        lost = make_mail(f"r{r}-lost-250", "alert")
        mails.append(lost)
        committer = await RawSession.open(server.port)
        await committer.start_data("alerts@externalsystem.com")
        await committer.send_raw(dot_stuff(lost.data) + b".\r\n")
        await wait_for(
            f"SELECT count(*) FROM inbound WHERE message_id = '<{lost.key}@crash.test>'",
            server,
            "the commit",
        )
        await server.kill()
        kills["intake (during DATA / between commit and 250)"] += 1
        await committer.close()
        lost.state = "unknown"  # whatever the socket holds, the sender never read a 250
        await sender
        await partial.close()
        in_flight_at_kill += sum(m.state == "unknown" for m in intake)

        # 2. While a worker holds a message.
        await server.start()
        work = batch(f"r{r}-work", 150)
        mails += work
        sender = asyncio.create_task(load(server.port, work))
        await wait_for(
            "SELECT count(*) FROM inbound WHERE state = 'active'", server, "an active message"
        )
        backlog_at_kill += int(
            (await server.query("SELECT count(*) FROM inbound WHERE state != 'done'"))[0][0]  # type: ignore[call-overload]
        )
        await server.kill()
        kills["processing (a message active)"] += 1
        await sender

        # 3. While the relay holds a delivery: it has the mail, the gateway has no answer yet.
        await server.start()
        relay.hold = True
        forwards = batch(f"r{r}-relay", 6, kinds=("stranger",))
        mails += forwards
        await load(server.port, forwards, sessions=2)
        async with asyncio.timeout(30):
            await relay.held.wait()
        await server.kill()
        kills["relay exchange (mail recorded, answer held)"] += 1
        relay.unhold()

    # Restart; the senders try again whatever got no answer, as an MTA would.
    await server.start()
    retried = [m for m in mails if m.state in ("new", "unknown")]
    await load(server.port, retried)
    assert all(m.state == "accepted" for m in mails), Counter(m.state for m in mails)

    all_ids = [qid for m in mails for qid in m.queue_ids]
    await wait_for(
        "SELECT count(*) = 0 FROM inbound WHERE state != 'done'", server, "every message done", 60
    )
    await wait_for(
        "SELECT count(*) = 0 FROM outbox WHERE state != 'done'", server, "every mail delivered", 60
    )

    # Every 250 ends done, with an outcome. Lost: 0.
    done_rows = await server.query(
        "SELECT id, json_extract(outcome, '$.action') FROM inbound WHERE state = 'done'"
    )
    actions = {str(qid): action for qid, action in done_rows}
    lost_ids = [qid for qid in all_ids if not actions.get(qid)]
    assert lost_ids == []
    assert (await server.query("SELECT count(*) FROM inbound WHERE state = 'dead'"))[0][0] == 0
    # Nothing half-sent was queued.
    for key in partial_keys:
        found = await server.query(
            "SELECT count(*) FROM inbound WHERE message_id = ?", f"<{key}@crash.test>"
        )
        assert found[0][0] == 0, key

    # Each ticket and each XML transaction applied exactly once.
    tickets = Counter(str(d) for (d,) in await server.query("SELECT description FROM tickets"))
    for m in mails:
        if m.kind in ("alert", "xml"):
            assert tickets[m.subject] == 1, (m.subject, tickets[m.subject])
    assert sum(tickets.values()) == sum(m.kind in ("alert", "xml") for m in mails)
    outcomes = Counter(
        a for (a,) in await server.query("SELECT json_extract(outcome, '$.action') FROM inbound")
    )
    assert outcomes["duplicate"] >= ROUNDS  # the committed-but-unanswered ones, sent again
    expected_actions = {"automated_ticket", "forwarded", "xml_applied", "duplicate"}
    assert set(outcomes) <= expected_actions, outcomes

    # Every mail owed reached the relay at least once; duplicates counted and bounded.
    owed: Counter[str] = Counter()
    for rcpts, data in relay.deliveries:
        for m in mails:
            forward = m.kind == "stranger" and SUPPORT in rcpts
            response = m.kind == "xml" and FORMS in rcpts
            if (forward and f"<{m.key}@crash.test>".encode() in data) or (
                response and f">{m.key}<".encode() in data
            ):
                owed[m.key] += 1
    missing = [m.key for m in mails if m.kind in ("stranger", "xml") and owed[m.key] == 0]
    assert missing == []
    duplicates = sum(n - 1 for n in owed.values())
    bound = sum(kills.values()) * RELAY_CONNECTIONS * RELAYED_UNRECORDED
    assert duplicates <= bound
    assert len(relay.deliveries) == sum(owed.values())  # nothing delivered that was not owed

    # A drain on SIGTERM exits cleanly.
    assert await server.terminate() == 0
    print(
        f"\ncrash: {len(mails)} messages, {sum(kills.values())} SIGKILLs {dict(kills)}, "
        f"{server.starts} starts, {len(all_ids)} answered 250, lost 0, "
        f"no-reply at kill {in_flight_at_kill} (resent: {len(retried)}), "
        f"backlog at processing kills {backlog_at_kill}, "
        f"duplicate outcomes {outcomes['duplicate']}, relay deliveries {len(relay.deliveries)}, "
        f"relay duplicates {duplicates} (bound {bound})"
    )


def test_reliability_doc_states_what_the_crash_test_asserts() -> None:
    """docs/reliability.md quotes these bounds; a change here or in app.py must update it."""
    doc = (Path(__file__).parent.parent / "docs" / "reliability.md").read_text()
    assert "| **lost** | **0** | **0**" in doc
    assert f"{ROUNDS} rounds, {ROUNDS * 3} `SIGKILL`s" in doc
    bound = ROUNDS * 3 * RELAY_CONNECTIONS * RELAYED_UNRECORDED
    per_connection = RELAYED_UNRECORDED
    assert f"kills × `SMTPGATE_RELAY_CONNECTIONS` × {per_connection} (= {bound} in the test)" in doc
    # The duplicate bound rests on how far a relay sender may run ahead of the store's record.
    assert "RELAYED_UNRECORDED" in inspect.getsource(Gateway._deliver)


# --- a message that kills the process ----------------------------------------------------------

# Injected with a sitecustomize on PYTHONPATH (nothing of smtpgate changed): the serve process
# SIGKILLs itself when it parses a message holding the marker, as the OOM killer or a segfault
# in a C extension would.
POISON_HOOK = """
import os, signal
import smtpgate.mail as _mail
_parse = _mail.parse_message
def parse_message(raw, *a, **k):
    if b"POISON-PILL" in raw:
        os.kill(os.getpid(), signal.SIGKILL)
    return _parse(raw, *a, **k)
_mail.parse_message = parse_message
"""


def _plain(key: str, body: str = "hello") -> bytes:
    return (
        f"From: <s@elsewhere.example>\r\nTo: connector@localhost\r\nSubject: {key}\r\n"
        f"Message-ID: <{key}@poison.test>\r\n\r\n{body}\r\n"
    ).encode()


async def test_a_message_that_kills_the_process_goes_dead_and_the_rest_is_processed(
    tmp_path: Path,
) -> None:
    """Each claim counted an attempt, but only a processing *exception* compared it with
    SMTPGATE_PROCESS_MAX_ATTEMPTS: a message that killed the process was requeued at every
    start and claimed first, so serve crash-looped for ever (Restart=on-failure) and took no
    mail. The messages a crash interrupts are processed one at a time at the next start, so a
    crash there is the message's own: after SMTPGATE_PROCESS_MAX_ATTEMPTS of them it is dead,
    and messages beside it at the first crash are not charged (tests/test_store.py)."""
    max_attempts = 2
    relay = HoldingRelay()
    async with serving(relay, hostname="relay.test") as relay_port:
        hook = tmp_path / "hook"
        hook.mkdir()
        (hook / "sitecustomize.py").write_text(POISON_HOOK)
        server = Server(tmp_path, relay_port, intake_processes=1)
        server.env.update(PYTHONPATH=str(hook), SMTPGATE_PROCESS_MAX_ATTEMPTS=str(max_attempts))
        try:
            await server.start()
            session = await RawSession.open(server.port)
            for key, body in (("before-1", "x"), ("before-2", "y"), ("poison", "POISON-PILL")):
                assert (await session.send_message(_plain(key, body))).code == 250
            await session.close()
            crashes = 0
            for _ in range(max_attempts + 3):  # bounded: more than it may take
                assert server.proc is not None
                try:
                    async with asyncio.timeout(6):
                        await server.proc.wait()
                except TimeoutError:
                    break  # serving on: the message was set aside
                crashes += 1
                with contextlib.suppress(AssertionError):  # it may die before it greets
                    await server.start()
            # The first crash, among others, is no one's for sure; each after it is its own.
            assert crashes == max_attempts + 1, server.log.read_text()[-3000:]
            ((state, error),) = await server.query(
                "SELECT state, last_error FROM inbound WHERE message_id = ?",
                "<poison@poison.test>",
            )
            assert state == "dead"
            assert f"stopped {max_attempts} times while processing it" in str(error)
            if server.proc is None or server.proc.returncode is not None:
                await server.start()
            session = await RawSession.open(server.port)
            assert (await session.send_message(_plain("after"))).code == 250
            await session.close()
            deadline = time.monotonic() + 15
            states: list[tuple[object, ...]] = []
            while time.monotonic() < deadline:
                states = await server.query(
                    "SELECT message_id, state FROM inbound WHERE message_id != ? ORDER BY 1",
                    "<poison@poison.test>",
                )
                if [s for _, s in states] == ["done"] * 3:
                    break
                await asyncio.sleep(0.1)
            assert [s for _, s in states] == ["done"] * 3, states
            log = server.log.read_text()
            assert "set aside as dead" in log, log[-3000:]
            assert "<poison@poison.test>" in log, log[-3000:]
        finally:
            if server.proc is not None and server.proc.returncode is None:
                server.proc.kill()
                await server.proc.wait()


async def test_a_reload_signal_while_serve_starts_is_kept_for_after_it(tmp_path: Path) -> None:
    """SIGHUP (`systemctl reload`) before serve had installed its handler, while it was still
    starting (a migration on a big store takes a while), ended the process: systemd counts
    that as a clean exit, so `Restart=on-failure` left the gateway down. It is kept, and the
    rules are read again once serve is up (they may have changed after they were read)."""
    relay = HoldingRelay()
    async with serving(relay, hostname="relay.test") as relay_port:
        server = Server(tmp_path, relay_port, intake_processes=1)
        server.env["SMTPGATE_LOG_LEVEL"] = "INFO"
        (tmp_path / "data").mkdir()
        lock = tmp_path / "data" / "smtpgate.lock"
        with server.log.open("ab") as log:
            server.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "smtpgate", "serve", env=server.env, cwd=tmp_path,
                stdout=asyncio.subprocess.DEVNULL, stderr=log,
            )  # fmt: skip
        try:
            deadline = time.monotonic() + 30
            while not lock.exists():  # serve has begun its start-up
                assert time.monotonic() < deadline, server.log.read_text()[-3000:]
                assert server.proc.returncode is None, server.log.read_text()[-3000:]
                await asyncio.sleep(0.01)
            server.proc.send_signal(signal.SIGHUP)
            while "rules reloaded" not in server.log.read_text():
                assert server.proc.returncode is None, server.log.read_text()[-3000:]
                assert time.monotonic() < deadline, server.log.read_text()[-3000:]
                await asyncio.sleep(0.05)
            session = await RawSession.open(server.port)
            assert (await session.send_message(_plain("after-reload"))).code == 250
            await session.close()
            assert await server.terminate() == 0
        finally:
            if server.proc.returncode is None:
                server.proc.kill()
                await server.proc.wait()


async def test_a_stop_waits_for_the_relays_answer_to_a_mail_it_has_whole(tmp_path: Path) -> None:
    """A graceful stop (`systemctl restart`) while the relay was still answering a mail's end of
    data (a content filter, a busy Exchange) cut the connection after 5 s and left the mail
    counted unsent: the relay had it, and the next start sent it again. The stop now waits for
    that answer (up to STOP_ANSWER_SECONDS more), and the mail is sent once."""
    relay = HoldingRelay()
    async with serving(relay, hostname="relay.test") as relay_port:
        server = Server(tmp_path, relay_port, intake_processes=0)
        server.env["SMTPGATE_LOG_LEVEL"] = "INFO"
        try:
            await server.start()
            relay.hold = True  # the relay answers the end of data only when released
            mail = make_mail("slow-relay", "stranger")
            session = await RawSession.open(server.port)
            assert (await session.send_message(mail.data, mail_from=mail.mail_from)).code == 250
            await session.close()
            async with asyncio.timeout(15):
                await relay.held.wait()  # the relay has the whole mail, end of data included
            assert server.proc is not None
            server.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 30
            while "for the relay's answer to 1 mail" not in server.log.read_text():
                assert server.proc.returncode is None, server.log.read_text()[-3000:]
                assert time.monotonic() < deadline, server.log.read_text()[-3000:]
                await asyncio.sleep(0.05)
            relay.unhold()  # it answers now: the stop records the mail as sent
            async with asyncio.timeout(30):
                assert await server.proc.wait() == 0
            await server.start()
            left: list[tuple[object, ...]] = []
            while time.monotonic() < deadline:
                left = await server.query("SELECT state, attempts FROM outbox")
                if left == [("done", 1)]:
                    break
                await asyncio.sleep(0.1)
            assert left == [("done", 1)]
            forwards = [d for _, d in relay.deliveries if b"<slow-relay@crash.test>" in d]
            assert len(forwards) == 1, f"the relay got the forward {len(forwards)} times"
        finally:
            relay.unhold()
            if server.proc is not None and server.proc.returncode is None:
                server.proc.kill()
                await server.proc.wait()
