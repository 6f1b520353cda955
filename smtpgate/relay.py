"""Delivery to the upstream relay with aiosmtplib: reused connections, replies mapped to
transient (4xx, timeouts, refused connections: retry on the schedule) or permanent (5xx: dead).

Plain ASCII envelopes (nearly every mail) take a lean path over aiosmtplib's public command API:
MAIL, RCPT and DATA sent as they are, and the data dot-stuffed with `bytes.replace` when its line
ends are already CRLF (our outbox rows are; bare ones get aiosmtplib's normalisation).
`SMTP.sendmail` re-parses every address with the email package's header parser and runs regular
expressions over the whole message three times (line ends for SIZE, line ends and dots for DATA):
~120 µs of a ~460 µs relay send at 2 KB, and 0.57 s on the event loop for a 25 MB forward.
Other envelopes (non-ASCII addresses, which need SMTPUTF8; quoted local parts) use `sendmail`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import ssl
import struct
from typing import cast

import aiosmtplib
from aiosmtplib import SMTPResponse

from smtpgate.config import Settings
from smtpgate.model import ascii_domain, has_bare_line_end

log = logging.getLogger(__name__)


# A dot-atom local part at a domain or an address literal: sent as it is, without quoting.
_PLAIN_ADDRESS = re.compile(
    r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
    r"@(?:[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*|\[[A-Za-z0-9.:-]+\])"
)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class DeliveryError(Exception):
    """`connection`: the relay could not be reached or refused us (TLS, AUTH, EHLO), which
    says nothing about this mail and would happen to the next one too."""

    def __init__(
        self, message: str, *, permanent: bool, code: int | None = None, connection: bool = False
    ) -> None:
        super().__init__(message)
        self.permanent = permanent
        self.code = code
        self.connection = connection


class RelayClient:
    """One SMTP connection to the relay, opened on first use and reused until it fails."""

    def __init__(self, settings: Settings, tls_context: ssl.SSLContext | None = None) -> None:
        self._settings = settings
        self._tls_context = tls_context
        self._smtp: aiosmtplib.SMTP | None = None

    async def _connection(self) -> aiosmtplib.SMTP:
        if self._smtp is not None and self._smtp.is_connected:
            return self._smtp
        s = self._settings
        smtp = aiosmtplib.SMTP(
            hostname=s.relay_host,
            port=s.relay_port,
            use_tls=s.relay_tls == "tls",
            start_tls=s.relay_tls == "starttls",
            timeout=s.relay_timeout,
            local_hostname=s.hostname,
            tls_context=self._tls_context,
        )
        try:
            await smtp.connect()
            if s.relay_username:
                password = s.relay_password.get_secret_value() if s.relay_password else ""
                await smtp.login(s.relay_username, password)
            if smtp.is_ehlo_or_helo_needed:  # the lean path asks for the relay's extensions
                try:
                    await smtp.ehlo()
                except aiosmtplib.SMTPHeloError:
                    await smtp.helo()
        except BaseException:
            smtp.close()
            raise
        self._smtp = smtp
        return smtp

    async def send(self, mail_from: str, recipients: tuple[str, ...], data: bytes) -> str:
        """Deliver one mail; return the relay's reply or raise DeliveryError."""
        if any(_CONTROL.search(address) for address in (mail_from, *recipients)):
            # Never sent, never "cleaned up" into some other address: the row goes dead.
            raise DeliveryError("an envelope address contains a control character", permanent=True)
        mail_from, recipients = ascii_domain(mail_from), tuple(map(ascii_domain, recipients))
        plain = (not mail_from or _PLAIN_ADDRESS.fullmatch(mail_from)) and all(
            _PLAIN_ADDRESS.fullmatch(address) for address in recipients
        )
        try:
            smtp = await self._connection()
        except Exception as exc:
            # About the connection, not this mail (refused, TLS, AUTH, EHLO): retry it later.
            raise DeliveryError(
                f"relay connection: {type(exc).__name__}: {exc}", permanent=False, connection=True
            ) from exc
        try:
            if plain:
                errors, reply = await _send_plain(
                    smtp, mail_from, recipients, data, self._settings.relay_data_timeout
                )
            else:
                utf8 = not (mail_from.isascii() and all(a.isascii() for a in recipients))
                errors, reply = await smtp.sendmail(
                    mail_from, list(recipients), data, mail_options=["SMTPUTF8"] if utf8 else []
                )
        except asyncio.CancelledError:
            # What the connection still holds (the rest of the data, its end-of-data dot) must
            # never reach the relay now: the mail counts as not sent and is sent again, and a
            # graceful close (QUIT) would deliver the first copy after all.
            self._abort()
            raise
        except aiosmtplib.SMTPTimeoutError as exc:  # the same: reset, then retried
            self._abort()
            raise DeliveryError(f"{type(exc).__name__}: {exc}", permanent=False) from exc
        except aiosmtplib.SMTPNotSupported as exc:  # SMTPUTF8 needed, not offered by the relay
            raise DeliveryError(f"relay: {exc}", permanent=True) from exc
        except aiosmtplib.SMTPRecipientsRefused as exc:
            await self.close()
            codes = [e.code for e in exc.recipients]
            permanent = all(500 <= c < 600 for c in codes)
            raise DeliveryError(f"recipients refused: {exc}", permanent=permanent) from exc
        except aiosmtplib.SMTPResponseException as exc:
            await self.close()
            # 530: the relay wants STARTTLS or AUTH first (RFC 3207, 4954). That is about our
            # settings, not this mail: it is retried, like a wrong password (535), so that the
            # queue goes out once the operator has fixed SMTPGATE_RELAY_*.
            raise DeliveryError(
                f"{exc.code} {exc.message}",
                permanent=500 <= exc.code < 600 and exc.code != 530,
                code=exc.code,
                connection=exc.code == 530,  # the next mail would get it too: back off
            ) from exc
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            await self.close()
            raise DeliveryError(f"{type(exc).__name__}: {exc}", permanent=False) from exc
        except (ValueError, UnicodeError) as exc:  # an address aiosmtplib cannot put in a command
            await self.close()
            raise DeliveryError(f"unsendable envelope: {exc}", permanent=True) from exc
        if errors:
            # Some recipients refused: our rows have one recipient each, so this is rare.
            log.warning("relay refused some recipients: %s", errors)
        return reply

    def _abort(self) -> None:
        """Reset the connection: what our side still holds, in the transport or the kernel's
        send buffer (a close would send it and then FIN), is thrown away (SO_LINGER 0)."""
        smtp, self._smtp = self._smtp, None
        if smtp is None:
            return
        if smtp.transport is not None:
            sock = smtp.transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            cast(asyncio.WriteTransport, smtp.transport).abort()
        smtp.close()

    async def close(self) -> None:
        smtp, self._smtp = self._smtp, None
        if smtp is not None and smtp.is_connected:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2):
                    await smtp.quit()
            smtp.close()


