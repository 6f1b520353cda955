"""Operations: HTTP endpoints, metrics, STARTTLS, relay TLS/AUTH, JSON logs, SIGHUP, retention,
backup and the deploy/ files. Real parts only: the gateway on loopback (in-process or the real
`smtpgate serve` as a subprocess), recording relays, a real SQLite file, a self-signed certificate
made by openssl."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import sqlite3
import ssl
import stat
import struct
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session
from prometheus_client.parser import text_string_to_metric_families

import smtpgate
from smtpgate.app import Gateway
from smtpgate.config import ENV_PREFIX, Settings, parse_rules
from smtpgate.http import StatusServer
from smtpgate.mail import parse_message
from smtpgate.rules.automated import candidates, first_detection, first_skip, resolve
from smtpgate.store import Store
from tests.conftest import (
    GatewayFactory,
    RecordingRelay,
    http_get,
    send,
    serving,
    simple_message,
    wait_outbox,
    wait_processed,
    wait_until,
)
from tests.hostile import RawSession
from tests.test_faults import cli

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
FIXTURES = Path(__file__).parent / "fixtures"

RELAY_USER = "gateway-user"
RELAY_PASSWORD = "Relay-Pw-9d2f-never-logged"  # a test value that must not leak
API_PASSWORD = "Api-Pw-41c7-never-logged"


# --- helpers -------------------------------------------------------------------------------------


async def test_a_method_not_allowed_names_the_allowed_ones(gateway: Gateway) -> None:
    """RFC 9110 15.5.6: a 405 carries Allow."""
    code, headers, _ = await http_get(gateway.http_port, "/status", method="POST")
    assert code == 405
    assert headers["allow"] == "GET, HEAD"
    assert "allow" not in (await http_get(gateway.http_port, "/status"))[1]


def metric_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus exposition text → {(sample name, sorted labels): value}."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class Cert:
    cert: Path
    key: Path

    def server_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert, self.key)
        return context

    def client_context(self) -> ssl.SSLContext:
        """A client context that trusts exactly this self-signed certificate."""
        return ssl.create_default_context(cafile=str(self.cert))


@pytest.fixture(scope="session")
def cert(tmp_path_factory: pytest.TempPathFactory) -> Cert:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make a test certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2",
            "-subj", "/CN=localhost",
            "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )  # fmt: skip
    return Cert(cert, key)


@dataclass
class SecureRelay:
    """A recording relay that insists on STARTTLS and AUTH, and records the logins it saw."""

    recorder: RecordingRelay
    logins: list[tuple[str, str]] = field(default_factory=list)

    @property
    def port(self) -> int:
        return self.recorder.port

    def authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
    ) -> AuthResult:
        if not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        user, password = auth_data.login.decode(), auth_data.password.decode()
        self.logins.append((user, password))
        ok = (user, password) == (RELAY_USER, RELAY_PASSWORD)
        return AuthResult(success=ok, handled=False)


@pytest.fixture
async def secure_relay(cert: Cert) -> AsyncIterator[SecureRelay]:
    relay = SecureRelay(RecordingRelay())
    async with serving(
        relay.recorder,
        hostname="relay.test",
        tls_context=cert.server_context(),
        require_starttls=True,
        authenticator=relay.authenticate,
        auth_required=True,
        auth_require_tls=True,
    ) as port:
        relay.recorder.port = port
        yield relay


async def send_until_relay_fails(gw: Gateway, message_id: str, what: str) -> None:
    """Send one message (250) and wait until its first delivery to the relay has failed."""
    code, _ = await send(gw.smtp_port, simple_message(message_id=message_id))
    assert code == 250
    assert gw.store is not None
    store = gw.store

    async def failed_once() -> bool:
        rows = await store.list_outbox()
        return bool(rows and rows[0]["last_error"])

    await wait_until(failed_once, what=what)


async def send_starttls(
    port: int, data: bytes, context: ssl.SSLContext
) -> tuple[str, str, str, str]:
    """One STARTTLS session; returns the EHLO reply before TLS and after it, the reply to a
    second STARTTLS inside TLS, and the final DATA reply."""
    client = aiosmtplib.SMTP(
        hostname="127.0.0.1", port=port, start_tls=False, tls_context=context, timeout=15
    )
    await client.connect()
    try:
        ehlo = await client.ehlo()
        await client.starttls()
        assert client.get_transport_info("sslcontext") is not None
        ehlo_tls = await client.ehlo()
        again = await client.execute_command(b"STARTTLS")
        await client.mail("alerts@rmm.example")
        await client.rcpt("connector@localhost")
        reply = await client.data(data)
        await client.quit()
    finally:
        client.close()
    return (
        ehlo.message,
        ehlo_tls.message,
        f"{again.code} {again.message}",
        (f"{reply.code} {reply.message}"),
    )


def clean_env(**values: str) -> dict[str, str]:
    """The test process's environment without any SMTPGATE_* variable, plus `values`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    env.update(values)
    return env


async def run_cli(cwd: Path, env: dict[str, str], *args: str) -> tuple[int, str, str]:
    """Run `smtpgate ARGS` without blocking the event loop (the gateway under test shares it)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "smtpgate",
        *args,
        cwd=cwd,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(30):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


# --- /healthz /status /metrics -------------------------------------------------------------------


async def test_healthz_is_503_while_the_store_cannot_be_written_and_recovers(
    gateway_factory: GatewayFactory, relay: RecordingRelay
) -> None:
    gw = await gateway_factory()
    assert gw.store is not None
    code, _, body = await http_get(gw.http_port, "/healthz")
    assert (code, body) == (200, b"ok\n")

    other = sqlite3.connect(gw.store.path, timeout=0.1, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    try:
        code, _, body = await http_get(gw.http_port, "/healthz")
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert code == 503
    assert b"not writable" in body

    async def healthy() -> bool:
        return (await http_get(gw.http_port, "/healthz"))[0] == 200

    await wait_until(healthy, what="/healthz back to 200")
    # The failed probe must leave the store usable: a message still goes all the way through.
    code, text = await send(gw.smtp_port, simple_message(message_id="<after-lock@example.org>"))
    assert code == 250, text
    await wait_processed(gw, 1)
    await relay.wait_for(1)
    code, _, _ = await http_get(gw.http_port, "/healthz")
    assert code == 200


async def test_healthz_is_503_when_the_disk_cannot_take_one_more_largest_message(
    gateway_factory: GatewayFactory, tmp_path: Path
) -> None:
    """A full disk does not fail the probe's transaction (it changes no byte, so writes no
    page): the free space is checked against SMTPGATE_MAX_MESSAGE_BYTES."""
    free = shutil.disk_usage(tmp_path).free
    gw = await gateway_factory(max_message_bytes=free * 2)  # more than the disk has left
    code, _, body = await http_get(gw.http_port, "/healthz")
    assert (code, body) == (503, b"store not writable (or its disk nearly full)\n")
    # (With the default size, the other /healthz tests get 200 from the same disk.)


async def test_a_failing_route_answers_500_and_the_next_request_is_served(
    gateway_factory: GatewayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """It used to close the connection without a word: a scraper saw a reset."""
    gw = await gateway_factory()
    assert gw.store is not None
    other = sqlite3.connect(gw.store.path, isolation_level=None)
    try:
        other.execute("ALTER TABLE inbound RENAME TO inbound_gone")  # the status query fails
        with caplog.at_level(logging.ERROR, logger="smtpgate.http"):
            code, _, body = await http_get(gw.http_port, "/status")
        assert code == 500
        assert body == b"internal error (OperationalError); see the log\n"
        assert "HTTP /status failed" in caplog.text
    finally:
        other.execute("ALTER TABLE inbound_gone RENAME TO inbound")
        other.close()
    code, _, body = await http_get(gw.http_port, "/status")
    assert code == 200
    assert json.loads(body)["inbound"] is not None


async def http_raw(port: int, request: bytes) -> bytes:
    """Send `request` as it is; what the endpoint answers before it closes (b"" if nothing)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        async with asyncio.timeout(30):  # a deadline, not a measurement
            return await reader.read()
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def test_a_request_with_bare_line_feeds_is_answered(gateway_factory: GatewayFactory) -> None:
    """A request whose lines end in a bare LF (a hand-typed one, a sloppy client) waited the
    whole 10 s timeout and then got no answer at all."""
    gw = await gateway_factory()
    answer = await http_raw(gw.http_port, b"GET /healthz HTTP/1.1\nHost: x\n\n")
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
    assert answer.endswith(b"\r\n\r\nok\n")


