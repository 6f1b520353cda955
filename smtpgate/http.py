"""The operator endpoint: GET /healthz, /status, /metrics (Prometheus) and / (a status page).

A deliberately small HTTP/1.1 server on asyncio streams: four read-only GET routes do not
justify a web framework dependency.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import ipaddress
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Collection
from email.utils import formatdate
from typing import Any
from urllib.parse import urlsplit

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)

from smtpgate import __version__
from smtpgate.mail import BIDI_CONTROLS
from smtpgate.model import MailKind
from smtpgate.store import Store

log = logging.getLogger(__name__)

# The reply codes the SMTP front sends (its own and aiosmtpd's), counted from 0.
SMTP_CODES = (
    "214", "220", "221", "250", "252", "354", "421", "451", "452", "454", "500", "501", "502",
    "503", "504", "538", "550", "552", "553", "554", "555",
)  # fmt: skip


class Metrics:
    """The gateway's Prometheus metrics, in a registry of its own (one per application)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        Info("smtpgate_build", "The smtpgate version serving", registry=r).info(
            {"version": __version__}
        )
        self.received = Counter(
            "smtpgate_messages_received", "Messages accepted and queued (250)", registry=r
        )
        self.processed = Counter(
            "smtpgate_messages_processed",
            "Messages processed, by path and action",
            ["path", "action"],
            registry=r,
        )
        self.rule_hits = Counter(
            "smtpgate_rule_hits", "Rules that matched, by rule name", ["rule"], registry=r
        )
        self.forward_bounces = Counter(
            "smtpgate_forward_bounces",
            "Delivery reports of forwards refused (by support's or the skip address's mailbox)",
            registry=r,
        )
        self.processing_failures = Counter(
            "smtpgate_processing_failures", "Processing attempts that raised", registry=r
        )
        self.latency = Histogram(
            "smtpgate_processing_seconds",
            "Time from receipt to processed",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
            registry=r,
        )
        self.deliveries = Counter(
            "smtpgate_relay_deliveries", "Mails delivered to the relay", ["kind"], registry=r
        )
        self.delivery_failures = Counter(
            "smtpgate_relay_failures",
            "Failed relay attempts, transient or permanent",
            ["failure"],
            registry=r,
        )
        self.smtp_replies = Counter(
            "smtpgate_smtp_replies", "SMTP replies sent, by code", ["code"], registry=r
        )
        self.connections = Counter("smtpgate_smtp_connections", "SMTP sessions opened", registry=r)
        self.active_sessions = Gauge(
            "smtpgate_smtp_active_sessions", "SMTP sessions open now", registry=r
        )
        self.queue_depth = Gauge(
            "smtpgate_queue_depth", "Rows per queue and state", ["queue", "state"], registry=r
        )
        self.oldest_queued = Gauge(
            "smtpgate_oldest_queued_age_seconds", "Age of the oldest queued message", registry=r
        )
        # The known label values from 0: a series first seen at N > 0 has no earlier sample,
        # and increase() over it is 0 (docs/operations.md's alerts: a short burst of 451s
        # between two scrapes after a start would go unseen).
        for kind in MailKind:
            self.deliveries.labels(kind)
        for failure in ("transient", "permanent"):
            self.delivery_failures.labels(failure)
        for code in SMTP_CODES:
            self.smtp_replies.labels(code)

    def observe_status(self, status: dict[str, Any]) -> None:
        for queue in ("inbound", "outbox"):
            for state, n in status[queue].items():
                if state != "oldest_queued_age_s":
                    self.queue_depth.labels(queue, state).set(n)
        self.oldest_queued.set(status["inbound"]["oldest_queued_age_s"])


Route = Callable[[], Awaitable[tuple[int, str, bytes]]]


