"""Real parts for tests: the gateway on a loopback port in the test's loop, a recording upstream
relay (aiosmtpd) that can be told to fail, and a real SQLite file in a temporary folder."""

from __future__ import annotations

import asyncio
import contextlib
import email
import email.policy
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from ssl import SSLContext
from typing import Any

import aiosmtplib
import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session

from smtpgate.app import Gateway
from smtpgate.config import Rules, Settings, parse_rules
from smtpgate.store import Store

FIXTURES = Path(__file__).parent / "fixtures"


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes

    @property
    def message(self) -> EmailMessage:
        msg = email.message_from_bytes(self.data, policy=email.policy.default)
        assert isinstance(msg, EmailMessage)
        return msg


def with_pipelining(ehlo_lines: list[str]) -> list[str]:
    """aiosmtpd's EHLO reply with PIPELINING (RFC 2920) offered, as Postfix and Exchange do."""
    return [*ehlo_lines[:1], "250-PIPELINING", *ehlo_lines[1:]]


@dataclass
class RecordingRelay:
    """An upstream relay that records what it accepts; `fail_with` makes it refuse DATA. It
    offers PIPELINING, as Postfix and Exchange do (tests/test_relay.py covers relays without)."""

    messages: list[Received] = field(default_factory=list)
    fail_with: str | None = None  # e.g. "451 4.3.0 try later" or "554 5.0.0 no"
    delay: float = 0.0
    attempts: int = 0
    port: int = 0
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        return with_pipelining(responses)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.attempts += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.fail_with:
            return self.fail_with
        data = envelope.original_content or b""
        self.messages.append(Received(envelope.mail_from or "", list(envelope.rcpt_tos), data))
        self.arrived.set()
        return "250 2.0.0 OK"

    def to(self, address: str) -> list[Received]:
        return [m for m in self.messages if address in m.rcpt_tos]

    async def wait_for(self, count: int, timeout: float = 15.0) -> list[Received]:
        """Poll with a deadline until `count` messages arrived (no sleeps for synchronisation)."""
        deadline = time.monotonic() + timeout
        while len(self.messages) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"relay got {len(self.messages)} of {count} messages")
            self.arrived.clear()
            try:
                async with asyncio.timeout(max(0.01, deadline - time.monotonic())):
                    await self.arrived.wait()
            except TimeoutError:
                continue
        return self.messages


@contextlib.asynccontextmanager
async def serving(
    handler: Any, *, port: int = 0, implicit_tls: SSLContext | None = None, **smtp_options: Any
) -> AsyncIterator[int]:
    """An upstream relay: aiosmtpd's `SMTP(handler, **smtp_options)` on 127.0.0.1 (`port` 0: a
    free one), TLS from the first byte with `implicit_tls`. Yields the port; closed on the way out.
    """
    server = await asyncio.get_running_loop().create_server(
        lambda: SMTP(handler, **smtp_options), host="127.0.0.1", port=port, ssl=implicit_tls
    )
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


