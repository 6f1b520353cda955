"""The SMTP front (aiosmtpd): recipient policy, limits, and DATA → durable enqueue → 250.

A message is answered 250 only after its bytes are committed; any store failure or a commit that
takes longer than SMTPGATE_STORE_TIMEOUT is answered 451 so the sender retries (spec 1, 6).
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
from collections.abc import Callable
from email.utils import formatdate
from typing import Any

from aiosmtpd.smtp import SMTP, Session
from aiosmtpd.smtp import Envelope as SmtpEnvelope

from smtpgate.config import Settings
from smtpgate.model import Envelope
from smtpgate.store import Store, StoreError, new_queue_id

log = logging.getLogger(__name__)

# Replies (RFC 5321 codes with RFC 3463 enhanced status codes).
OK_RCPT = "250 2.1.5 OK"
NOT_RELAY = "550 5.1.1 <{}>: recipient not accepted here (not a connector address)"
TOO_MANY_RCPTS = "452 4.5.3 Too many recipients"
STORE_FAILED = "451 4.3.0 Temporary storage failure, please try again later"
QUEUED = "250 2.0.0 queued as {}"
SMUGGLING = "550 5.5.2 Message refused: bare <CR> or <LF> in message data (RFC 5321 2.3.8)"
TOO_BIG = "552 5.3.4 Message size exceeds fixed maximum message size"
TOO_MANY_CONNECTIONS = b"421 4.7.0 Too many connections, try again later\r\n"

_MESSAGE_ID = re.compile(rb"^message-id:[ \t]*(<[^>\r\n]{1,500}>)", re.IGNORECASE | re.MULTILINE)


# RFC 5321 2.3.8: lines end in CRLF only. A bare CR or LF is how SMTP smuggling hides a second
# end-of-data (`<LF>.<CR><LF>` and friends), so — like Postfix's smtpd_forbid_bare_newline —
# any message holding one is refused. aiosmtpd already ends DATA on <CR><LF>.<CR><LF> only, and
# its dot-unstuffing can hide a smuggled dot, which is why the whole message is checked.
def smuggling_attempt(data: bytes) -> bool:
    # Every CR and every LF must belong to a CRLF. Three bytes.count calls run in C: ~15x faster
    # than the regex rb"\r(?!\n)|(?<!\r)\n" (3 ms → 0.2 ms for 100 KB), with the same answer.
    crlf = data.count(b"\r\n")
    return data.count(b"\r") != crlf or data.count(b"\n") != crlf


def header_message_id(data: bytes) -> str | None:
    """The Message-ID from the header block, cheaply (the worker parses properly later)."""
    end = data.find(b"\r\n\r\n")
    head = data if end < 0 else data[: end + 2]
    m = _MESSAGE_ID.search(head[:262144])
    return m.group(1).decode("ascii", "replace") if m else None


class Handler:
    """aiosmtpd handler: the hooks return the SMTP reply string."""

    def __init__(self, settings: Settings, store: Store, on_queued: Callable[[], None]) -> None:
        self.settings = settings
        self.store = store
        self.connectors = frozenset(settings.connector_addresses)
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
        extra = ["250-PIPELINING", "250-ENHANCEDSTATUSCODES"]
        return [responses[0], *extra, *responses[1:]]

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: SmtpEnvelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        normalized = address.strip().lower()
        if normalized not in self.connectors:
            return NOT_RELAY.format(address)
        if normalized in envelope.rcpt_tos:
            return OK_RCPT
        if len(envelope.rcpt_tos) >= self.settings.max_recipients:
            return TOO_MANY_RCPTS
        envelope.rcpt_tos.append(normalized)
        return OK_RCPT

    async def handle_DATA(self, server: SMTP, session: Session, envelope: SmtpEnvelope) -> str:
        data: bytes = envelope.original_content or b""
        if smuggling_attempt(data):
            log.warning("refused a smuggling attempt from %s", session.peer)
            return SMUGGLING
        queue_id = new_queue_id()
        peer = _peer(session.peer)
        helo = _utf8(session.host_name or "")
        tls = " (TLS)" if session.ssl else ""
        received = (
            f"Received: from {_clean(helo)} ({peer})\r\n\tby {self.settings.hostname}"
            f" (smtpgate) with ESMTP{'S' if tls else ''} id {queue_id}\r\n"
            f"\tfor <{envelope.rcpt_tos[0]}>; {formatdate(localtime=False)}\r\n"
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
            log.error("could not store a message from %s: %s", peer, exc or "timeout")
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


def _utf8(value: str) -> str:
    """aiosmtpd decodes arguments with surrogateescape; SQLite takes only valid UTF-8."""
    return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _clean(value: str) -> str:
    return "".join(ch for ch in value if ch.isprintable() and ch not in "()\r\n")[:255] or "unknown"


class Listener(SMTP):
    """aiosmtpd's SMTP with a cap on concurrent sessions (spec 6); extra sessions get 421."""

    # RFC 5321 says 1000, but real alert mail (long HTML lines) breaks it daily; accept up to
    # 1 MiB per line like Postfix does, which still bounds the reader's buffer.
    line_length_limit = 1 << 20

    def __init__(
        self,
        handler: Handler,
        counter: list[int],
        limit: int,
        on_reply: Callable[[str], None],
        **kwargs: Any,
    ) -> None:
        super().__init__(handler, **kwargs)
        self._counter = counter
        self._limit = limit
        self._on_reply = on_reply
        self._counted = False
        self._refused = False

    async def push(self, status: str) -> None:  # type: ignore[override]
        if status.startswith("552 Error"):
            status = TOO_BIG  # spec 6: oversize is 552 5.3.4
        if status[3:4] != "-":  # count a multi-line reply (EHLO) once, by its last line
            self._on_reply(status[:3])
        await super().push(status)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self._counted and not self._refused and self._original_transport is None:
            if self._counter[0] >= self._limit:
                self._refused = True
                self._on_reply("421")
                if isinstance(transport, asyncio.WriteTransport):
                    transport.write(TOO_MANY_CONNECTIONS)
                transport.close()
                return
            self._counter[0] += 1
            self._counted = True
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        if self._refused:
            return
        if self._counted:
            self._counted = False
            self._counter[0] -= 1
        super().connection_lost(error)

    def data_received(self, data: bytes) -> None:
        if not self._refused:
            super().data_received(data)

    def eof_received(self) -> bool:
        return False if self._refused else bool(super().eof_received())


def listener_factory(
    settings: Settings,
    handler: Handler,
    tls_context: ssl.SSLContext | None,
    on_reply: Callable[[str], None],
) -> tuple[Callable[[], Listener], list[int]]:
    """A protocol factory for loop.create_server, and the live session counter it shares."""
    counter = [0]

    def factory() -> Listener:
        return Listener(
            handler,
            counter,
            settings.max_connections,
            on_reply,
            data_size_limit=settings.max_message_bytes,
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname=settings.hostname,
            ident="smtpgate ESMTP",
            tls_context=tls_context,
            timeout=settings.smtp_timeout,
        )

    return factory, counter


def listener_tls_context(settings: Settings) -> ssl.SSLContext | None:
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(settings.tls_cert_file, settings.tls_key_file)
    return context