# The answer to a request over StatusServer.MAX_CONNECTIONS that is not for /healthz.
_CROWDED = (503, "text/plain", b"too many connections\n")
_BAD_REQUEST = (400, "text/plain", b"bad request\n")
_MISDIRECTED = (
    b"the status page does not answer to this host name (DNS rebinding): open it by the"
    b" gateway's IP address or name, or add the name to SMTPGATE_HTTP_NAMES\n"
)
_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    421: "Misdirected Request",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}
# Every answer: the page shows hostile mail data (escaped); no sniffing, no framing, nothing
# loaded or run whatever escaping might miss (the page has inline style only).
_HARDENING = (
    "X-Content-Type-Options: nosniff\r\nX-Frame-Options: DENY\r\n"
    "Content-Security-Policy: default-src 'none'; style-src 'unsafe-inline';"
    " frame-ancestors 'none'; base-uri 'none'; form-action 'none'\r\n"
    "Referrer-Policy: no-referrer\r\n"
)
# Bidi controls in a cell are shown, not obeyed: "\u202emoc.elgoog@example.com" read as
# "moc.elpmaxe@google.com".
_BIDI_SHOWN = {code: "\ufffd" for code in BIDI_CONTROLS}


class _HeadTooLarge(Exception):
    pass


async def _read_head(reader: asyncio.StreamReader) -> tuple[bytes, list[bytes]]:
    """The request line, without its line end, and the values of its Host header fields, up to
    the empty line that ends the head (CRLF or a bare LF: a hand-typed or sloppy request is
    answered at once instead of after the timeout). Empty lines before the request line are
    skipped (RFC 9112 2.2)."""
    size = 0
    first = b""
    hosts: list[bytes] = []
    while True:
        try:
            line = await reader.readline()
        except ValueError:  # a line longer than the stream's limit (64 KiB)
            raise _HeadTooLarge from None
        if not line.endswith(b"\n"):
            raise asyncio.IncompleteReadError(line, None)  # the client hung up mid-request
        size += len(line)
        if size > StatusServer.MAX_HEAD_BYTES:
            raise _HeadTooLarge
        line = line.removesuffix(b"\n").removesuffix(b"\r")
        if not line:
            if first:
                return first, hosts
        elif not first:
            first = line
        elif line[:5].lower() == b"host:":
            hosts.append(line[5:].strip(b" \t"))


def _request_target(request_line: bytes) -> tuple[str, str, bytes | None] | None:
    """(method, path, authority) of `METHOD SP target SP HTTP/1.x` (RFC 9112 3), or None:
    split on single spaces only (a TAB, NBSP or NEL read as one served
    `/status\\xa0/../healthz` as /status, where a proxy in front may read another path). A
    line without its version (`printf 'GET /healthz\\n\\n' | nc`) is taken as HTTP/1.0. An
    absolute-form target gives its path, and its authority stands for the Host field."""
    parts = request_line.split(b" ")
    if len(parts) == 2:
        parts.append(b"HTTP/1.0")
    if len(parts) != 3 or parts[2] not in (b"HTTP/1.0", b"HTTP/1.1"):
        return None
    method, target = parts[0], parts[1]
    if _TOKEN.fullmatch(method) is None or _TARGET.fullmatch(target) is None:
        return None
    text = target.decode("ascii")
    authority = None
    if text[:8].lower().startswith(("http://", "https://")):  # absolute-form (RFC 9112 3.2.2)
        split = urlsplit(text)
        text, authority = split.path or "/", split.netloc.encode("ascii")
    return method.decode("latin-1"), text.split("?", 1)[0], authority


def _host_name(value: bytes) -> str:
    """The name (or address) of a Host field value, without port, brackets or root dot; ""
    when it is none (`[::1]evil.example`)."""
    text = value.decode("latin-1").strip().lower()
    if text.startswith("["):
        address, bracket, rest = text[1:].partition("]")
        return address if bracket and (not rest or _PORT.fullmatch(rest)) else ""
    name, colon, port = text.rpartition(":")
    return (name if colon and port.isdigit() else text).rstrip(".")


