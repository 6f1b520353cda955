"""The SMTP front (aiosmtpd): recipient policy, limits, and DATA → durable enqueue → 250.

A message is answered 250 only after its bytes are committed; any store failure or a commit that
takes longer than SMTPGATE_STORE_TIMEOUT is answered 451 so the sender retries (spec 1, 6).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import ipaddress
import logging
import re
import socket
import ssl
import time
import types
from collections.abc import Callable
from typing import Any, Protocol, cast

import aiosmtpd
import aiosmtpd.smtp as aiosmtpd_smtp
from aiosmtpd.smtp import (
    DATA_SIZE_DEFAULT,
    MISSING,
    SMTP,
    Session,
    _AuthMechAttr,
    login_always_fail,
    syntax,
)
from aiosmtpd.smtp import Envelope as SmtpEnvelope

from smtpgate.config import ConfigError, Settings
from smtpgate.model import (
    Envelope,
    LineBudget,
    address_key,
    ascii_domain,
    has_bare_line_end,
)
from smtpgate.outbound import mail_date
from smtpgate.store import StoreError, new_queue_id

log = logging.getLogger(__name__)

# Replies (RFC 5321 codes with RFC 3463 enhanced status codes).
# What the listener's reply callback is told for the 220 that opens a session (a session for
# /metrics); every other reply by its code.
GREETING = "greeting"
OK_MAIL = "250 2.1.0 OK"  # RFC 3463 X.1.0, as MTAs answer a sender
OK_RCPT = "250 2.1.5 OK"
NOT_RELAY = "550 5.1.1 <{}>: recipient not accepted here (not a connector address)"
TOO_MANY_RCPTS = "452 4.5.3 Too many recipients"
STORE_FAILED = "451 4.3.0 Temporary storage failure, please try again later"
QUEUED = "250 2.0.0 queued as {}"
SMUGGLING = "550 5.5.2 Message refused: bare <CR> or <LF> in message data (RFC 5321 2.3.8)"
BARE_LF_END = (
    "550 5.5.2 Message refused: its data ends with a bare <LF> (lines and the end of data"
    " must end in <CR><LF>, RFC 5321 2.3.8); closing"
)
TOO_BIG = "552 5.3.4 Message size exceeds fixed maximum message size"
TOO_MANY_CONNECTIONS = b"421 4.7.0 Too many connections, try again later\r\n"
SHUTTING_DOWN = b"421 4.3.2 Service shutting down, try again later\r\n"  # RFC 5321 3.8
IDLE_TIMEOUT = b"421 4.4.2 Idle timeout, closing connection\r\n"  # RFC 5321 4.2.2, 4.5.3.2
# Refusals (4xx/5xx replies) logged a session: relay probes pipelined by the thousand are not
# a thousand log lines. And a second, whatever the sessions: each connection of a flood over
# SMTPGATE_MAX_CONNECTIONS is a session of its own.
REFUSALS_LOGGED = 20
REFUSALS_PER_SECOND = 50
# The RFC 3463 code given to a reply of aiosmtpd's that has none (RFC 2034 4).
_ENHANCED_CODE = re.compile(r"[245]\.\d{1,3}\.\d{1,3}(?: |$)")
_DEFAULT_ENHANCED = {
    "220": "2.0.0",  # STARTTLS's "Ready to start TLS"
    "214": "2.0.0",  # HELP
    "221": "2.0.0",
    "250": "2.0.0",
    "252": "2.5.0",
    "421": "4.3.0",
    "451": "4.3.0",
    "454": "4.7.0",
    "500": "5.5.2",
    "501": "5.5.4",
    "502": "5.5.1",
    "503": "5.5.1",
    "504": "5.5.4",
    "530": "5.7.0",
    "550": "5.0.0",
    "553": "5.1.3",
    "554": "5.0.0",
    "555": "5.5.4",
}
# A session that has answered this many commands without waiting for its client lets the
# other sessions (and, in the serve process, the commits and workers) have the event loop:
# aiosmtpd's command loop never waits while a client's pipelined commands are buffered, and a
# client sending 400,000 NOOPs held the loop for 5–10 s.
REPLIES_PER_TURN = 64

# Its value may be folded onto the next line (Exchange does).
_MESSAGE_ID = re.compile(
    rb"^message-id:[ \t]*(?:\r?\n[ \t]+)?(<[^>\r\n]{1,500}>)", re.IGNORECASE | re.MULTILINE
)


def header_message_id(data: bytes) -> str | None:
    """The Message-ID from the header block, cheaply (the worker parses properly later)."""
    end = data.find(b"\r\n\r\n")
    head = data if end < 0 else data[: end + 2]
    m = _MESSAGE_ID.search(head[:262144])
    return m.group(1).decode("ascii", "replace") if m else None


class Queue(Protocol):
    """Where accepted messages go: the Store, or in an intake process its parent (intake.py)."""

    async def enqueue(
        self, envelope: Envelope, raw: bytes, message_id: str | None, queue_id: str
    ) -> None: ...


def with_enhanced_code(status: str, hostname: str) -> str:
    """A reply as the listener sends it: RFC 2034 4 wants an RFC 3463 code in every reply but
    the greeting and HELO/EHLO's once ENHANCEDSTATUSCODES is advertised, and aiosmtpd's own
    ("250 OK", "503 Error: need MAIL command") have none; oversize is 552 5.3.4 (spec 6)."""
    if status.startswith("552 Error"):
        return TOO_BIG
    if (
        status[3:4] != " "  # a multi-line reply's first lines (EHLO's), or no reply at all
        or status[:1] not in "245"
        or _ENHANCED_CODE.match(status, 4)
        or status[4:] in (hostname, "HELP")  # HELO's reply and EHLO's last line
        or status.startswith("220 " + hostname)  # the greeting
    ):
        return status
    enhanced = _DEFAULT_ENHANCED.get(status[:3])
    return status if enhanced is None else f"{status[:3]} {enhanced} {status[4:]}"


# Refusals logged where they happen, above the capped refusal lines: a smuggling attempt (a
# warning) and a commit that failed (an error, with its reason).
_LOGGED_ELSEWHERE = frozenset({SMUGGLING, STORE_FAILED})


class Handler:
    """aiosmtpd handler: the hooks return the SMTP reply string."""

    def __init__(self, settings: Settings, store: Queue, on_queued: Callable[[], None]) -> None:
        self.settings = settings
        self.store = store
        self._on_queued = on_queued

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: SmtpEnvelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        # aiosmtpd handles pipelined commands; spec 6 wants it and RFC 3463 codes advertised.
        # No AUTH (aiosmtpd offers it over TLS): the spec has none, and a sender configured
        # with credentials would try it, get a permanent 535 and give up.
        extra = ["250-PIPELINING", "250-ENHANCEDSTATUSCODES"]
        rest = [line for line in responses[1:] if not line.startswith("250-AUTH")]
        return [responses[0], *extra, *rest]

    async def handle_MAIL(
        self,
        server: SMTP,
        session: Session,
        envelope: SmtpEnvelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        envelope.mail_from = address  # what aiosmtpd does without this hook
        envelope.mail_options.extend(mail_options)
        return OK_MAIL

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: SmtpEnvelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        connector = self.settings.connector_keys.get(address_key(address))
        if connector is None:
            return NOT_RELAY.format(_echoed(address))
        if connector in envelope.rcpt_tos:  # stored as configured, whatever the spelling
            return OK_RCPT
        if len(envelope.rcpt_tos) >= self.settings.max_recipients:
            return TOO_MANY_RCPTS
        envelope.rcpt_tos.append(connector)
        return OK_RCPT

    async def handle_VRFY(
        self, server: SMTP, session: Session, envelope: SmtpEnvelope, address: str
    ) -> str:
        """252 (RFC 5321 3.5.3: "will accept message and attempt delivery") only for what RCPT
        accepts; aiosmtpd promised it for any address, and relay scanners read that as open."""
        if address_key(address) in self.settings.connector_keys:
            return "252 Cannot VRFY user, but will accept message and attempt delivery"
        return NOT_RELAY.format(_echoed(address))

    async def handle_DATA(self, server: SMTP, session: Session, envelope: SmtpEnvelope) -> str:
        data: bytes = envelope.original_content or b""
        # RFC 5321 2.3.8: lines end in CRLF only. A bare CR or LF is how SMTP smuggling hides a
        # second end-of-data (`<LF>.<CR><LF>` and friends), so, like Postfix's
        # smtpd_forbid_bare_newline, any message holding one is refused. aiosmtpd ends DATA on
        # <CR><LF>.<CR><LF> only, but its dot-unstuffing can hide a smuggled dot: hence the
        # whole message is checked.
        if has_bare_line_end(data):
            # A warning (an attack, not a misconfigured client): the first of a session, at
            # most REFUSALS_PER_SECOND a second (300 pipelined attempts wrote 300 lines).
            if not getattr(session, "smuggling_told", False):
                session.smuggling_told = True  # type: ignore[attr-defined]
                unlogged = _SMUGGLING_LINES.take(time.monotonic())
                if unlogged is not None:
                    log.warning(
                        "refused a smuggling attempt from %s from=<%s>%s",
                        _peer(session.peer),
                        _utf8(envelope.mail_from or ""),
                        f" ({unlogged} attempts before it not logged)" if unlogged else "",
                    )
            return SMUGGLING
        queue_id = new_queue_id()
        peer = _peer(session.peer)
        helo = _utf8(session.host_name or "")
        # RFC 3848 / 6531 protocol names; RFC 5321 4.4: the TCP-info is an address literal.
        # TLS came by STARTTLS, an extension: ESMTPS even if HELO followed it ("SMTPS" is no
        # registered name).
        extended = session.extended_smtp or bool(session.ssl)
        protocol = ("UTF8SMTP" if envelope.smtp_utf8 else "ESMTP" if extended else "SMTP") + (
            "S" if session.ssl else ""
        )
        received = (
            f"Received: from {_clean(helo)} ({_address_literal(peer)})\r\n"
            f"\tby {self.settings.hostname} (smtpgate) with {protocol} id {queue_id}\r\n"
            f"\tfor <{ascii_domain(envelope.rcpt_tos[0])}>; {mail_date()}\r\n"
        ).encode("ascii", "replace")
        raw = received + data
        env = Envelope(
            peer=peer,
            helo=helo,
            mail_from=_utf8(envelope.mail_from or ""),
            rcpt_tos=tuple(envelope.rcpt_tos),
        )
        try:
            async with asyncio.timeout(self.settings.store_timeout):
                await self.store.enqueue(env, raw, header_message_id(data), queue_id)
        except (StoreError, TimeoutError) as exc:
            why = (
                f"timed out after {self.settings.store_timeout:g} s (SMTPGATE_STORE_TIMEOUT)"
                if isinstance(exc, TimeoutError)
                else str(exc)
            )
            unlogged = _STORE_FAILURE_LINES.take(time.monotonic())
            if unlogged is not None:
                log.error(
                    "could not store a message from %s from=<%s>: %s%s",
                    peer,
                    env.mail_from,
                    why,
                    f" ({unlogged} more refused before it, not logged)" if unlogged else "",
                )
            return STORE_FAILED
        self._on_queued()
        log.info(
            "queued %s from=<%s> size=%d peer=%s",
            queue_id,
            env.mail_from,
            len(raw),
            peer,
            extra={"queue_id": queue_id},
        )
        return QUEUED.format(queue_id)


def _peer(peer: Any) -> str:
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return str(peer or "unknown")


@functools.lru_cache(maxsize=1024)  # senders' addresses repeat; parsing one costs ~1.5 µs
def _address_literal(peer: str) -> str:
    """[192.0.2.1], [IPv6:2001:db8::1]; a peer that is no IP address (a Unix socket) as is."""
    try:
        ip = ipaddress.ip_address(peer)
    except ValueError:
        return _clean(peer)
    return f"[IPv6:{ip}]" if ip.version == 6 else f"[{ip}]"


def _utf8(value: str) -> str:
    """aiosmtpd decodes arguments with surrogateescape; SQLite takes only valid UTF-8."""
    return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _echoed(address: str) -> str:
    """An address as a reply quotes it: a byte that was not UTF-8 (aiosmtpd's surrogate escape)
    as "?", for the reply must be encoded, and a log line holds valid text only."""
    return address.encode("utf-8", "replace").decode("utf-8")


def _clean(value: str) -> str:
    return "".join(ch for ch in value if ch.isprintable() and ch not in "()\r\n")[:255] or "unknown"


# --- the listener: aiosmtpd's SMTP with a cheaper set-up, address parser and DATA reader -------
#
# Profiled, aiosmtpd's own per-connection and per-message Python dominated intake: SMTP.__init__
# introspects the class and the handler (inspect.getmembers, dir, inspect.signature) for every
# connection, _getaddr runs the email header parser for every address, and the DATA loop awaits
# one readuntil(b"\r\n") per line. The overrides below do the same work with cached
# introspection, a regular expression for the plain <local@domain> form, and a reader that takes
# the data in large pieces. tests/test_front_lean.py checks them against aiosmtpd's behaviour.

_mail_log = logging.getLogger("mail.log")  # aiosmtpd's logger: its messages stay where they were

# Our __init__ repeats SMTP.__init__ of this aiosmtpd version for the arguments we pass; with
# another version (or other arguments), aiosmtpd's own __init__ runs.
_LEAN_INIT = aiosmtpd.__version__ == "1.4.6"
_LEAN_INIT_ARGS = frozenset(
    {
        "data_size_limit",
        "enable_SMTPUTF8",
        "decode_data",
        "hostname",
        "ident",
        "tls_context",
        "timeout",
    }
)
_names_cache: dict[tuple[type, str], tuple[str, ...]] = {}
_params_cache: dict[Callable[..., Any], int] = {}


def _names(obj: object, prefix: str, own: bool = True) -> tuple[str, ...] | list[str]:
    """The names in dir(obj) that start with `prefix` (sorted, as dir gives them), with the
    class's part cached: dir() of a class costs ~10 µs, and this runs per connection.
    own=False: obj's instance attributes are known not to have the prefix."""
    cls = type(obj)
    if cls.__dir__ is not object.__dir__:
        return [n for n in dir(obj) if n.startswith(prefix)]
    names = _names_cache.get((cls, prefix))
    if names is None:
        names = _names_cache[cls, prefix] = tuple(n for n in dir(cls) if n.startswith(prefix))
    attributes = getattr(obj, "__dict__", None) if own else None
    if attributes:
        extra = [n for n in attributes if n.startswith(prefix) and n not in names]
        if extra:
            return sorted({*names, *extra})
    return names


def _param_count(hook: Callable[..., Any]) -> int:
    """len(inspect.signature(hook).parameters), cached for methods (~10 µs each time)."""
    func = getattr(hook, "__func__", None)
    if isinstance(hook, types.MethodType) and isinstance(func, types.FunctionType):
        count = _params_cache.get(func)
        if count is None:
            count = _params_cache[func] = len(inspect.signature(hook).parameters)
        return count
    return len(inspect.signature(hook).parameters)


# The plain address form `<dot-atom@dot-atom>` in ASCII, for which the email header parser that
# aiosmtpd's _getaddr uses returns the text between the brackets unchanged. Anything else (null
# sender, quoted or non-ASCII local parts, comments, routes, literals, encoded words) goes to it.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_DOT_ATOM = rf"(?!=\?){_ATEXT}+(?:\.{_ATEXT}+)*"  # "=?" would start an RFC 2047 encoded word
_PLAIN_ADDRESS = re.compile(rf"<({_DOT_ATOM}@{_DOT_ATOM})>(.*)", re.DOTALL)

# DATA: the data ends with <CR><LF>.<CR><LF>; its first line also counts as after a CRLF.
_EOD = b"\r\n.\r\n"
_EOD_STARTS = (_EOD[:4], _EOD[:3], _EOD[:2], _EOD[:1])
_START_RUN = 8192  # bytes of the start-phase buffer before they are handed on
# During DATA the idle timer restarts after every this many bytes received: a slow link that
# keeps sending is not cut off, a client dribbling a few bytes per timeout still is.
DATA_PROGRESS_BYTES = 64 * 1024
# An end of data written with bare LFs ("\n.\n", as `printf … | nc` sends it) ends nothing: if
# no proper one follows within this long, the sender is told so and the connection closed.
BARE_LF_GRACE = 2.0


def _bare_lf_end(data: bytes | bytearray, *, at_start: bool = True) -> bool:
    """Whether `data` holds an end of data with a bare LF: <LF>.<LF>, <LF>.<CR><LF> or
    <CR><LF>.<LF>. Only "<LF>." is searched for (in C): in mail it starts a dot-stuffed line or
    the proper end, so the loop runs a few times a message. `at_start`: an LF first in `data`
    is bare (the data's start); else what came before it is not known here."""
    i = data.find(b"\n.")
    while i >= 0:
        after = data[i + 2 : i + 4]
        if after[:1] == b"\n" or (after == b"\r\n" and (data[i - 1] != 13 if i else at_start)):
            return True
        i = data.find(b"\n.", i + 2)
    return False


# Message data the listener of one process holds at once, from the first byte of a DATA until
# its commit is answered (see DataBudget).
DATA_BUDGET_BYTES = 64 * 1024 * 1024
_NOMINAL, _TOO_LONG, _TOO_MUCH = range(3)  # as aiosmtpd's _DataState


def _eod_started(tail: bytes) -> int:
    """How many bytes at the end of `tail` begin <CR><LF>.<CR><LF> (0 to 4)."""
    for start in _EOD_STARTS:
        if tail.endswith(start):
            return len(start)
    return 0


class _Lines:
    """Finds the first line longer than `limit` bytes (CRLF included) in data fed in pieces,
    with a few rfind calls per `limit` bytes instead of a Python step per line."""

    __slots__ = ("cr", "end", "limit", "line", "pos", "start")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.pos = 0  # bytes fed so far
        self.line = 0  # where the current line starts
        self.cr = False  # the last byte fed was a CR (a CRLF may be split between pieces)
        self.start = -1  # the first too-long line: where it starts ...
        self.end = -1  # ... and where it ends (after its CRLF); -1 while not known

    def feed(self, data: bytes) -> None:
        if self.end >= 0 or not data:
            return
        base = self.pos
        size = len(data)
        self.pos = base + size
        i = 0  # data[:i] is done
        if self.cr and data[0] == 10:  # the LF of a CRLF split between two pieces
            self._line_end(base + 1)
            if self.end >= 0:
                return
            i = 1
        self.cr = data[-1] == 13
        limit = self.limit
        while True:
            if self.start >= 0:  # in the too-long line: only its end is wanted
                r = data.find(b"\r\n", max(i, self.start + limit - 1 - base))
                if r >= 0:
                    self.end = base + r + 2
                return
            window = self.line - base + limit  # a CRLF must end by here (local index)
            if window > size:  # the current line can still end in time
                r = data.rfind(b"\r\n", i)
                if r >= 0:
                    self.line = base + r + 2
                return
            r = data.rfind(b"\r\n", i, window)
            if r < 0:
                self.start = self.line
            else:  # every line up to r fits in the window
                self.line = base + r + 2
                i = r + 2

    def _line_end(self, end: int) -> None:
        if self.start >= 0:
            self.end = end
        elif end - self.line > self.limit:
            self.start, self.end = self.line, end
        else:
            self.line = end


class _Data:
    """The (still dot-stuffed) data of one DATA command as it arrives, and its verdict.

    `size` counts the message as RFC 1870 does (and SIZE= declares it): without the dot the
    client added to each line starting with one (RFC 5321 4.5.2; the listener removes it). A
    log whose lines start with "." was refused 552 a few bytes under the limit."""

    __slots__ = ("_edge", "_wire", "keep", "lines", "over", "parts", "size", "size_limit")

    def __init__(self, size_limit: int | None, line_limit: int) -> None:
        self.parts: list[bytes] = []
        self.size = 0
        self.size_limit = size_limit or 0
        self.lines = _Lines(line_limit)
        self.keep = True
        self.over = -1  # where on the wire the message passed the size limit (-1: it has not)
        self._wire = 0  # bytes fed so far
        self._edge = b"\r\n"  # the last two bytes fed (the data begins at a line start)

    def feed(self, data: bytes) -> None:
        content, edge = _content_bytes(self._edge, data)
        size = self.size + content
        if self.size_limit and self.size <= self.size_limit < size:
            at = _content_byte(data, self._edge, self.size_limit + 1 - self.size)
            self.over = self._wire + at
        self.size = size
        self._wire += len(data)
        self._edge = edge
        self.lines.feed(data)
        if self.keep:
            if self.over >= 0 or self.lines.start >= 0:
                self.keep = False  # refused in any case: drop what we have, keep nothing more
                self.parts.clear()
            else:
                self.parts.append(data)

    def verdict(self) -> int:
        """aiosmtpd's answer: it reads line by line and the first problem met decides — a line
        over the limit, or the line that takes the size over its limit. If that is one line: 552
        if it was read whole (at most limit + 2 bytes, counted before its length is checked),
        500 if it overran the reader (longer)."""
        start, end, over = self.lines.start, self.lines.end, self.over
        if start < 0:
            return _TOO_MUCH if over >= 0 else _NOMINAL
        if over >= 0 and (over < start or (over < end and end - start <= self.lines.limit + 2)):
            return _TOO_MUCH
        return _TOO_LONG


_LINE_DOT = b"\r\n."
# What a session's count of its DATA may hold beyond the message: the end-of-data line and the
# commands a client pipelines behind it (RFC 2920).
_PAST_DATA = 4096


def _content_bytes(edge: bytes, data: bytes) -> tuple[int, bytes]:
    """How many bytes of a piece of DATA are message content (a line-start dot, "\r\n." on the
    wire, is not: RFC 5321 4.5.2), and the edge to pass with the next piece; `edge` is the
    last two bytes before `data` (the data begins at a line start: "\r\n"), for a dot whose
    line end is in the piece before."""
    head = edge + data[:2]
    dots = head.count(_LINE_DOT) + data.count(_LINE_DOT)
    return len(data) - dots, (data[-2:] if len(data) >= 2 else head[-2:])


def _content_byte(data: bytes, edge: bytes, n: int) -> int:
    """The offset in `data` of its n-th byte of message content (1-based), line-start dots
    not counted; `edge` is the two bytes before `data` (as `_content_bytes` takes it)."""
    head = edge + data[:2]
    dots = [i for i in range(2) if head[i : i + 3] == _LINE_DOT]  # a dot at data[0] or [1]
    j = n - 1
    for d in dots:
        if d <= j:
            j += 1
    r = data.find(_LINE_DOT)
    while r >= 0 and r + 2 <= j:
        j += 1
        r = data.find(_LINE_DOT, r + 3)
    return j


class DataBudget:
    """Bounds the message data the listener holds, by making senders wait (TCP back-pressure).

    Each session in DATA counts the bytes it has received until its message is committed and
    answered. While the total is over the limit, only the session that began its DATA first
    goes on reading; the others' sockets are paused and their senders' TCP windows fill up, so
    they simply wait. The first session always reads, so the total drains whatever the sizes
    (one message larger than the limit still gets through). Without this, 50 senders of 25 MB
    each took the gateway to ~3 GB and the late ones timed out waiting for the store (451).

    A paused session's idle timer keeps running: one that waits longer than
    SMTPGATE_SMTP_TIMEOUT is dropped and its sender retries later, so slow senders holding the
    budget cannot keep the others' connections open for ever. Bytes past the size limit are
    thrown away and not counted: the listener ends a session's count when it passes the limit.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self.peak = 0  # the most held at once (for tests and benchmarks)
        self._sessions: dict[Listener, int] = {}  # in the order their DATA began: bytes held
        self._paused: set[Listener] = set()

    def begin(self, session: Listener) -> None:
        self._sessions[session] = 0
        if self.held > self.limit:
            self._pause(session)

    def grow(self, session: Listener, size: int) -> None:
        if session not in self._sessions:
            return
        self._sessions[session] += size
        self.held += size
        self.peak = max(self.peak, self.held)
        if session in self._paused:
            session.hold_back(True)  # the stream reader resumed it for its own flow control
        elif self.held > self.limit and len(self._paused) < len(self._sessions) - 1:
            first = next(iter(self._sessions))
            for other in self._sessions:
                if other is not first:
                    self._pause(other)

    def end(self, session: Listener) -> None:
        self.held -= self._sessions.pop(session, 0)
        if session in self._paused:
            self._paused.discard(session)
            session.hold_back(False)
        if not self._paused:
            return
        if self.held <= self.limit:
            for other in self._paused:
                other.hold_back(False)
            self._paused.clear()
        else:  # still over: the session now first goes on
            first = next(iter(self._sessions))
            if first in self._paused:
                self._paused.discard(first)
                first.hold_back(False)

    def _pause(self, session: Listener) -> None:
        if session not in self._paused:
            self._paused.add(session)
            session.hold_back(True)


class _HalfClosableReader(asyncio.StreamReader):
    """The session's reader. At the client's end of input (EOF), a read that cannot be
    completed ends the session as a reset connection would, instead of aiosmtpd answering
    "500" to the IncompleteReadError over and over (see Listener.eof_received)."""

    async def readuntil(self, separator: Any = b"\n") -> bytes:  # typeshed's type is private
        try:
            return await super().readuntil(separator)
        except asyncio.IncompleteReadError:
            raise ConnectionResetError("the client closed its side") from None

    async def readexactly(self, n: int) -> bytes:
        try:
            return await super().readexactly(n)
        except asyncio.IncompleteReadError:
            raise ConnectionResetError("the client closed its side") from None

    def unread(self) -> bytearray:
        """What has been received and not read yet (not a copy: look, do not keep)."""
        buffer: bytearray = getattr(self, "_buffer")  # noqa: B009  # StreamReader's own
        return buffer


class _SessionOver:
    """Stands for the task and the idle timer of a session that has ended
    (Listener._cut_cycles): aiosmtpd cancels both on a late connection_lost or end of input,
    which does nothing once they are over."""

    @staticmethod
    def cancel(msg: Any = None) -> bool:
        return False

    @staticmethod
    def done() -> bool:
        return True


_SESSION_OVER: Any = _SessionOver()


class _CommandLimits(dict[str, int]):
    """aiosmtpd's command line limits, one set a session. aiosmtpd keeps them in one dict of its
    class, shared by every session of the process, and raises MAIL's by the bytes of SIZE= and
    SMTPUTF8 (36) at every EHLO: 2,000 EHLOs let any session send a 72 KB MAIL FROM. Here a
    limit never rises above the base plus those 36 bytes (RFC 5321 4.5.3.1.4, RFC 1870 and
    RFC 6531 each add to the 512)."""

    def __init__(self, base: int) -> None:
        super().__init__()
        self.base = base

    def __missing__(self, command: str) -> int:
        return self.base

    def __setitem__(self, command: str, limit: int) -> None:
        super().__setitem__(command, min(limit, self.base + _EXTENSION_BYTES))


_EXTENSION_BYTES = 26 + 10  # what aiosmtpd's EHLO adds to MAIL's limit for SIZE= and SMTPUTF8


class Listener(SMTP):
    """aiosmtpd's SMTP with a cap on concurrent sessions (spec 6); extra sessions get 421.

    It also replaces three of aiosmtpd's costliest steps with equivalent cheaper ones: the
    per-connection set-up, the address parser's common case and the DATA reader."""

    # RFC 5321 says 1000, but real alert mail (long HTML lines) breaks it daily; accept up to
    # 1 MiB per line like Postfix does, which still bounds the reader's buffer.
    line_length_limit = 1 << 20

    def __init__(
        self,
        handler: Handler,
        sessions: Sessions,
        limit: int,
        on_reply: Callable[[str], None],
        budget: DataBudget | None = None,
        **kwargs: Any,
    ) -> None:
        if _LEAN_INIT and kwargs.keys() <= _LEAN_INIT_ARGS:
            self._lean_init(handler, **kwargs)
        else:
            super().__init__(handler, **kwargs)
        # No AUTH: an AUTH command gets 538 (aiosmtpd: encryption required) before STARTTLS,
        # 504 after it (see handle_EHLO).
        self._auth_methods = {}
        self._sessions = sessions
        self._limit = limit
        self._on_reply = on_reply
        self._counted = False
        self._refused = False
        self._data_progress = -1  # bytes since the idle timer last restarted; -1: not in DATA
        self._data_serial = 0  # DATA commands so far (which one a bare-LF timer is about)
        self._bare_lf_timer: asyncio.TimerHandle | None = None
        self._data_heard = 0.0  # when data last came after a bare-LF end (loop time)
        self._data_tail = b""  # the last bytes of this DATA seen (`_watch_bare_lf`)
        self._held_back = False  # reading paused by the DataBudget
        self._data_size = 0  # bytes received in this DATA, as `_Data.size` counts them
        self._data_edge = b"\r\n"  # the last two of them
        self._budget = budget or DataBudget(DATA_BUDGET_BYTES)
        self._in_message = False  # from the end of DATA's 354 to the message's answer
        self._closing = False  # shut_down(): 421 once the message in hand is answered
        self._turn = 0  # replies since this session last let the loop go to others
        self._idle_deadline = 0.0  # loop time at which the idle timeout ends the session
        self._lost = False  # connection_lost has run
        self._refusals = 0  # 4xx/5xx replies of this session so far (REFUSALS_LOGGED)

    def _lean_init(
        self,
        handler: Any,
        *,
        data_size_limit: int | None = DATA_SIZE_DEFAULT,
        enable_SMTPUTF8: bool = False,
        decode_data: bool = False,
        hostname: str | None = None,
        ident: str | None = None,
        tls_context: ssl.SSLContext | None = None,
        timeout: float = 300,
    ) -> None:
        """SMTP.__init__ of aiosmtpd 1.4.6 for these arguments (the others at their defaults),
        line by line, with the introspection of the class and the handler cached."""
        self.__ident__ = ident or aiosmtpd_smtp.__ident__
        try:
            self.loop = asyncio.get_running_loop()  # what make_loop() returns in a running loop
        except RuntimeError:
            self.loop = aiosmtpd_smtp.make_loop()
        asyncio.StreamReaderProtocol.__init__(
            self,
            _HalfClosableReader(loop=self.loop, limit=self.line_length_limit),
            client_connected_cb=self._cb_client_connected,
            loop=self.loop,
        )
        self.event_handler = handler
        assert data_size_limit is None or isinstance(data_size_limit, int)
        self.data_size_limit = data_size_limit
        self.enable_SMTPUTF8 = enable_SMTPUTF8
        self._decode_data = decode_data
        self.command_size_limits = _CommandLimits(self.command_size_limit)
        self.hostname = hostname if hostname else socket.getfqdn()
        self.tls_context = tls_context
        if tls_context:
            if tls_context.verify_mode not in {ssl.CERT_NONE, ssl.CERT_OPTIONAL}:
                _mail_log.warning(
                    "tls_context.verify_mode not in {CERT_NONE, "
                    "CERT_OPTIONAL}; this might cause client "
                    "connection problems"
                )
            elif tls_context.check_hostname:
                _mail_log.warning(
                    "tls_context.check_hostname == True; "
                    "this might cause client connection problems"
                )
        self.require_starttls = tls_context and False
        self._timeout_duration = timeout
        self._timeout_handle = None
        self._tls_handshake_okay = True
        self._tls_protocol = None
        self._original_transport = None
        self.session = None
        self.envelope = None
        self.transport = None
        self._handler_coroutine = None
        self._auth_require_tls = True
        self._proxy_timeout = None
        self._authenticator = None
        self._auth_callback = login_always_fail
        self._auth_required = False
        # (None of the instance attributes set so far starts with "auth_" or "smtp_".)
        auth_methods: dict[str, _AuthMechAttr] = {}
        for obj in (self, handler):
            for name in _names(obj, "auth_", obj is not self):
                try:
                    method = getattr(obj, name)
                except AttributeError:  # as inspect.getmembers does
                    continue
                mechanism = getattr(
                    method, "__auth_mechanism_name__", name.replace("auth_", "").replace("__", "-")
                )
                auth_methods[mechanism] = _AuthMechAttr(method, obj is self)
        self._auth_methods = auth_methods
        if _mail_log.isEnabledFor(logging.INFO):
            _mail_log.info(
                "Available AUTH mechanisms: "
                + " ".join(
                    m + "(builtin)" if impl.is_builtin else m
                    for m, impl in sorted(self._auth_methods.items())
                )
            )
        self._handle_hooks = {
            m.replace("handle_", ""): getattr(handler, m) for m in _names(handler, "handle_")
        }
        ehlo_hook = self._handle_hooks.get("EHLO")
        if ehlo_hook is None:
            self._ehlo_hook_ver = None
        elif _param_count(ehlo_hook) == 5:
            self._ehlo_hook_ver = "new"
        else:  # (aiosmtpd's deprecated 4-argument hook: our Handler has none)
            raise RuntimeError("Unsupported EHLO Hook")
        self._smtp_methods = {
            m.replace("smtp_", ""): getattr(self, m) for m in _names(self, "smtp_", False)
        }
        self._enforce_call_limit = False

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """aiosmtpd's _getaddr, without the email header parser for a plain <local@domain>."""
        m = _PLAIN_ADDRESS.fullmatch(arg) if arg else None
        if m is None:
            return super()._getaddr(arg)
        address, rest = m.group(1, 2)
        # The parser takes white space and comments after the ">" (CFWS); no comments here.
        if rest[:1] in (" ", "\t"):
            rest = rest.lstrip()
        if rest[:1] == "(":
            return super()._getaddr(arg)
        if self.local_part_limit and len(address.rpartition("@")[0]) > self.local_part_limit:
            return None, None
        return address, rest

    @syntax("HELP [command]")
    async def smtp_HELP(self, arg: str | None) -> None:
        """RFC 5321 4.1.1.8's 214, listing the commands a client can use: aiosmtpd's HELP
        (250) also lists AUTH, which EHLO does not offer here."""
        topic = (arg or "").upper()
        method = self._smtp_methods.get(topic) if topic != "AUTH" else None
        if method is not None and self._syntax_available(method):
            help_str = method.__smtp_syntax__
            if self.session is not None and self.session.extended_smtp:
                help_str += method.__smtp_syntax_extended__ or ""
            await self.push(f"214 Syntax: {help_str}")
            return
        commands = " ".join(
            sorted(
                name
                for name, method in self._smtp_methods.items()
                if name != "AUTH" and self._syntax_available(method)
            )
        )
        await self.push(f"{501 if topic else 214} Supported commands: {commands}")

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        """aiosmtpd's smtp_DATA (same checks, replies, limits and hooks), reading the data in
        large pieces: readuntil(<CR><LF>.<CR><LF>) instead of a readuntil(<CR><LF>) per line."""
        if await self.check_helo_needed():
            return
        if await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return

        await self.push("354 End data with <CR><LF>.<CR><LF>")
        self._budget.begin(self)
        try:
            await self._receive_data()
        finally:
            self._budget.end(self)

    async def _receive_data(self) -> None:
        """The rest of smtp_DATA; a shutdown meanwhile says 421 after the message's answer."""
        self._in_message = True
        try:
            await self._receive_message()
        finally:
            self._in_message = False
        if self._closing:
            self._say_shutting_down(abort=False)

    async def _receive_message(self) -> None:
        """Read the data, check it, hand it to the handler, answer."""
        assert self.envelope is not None
        self._data_progress = 0
        self._data_size = 0
        self._data_edge = b"\r\n"
        self._data_serial += 1
        try:
            data = await self._read_data()
        except ConnectionResetError:
            if self._bare_lf_timer is not None:  # half-closed (`nc -N`) after a bare-LF end:
                self._refuse_bare_lf()  # it may still read why
            raise
        except asyncio.CancelledError:
            # The connection got reset (or timed out) during the DATA command.
            _mail_log.info("Connection lost during DATA")
            self._writer.close()
            raise
        finally:
            self._data_progress = -1
            if self._bare_lf_timer is not None:
                self._bare_lf_timer.cancel()
                self._bare_lf_timer = None

        state = data.verdict()
        if state != _NOMINAL:
            if state == _TOO_LONG:
                await self.push("500 Line too long (see RFC5321 4.5.3.1.6)")
            else:
                await self.push("552 Error: Too much mail data")
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            return

        # Remove the transparency dots (RFC 5321 4.5.2): each line that starts with "." loses it.
        original_content = b"".join(data.parts)
        data.parts.clear()
        if original_content[:1] == b".":
            original_content = original_content[1:]
        original_content = original_content.replace(b"\r\n.", b"\r\n")

        # The bytes as they came (listener_factory never asks aiosmtpd to decode them), and the
        # handler's handle_DATA (aiosmtpd's deprecated process_message: our Handler has none).
        self.envelope.content = self.envelope.original_content = original_content
        status = await self._call_handler_hook("DATA") if "DATA" in self._handle_hooks else MISSING
        self._set_post_data_state()  # type: ignore[no-untyped-call]
        await self.push("250 OK" if status is MISSING else status)

    async def _read_data(self) -> _Data:
        """The data up to <CR><LF>.<CR><LF> (not included), taken off the stream reader in the
        pieces it has; whatever follows (pipelined commands) stays in the reader."""
        reader = self._reader
        data = _Data(self.data_size_limit, self.line_length_limit)
        self._data_tail = b""
        if isinstance(reader, _HalfClosableReader):  # (always: Listener makes it)
            self._watch_bare_lf(reader.unread())  # sent with the commands, before the 354
        # The data begins at a line start: ".\r\n" straight away ends it. readuntil cannot see
        # the CRLF before the data, so read only as many bytes as could complete the end of
        # data until what was read cannot be its beginning (for real mail: 3 bytes, once).
        head = bytearray()
        tail = _EOD[:2]
        while started := _eod_started(tail):
            piece = await reader.readexactly(5 - started)
            head += piece
            tail = (tail + piece)[-5:]
            if tail == _EOD:
                data.feed(bytes(head[:-3]))
                return data
            if len(head) > _START_RUN:  # a long run of empty lines: hand the bytes on
                data.feed(bytes(head[:-4]))
                del head[:-4]
        data.feed(bytes(head))
        # From here the end of data lies wholly in what is still unread: readuntil finds it.
        # When the reader holds more than its limit (1 MiB) without it, take that much and go on.
        while True:
            try:
                chunk = await reader.readuntil(_EOD)
            except asyncio.LimitOverrunError as exc:
                data.feed(await reader.readexactly(exc.consumed))
                continue
            data.feed(chunk[:-3])  # the CRLF before the dot is the data's last line end
            return data

    def _watch_bare_lf(self, data: bytes | bytearray) -> None:
        """Data of this DATA as it comes (in pieces: `_data_tail` holds the end of the last
        one, as a piece may end inside the bare-LF end). Once a bare-LF end of data is seen,
        the sender has BARE_LF_GRACE of silence to send a proper one (the message is then
        refused as any with a bare LF, and the session goes on); else `_bare_lf_due`."""
        if self._bare_lf_timer is not None:
            self._data_heard = self.loop.time()  # still sending: not waiting for an answer
            return
        # The end of the last piece and the start of this one: an end of data cut between them.
        edge = self._data_tail + bytes(data[:4])
        starts = not self._data_tail  # the data's first bytes: an LF first is bare
        self._data_tail = (self._data_tail + bytes(data[-4:]))[-4:]
        if _bare_lf_end(edge, at_start=starts) or _bare_lf_end(data, at_start=starts):
            self._data_heard = self.loop.time()
            self._bare_lf_timer = self.loop.call_later(
                self._bare_lf_grace(), self._bare_lf_due, self._data_serial
            )

    def _bare_lf_grace(self) -> float:
        return min(BARE_LF_GRACE, self._timeout_duration / 2)

    def _bare_lf_due(self, serial: int) -> None:
        self._bare_lf_timer = None
        if serial != self._data_serial or self._data_progress < 0 or self.transport is None:
            return  # that DATA ended after all
        quiet = self.loop.time() - self._data_heard
        grace = self._bare_lf_grace()
        if quiet < grace or self._held_back or getattr(self._reader, "_paused", False):
            # More data came since (a message still arriving), or we are the ones not reading.
            self._bare_lf_timer = self.loop.call_later(
                max(grace - quiet, 0.05), self._bare_lf_due, serial
            )
            return
        self._refuse_bare_lf()

    def _refuse_bare_lf(self) -> None:
        """550 and close: nothing the client sends after is read as a command."""
        transport = cast(asyncio.WriteTransport | None, self.transport)
        if transport is None or transport.is_closing():
            return
        self._on_reply(BARE_LF_END[:3])
        self._log_refusal(BARE_LF_END)
        transport.write(BARE_LF_END.encode() + b"\r\n")
        transport.close()

    async def push(self, status: str) -> None:  # type: ignore[override]
        status = with_enhanced_code(status, self.hostname)
        if status[3:4] != "-":  # count a multi-line reply (EHLO) once, by its last line
            greeting = status.startswith(f"220 {self.hostname} ")  # not STARTTLS's 220
            self._on_reply(GREETING if greeting else status[:3])
            if status[0] in "45" and status not in _LOGGED_ELSEWHERE:
                self._log_refusal(status)
        await super().push(status)
        self._turn += 1
        if self._turn >= REPLIES_PER_TURN:
            self._turn = 0
            await asyncio.sleep(0)

    def _log_refusal(self, status: str, peer: object = None) -> None:
        """One INFO line a refusal, as an MTA logs its rejects: relay probing and senders that
        hit the limits show in the log. A session's first REFUSALS_LOGGED only: a thousand
        pipelined probes are not a thousand lines."""
        self._refusals += 1
        if self._refusals > REFUSALS_LOGGED:
            return
        unlogged = self._sessions.refusal_lines.take(self.loop.time())
        if unlogged is None:
            return
        if peer is None and self.session is not None:
            peer = self.session.peer
        sender = self.envelope.mail_from if self.envelope is not None else None
        log.info(
            "refused %s%s: %s%s%s",
            _peer(peer),
            "" if sender is None else f" from=<{_utf8(sender)}>",
            status.rstrip("\r\n"),
            " (further refusals in this session not logged)"
            if self._refusals == REFUSALS_LOGGED
            else "",
            f" ({unlogged} refusals before it not logged: over {REFUSALS_PER_SECOND} a second)"
            if unlogged
            else "",
        )

    def shut_down(self) -> None:
        """Sessions.shut_down: 421 4.3.2 and close, between commands at once; with a message
        in hand (in DATA or its commit) only after its answer."""
        self._closing = True
        if not self._in_message:
            self._say_shutting_down(abort=False)

    def cut_off(self) -> None:
        """The shutdown's grace is over: 421 if it can still be said, and abort. A transfer
        cut off is not stored; its sender retries."""
        self._say_shutting_down(abort=True)

    def _say_shutting_down(self, *, abort: bool) -> None:
        transport = cast(asyncio.WriteTransport | None, self.transport)
        if transport is None:
            return
        if not transport.is_closing():
            self._on_reply("421")
            transport.write(SHUTTING_DOWN)
        if abort:
            transport.abort()
        else:
            transport.close()

    def _reset_timeout(self, duration: float | None = None) -> None:
        """Restart the idle timer. aiosmtpd makes a new timer for every command line (a
        `call_later` and a cancelled handle left in the loop's heap: 1.5–2 µs, ~7 times a
        message); here the deadline moves, and the one timer, when it comes before the
        deadline, waits for the rest. A shorter duration (PROXY) sets a timer of its own."""
        deadline = self.loop.time() + (duration or self._timeout_duration)
        self._idle_deadline = deadline
        handle = self._timeout_handle
        if handle is _SESSION_OVER:
            return
        if handle is None or handle.cancelled() or handle.when() > deadline:
            if handle is not None:
                handle.cancel()
            self._timeout_handle = self.loop.call_at(deadline, self._idle_due)

    def _idle_due(self) -> None:
        if self.loop.time() < self._idle_deadline:  # activity since the timer was set
            self._timeout_handle = self.loop.call_at(self._idle_deadline, self._idle_due)
            return
        self._timeout_cb()

    def _timeout_cb(self) -> None:
        """aiosmtpd's idle timeout closes the transport, which first sends what is buffered:
        for a client that pipelines commands and never reads our replies, that is never, and
        its session held a slot of SMTPGATE_MAX_CONNECTIONS for ever. Abort it instead."""
        # Over TLS the unsent bytes may sit in the TLS layer or in the socket's transport below.
        layers = [
            cast(asyncio.WriteTransport | None, t)
            for t in (self.transport, self._original_transport)
        ]
        if any(t is not None and t.get_write_buffer_size() > 0 for t in layers):
            _mail_log.info(
                "%r connection timeout, replies unread", self.session and self.session.peer
            )
            for t in layers:
                if t is not None:
                    t.abort()
            return
        if self.transport is not None and not self.transport.is_closing():
            # the client learns why, and retries later
            cast(asyncio.WriteTransport, self.transport).write(IDLE_TIMEOUT)
            self._on_reply("421")
            self._log_refusal(IDLE_TIMEOUT.decode())
        super()._timeout_cb()  # type: ignore[no-untyped-call]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self._counted and not self._refused and self._original_transport is None:
            refusal = (
                SHUTTING_DOWN  # accepted just before the listener closed
                if self._sessions.closing
                else TOO_MANY_CONNECTIONS
                if len(self._sessions) >= self._limit
                else None
            )
            if refusal is not None:
                self._refused = True
                self._on_reply("421")
                if refusal is TOO_MANY_CONNECTIONS:  # (a shutdown is logged once, not a session)
                    self._log_refusal(refusal.decode(), transport.get_extra_info("peername"))
                # Not isinstance(…, asyncio.WriteTransport): uvloop's transports are not
                # asyncio's classes, and the 421 went unsent there.
                cast(asyncio.WriteTransport, transport).write(refusal)
                transport.close()
                return
            self._sessions.add(self)
            self._counted = True
        task_before = self._handler_coroutine
        super().connection_made(transport)
        task = self._handler_coroutine
        if task is not None and task is not task_before:  # (STARTTLS comes here again)
            task.add_done_callback(self._session_task_over)

    def connection_lost(self, error: Exception | None) -> None:
        if self._lost:  # ended already (smtp_STARTTLS, a handshake that never happened)
            return
        if self._refused:
            self._smtp_methods = {}  # no session ran: only these bound methods make a cycle
            self._client_connected_cb = None
            return
        if self._counted:
            self._counted = False
            self._sessions.discard(self)
        super().connection_lost(error)
        self._lost = True
        self._cut_cycles()

    def _session_task_over(self, task: asyncio.Task[None]) -> None:
        self._cut_cycles()

    def _cut_cycles(self) -> None:
        """Once the connection is gone and the session's task has ended, cut the references
        that make a session's objects a cycle, so that reference counting frees them at once:
        aiosmtpd keeps bound methods of the session in the session (`_smtp_methods`), the
        stream writer and this protocol point at each other, and the task's CancelledError (a
        session ends cancelled) holds the frames that hold the session. Left to the cyclic
        garbage collector, ~50 objects a session cost ~50 µs of the listener's CPU a message
        (~8 %)."""
        task = self._handler_coroutine
        if not self._lost or task is None or not task.done() or task is _SESSION_OVER:
            return
        self._smtp_methods = {}
        self._client_connected_cb = None
        self._writer = self._reader = cast(Any, None)  # the transport keeps its protocol (uvloop)
        self._timeout_handle = self._handler_coroutine = _SESSION_OVER

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._data_progress >= 0:
            self._watch_bare_lf(data)
            content, self._data_edge = _content_bytes(self._data_edge, data)
            self._data_size += content
            # (The count takes in the end-of-data line and commands pipelined behind it: a
            # message at the limit keeps its budget until it is answered.)
            if self.data_size_limit and self._data_size > self.data_size_limit + _PAST_DATA:
                # Refused whatever follows (552): the rest is read only to be thrown away, so
                # it holds no budget and is no progress; a sender streaming on past the limit
                # is cut off by the idle timeout.
                self._budget.end(self)
            else:
                # aiosmtpd restarts its idle timer only on command lines, so a DATA transfer
                # had to finish within one timeout however steadily it was sent.
                self._data_progress += len(data)
                if self._data_progress >= DATA_PROGRESS_BYTES:
                    self._data_progress = 0
                    self._reset_timeout()
                self._budget.grow(self, len(data))
        super().data_received(data)

    def hold_back(self, paused: bool) -> None:
        """DataBudget: stop (or resume) reading this session's socket."""
        # Any live transport (asyncio's, an SSL one, uvloop's) can pause; an isinstance check
        # on asyncio.ReadTransport made this do nothing under uvloop (production).
        self._held_back = paused
        transport = cast(asyncio.ReadTransport | None, self.transport)
        if transport is not None and not transport.is_closing():
            if paused:
                transport.pause_reading()
            elif not getattr(self._reader, "_paused", False):
                # Not while the stream reader holds its own pause (its buffer is full): it
                # resumes when drained, and would not pause again if we resumed it now.
                transport.resume_reading()

    async def smtp_STARTTLS(self, arg: str) -> None:
        if self._tls_protocol is not None:  # aiosmtpd answers 220 and breaks the session
            await self.push("503 5.5.1 TLS already active")
            return
        await super().smtp_STARTTLS(arg)
        below = self._original_transport
        if below is not None and below.is_closing():
            # The handshake never happened (the idle timeout, or the client went): the TLS
            # layer closes without telling its session, whose reader then waited for ever and
            # held a slot of SMTPGATE_MAX_CONNECTIONS until restart. End the session here.
            self.connection_lost(None)

    def eof_received(self) -> bool:
        if self._refused:
            return False
        reader = getattr(self, "_reader", None)  # set once the session has started
        if isinstance(reader, _HalfClosableReader) and self._tls_protocol is None:
            # The client has sent all it will and may still read (`printf … | nc -N`): its
            # commands are worked off and answered, a 250 only after the commit as always; the
            # reader's end then ends the session. aiosmtpd cancelled the session here instead:
            # such a client got no 250 and its message was not stored.
            reader.feed_eof()
            return True  # our side stays open for the replies
        return bool(super().eof_received())


_SMUGGLING_LINES = LineBudget(REFUSALS_PER_SECOND)  # Handler.handle_DATA's warnings
# Handler.handle_DATA's errors when a commit fails: a full disk refuses a burst of mail, and
# each refusal was a line, onto that disk.
_STORE_FAILURE_LINES = LineBudget(5)


class Sessions:
    """The listener's live sessions: how many (the cap of SMTPGATE_MAX_CONNECTIONS, /metrics),
    and which, so that a shutdown can tell each of them (RFC 5321 3.8)."""

    def __init__(self) -> None:
        self.refusal_lines = LineBudget(REFUSALS_PER_SECOND)  # Listener._log_refusal
        self.live: set[Listener] = set()
        self.closing = False  # shut_down began: a connection accepted just before is told too
        self._all_gone: asyncio.Event | None = None

    def __len__(self) -> int:
        return len(self.live)

    def add(self, session: Listener) -> None:
        self.live.add(session)

    def discard(self, session: Listener) -> None:
        self.live.discard(session)
        if not self.live and self._all_gone is not None:
            self._all_gone.set()

    async def shut_down(self, grace: float) -> None:
        """Every session gets `421 4.3.2` and is closed: at once between commands; a message
        being received or committed first gets its own answer (250 or 451). Whatever is still
        open after `grace` seconds is cut off (421, then the connection is aborted)."""
        self.closing = True
        self._all_gone = asyncio.Event()
        for session in list(self.live):
            session.shut_down()
        if self.live:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace):
                    await self._all_gone.wait()
        for session in list(self.live):
            session.cut_off()