@pytest.mark.parametrize(
    ("request_line", "status"),
    [
        (b"GET /healthz HTTP/1.1", b"200 OK"),
        (b"\r\nGET /healthz HTTP/1.1", b"200 OK"),  # RFC 9112 2.2: an empty line before it
        (b"GET http://127.0.0.1:8025/healthz?x=1 HTTP/1.1", b"200 OK"),  # absolute-form, 3.2.2
        (b"GET /status\xa0/../healthz HTTP/1.1", b"400 Bad Request"),
        (b"GET /metrics\x85x HTTP/1.1", b"400 Bad Request"),
        (b"GET\x1c/status\x1cHTTP/1.1", b"400 Bad Request"),
        (b"GET\t/status HTTP/1.1", b"400 Bad Request"),
        (b"GET /healthz", b"200 OK"),  # a hand-typed check (`printf 'GET /healthz\\n\\n' | nc`)
        (b"GET HTTP://127.0.0.1/healthz HTTP/1.1", b"200 OK"),
        (b"GET  /status HTTP/1.1", b"400 Bad Request"),
        (b"GET /status HTTP/9.9 extra", b"400 Bad Request"),
        (b"GET /status HTTP/2.0", b"400 Bad Request"),
    ],
)
async def test_the_request_line_is_read_as_rfc_9112_writes_it(
    gateway_factory: GatewayFactory, request_line: bytes, status: bytes
) -> None:
    """`split()` took TAB, VT, \\x1c–\\x1f, NEL and NBSP for separators and ignored the version:
    `GET /status\\xa0/../healthz` served /status, where a proxy in front may read another path."""
    gw = await gateway_factory()
    answer = await http_raw(gw.http_port, request_line + b"\r\nHost: 127.0.0.1\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 " + status + b"\r\n"), answer[:80]