_PORT = re.compile(r":[0-9]{1,5}")
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 5.6.2
# origin-form, or absolute-form for http(s) (RFC 9112 3.2), printable ASCII
_TARGET = re.compile(rb"(?:/|(?i:https?://))[\x21-\x7e]*")


async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """After every answer (a lingering close): the request may not have been read whole (a
    body, which no route reads; the rest of a refused head), and closing with unread bytes
    would reset the connection: the client could lose the answer with it. Our side ends first
    (the client reads the answer, then EOF); what it still sends is read and dropped, for a
    second and 4 MiB at most."""
    writer.write_eof()
    with contextlib.suppress(TimeoutError, ConnectionError, ValueError):
        async with asyncio.timeout(1.0):
            for _ in range(64):  # 64 reads of up to 64 KiB
                if not await reader.read(65536):
                    break


class StatusServer:
    """Serves the routes; every response closes the connection (no keep-alive to manage)."""

    # /healthz answers within this many seconds even while the store is locked.
    HEALTH_TIMEOUT = 3.0
    # A request's line and headers; beyond: 431. Each request has REQUEST_TIMEOUT seconds to
    # arrive. Beyond MAX_CONNECTIONS a request has 1 s and only /healthz is served (503 for the
    # rest): a client that opens many and sends nothing cannot hold the gateway's descriptors
    # for long, nor make its health probe fail.
    MAX_HEAD_BYTES = 16 * 1024
    REQUEST_TIMEOUT = 10.0
    MAX_CONNECTIONS = 32

    def __init__(
        self,
        store: Store,
        metrics: Metrics,
        sessions: Callable[[], int],
        listening: Callable[[], bool] = lambda: True,
        min_free_bytes: int = 0,
        names: Collection[str] = (),
    ) -> None:
        self.store = store
        # The Host names the page answers to (besides IP addresses), each also by its first
        # label ("gw1" for gw1.corp.example); "*": any.
        names = {"localhost", *(n.lower().rstrip(".") for n in names)}
        self._names = frozenset(names | {n.partition(".")[0] for n in names})
        self._min_free_bytes = min_free_bytes
        self.metrics = metrics
        self._sessions = sessions
        self._listening = listening
        self._probe: asyncio.Task[bool] | None = None
        self._open = 0  # connections being served
        self.routes: dict[str, Route] = {
            "/healthz": self.healthz,
            "/status": self.status,
            "/metrics": self.prometheus,
            "/": self.page,
        }

    @property
    def serving(self) -> int:
        """Connections being served now."""
        return self._open

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._open += 1
        try:
            await self._serve(reader, writer)
        finally:
            self._open -= 1

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            code, ctype, body, method = await self._answer(
                reader, crowded=self._open > self.MAX_CONNECTIONS
            )
            allow = "Allow: GET, HEAD\r\n" if code == 405 else ""  # RFC 9110 15.5.6
            head = (
                f"HTTP/1.1 {code} {_REASONS.get(code, 'OK')}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nCache-Control: no-store\r\n{allow}"
                f"{_HARDENING}Date: {formatdate(usegmt=True)}\r\nConnection: close\r\n\r\n"
            ).encode()
            if writer.is_closing():  # the client is gone (a reset while its answer was made)
                return
            writer.write(head if method == "HEAD" else head + body)
            await writer.drain()
            if writer.can_write_eof():  # whatever the request still sends (a body, a 431's rest)
                await _linger(reader, writer)
        except (TimeoutError, asyncio.IncompleteReadError):
            pass
        except ConnectionError:
            pass
        except RuntimeError:
            # uvloop's transport, reset under the write: "unable to perform operation on
            # <TCPTransport closed=True …>; the handler is closed" — no error of ours.
            if not writer.is_closing():
                log.exception("HTTP request failed")
        except Exception:
            log.exception("HTTP request failed")
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _answer(
        self, reader: asyncio.StreamReader, *, crowded: bool
    ) -> tuple[int, str, bytes, str]:
        """(code, content type, body, method) for the request `reader` brings. `crowded`: over
        MAX_CONNECTIONS, where only /healthz is served, and its request must come within a
        second (idle connections must not make a healthy gateway look down to its probe)."""
        try:
            async with asyncio.timeout(1.0 if crowded else self.REQUEST_TIMEOUT):
                request_line, hosts = await _read_head(reader)
        except _HeadTooLarge:
            return 431, "text/plain", b"request header fields too large\n", ""
        except TimeoutError:
            if crowded:
                return (*_CROWDED, "")
            raise
        request = _request_target(request_line)
        if request is None or len(hosts) > 1:  # RFC 9112 3.2: one Host at most
            return (*_BAD_REQUEST, "")
        method, path, authority = request
        if authority is not None:
            hosts = [authority]
        route = self.routes.get(path)
        if crowded and path != "/healthz":
            code, ctype, body = _CROWDED
        elif method not in ("GET", "HEAD"):
            code, ctype, body = 405, "text/plain", b"method not allowed\n"
        elif route is None:
            code, ctype, body = 404, "text/plain", b"not found\n"
        elif route == self.page and hosts and not self._ours(hosts[0]):
            code, ctype, body = 421, "text/plain", _MISDIRECTED
        else:
            try:
                code, ctype, body = await route()
            except Exception as exc:  # an answer, not a dropped connection: a scraper or
                log.exception("HTTP %s failed", path)  # probe can tell what went wrong
                code, ctype = 500, "text/plain"
                body = f"internal error ({type(exc).__name__}); see the log\n".encode()
        return code, ctype, body, method

    def _ours(self, host: bytes) -> bool:
        """Whether the page may answer to this Host: an IP address, localhost or a name of
        this gateway. A web page whose name resolves to the gateway (DNS rebinding) read the
        page, with its senders, subjects and relay errors, through a visitor's browser."""
        name = _host_name(host)
        if name in self._names or "*" in self._names:
            return True
        try:
            ipaddress.ip_address(name)
        except ValueError:
            return False
        return True

    async def healthz(self) -> tuple[int, str, bytes]:
        if not self._listening():
            return 503, "text/plain", b"SMTP intake process down (restarting)\n"
        if self.store.intake_failing() is not None:  # why is in the log (paths stay there)
            return 503, "text/plain", b"store cannot commit incoming mail (answered 451)\n"
        # One probe at a time, shielded: a probe must never be cancelled mid-statement (see
        # Store.can_write); a slow one answers 503 here and finishes in the background.
        if self._probe is None or self._probe.done():
            self._probe = asyncio.create_task(
                self.store.can_write(self._min_free_bytes), name="health-probe"
            )
        try:
            async with asyncio.timeout(self.HEALTH_TIMEOUT):
                ok = await asyncio.shield(self._probe)
        except TimeoutError:
            ok = False
        if ok:
            return 200, "text/plain", b"ok\n"
        return 503, "text/plain", b"store not writable (or its disk nearly full)\n"

    async def status(self) -> tuple[int, str, bytes]:
        body = json.dumps(await self.store.status(), indent=2).encode() + b"\n"
        return 200, "application/json", body

    async def prometheus(self) -> tuple[int, str, bytes]:
        self.metrics.observe_status(await self.store.status())
        self.metrics.active_sessions.set(self._sessions())
        return 200, CONTENT_TYPE_LATEST, generate_latest(self.metrics.registry)

    async def page(self) -> tuple[int, str, bytes]:
        status = await self.store.status()
        recent = await self.store.list_inbound(limit=25)
        dead = await self.store.list_inbound(state="dead", limit=25)
        outbox = await self.store.list_outbox(limit=15)
        tickets = await self.store.list_tickets(limit=15)
        return 200, "text/html; charset=utf-8", render_page(status, recent, dead, outbox, tickets)