def shutdown_grace(settings: Settings) -> float:
    """How long a shutdown waits for a message in DATA or in its commit: the commit's own
    limit (SMTPGATE_STORE_TIMEOUT, then 451) and a little more."""
    return settings.store_timeout + 2.0


def listener_factory(
    settings: Settings,
    handler: Handler,
    tls_context: ssl.SSLContext | None,
    on_reply: Callable[[str], None],
    budget: DataBudget | None = None,
) -> tuple[Callable[[], Listener], Sessions]:
    """A protocol factory for loop.create_server, and the live sessions it shares.

    Its sessions share `budget` (by default one of DATA_BUDGET_BYTES of their own)."""
    sessions = Sessions()
    budget = budget or DataBudget(DATA_BUDGET_BYTES)

    def factory() -> Listener:
        return Listener(
            handler,
            sessions,
            settings.max_connections,
            on_reply,
            budget,
            data_size_limit=settings.max_message_bytes,
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname=settings.hostname,
            ident="smtpgate ESMTP",
            tls_context=tls_context,
            timeout=settings.smtp_timeout,
        )

    return factory, sessions


def listener_tls_context(settings: Settings) -> ssl.SSLContext | None:
    """STARTTLS for the listener; ConfigError naming the variables if the files do not load."""
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(settings.tls_cert_file, settings.tls_key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            "SMTPGATE_TLS_CERT_FILE / SMTPGATE_TLS_KEY_FILE: cannot load the certificate"
            f" {settings.tls_cert_file} and key {settings.tls_key_file}: {exc}"
        ) from None
    return context