@contextlib.asynccontextmanager
async def listening(
    session: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> AsyncIterator[int]:
    """A raw TCP server on 127.0.0.1 running `session` per connection (a relay that misbehaves
    in ways aiosmtpd will not); yields its port."""
    server = await asyncio.start_server(session, "127.0.0.1", 0)
    async with server:
        yield server.sockets[0].getsockname()[1]


@pytest.fixture
async def relay() -> AsyncIterator[RecordingRelay]:
    recorder = RecordingRelay()
    async with serving(recorder, hostname="relay.test", enable_SMTPUTF8=True) as port:
        recorder.port = port
        yield recorder


def make_settings(tmp_path: Path, relay_port: int, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "data_dir": tmp_path / "data",
        "smtp_port": 0,
        "http_port": 0,
        "hostname": "gateway.test",
        "relay_port": relay_port,
        "connector_addresses": "connector@localhost",
        "internal_support_address": "support@msp.example",
        "retry_schedule": "1",
        # The listener in the test's own process (a child per gateway would cost ~0.4 s per
        # test); tests/test_intake.py and the fault and crash suites run the children too.
        "intake_processes": 0,
        "_env_file": None,
    }
    values.update(overrides)
    return Settings(**values)


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Tests marked both_loops run twice: on asyncio, and on uvloop, which `serve` uses when
    installed (`[fast]`, in the Docker image and the systemd install). Its transports are not
    asyncio's classes, which an isinstance check once missed. Other tests: asyncio only."""
    if item.get_closest_marker("both_loops") is None:
        return {"asyncio": asyncio.new_event_loop}
    import uvloop

    return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


GatewayFactory = Callable[..., Awaitable[Gateway]]


@pytest.fixture
async def gateway_to(tmp_path: Path) -> AsyncIterator[GatewayFactory]:
    """Start gateways delivering to the relay on the given port; all are stopped at the end."""
    started: list[Gateway] = []

    async def start(relay_port: int, rules: Rules | str | None = None, **overrides: Any) -> Gateway:
        if isinstance(rules, str):
            rules = parse_rules(rules)
        settings = make_settings(tmp_path, relay_port, **overrides)
        gw = Gateway(settings, rules or Rules())
        await gw.start()
        started.append(gw)
        return gw

    yield start
    for gw in started:
        await gw.stop(grace=2)


@pytest.fixture
async def gateway_factory(relay: RecordingRelay, gateway_to: GatewayFactory) -> GatewayFactory:
    """Like gateway_to, delivering to the `relay` fixture (set up first, so closed last)."""

    async def start(rules: Rules | str | None = None, **overrides: Any) -> Gateway:
        return await gateway_to(relay.port, rules, **overrides)

    return start


@pytest.fixture
async def gateway(gateway_factory: GatewayFactory) -> Gateway:
    return await gateway_factory()


async def send(
    port: int,
    data: bytes,
    *,
    mail_from: str = "sender@example.org",
    rcpt: tuple[str, ...] = ("connector@localhost",),
) -> tuple[int, str]:
    """Send one message; return the final reply (code, text) instead of raising on refusal."""
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, timeout=15)
    await client.connect()
    try:
        await client.ehlo()
        await client.mail(mail_from)
        for r in rcpt:
            await client.rcpt(r)
        reply = await client.data(data)
        return reply.code, reply.message
    except aiosmtplib.SMTPResponseException as exc:
        return exc.code, exc.message
    finally:
        client.close()


async def http_get(port: int, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    await writer.drain()
    data = await reader.read()
    writer.close()
    await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        key, _, value = line.partition(":")
        headers[key.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers, body


async def wait_until(
    predicate: Callable[[], Awaitable[bool]], timeout: float = 15.0, what: str = "condition"
) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def wait_processed(gw: Gateway, count: int, timeout: float = 15.0) -> None:
    assert gw.store is not None
    store = gw.store

    async def done() -> bool:
        s = await store.status()
        return bool(s["inbound"]["done"] + s["inbound"]["dead"] >= count)

    await wait_until(done, timeout, f"{count} processed messages")


async def wait_outbox(
    store: Store, state: str, count: int, what: str, timeout: float = 15.0
) -> None:
    """Until exactly `count` outbox rows are in `state`."""

    async def reached() -> bool:
        return bool((await store.status())["outbox"][state] == count)

    await wait_until(reached, timeout, what)


def simple_message(
    subject: str = "Hello",
    sender: str = "Someone <someone@elsewhere.example>",
    body: str = "Hello there.",
    message_id: str | None = None,
    extra: dict[str, str] | None = None,
) -> bytes:
    msg = EmailMessage(policy=email.policy.SMTP)
    msg["From"] = sender
    msg["To"] = "connector@localhost"
    msg["Subject"] = subject
    if message_id:
        msg["Message-ID"] = message_id
    for key, value in (extra or {}).items():
        msg[key] = value
    msg.set_content(body)
    return msg.as_bytes()