def human_age(seconds: float) -> str:
    """12 s, 4 min, 3 h 20 min, 2 d 5 h: what a person reads at a glance."""
    s = int(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"


def _table(headers: list[str], rows: list[list[Any]], empty: str) -> str:
    if not rows:
        return f'<p class="empty">{html.escape(empty)}</p>'
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join(
        "<tr>"
        + "".join(
            f"<td>{html.escape(str(c if c is not None else '').translate(_BIDI_SHOWN))}</td>"
            for c in r
        )
        + "</tr>"
        for r in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_page(
    status: dict[str, Any],
    recent: list[dict[str, Any]],
    dead: list[dict[str, Any]],
    outbox: list[dict[str, Any]],
    tickets: list[dict[str, Any]],
) -> bytes:
    """The status page for people: self-contained HTML (no external assets) that refreshes
    itself every 10 s. Everything shown that came from a message is HTML-escaped."""
    inbound, out = status["inbound"], status["outbox"]
    cards = "".join(
        f'<div class="card {k}{" alarm" if k == "dead" and inbound[k] else ""}">'
        f'<div class="n" id="inbound-{k}">{inbound[k]}</div>'
        f"<div>{k}</div></div>"
        for k in ("queued", "active", "done", "dead")
    )

    def outcome(o: dict[str, Any] | None) -> str:
        if not o:
            return ""
        bits = [o.get("action") or ""]
        if o.get("reason"):
            bits.append(f"({o['reason']})")
        if o.get("ticket") is not None:
            bits.append(f"ticket {o['ticket']}")
        return " ".join(bits)

    recent_rows = [
        [m["id"], m["received_at"], m["mail_from"], m["state"], outcome(m["outcome"])]
        for m in recent
    ]
    dead_rows = [[m["id"], m["received_at"], m["mail_from"], m["last_error"]] for m in dead]
    outbox_rows = [
        [d["id"], d["kind"], ", ".join(d["recipients"]), d["state"], d["attempts"], d["last_error"]]
        for d in outbox
    ]
    ticket_rows = [
        [
            t["number"],
            t["description"],
            t["account_name"] or t["account"],
            t["source"],
            t["created_at"],
        ]
        for t in tickets
    ]
    age = inbound["oldest_queued_age_s"]
    oldest = human_age(age) if inbound["queued"] else "none waiting"
    generated = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="refresh" content="10">
<title>smtpgate — queue status</title>
<style>
body{{font:14px system-ui,sans-serif;margin:1.5em;color:#222}}
h1{{font-size:1.4em}} h2{{font-size:1.1em;margin-top:1.6em}}
.cards{{display:flex;gap:1em}} .card{{border:1px solid #ccc;border-radius:6px;padding:.6em 1.2em}}
.card .n{{font-size:1.8em;font-weight:600}} .alarm .n{{color:#b00}}
table{{border-collapse:collapse;width:100%}} td,th{{border-bottom:1px solid #eee;padding:.3em .5em;
text-align:left;vertical-align:top}} .empty,.note{{color:#777}} .bad{{color:#b00;font-weight:600}}
</style></head><body>
<h1>smtpgate — queue status</h1>
<div class="cards">{cards}</div>
<p id="oldest">Oldest queued message: {oldest}</p>
<p id="outbox-state">Outbox: {out["queued"]} queued, {out["active"]} sending, {out["done"]} sent,
<span class="{"bad" if out["dead"] else ""}">{out["dead"]} dead</span> ·
Accounts: {status["accounts"]} · Tickets: {status["tickets"]}</p>
<p class="note">Updated {generated} UTC; this page refreshes itself every 10 seconds.</p>
<h2>Latest messages</h2>
{_table(["id", "received", "from", "state", "outcome"], recent_rows, "No messages yet.")}
<h2>Dead messages</h2>
{_table(["id", "received", "from", "error"], dead_rows, "No dead messages.")}
<h2>Outbox</h2>
{_table(["id", "kind", "to", "state", "attempts", "error"], outbox_rows, "Outbox is empty.")}
<h2>Latest tickets</h2>
{_table(["#", "description", "account", "source", "created"], ticket_rows, "No tickets yet.")}
</body></html>
"""
    return page.encode("utf-8")