# A mail up to this size is sent with its end-of-data dot in one write (a copy is cheaper than
# a second send() system call).
_ONE_WRITE_BYTES = 64 * 1024
_SENT_POLL_SECONDS = 0.05


async def _all_sent(transport: asyncio.WriteTransport, stall_seconds: float) -> None:
    """Until the connection has handed all our data to the kernel. A slow uplink may take long
    for a big mail; only a relay that takes nothing for `stall_seconds` fails it."""
    loop = asyncio.get_running_loop()
    left = transport.get_write_buffer_size()
    moved_at = loop.time()
    while left:
        await asyncio.sleep(_SENT_POLL_SECONDS)
        now = transport.get_write_buffer_size()
        if now < left:
            left, moved_at = now, loop.time()
        elif loop.time() - moved_at > stall_seconds:
            raise aiosmtplib.SMTPTimeoutError("the relay stopped taking the message data")


async def _send_plain(
    smtp: aiosmtplib.SMTP,
    mail_from: str,
    recipients: tuple[str, ...],
    data: bytes,
    reply_timeout: float,
) -> tuple[dict[str, SMTPResponse], str]:
    """What `SMTP.sendmail` does, for plain ASCII addresses, without its per-mail re-parsing.

    The reply to the end of data is awaited `reply_timeout` seconds once all the data is sent
    (RFC 5321 4.5.3.2.6: 10 minutes; the relay may be filtering the message): a timer running
    while a big mail crossed a slow uplink expired, and the mail the relay then queued anyway
    was sent again on every retry."""
    if has_bare_line_end(data):
        # Never in our outbox rows (the front refuses such mail): aiosmtplib's normalisation.
        data = aiosmtplib.protocol.normalize_message_line_endings(data)
    elif not data.endswith(b"\r\n"):
        data += b"\r\n"
    mail = [b"FROM:<" + mail_from.encode() + b">"]
    if smtp.supports_extension("size"):
        mail.append(b"SIZE=%d" % len(data))  # RFC 1870: CRLFs included, stuffing dots not
    if not data.isascii() and smtp.supports_extension("8bitmime"):
        mail.append(b"BODY=8BITMIME")  # RFC 6152 (a relay without it gets the bytes as they are)
    response = await smtp.execute_command(b"MAIL", *mail)
    if response.code != 250:
        raise aiosmtplib.SMTPSenderRefused(response.code, response.message, mail_from)
    refused: list[aiosmtplib.SMTPRecipientRefused] = []
    for address in recipients:
        response = await smtp.execute_command(b"RCPT", b"TO:<" + address.encode() + b">")
        if response.code not in (250, 251):
            refused.append(
                aiosmtplib.SMTPRecipientRefused(response.code, response.message, address)
            )
    if len(refused) == len(recipients):
        raise aiosmtplib.SMTPRecipientsRefused(refused)
    response = await smtp.execute_command(b"DATA")
    if response.code != 354:
        raise aiosmtplib.SMTPDataError(response.code, response.message)
    stuffed = data.replace(b"\r\n.", b"\r\n..")
    if stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    protocol = smtp.protocol
    if protocol is None:
        raise aiosmtplib.SMTPServerDisconnected("connection lost")
    if len(stuffed) <= _ONE_WRITE_BYTES:
        protocol.write(stuffed + b".\r\n")  # one send() instead of two
    else:
        protocol.write(stuffed)  # no copy of a large message just to append the dot
        protocol.write(b".\r\n")
    if protocol.transport is not None:
        await _all_sent(cast(asyncio.WriteTransport, protocol.transport), smtp.timeout or 30.0)
    response = await protocol.read_response(timeout=reply_timeout)
    if response.code != 250:
        raise aiosmtplib.SMTPDataError(response.code, response.message)
    return {r.recipient: SMTPResponse(r.code, r.message) for r in refused}, response.message


def relay_tls_context(settings: Settings) -> ssl.SSLContext | None:
    """Verifying context for the relay unless SMTPGATE_RELAY_TLS_VERIFY is off."""
    if settings.relay_tls == "none":
        return None
    context = ssl.create_default_context()
    if not settings.relay_tls_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context