async def test_the_status_page_answers_only_to_names_of_this_gateway(
    gateway_factory: GatewayFactory,
) -> None:
    """DNS rebinding: a web page of attacker.example whose name then resolves to 127.0.0.1
    read the status page (senders, subjects, relay errors) through the visitor's browser. The
    page now answers only to a Host that is an IP address, localhost or this gateway's name;
    the routes without mail data (health, status counts, metrics) to any."""
    gw = await gateway_factory(hostname="gw.example.net", http_names="status.corp.example")
    allowed = (b"127.0.0.1:8025", b"[::1]", b"[::1]:8025", b"localhost", b"GW.example.net.:8025")
    for host in (*allowed, b"gw", b"status.corp.example:443", None):
        line = b"" if host is None else b"Host: " + host + b"\r\n"
        answer = await http_raw(gw.http_port, b"GET / HTTP/1.1\r\n" + line + b"\r\n")
        assert answer.startswith(b"HTTP/1.1 200 OK\r\n"), (host, answer[:80])
    for host in (b"attacker.example:8025", b"127.0.0.1.attacker.example", b"[::1]evil.example"):
        answer = await http_raw(gw.http_port, b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 421 Misdirected Request\r\n"), (host, answer[:80])
        assert b"<td>" not in answer
        assert b"gw.example.net" not in answer  # no internal names told to whoever asks
        for path in (b"/healthz", b"/status", b"/metrics"):
            request = b"GET " + path + b" HTTP/1.1\r\nHost: " + host + b"\r\n\r\n"
            assert (await http_raw(gw.http_port, request)).startswith(b"HTTP/1.1 200 OK\r\n")
    two = b"GET / HTTP/1.1\r\nHost: localhost\r\nHost: attacker.example\r\n\r\n"
    assert (await http_raw(gw.http_port, two)).startswith(b"HTTP/1.1 400 Bad Request\r\n")
    # RFC 9112 3.2.2: an absolute-form target's authority stands for the Host field.
    absolute = b"GET http://attacker.example/ HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    assert (await http_raw(gw.http_port, absolute)).startswith(b"HTTP/1.1 421 ")


async def test_the_status_page_answers_to_any_name_when_told_so(
    gateway_factory: GatewayFactory,
) -> None:
    gw = await gateway_factory(http_names="*")
    request = b"GET / HTTP/1.1\r\nHost: attacker.example\r\n\r\n"
    assert (await http_raw(gw.http_port, request)).startswith(b"HTTP/1.1 200 OK\r\n")


async def test_every_answer_carries_hardening_headers(gateway: Gateway) -> None:
    """The page shows hostile mail data (escaped): defence in depth against what escaping
    might miss, sniffing and framing."""
    for path in ("/", "/healthz", "/nowhere"):
        _, headers, _ = await http_get(gateway.http_port, path)
        assert headers["x-content-type-options"] == "nosniff"
        assert headers["x-frame-options"] == "DENY"
        assert "frame-ancestors 'none'" in headers["content-security-policy"]
        assert "default-src 'none'" in headers["content-security-policy"]
        assert headers["date"].endswith(" GMT")


@pytest.mark.both_loops
async def test_a_client_that_resets_after_its_request_leaves_no_traceback(
    gateway: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    """On uvloop a write to a reset connection raises RuntimeError ("the handler is closed"),
    which reached log.exception: anyone could write a 9-line ERROR traceback per connection."""
    for path in (b"/status", b"/healthz", b"/"):
        sock = socket.create_connection(("127.0.0.1", gateway.http_port))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.sendall(b"GET " + path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        sock.close()  # a reset, before the answer
    assert (await http_get(gateway.http_port, "/healthz"))[0] == 200
    status_server = gateway.status_server
    assert status_server is not None

    async def all_answered() -> bool:
        return status_server.serving == 0

    await wait_until(all_answered, what="the reset connections' answers written")
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


@pytest.mark.parametrize(("method", "expected"), [("POST", b"405"), ("GET", b"200")])
async def test_a_request_with_a_body_still_gets_its_answer(
    gateway_factory: GatewayFactory, method: str, expected: bytes
) -> None:
    """A monitoring tool's POST (or a GET with a body) got a reset instead of its answer: the
    server closed with the body unread, and the kernel resets such a connection."""
    gw = await gateway_factory()
    body = b"x" * (256 * 1024)
    head = (
        f"{method} /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.http_port)

    async def upload() -> None:
        with contextlib.suppress(ConnectionError):
            writer.write(head + body)
            await writer.drain()

    sending = asyncio.create_task(upload())
    try:
        async with asyncio.timeout(15):
            answer = await reader.read()
    except ConnectionError as exc:
        answer = repr(exc).encode()
    finally:
        await sending
        writer.close()
    assert answer.startswith(b"HTTP/1.1 " + expected), answer[:120]


@pytest.mark.parametrize("size", [20_000, 100_000])
async def test_request_headers_over_16_kib_get_431(
    gateway_factory: GatewayFactory, size: int
) -> None:
    """Over 64 KiB the connection was closed without an answer; now any head over 16 KiB (no
    route needs more) is refused with 431 and the endpoint goes on serving."""
    gw = await gateway_factory()
    request = b"GET /status HTTP/1.1\r\nCookie: " + b"c" * size + b"\r\n\r\n"
    answer = await http_raw(gw.http_port, request)
    assert answer.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")
    assert (await http_get(gw.http_port, "/healthz"))[0] == 200


async def test_connections_over_the_cap_get_503_but_health_and_the_endpoint_recover(
    gateway_factory: GatewayFactory,
) -> None:
    """Idle connections were held without a limit, each for 10 s: a client could take every
    descriptor of the gateway (and its SMTP sessions with them). Over the cap only /healthz is
    served: idle connections must not make the health probe (Docker's HEALTHCHECK) fail."""
    gw = await gateway_factory()
    idle = [
        await asyncio.open_connection("127.0.0.1", gw.http_port)
        for _ in range(StatusServer.MAX_CONNECTIONS)
    ]
    try:

        async def refused() -> bool:  # once the server has taken every idle one
            code, _, body = await http_get(gw.http_port, "/status")
            assert code in (200, 503)
            return (code, body) == (503, b"too many connections\n")

        await wait_until(refused, what="a connection over the cap refused")
        code, _, body = await http_get(gw.http_port, "/healthz")
        assert (code, body) == (200, b"ok\n")
        silent = await http_raw(gw.http_port, b"")  # sends nothing: answered within a second
        assert silent.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    finally:
        for _, writer in idle:
            writer.close()
            await writer.wait_closed()

    async def served() -> bool:
        return (await http_get(gw.http_port, "/healthz"))[0] == 200

    await wait_until(served, what="the idle connections gone, requests served again")


async def test_status_is_the_same_json_as_the_status_command(
    gateway_factory: GatewayFactory, relay: RecordingRelay, tmp_path: Path
) -> None:
    gw = await gateway_factory()
    for i in range(2):
        code, _ = await send(gw.smtp_port, simple_message(message_id=f"<st{i}@example.org>"))
        assert code == 250
    await wait_processed(gw, 2)
    await relay.wait_for(2)
    assert gw.store is not None
    await wait_outbox(gw.store, "done", 2, "outbox done")
    code, headers, body = await http_get(gw.http_port, "/status")
    assert code == 200
    assert headers["content-type"] == "application/json"
    served = json.loads(body)
    env = clean_env(SMTPGATE_DATA_DIR=str(gw.settings.data_dir))
    rc, out, err = await run_cli(tmp_path, env, "status", "--json")
    assert rc == 0, err
    assert json.loads(out) == served
    assert served["inbound"]["done"] == 2
    assert served["outbox"]["done"] == 2


async def test_metrics_cover_what_an_operator_alerts_on(
    gateway_factory: GatewayFactory, relay: RecordingRelay
) -> None:
    rules = """
[[detection]]
name = "rmm"
sender = ["alerts@rmm.example"]
subject = "Alert"
"""
    gw = await gateway_factory(rules)
    code, _ = await send(
        gw.smtp_port,
        simple_message("Alert: disk C: low", "RMM <alerts@rmm.example>", message_id="<m1@rmm>"),
        mail_from="alerts@rmm.example",
    )
    assert code == 250
    code, _ = await send(gw.smtp_port, simple_message(message_id="<m2@example.org>"))
    assert code == 250
    await wait_processed(gw, 2)
    await relay.wait_for(2)

    async def delivered() -> bool:
        _, _, body = await http_get(gw.http_port, "/metrics")
        samples = metric_samples(body.decode())
        return samples.get(("smtpgate_relay_deliveries_total", (("kind", "forward"),))) == 2

    await wait_until(delivered, what="two deliveries counted")
    code, headers, body = await http_get(gw.http_port, "/metrics")
    assert code == 200
    assert headers["content-type"].startswith("text/plain")
    m = metric_samples(body.decode())
    assert m[("smtpgate_messages_received_total", ())] == 2
    automated = (("action", "automated_no_account"), ("path", "automated"))
    assert m[("smtpgate_messages_processed_total", automated)] == 1
    regular = (("action", "forwarded"), ("path", "regular"))
    assert m[("smtpgate_messages_processed_total", regular)] == 1
    assert m[("smtpgate_rule_hits_total", (("rule", "rmm"),))] == 1
    assert m[("smtpgate_queue_depth", (("queue", "inbound"), ("state", "done")))] == 2
    assert m[("smtpgate_queue_depth", (("queue", "inbound"), ("state", "queued")))] == 0
    assert m[("smtpgate_queue_depth", (("queue", "outbox"), ("state", "done")))] == 2
    assert m[("smtpgate_oldest_queued_age_seconds", ())] == 0
    assert m[("smtpgate_processing_seconds_count", ())] == 2
    assert ("smtpgate_processing_seconds_bucket", (("le", "+Inf"),)) in m
    assert m[("smtpgate_smtp_connections_total", ())] == 2
    assert m[("smtpgate_build_info", (("version", smtpgate.__version__),))] == 1
    # Per session: 220 greeting; 250 for EHLO (multi-line, counted once), MAIL, RCPT, end of DATA.
    assert m[("smtpgate_smtp_replies_total", (("code", "220"),))] == 2
    assert m[("smtpgate_smtp_replies_total", (("code", "354"),))] == 2
    assert m[("smtpgate_smtp_replies_total", (("code", "250"),))] == 8


async def test_relay_failures_are_counted_by_kind(
    gateway_factory: GatewayFactory, relay: RecordingRelay
) -> None:
    relay.fail_with = "554 5.7.1 rejected by policy"
    gw = await gateway_factory()
    code, _ = await send(gw.smtp_port, simple_message(message_id="<f1@example.org>"))
    assert code == 250

    async def failed() -> bool:
        _, _, body = await http_get(gw.http_port, "/metrics")
        samples = metric_samples(body.decode())
        return samples.get(("smtpgate_relay_failures_total", (("failure", "permanent"),))) == 1

    await wait_until(failed, what="a permanent relay failure counted")
    _, _, body = await http_get(gw.http_port, "/metrics")
    m = metric_samples(body.decode())
    assert m[("smtpgate_queue_depth", (("queue", "outbox"), ("state", "dead")))] == 1
    assert m[("smtpgate_relay_deliveries_total", (("kind", "forward"),))] == 0


async def test_the_series_the_documented_alerts_read_exist_at_zero_from_the_start(
    gateway_factory: GatewayFactory,
) -> None:
    """docs/operations.md's alerts take increase() of labelled counters, whose series did not
    exist before their first event: a series first scraped at N > 0 has no earlier sample, and
    increase() counts it as 0. A short store failure whose 451s all fell between two scrapes
    never fired SmtpgateStoreFailures. The known label values start at 0 (prometheus_client's
    advice)."""
    gw = await gateway_factory()
    _, _, body = await http_get(gw.http_port, "/metrics")
    m = metric_samples(body.decode())
    for series in (
        ("smtpgate_smtp_replies_total", (("code", "451"),)),
        ("smtpgate_smtp_replies_total", (("code", "550"),)),
        ("smtpgate_smtp_replies_total", (("code", "214"),)),  # HELP
        ("smtpgate_smtp_replies_total", (("code", "454"),)),  # STARTTLS without TLS
        ("smtpgate_smtp_replies_total", (("code", "553"),)),  # a malformed address
        ("smtpgate_smtp_replies_total", (("code", "538"),)),  # AUTH before STARTTLS
        ("smtpgate_relay_failures_total", (("failure", "transient"),)),
        ("smtpgate_relay_failures_total", (("failure", "permanent"),)),
        ("smtpgate_relay_deliveries_total", (("kind", "forward"),)),
        ("smtpgate_relay_deliveries_total", (("kind", "response"),)),
    ):
        assert m.get(series) == 0, series


# --- TLS: the listener and the relay -------------------------------------------------------------


@pytest.mark.both_loops
async def test_starttls_without_a_handshake_frees_its_slot_at_the_idle_timeout(
    gateway_factory: GatewayFactory, cert: Cert
) -> None:
    """A client that says STARTTLS and then never starts the handshake: the idle timeout
    closed the connection, but the TLS layer never told the session, whose reader waited for
    ever: its slot of SMTPGATE_MAX_CONNECTIONS was held until restart (with SMTP_TIMEOUT under
    the TLS layer's own 60 s handshake timeout)."""
    gw = await gateway_factory(
        tls_cert_file=cert.cert, tls_key_file=cert.key, smtp_timeout=1.0, max_connections=1
    )
    hog = await RawSession.open(gw.smtp_port)
    assert (await hog.command(b"STARTTLS")).code == 220
    async with asyncio.timeout(10):  # no ClientHello: closed at the idle timeout
        assert await hog.reader.read() == b""
    await hog.close()

    async def slot_free() -> bool:
        session = await RawSession.open(gw.smtp_port, ehlo=False)
        await session.close()
        return session.greeting is not None and session.greeting.code == 220

    await wait_until(slot_free, timeout=10, what="the slot back after the idle timeout")


async def test_starttls_on_the_listener_delivers(
    gateway_factory: GatewayFactory, relay: RecordingRelay, cert: Cert
) -> None:
    gw = await gateway_factory(tls_cert_file=cert.cert, tls_key_file=cert.key)
    ehlo, ehlo_tls, again, reply = await send_starttls(
        gw.smtp_port, simple_message("over TLS", message_id="<tls@example.org>"),
        cert.client_context(),
    )  # fmt: skip
    assert "STARTTLS" in ehlo.upper()
    # No AUTH offered over TLS either: the spec has none, and a sender with credentials set
    # would try it, get a permanent 535 and give up. No second STARTTLS (RFC 3207: 503).
    assert "AUTH" not in ehlo_tls.upper()
    assert "STARTTLS" not in ehlo_tls.upper()
    assert again.startswith("503"), again
    assert reply.startswith("250 2.0.0 queued as "), reply
    await wait_processed(gw, 1)
    (forwarded,) = await relay.wait_for(1)
    assert forwarded.message["Subject"] == "over TLS"
    assert "with ESMTPS id" in forwarded.data.decode("ascii", "replace")
    # STARTTLS's "220 Ready to start TLS" is a reply, not a second session.
    _, _, body = await http_get(gw.http_port, "/metrics")
    m = metric_samples(body.decode())
    assert m[("smtpgate_smtp_connections_total", ())] == 1
    assert m[("smtpgate_smtp_replies_total", (("code", "220"),))] == 2


async def test_no_starttls_without_a_certificate(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory()
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=gw.smtp_port, start_tls=False)
    await client.connect()
    try:
        reply = await client.ehlo()
    finally:
        client.close()
    assert "STARTTLS" not in reply.message.upper()


async def test_relay_with_starttls_and_auth(
    gateway_to: GatewayFactory, secure_relay: SecureRelay
) -> None:
    gw = await gateway_to(
        secure_relay.port,
        relay_tls="starttls",
        relay_tls_verify=False,  # the relay's certificate is self-signed
        relay_username=RELAY_USER,
        relay_password=RELAY_PASSWORD,
    )
    code, _ = await send(gw.smtp_port, simple_message("via auth", message_id="<au@example.org>"))
    assert code == 250
    (forwarded,) = await secure_relay.recorder.wait_for(1)
    assert forwarded.rcpt_tos == ["support@msp.example"]
    assert forwarded.message["Subject"] == "via auth"
    assert secure_relay.logins == [(RELAY_USER, RELAY_PASSWORD)]


async def test_relay_certificate_is_verified_by_default(
    gateway_to: GatewayFactory, secure_relay: SecureRelay
) -> None:
    gw = await gateway_to(
        secure_relay.port,
        relay_tls="starttls",
        relay_username=RELAY_USER,
        relay_password=RELAY_PASSWORD,
    )
    await send_until_relay_fails(gw, "<verify@example.org>", "a failed relay attempt")
    assert gw.store is not None
    (row,) = await gw.store.list_outbox()
    assert "certificate" in row["last_error"].lower()
    assert row["state"] in ("queued", "active")  # transient: retried, not dead
    assert secure_relay.recorder.messages == []
    assert secure_relay.logins == []  # no password sent over an unverified connection


async def wrong_password_gateway(
    gateway_to: GatewayFactory, secure_relay: SecureRelay, **overrides: Any
) -> Gateway:
    """A gateway relaying over STARTTLS to `secure_relay` with the wrong password."""
    return await gateway_to(
        secure_relay.port,
        relay_tls="starttls",
        relay_tls_verify=False,
        relay_username=RELAY_USER,
        relay_password="wrong",
        **overrides,
    )


async def test_relay_wrong_password_is_not_delivered(
    gateway_to: GatewayFactory, secure_relay: SecureRelay
) -> None:
    gw = await wrong_password_gateway(gateway_to, secure_relay)
    await send_until_relay_fails(gw, "<wrong@example.org>", "a refused login")
    assert secure_relay.logins[0] == (RELAY_USER, "wrong")
    assert secure_relay.recorder.messages == []
    # A refused login is about the connection, not the mail: it waits for a retry, not dead.
    assert gw.store is not None
    [row] = await gw.store.list_outbox()
    assert row["state"] == "queued", row
    assert row["last_error"].startswith("relay connection:")


async def test_a_wrong_relay_password_costs_one_login_per_sender_not_one_per_mail(
    gateway_to: GatewayFactory, secure_relay: SecureRelay
) -> None:
    """Each queued mail used to try its own login: 20 mails, 40 failed logins at once, enough
    for Microsoft 365 to lock the account or fail2ban to ban the gateway. A sender whose
    connection fails now puts the rest of its claim back unsent and waits (RELAY_BACKOFF)."""
    gw = await wrong_password_gateway(
        gateway_to, secure_relay, relay_connections=2, retry_schedule="60"
    )
    for i in range(20):
        message = simple_message(subject=f"m{i}", message_id=f"<m{i}@example.org>")
        assert (await send(gw.smtp_port, message))[0] == 250
    assert gw.store is not None
    store = gw.store

    async def each_sender_failed_once() -> bool:
        rows = await store.list_outbox(limit=100)
        tried = [r for r in rows if r["attempts"]]
        untried = [r for r in rows if not r["attempts"]]
        return len(rows) == 20 and len(tried) == 2 and all(r["state"] == "queued" for r in untried)

    await wait_until(each_sender_failed_once, what="one failed login per sender, the rest back")
    assert 1 <= len(secure_relay.logins) <= 4  # aiosmtplib may try two AUTH mechanisms


async def test_relay_with_implicit_tls(gateway_to: GatewayFactory, cert: Cert) -> None:
    recorder = RecordingRelay()
    async with serving(recorder, hostname="relay.test", implicit_tls=cert.server_context()) as port:
        gw = await gateway_to(port, relay_tls="tls", relay_tls_verify=False)
        code, _ = await send(gw.smtp_port, simple_message("tls", message_id="<itls@example.org>"))
        assert code == 250
        (forwarded,) = await recorder.wait_for(1)
        assert forwarded.message["Subject"] == "tls"


# --- retention and backup ------------------------------------------------------------------------


async def test_retention_removes_raw_bytes_and_keeps_the_outcome(
    gateway_factory: GatewayFactory, relay: RecordingRelay
) -> None:
    gw = await gateway_factory()
    code, text = await send(gw.smtp_port, simple_message(message_id="<ret@example.org>"))
    assert code == 250
    queue_id = text.rsplit(" ", 1)[-1]
    await wait_processed(gw, 1)
    assert gw.store is not None
    assert await gw.store.purge(30) == 0  # younger than 30 days: kept
    assert await gw.store.raw_message(queue_id) is not None
    code, out = await cli(gw, "queue", "show", queue_id, "--raw")
    assert code == 0
    assert "Message-ID: <ret@example.org>" in out

    assert await gw.store.purge(0) == 1
    # Said, not an empty output that reads as an empty message (it printed nothing, exit 0).
    code, out = await cli(gw, "queue", "show", queue_id, "--raw")
    assert code == 1
    assert f"the raw bytes of {queue_id} were removed after SMTPGATE_RETENTION_DAYS" in out
    row = await gw.store.get_inbound(queue_id)
    assert row is not None
    assert row["raw_kept"] is False
    assert await gw.store.raw_message(queue_id) is None
    assert row["state"] == "done"
    assert row["outcome"]["action"] == "forwarded"
    assert row["outcome"]["path"] == "regular"
    assert await gw.store.purge(0) == 0  # nothing left to remove


async def test_backup_is_a_consistent_online_copy(
    gateway_factory: GatewayFactory, relay: RecordingRelay, tmp_path: Path
) -> None:
    gw = await gateway_factory()
    assert gw.store is not None
    await gw.store.import_accounts([(2, {"file_as": "Acme Corp", "email1": "it@acme.example"})])
    for i in range(3):
        code, _ = await send(
            gw.smtp_port,
            simple_message(f"printer {i}", "IT <it@acme.example>", message_id=f"<b{i}@acme>"),
            mail_from="it@acme.example",
        )
        assert code == 250
    await wait_processed(gw, 3)
    target = tmp_path / "backups" / "smtpgate-copy.db"
    env = clean_env(SMTPGATE_DATA_DIR=str(gw.settings.data_dir))
    rc, out, err = await run_cli(tmp_path, env, "backup", str(target))  # while serving
    assert rc == 0, err
    assert "backup written" in out
    live = sqlite3.connect(gw.store.path)
    copy = sqlite3.connect(target)
    try:
        assert copy.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        for table in ("inbound", "tickets", "accounts", "history", "outbox"):
            query = f"SELECT count(*) FROM {table}"
            assert copy.execute(query).fetchone() == live.execute(query).fetchone(), table
        assert copy.execute("SELECT count(*) FROM tickets").fetchone() == (3,)
    finally:
        live.close()
        copy.close()


# --- the real `smtpgate serve`: TLS, JSON logs, rules, SIGHUP ------------------------------------

RULES_V1 = """
account_by_sender = true

[[detection]]
name = "rmm-alpha"
sender = ["alerts@rmm.example"]
subject = "ALPHA"
"""
RULES_V2 = RULES_V1.replace("rmm-alpha", "rmm-beta").replace('"ALPHA"', '"BETA"')
RULES_BROKEN = RULES_V2 + '\n[[skip]]\nsubject = "Self Healed"\nunknown_key = 1\n'


class ServeProcess:
    """`python -m smtpgate serve` with its stderr in a file that tests read line by line."""

    def __init__(self, cwd: Path, env: dict[str, str]) -> None:
        self.log_path = cwd / "serve.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "smtpgate", "serve"],
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self._log,
        )

    def lines(self) -> list[str]:
        return self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()

    async def wait_log(self, predicate: Any, what: str, start: int = 0) -> int:
        """Poll stderr until a JSON line satisfies `predicate`; returns the line count seen."""
        found: list[int] = []

        async def seen() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError("serve exited early:\n" + "\n".join(self.lines()))
            lines = self.lines()
            for line in lines[start:]:
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                if predicate(entry):
                    found.append(len(lines))
                    return True
            return False

        await wait_until(seen, timeout=20, what=what)
        return found[0]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self._log.close()
        return self.proc.returncode


@pytest.fixture
def serve_env(tmp_path: Path, cert: Cert, secure_relay: SecureRelay) -> dict[str, str]:
    rules = tmp_path / "rules.toml"
    rules.write_text(RULES_V1)
    return clean_env(
        SMTPGATE_DATA_DIR=str(tmp_path / "data"),
        SMTPGATE_SMTP_PORT=str(free_port()),
        SMTPGATE_HTTP_PORT=str(free_port()),
        SMTPGATE_HOSTNAME="gateway.test",
        SMTPGATE_CONNECTOR_ADDRESSES="connector@localhost",
        SMTPGATE_INTERNAL_SUPPORT_ADDRESS="support@msp.example",
        SMTPGATE_TLS_CERT_FILE=str(cert.cert),
        SMTPGATE_TLS_KEY_FILE=str(cert.key),
        SMTPGATE_RELAY_PORT=str(secure_relay.port),
        SMTPGATE_RELAY_TLS="starttls",
        SMTPGATE_RELAY_TLS_VERIFY="false",
        SMTPGATE_RELAY_USERNAME=RELAY_USER,
        SMTPGATE_RELAY_PASSWORD=RELAY_PASSWORD,
        SMTPGATE_API_ENABLED="true",
        SMTPGATE_API_PASSWORD=API_PASSWORD,
        SMTPGATE_RULES_FILE=str(rules),
        SMTPGATE_LOG_FORMAT="json",
        SMTPGATE_LOG_LEVEL="DEBUG",  # the strictest case for "no secrets in logs"
        SMTPGATE_RETRY_SCHEDULE="1",
    )


@pytest.fixture
def serve(tmp_path: Path, serve_env: dict[str, str]) -> Iterator[ServeProcess]:
    process = ServeProcess(tmp_path, serve_env)
    yield process
    process.stop()


def xml_message(password: str) -> bytes:
    text = (FIXTURES / "04-xml-new-ticket.eml").read_bytes()
    return text.replace(b"s3cret", password.encode()).replace(b"\n", b"\r\n")


@pytest.mark.slow
async def test_serve_with_tls_json_logs_rules_and_sighup(
    serve: ServeProcess, serve_env: dict[str, str], secure_relay: SecureRelay, cert: Cert
) -> None:
    smtp_port = int(serve_env["SMTPGATE_SMTP_PORT"])
    http_port = int(serve_env["SMTPGATE_HTTP_PORT"])
    rules_file = Path(serve_env["SMTPGATE_RULES_FILE"])
    ready = await serve.wait_log(lambda e: "SMTP on" in e["message"], "the ready line")

    async def get(path: str) -> tuple[int, dict[str, str], bytes]:
        return await http_get(http_port, path)

    async def metrics() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        code, _, body = await get("/metrics")
        assert code == 200
        return metric_samples(body.decode())

    async def processed(count: int) -> None:
        async def done() -> bool:
            status = json.loads((await get("/status"))[2])
            return bool(status["inbound"]["done"] + status["inbound"]["dead"] >= count)

        await wait_until(done, what=f"{count} processed")

    def rule_hits(m: dict[Any, float], rule: str) -> float:
        return m.get(("smtpgate_rule_hits_total", (("rule", rule),)), 0.0)

    assert (await get("/healthz"))[0] == 200
    before = (await metrics())[("smtpgate_messages_received_total", ())]
    assert before == 0

    # A STARTTLS session that delivers; the v1 rule detects ALPHA alerts.
    ehlo, ehlo_tls, again, reply = await send_starttls(
        smtp_port, simple_message("ALPHA disk low", "RMM <alerts@rmm.example>"),
        cert.client_context(),
    )  # fmt: skip
    assert "STARTTLS" in ehlo.upper()
    assert "AUTH" not in ehlo_tls.upper()  # in the intake child, on uvloop when installed
    assert again.startswith("503"), again
    assert reply.startswith("250 2.0.0 queued as "), reply
    await processed(1)
    (forwarded,) = await secure_relay.recorder.wait_for(1)
    assert forwarded.message["Subject"] == "ALPHA disk low"
    assert secure_relay.logins == [(RELAY_USER, RELAY_PASSWORD)]
    m = await metrics()
    assert m[("smtpgate_messages_received_total", ())] == 1  # grows
    assert rule_hits(m, "rmm-alpha") == 1
    names = {name for name, _ in m if name.startswith("smtpgate_")}
    assert len({re.sub(r"_(total|count|sum|bucket|created)$", "", n) for n in names}) >= 5

    # SIGHUP with a changed rules file: ALPHA is no longer an alert, BETA is.
    rules_file.write_text(RULES_V2)
    serve.proc.send_signal(signal.SIGHUP)
    seen = await serve.wait_log(
        lambda e: e["message"].startswith("rules reloaded"), "the reload", ready
    )
    for subject in ("ALPHA again", "BETA disk low"):
        *_, reply = await send_starttls(
            smtp_port, simple_message(subject, "RMM <alerts@rmm.example>"), cert.client_context()
        )
        assert reply.startswith("250"), reply
    await processed(3)
    m = await metrics()
    assert rule_hits(m, "rmm-alpha") == 1
    assert rule_hits(m, "rmm-beta") == 1
    assert m[("smtpgate_messages_processed_total", (("action", "forwarded"), ("path", "regular")))]

    # SIGHUP with a broken file: rejected with an error line, the v2 rules stay in force.
    rules_file.write_text(RULES_BROKEN)
    serve.proc.send_signal(signal.SIGHUP)
    await serve.wait_log(
        lambda e: e["level"] == "error" and "rules reload rejected" in e["message"],
        "the rejected reload",
        seen,
    )
    assert "unknown_key" in serve.lines()[-1] or any(
        "unknown_key" in line for line in serve.lines()[seen:]
    )
    code, _ = await send(smtp_port, simple_message("BETA cpu high", "RMM <alerts@rmm.example>"))
    assert code == 250
    # An XML transaction carrying the API password (it must not reach the logs either).
    code, _ = await send(smtp_port, xml_message(API_PASSWORD), mail_from="forms@globex.example")
    assert code == 250
    await processed(5)
    m = await metrics()
    assert rule_hits(m, "rmm-beta") == 2
    assert m[("smtpgate_messages_received_total", ())] == 5
    assert serve.proc.poll() is None  # still serving

    # /status and the HTML page.
    code, headers, body = await get("/status")
    assert code == 200
    assert json.loads(body)["inbound"]["done"] == 5
    code, headers, body = await get("/")
    assert code == 200
    assert headers["content-type"].startswith("text/html")
    page = body.decode()
    assert "<html" in page
    assert "queue" in page.lower()
    assert "BETA cpu high" in page or "automated_no_account" in page

    await secure_relay.recorder.wait_for(5)  # 4 forwards + the XML response
    assert serve.stop() == 0

    # Every line is a JSON object; decisions and deliveries carry the queue id; no secrets.
    lines = serve.lines()
    entries = [json.loads(line) for line in lines if line.strip()]
    assert all(isinstance(e, dict) and {"ts", "level", "message"} <= set(e) for e in entries)
    decisions = [e for e in entries if e["message"].startswith("processed ")]
    deliveries = [e for e in entries if e["message"].startswith("delivered outbox ")]
    assert len(decisions) == 5
    assert all(e["queue_id"] and e["outcome"]["action"] for e in decisions)
    assert len(deliveries) >= 5
    assert all(e.get("queue_id") and e.get("outbox_id") for e in deliveries)
    text = serve.log_path.read_text()
    assert RELAY_PASSWORD not in text
    assert API_PASSWORD not in text


async def test_serve_refuses_to_start_on_a_busy_data_dir_with_a_json_error(
    serve: ServeProcess, serve_env: dict[str, str], tmp_path: Path
) -> None:
    await serve.wait_log(lambda e: "SMTP on" in e["message"], "the ready line")
    env = dict(serve_env, SMTPGATE_SMTP_PORT="0", SMTPGATE_HTTP_PORT="0")
    rc, _, err = await run_cli(tmp_path, env, "serve")
    assert rc == 2
    lines = [json.loads(line) for line in err.splitlines() if line.strip()]
    assert any("already running" in e["message"] for e in lines)


# --- deploy/ and the docs ------------------------------------------------------------------------


def setting_names() -> list[str]:
    return [f"{ENV_PREFIX}{name.upper()}" for name in Settings.model_fields]


def test_env_example_lists_every_setting_with_its_default() -> None:
    text = (DEPLOY / "smtpgate.env.example").read_text()
    missing = [name for name in setting_names() if not re.search(rf"\b{name}=", text)]
    assert missing == []
    documented = set(re.findall(r"\b(SMTPGATE_[A-Z0-9_]+)=", text))
    assert documented <= set(setting_names()), "unknown variables in the example"
    # Each variable is preceded by a comment that explains it.
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if re.match(r"#?\s*SMTPGATE_", line):
            assert lines[i - 1].startswith("# "), line
            assert len(lines[i - 1]) > 10, line


def test_env_example_loads_as_settings(tmp_path: Path) -> None:
    """The uncommented values of the example are valid settings."""
    values = {}
    for line in (DEPLOY / "smtpgate.env.example").read_text().splitlines():
        if line.startswith("SMTPGATE_"):
            key, _, value = line.partition("=")
            values[key.removeprefix(ENV_PREFIX).lower()] = value
    assert {"connector_addresses", "internal_support_address", "relay_host"} <= set(values)
    Settings(_env_file=None, **values)


def test_readme_documents_every_setting() -> None:
    text = (ROOT / "README.md").read_text()
    missing = [name for name in setting_names() if f"`{name}`" not in text]
    assert missing == [], "README settings table is missing these"


EXAMPLE_RULES = sorted((DEPLOY / "rules").glob("*.toml"))


def test_example_rules_cover_the_common_rmm_systems() -> None:
    names = {p.stem for p in EXAMPLE_RULES}
    for system in ("n-central", "datto", "connectwise", "prtg", "veeam", "ninjaone"):
        assert any(system in name for name in names), system


@pytest.mark.parametrize("path", EXAMPLE_RULES, ids=lambda p: p.name)
def test_example_rules_file_loads(path: Path) -> None:
    rules = parse_rules(path.read_text(), str(path))
    assert rules.detection, "an example must detect something"
    names = [r.name for kind in (rules.detection, rules.skip, rules.account) for r in kind]
    assert all(name and "[" not in name for name in names), "every example rule is named"
    assert len(set(names)) == len(names), "rule names are unique"


# The subjects quoted in each example's comments: (file, sender, subject, skip rule, account).
EXAMPLE_SUBJECTS = [
    ("n-central", "alerts@ncentral.msp.example",
     "N-central: Customer Acme Corp | ACME-DC01 - Disk Space is Failed", None, "acme corp"),
    ("n-central", "alerts@ncentral.msp.example",
     "N-central: Customer Acme Corp | ACME-DC01 - Disk Space is Normal", "n-central-normal", None),
    ("datto-rmm", "noreply@centrastage.net",
     "[Datto RMM] Alert - Site: Acme Corp - Device: ACME-PC17 - Disk C: below 10% free",
     None, "acme corp"),
    ("connectwise-automate", "automate@msp.example",
     "Automate FAILED: Disk - C: Free Space [Client: Acme Corp] ACME-SRV02", None, "acme corp"),
    ("connectwise-automate", "automate@msp.example",
     "Automate SUCCESS: Disk - C: Free Space [Client: Acme Corp] ACME-SRV02",
     "automate-success", None),
    ("connectwise-automate", "automate@msp.example",  # Automate's default message
     "Disk - C: Free Space FAILED on Acme Corp\\ACME-SRV02 at Main Office for C: result 3%.",
     None, "acme corp"),
    ("connectwise-automate", "automate@msp.example",
     "Disk - C: Free Space SUCCESS on Acme Corp\\ACME-SRV02 at Main Office for C: result 30%.",
     "automate-default-success", None),
    ("prtg", "prtg@msp.example", "[PRTG] Acme Corp: acme-fw01 Ping Down  (5 m)", None, "acme corp"),
    ("prtg", "prtg@msp.example", "[PRTG] Acme Corp: acme-fw01 Ping Down ended (now: Up)",
     "prtg-back-up", None),
    ("prtg", "prtg@msp.example",  # PRTG's default subject: an alert, forwarded (no customer)
     "[PRTG Network Monitor (PRTG01)] acme-fw01 Ping Down (No such host is known)", None, None),
    ("veeam", "veeam@msp.example", "[Failed] Acme Corp Daily (3 machines) 1 failed",
     None, "acme corp"),
    ("veeam", "veeam@msp.example", "[Success] Acme Corp Daily (3 machines)",
     "veeam-success-skip", None),
    ("ninjaone", "no-reply@ninjarmm.com",
     "NinjaOne Alert | Organization: Acme Corp | ACME-LT042 | Disk C: free space below 10%",
     None, "acme corp"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("stem", "sender", "subject", "skip", "account"),
    EXAMPLE_SUBJECTS,
    ids=[f"{row[0]}-{i}" for i, row in enumerate(EXAMPLE_SUBJECTS)],
)
def test_example_rules_handle_their_documented_subjects(
    stem: str, sender: str, subject: str, skip: str | None, account: str | None
) -> None:
    rules = parse_rules((DEPLOY / "rules" / f"{stem}.toml").read_text())
    msg = parse_message(simple_message(subject, f"Monitor <{sender}>"))
    detected, _ = first_detection(rules.detection, msg)
    assert detected is not None, "not detected as automated"
    skipped, _ = first_skip(rules.skip, msg.subject)
    assert (skipped.name if skipped else None) == skip
    if account is not None:
        found = [rule.name for rule in rules.account if account in candidates(rule, msg.subject)]
        assert found, f"no account rule offers {account!r}"


# Account rules apply to every detected alert, whichever system sent it (spec 2.1.3): in a rules
# file made of all the examples' blocks (docs/operations.md), each subject finds its own
# customer and no other. Veeam's `after = "]"` filed an unknown "[PRTG] Baker & Sons Bakery: …"
# under the account "Baker & Sons"; N-central's `before = ","` cut "Smith, Jones & Partners LLP".
COMBINED_CASES = [
    ("N-central: Customer Smith, Jones & Partners LLP | SJP-FS01 - Backup Status is Warning",
     "smith, jones & partners llp"),
    ("[PRTG] Baker & Sons Bakery: bsb-fw01 Ping Down  (5 m)", None),
    ("[PRTG] Baker & Sons: bs-fw01 Ping Down  (5 m)", "baker & sons"),
    ("[Failed] Baker & Sons Nightly (2 machines) 1 failed", "baker & sons"),
    ("[Warning] Smith, Jones & Partners LLP Daily (3 machines)", "smith, jones & partners llp"),
    ("Disk - C: Free Space FAILED on Baker & Sons\\BS-SRV01 at Bakery for C: result 3%.",
     "baker & sons"),
    ("[Datto RMM] Alert - Site: Acme Corp - Device: ACME-PC17 - Disk C: below 10% free",
     "acme corp"),
    ("NinjaOne Alert | Organization: Smith, Jones & Partners LLP | SJP-LT1 | Disk C: low",
     "smith, jones & partners llp"),
]  # fmt: skip


@pytest.mark.parametrize(("subject", "account"), COMBINED_CASES)
def test_the_examples_combined_find_each_customer_and_no_other(
    subject: str, account: str | None
) -> None:
    blocks = [
        "\n".join(ln for ln in path.read_text().splitlines() if not ln.startswith("account_by"))
        for path in sorted((DEPLOY / "rules").glob("*.toml"))
    ]
    rules = parse_rules("\n".join(blocks))
    accounts = {"acme corp", "baker & sons", "smith, jones & partners llp"}
    found = None
    for rule in rules.account:  # the first rule that finds one account wins
        values = candidates(rule, subject)
        match = resolve(values, {v: [(v, None)] for v in values if v in accounts})
        if match.account is not None:
            found = match.account
            break
    assert found == account


def test_dockerfile_runs_unprivileged_with_a_volume_and_a_healthcheck() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    user = re.search(r"^USER\s+(\S+)", text, re.MULTILINE)
    assert user is not None
    assert user.group(1).split(":")[0] not in ("root", "0")
    assert re.search(r"^VOLUME\s+.*/var/lib/smtpgate", text, re.MULTILINE)
    joined = text.replace("\\\n", " ")  # continuation lines
    healthcheck = re.search(r"^HEALTHCHECK\b.*$", joined, re.MULTILINE)
    assert healthcheck is not None
    assert "/healthz" in healthcheck.group(0)
    assert "SMTPGATE_HTTP_HOST=0.0.0.0" in text  # reachable from outside the container


def test_compose_file_mounts_the_data_volume_and_env_file() -> None:
    text = (DEPLOY / "docker-compose.yml").read_text()
    for needle in ("build:", "volumes:", "/var/lib/smtpgate", "env_file:", "25:2525"):
        assert needle in text, needle


def test_systemd_unit_is_hardened() -> None:
    text = (DEPLOY / "smtpgate.service").read_text()
    for directive in (
        "User=smtpgate",
        "DynamicUser=no",
        "StateDirectory=smtpgate",
        "AmbientCapabilities=CAP_NET_BIND_SERVICE",
        "CapabilityBoundingSet=CAP_NET_BIND_SERVICE",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "EnvironmentFile=",
        "ExecStart=",
    ):
        assert directive in text, directive


def test_operations_doc_covers_the_topics() -> None:
    text = (ROOT / "docs" / "operations.md").read_text().lower()
    for topic in (
        "mx",
        "rmm",
        "starttls",
        "relay",
        "smtpgate queue",
        "/metrics",
        "backup",
        "upgrade",
        "sighup",
        "retention",
    ):
        assert topic in text, topic


async def test_the_store_and_its_directory_are_not_readable_by_other_users(
    gateway_factory: GatewayFactory, relay: RecordingRelay
) -> None:
    """The live store holds every customer mail, yet the README's first command made ./var
    0755 and smtpgate.db, -wal and -shm 0644 under the usual umask: readable by every local
    user (backups are made 0600 for that reason). Only the systemd unit's UMask hid them."""
    old = os.umask(0o022)
    try:
        gw = await gateway_factory()
        code, _ = await send(gw.smtp_port, simple_message(message_id="<mode@example.org>"))
        assert code == 250
        await wait_processed(gw, 1)
        assert gw.store is not None
        path = gw.store.path
        modes = {
            p.name: stat.S_IMODE(p.stat().st_mode)
            for p in (path.parent, path, Path(f"{path}-wal"), Path(f"{path}-shm"))
        }
    finally:
        os.umask(old)
    assert modes == {
        "data": 0o750,
        "smtpgate.db": 0o640,
        "smtpgate.db-wal": 0o640,
        "smtpgate.db-shm": 0o640,
    }, {name: oct(mode) for name, mode in modes.items()}


def _on_disk(path: Path) -> int:
    return sum(p.stat().st_size for p in (path, Path(f"{path}-wal")) if p.exists())


async def test_retention_frees_space_without_first_taking_as_much_more(
    gateway_factory: GatewayFactory, relay: RecordingRelay
) -> None:
    """Freed pages are overwritten (secure_delete: purged mail must be gone), through the WAL:
    one purge transaction wrote as much to the WAL as it freed, which a nearly full disk (when
    an operator lowers SMTPGATE_RETENTION_DAYS) could not take: "database or disk is full",
    nothing freed. Batches of a few MiB, each checkpointed, need room for one batch only."""
    gw = await gateway_factory()
    body = ("x" * 76 + "\n") * 13_000  # ~1 MB a message
    for i in range(12):
        assert (await send(gw.smtp_port, simple_message(f"big {i}", body=body)))[0] == 250
    await wait_processed(gw, 12)
    await relay.wait_for(12)
    assert gw.store is not None
    path = gw.store.path
    await gw.stop()  # the WAL checkpointed and removed: the store file alone
    store = await Store.open(path)
    try:
        before = _on_disk(path)
        assert await store.purge(0) == 12  # ~24 MB: raw bytes and the forwards' data
        grown = _on_disk(path) - before
    finally:
        await store.close()
    assert grown < 10_000_000, f"purging ~24 MB took {grown / 1e6:.1f} MB more disk first"


def _on_a_read_only_mount(data: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`smtpgate ARGS` with `data` bind-mounted read-only over itself, in a mount namespace of
    its own (nothing leaks out of it)."""
    script = (
        f'mount --bind "{data}" "{data}" && mount -o remount,bind,ro "{data}" && '
        f'exec "{sys.executable}" -m smtpgate "$@"'
    )
    return subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh", *args],
        env=clean_env(SMTPGATE_DATA_DIR=str(data)),
        cwd=data.parent,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare"
)
async def test_status_the_queue_and_a_backup_read_a_read_only_data_directory(
    gateway_factory: GatewayFactory, relay: RecordingRelay, tmp_path: Path
) -> None:
    """A data directory that became read-only (a disk remounted read-only after errors, a
    snapshot mounted to look at) could not be read by any command ("cannot write in …", exit
    2): just when an operator needs to see the queue and copy the store off the disk."""
    gw = await gateway_factory()
    assert (await send(gw.smtp_port, simple_message(message_id="<ro@example.org>")))[0] == 250
    await wait_processed(gw, 1)
    data = gw.settings.data_dir
    await gw.stop()  # as after `systemctl stop`: the store file alone
    copy = tmp_path / "rescue.db"
    results = {
        "status": _on_a_read_only_mount(data, "status"),
        "list": _on_a_read_only_mount(data, "queue", "list"),
        "backup": _on_a_read_only_mount(data, "backup", str(copy)),
        "retry": _on_a_read_only_mount(data, "queue", "retry", "--dead"),
    }
    if "Operation not permitted" in results["status"].stderr:
        pytest.skip("no mount namespaces here")
    for verb in ("status", "list", "backup"):
        assert results[verb].returncode == 0, (verb, results[verb].stderr)
    assert "1 done" in results["status"].stdout
    assert "regular/forwarded" in results["list"].stdout
    with contextlib.closing(sqlite3.connect(copy)) as db:
        assert db.execute("SELECT count(*) FROM inbound").fetchone() == (1,)
    # A command that writes says why it cannot, naming the variable.
    assert results["retry"].returncode == 2
    assert "SMTPGATE_DATA_DIR: cannot write in" in results["retry"].stderr
