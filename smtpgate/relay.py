"""Delivery to the upstream relay with aiosmtplib: reused connections, replies mapped to
transient (4xx, timeouts, refused connections: retry on the schedule) or permanent (5xx: dead).

Plain ASCII envelopes (nearly every mail) take a lean path over aiosmtplib's public command API:
MAIL, RCPT and DATA sent as they are, and the data dot-stuffed with `bytes.replace` when its line
ends are already CRLF (our outbox rows are; bare ones get aiosmtplib's normalisation).
`SMTP.sendmail` re-parses every address with the email package's header parser and runs regular
expressions over the whole message three times (line ends for SIZE, line ends and dots for DATA):
~120 µs of a ~460 µs relay send at 2 KB, and 0.57 s on the event loop for a 25 MB forward.
Other envelopes (non-ASCII addresses, which need SMTPUTF8; quoted local parts) use `sendmail`.

A relay that offers PIPELINING (RFC 2920; Postfix does) gets MAIL, the RCPTs and DATA in one
write, and the data with its end-of-data dot in a second: two round trips a mail instead of
four. When the caller names the mail it sends next (`send(..., then=...)`), that mail's MAIL,
RCPT and DATA follow the end-of-data dot in the same write (RFC 2920 3.1: message content may
open a group): one write and one round trip a mail. aiosmtplib's protocol keeps one reply per
command and drops what arrives beyond it, so for the replies to those commands the
connection's transport is handed to `_Replies`, and back once no command is left unanswered.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import socket
import ssl
import struct
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple, cast

import aiosmtplib
from aiosmtplib import SMTPResponse, SMTPResponseException, SMTPStatus

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


# What a forward adds to the message it forwards: its headers (Received:, Resent-*,
# X-Smtpgate-*, Auto-Submitted: ~0.5 KB, with room to spare) and, for lines over 998 octets,
# the line breaks `outbound.break_long_lines` puts in (at most 5 octets in 1,000: a break
# before a space and one after a 998-octet word, each in turn).
FORWARD_HEADROOM = 2048


def forward_size(size: int) -> int:
    """The most a forward of a message of `size` bytes can take."""
    return size + size // 200 + FORWARD_HEADROOM


def _check_size(advertised: str, limit: int) -> None:
    """RFC 1870: the relay's SIZE (0: none). Below a forward of the largest mail accepted, such
    forwards (their senders told 250) go dead."""
    if advertised.isdigit() and 0 < int(advertised) < forward_size(limit):
        _warn_small_relay(int(advertised), limit)


@functools.cache
def _warn_small_relay(size: int, limit: int) -> None:
    """Once a process, not once a connection."""
    log.warning(
        "the relay takes mail up to %d bytes (SIZE) and SMTPGATE_MAX_MESSAGE_BYTES is %d: a"
        " forward of the largest messages accepted (headers added, long lines broken: up to %d"
        " bytes) will be refused and go dead; raise the relay's limit, or lower"
        " SMTPGATE_MAX_MESSAGE_BYTES",
        size,
        limit,
        forward_size(limit),
    )


class Mail(NamedTuple):
    """A mail as the relay gets it: the envelope and the data."""

    mail_from: str
    recipients: tuple[str, ...]
    data: bytes


class _Next(NamedTuple):
    """The mail sent next as the caller named it, as it goes to the relay (ASCII domains, data
    with CRLF line ends), and its MAIL, RCPT and DATA."""

    named: Mail
    mail: Mail
    data: bytes
    commands: bytes


@dataclass
class _Ahead:
    """The commands of `next`, written after the last mail's data: the relay answers them to
    `replies`, and may wait for the data of `next`."""

    next: _Next
    replies: _Replies
    transport: asyncio.BaseTransport

    def continues(self, named: Mail) -> bool:
        return self.next.named == named and not self.transport.is_closing()


class RelayClient:
    """One SMTP connection to the relay, opened on first use and reused until it fails."""

    def __init__(self, settings: Settings, tls_context: ssl.SSLContext | None = None) -> None:
        self._settings = settings
        self._tls_context = tls_context
        self._smtp: aiosmtplib.SMTP | None = None
        self._ahead: _Ahead | None = None
        # The relay has a mail whole (its end of data sent) and its answer is awaited: a stop
        # waits for it (Gateway.stop), or the mail, counted unsent, would go again.
        self.answer_due = False

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
                    if not smtp.is_connected:  # a 421, or a refusal and a hang-up: say why
                        raise
                    await smtp.helo()  # a relay that does not know EHLO
            _check_size(smtp.esmtp_extensions.get("size", ""), s.max_message_bytes)
        except BaseException:
            smtp.close()
            raise
        self._smtp = smtp
        return smtp

    async def send(
        self, mail_from: str, recipients: tuple[str, ...], data: bytes, *, then: Mail | None = None
    ) -> str:
        """Deliver one mail; return the relay's reply or raise DeliveryError.

        `then` is the mail the caller sends next on this client: its commands may go with this
        mail's data. Should the next send be another mail, the connection is reset first (the
        relay may be waiting for the data of `then`), and nothing of `then` is delivered."""
        named = Mail(mail_from, recipients, data)
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead.continues(named):
            mail, plain = ahead.next.mail, True  # checked when it was named
        else:
            if ahead is not None:
                self._abort()
                ahead = None
            if any(_CONTROL.search(address) for address in (mail_from, *recipients)):
                # Never sent, never "cleaned up" into some other address: the row goes dead.
                raise DeliveryError(
                    "an envelope address contains a control character", permanent=True
                )
            mail = _ascii_envelope(named)
            plain = _is_plain(mail)
        reused = self._smtp is not None and self._smtp.is_connected
        while True:
            try:
                return await self._send_on(mail, plain, ahead, then)
            except _Ended as exc:
                self._abort()
                if not reused:
                    # A new connection ended at once: the relay is closing or refusing
                    # service, and would do the same to the next mail: back off.
                    cause = exc.cause
                    if isinstance(cause, aiosmtplib.SMTPResponseException):
                        refusal = _refusal(cause)
                        refusal.connection = True
                        raise refusal from cause
                    raise DeliveryError(
                        f"{type(cause).__name__}: {cause}", permanent=False, connection=True
                    ) from cause
                # A reused connection the relay ended (a limit of mails per connection, an
                # idle timeout) took nothing of this mail: it goes on a new one at once.
                log.debug("relay ended a reused connection (%s); reconnecting", exc)
                reused, ahead = False, None

    async def _send_on(
        self, mail: Mail, plain: bool, ahead: _Ahead | None, then: Mail | None
    ) -> str:
        """`send` on the current connection, opened if there is none."""
        try:
            smtp = await self._connection()
        except Exception as exc:
            # About the connection, not this mail (refused, TLS, AUTH, EHLO): retry it later.
            raise DeliveryError(
                f"relay connection: {type(exc).__name__}: {exc}", permanent=False, connection=True
            ) from exc
        if ahead is not None and smtp.transport is not ahead.transport:
            ahead = None  # a new connection (never expected here): its commands go afresh
        try:
            if plain:
                errors, reply = await self._send_plain(smtp, mail, ahead, then)
            else:
                utf8 = not (mail.mail_from.isascii() and all(a.isascii() for a in mail.recipients))
                self.answer_due = True  # (aiosmtplib's whole transaction: its dot is not told)
                errors, reply = await smtp.sendmail(
                    mail.mail_from,
                    list(mail.recipients),
                    mail.data,
                    mail_options=["SMTPUTF8"]
                    if utf8 or _utf8_headers(smtp, mail.data)
                    else _body_options(smtp, mail.data),
                    # aiosmtplib has one timeout for every command: the end-of-data reply is
                    # awaited as long as on the lean path (SMTPGATE_RELAY_DATA_TIMEOUT), or a
                    # relay scanning the mail longer than SMTPGATE_RELAY_TIMEOUT got it again
                    # on every retry.
                    timeout=self._settings.relay_data_timeout,
                )
        except asyncio.CancelledError:
            # What the connection still holds (the rest of the data, its end-of-data dot) must
            # never reach the relay now: the mail counts as not sent and is sent again, and a
            # graceful close (QUIT) would deliver the first copy after all.
            self._abort()
            raise
        except aiosmtplib.SMTPTimeoutError as exc:  # the same: reset, then retried
            self._abort()
            said = _refusal_before(exc)
            if said is not None:
                # sendmail's RSET after a refusal went unanswered: the refusal is the answer.
                raise _refusal(said) from said
            raise DeliveryError(f"{type(exc).__name__}: {exc}", permanent=False) from exc
        except aiosmtplib.SMTPNotSupported as exc:  # SMTPUTF8 needed, not offered by the relay
            raise DeliveryError(f"relay: {exc}", permanent=True) from exc
        except _Unusable as exc:  # refused, and the relay waits for data: reset
            self._abort()
            raise _refusal(exc.failure) from exc.failure
        except aiosmtplib.SMTPSenderRefused as exc:
            if exc.code == 421:  # (the sendmail path) the relay is ending this connection
                raise _Ended(exc) from exc
            await self.close()
            raise _refusal(exc) from exc
        except (aiosmtplib.SMTPRecipientsRefused, aiosmtplib.SMTPResponseException) as exc:
            await self.close()
            raise _refusal(exc) from exc
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            await self.close()
            raise DeliveryError(f"{type(exc).__name__}: {exc}", permanent=False) from exc
        except (ValueError, UnicodeError) as exc:  # an address aiosmtplib cannot put in a command
            await self.close()
            raise DeliveryError(f"unsendable envelope: {exc}", permanent=True) from exc
        finally:
            self.answer_due = False
        if errors:
            # Some recipients refused: our rows have one recipient each, so this is rare.
            log.warning("relay refused some recipients: %s", errors)
        return reply

    def _abort(self) -> None:
        """Reset the connection: what our side still holds, in the transport or the kernel's
        send buffer (a close would send it and then FIN), is thrown away (SO_LINGER 0)."""
        smtp, self._smtp, self._ahead = self._smtp, None, None
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
        if self._ahead is not None:  # the relay may wait for data: a QUIT would be taken as such
            self._abort()
            return
        smtp, self._smtp = self._smtp, None
        if smtp is not None and smtp.is_connected:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2):
                    await smtp.quit()
            smtp.close()

    async def _send_plain(
        self, smtp: aiosmtplib.SMTP, mail: Mail, ahead: _Ahead | None, then: Mail | None
    ) -> tuple[dict[str, SMTPResponse], str]:
        """What `SMTP.sendmail` does, for plain ASCII addresses, without its per-mail re-parsing.

        The reply to the end of data is awaited SMTPGATE_RELAY_DATA_TIMEOUT seconds once all
        the data is sent (RFC 5321 4.5.3.2.6: 10 minutes; the relay may be filtering the
        message): a timer running while a big mail crossed a slow uplink expired, and the mail
        the relay then queued anyway was sent again on every retry."""
        command_timeout = smtp.timeout or 30.0
        reply_timeout = self._settings.relay_data_timeout
        data = ahead.next.data if ahead is not None else _line_ends_fixed(mail.data)
        protocol = smtp.protocol
        if protocol is None or protocol.transport is None:
            raise aiosmtplib.SMTPServerDisconnected("connection lost")
        if smtp.supports_extension("pipelining"):
            return await self._send_pipelined(
                protocol,
                mail,
                None if ahead is not None else _commands(smtp, mail, data),
                data,
                ahead,
                _next(smtp, then),
                command_timeout,
            )
        try:
            response = await smtp.execute_command(b"MAIL", *_mail_arguments(smtp, mail, data))
        except aiosmtplib.SMTPServerDisconnected as exc:
            raise _Ended(exc) from exc
        if response.code != 250:
            sender_refused = aiosmtplib.SMTPSenderRefused(
                response.code, response.message, mail.mail_from
            )
            if response.code == 421:
                raise _Ended(sender_refused)
            raise sender_refused
        refused: list[aiosmtplib.SMTPRecipientRefused] = []
        for address in mail.recipients:
            reply = await smtp.execute_command(b"RCPT", b"TO:<" + address.encode() + b">")
            refusal = _rcpt_refusal(address, reply)
            if refusal is not None:
                refused.append(refusal)
        if len(refused) == len(mail.recipients):
            raise aiosmtplib.SMTPRecipientsRefused(refused)
        response = await smtp.execute_command(b"DATA")
        if response.code != 354:
            raise aiosmtplib.SMTPDataError(response.code, response.message)
        # aiosmtplib drops a reply that comes while no read_response() is pending (and
        # _all_sent polls): the reply to the end of data goes to _Replies.
        transport = cast(asyncio.WriteTransport, protocol.transport)
        replies = _Replies(protocol)
        _drop_unread(protocol)
        transport.set_protocol(replies)
        try:
            await _write_data(transport, _stuffed(data), command_timeout)
            end_reply = await self._answer(replies, reply_timeout)
        finally:
            if not transport.is_closing():
                transport.set_protocol(protocol)
        return _delivered(end_reply, refused)

    async def _answer(self, replies: _Replies, seconds: float) -> SMTPResponse:
        """The relay's answer to a mail's end of data: the mail is the relay's now, so a stop
        waits for it (`answer_due`)."""
        self.answer_due = True
        try:
            return await replies.next(seconds)
        finally:
            self.answer_due = False

    async def _send_pipelined(
        self,
        protocol: aiosmtplib.protocol.SMTPProtocol,
        mail: Mail,
        commands: bytes | None,
        data: bytes,
        ahead: _Ahead | None,
        then: _Next | None,
        command_timeout: float,
    ) -> tuple[dict[str, SMTPResponse], str]:
        """MAIL, RCPT… and DATA in one write (RFC 2920), unless they went with the last mail's
        data (`ahead`), then the data, with the commands of `then` behind it. Every reply to a
        group is read before the connection goes back to aiosmtplib, so none is left to be
        mistaken for the reply to a later command."""
        transport = cast(asyncio.WriteTransport, protocol.transport)
        if ahead is not None:
            replies = ahead.replies
        else:
            assert commands is not None
            replies = _Replies(protocol)
            _drop_unread(protocol)
            transport.set_protocol(replies)
            transport.write(commands)
        chained = False
        try:
            group: list[SMTPResponse] = []  # the replies to MAIL, each RCPT and DATA
            try:
                while len(group) < len(mail.recipients) + 2:
                    group.append(await replies.next(command_timeout))
            except aiosmtplib.SMTPResponseException as exc:
                # A reply we cannot read (malformed, too long): the relay may be waiting for
                # data after a 354 we did not see, and would take a QUIT as data. Reset instead.
                raise _Unusable(exc) from exc
            except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPReadTimeoutError) as exc:
                # A relay that refuses and hangs up (or falls silent): what it said is the
                # answer, not the lost connection (a 550 would otherwise be retried for days).
                if not group or group[0].code == 421:  # closing: nothing of this mail taken
                    raise _Ended(_group_failure(mail, group) or exc) from exc
                said = _group_failure(mail, group)
                if said is None:
                    raise
                raise _Unusable(said) from exc
            if group[0].code == 421:  # closing: nothing of this mail was taken
                raise _Ended(_group_failure(mail, group))
            refused = _refused(mail, group[1:-1])
            data_reply = group[-1]
            failure: SMTPResponseException | aiosmtplib.SMTPRecipientsRefused | None
            failure = _group_failure(mail, group)
            if failure is None and data_reply.code != 354:
                failure = aiosmtplib.SMTPDataError(data_reply.code, data_reply.message)
            if failure is not None:
                if data_reply.code == 354:
                    # The relay waits for data we will not send: no end-of-data dot (that could
                    # deliver an empty mail), the connection is reset instead (RelayClient).
                    raise _Unusable(failure)
                raise failure
            stuffed = _stuffed(data)
            if then is not None and len(stuffed) <= _ONE_WRITE_BYTES:
                transport.write(stuffed + b".\r\n" + then.commands)
                chained = True
                # Known before the reply to this data: on any failure from here the connection
                # is reset, not closed with a QUIT the relay could take as the next mail's data.
                self._ahead = _Ahead(then, replies, transport)
                await _all_sent(transport, command_timeout)
            else:
                await _write_data(transport, stuffed, command_timeout)
            end_reply = await self._answer(replies, self._settings.relay_data_timeout)
        finally:
            if not chained and not transport.is_closing():
                transport.set_protocol(protocol)
        return _delivered(end_reply, refused)


def _drop_unread(protocol: aiosmtplib.protocol.SMTPProtocol) -> None:
    """Throw away what aiosmtplib's protocol read beyond the last reply it returned (a relay
    that glued a stray line to its 354), as aiosmtplib does at STARTTLS: kept, it answered
    the next mail's MAIL, and every reply after it went to the wrong command."""
    unread = getattr(protocol, "_buffer", None)
    if isinstance(unread, bytearray):
        del unread[:]


def _next(smtp: aiosmtplib.SMTP, then: Mail | None) -> _Next | None:
    """The mail sent next, ready to be named ahead; None when it cannot go pipelined."""
    if then is None or any(_CONTROL.search(a) for a in (then.mail_from, *then.recipients)):
        return None
    mail = _ascii_envelope(then)
    if not _is_plain(mail):
        return None
    data = _line_ends_fixed(mail.data)
    return _Next(then, mail, data, _commands(smtp, mail, data))


def _ascii_envelope(mail: Mail) -> Mail:
    """The envelope with internationalized domains in their ASCII form."""
    return mail._replace(
        mail_from=ascii_domain(mail.mail_from),
        recipients=tuple(map(ascii_domain, mail.recipients)),
    )


def _is_plain(mail: Mail) -> bool:
    """Whether every address can go in a command as it is (else `SMTP.sendmail` sends it)."""
    return (not mail.mail_from or bool(_PLAIN_ADDRESS.fullmatch(mail.mail_from))) and all(
        _PLAIN_ADDRESS.fullmatch(address) for address in mail.recipients
    )


def _line_ends_fixed(data: bytes) -> bytes:
    """The data with CRLF line ends, ending in one."""
    if has_bare_line_end(data):
        # Never in our outbox rows (the front refuses such mail): aiosmtplib's normalisation.
        return aiosmtplib.protocol.normalize_message_line_endings(data)
    return data if data.endswith(b"\r\n") else data + b"\r\n"


def _mail_arguments(smtp: aiosmtplib.SMTP, mail: Mail, data: bytes) -> list[bytes]:
    arguments = [b"FROM:<" + mail.mail_from.encode() + b">"]
    if smtp.supports_extension("size"):
        arguments.append(b"SIZE=%d" % len(data))  # RFC 1870: CRLFs included, stuffing dots not
    arguments += [option.encode() for option in _body_options(smtp, data)]
    if _utf8_headers(smtp, data):
        arguments.append(b"SMTPUTF8")
    return arguments


def _body_options(smtp: aiosmtplib.SMTP, data: bytes) -> list[str]:
    """RFC 6152: 8-bit data is declared when the relay offers 8BITMIME (a relay without it gets
    the bytes as they are: refusing would leave 8-bit mail for support undelivered)."""
    return ["BODY=8BITMIME"] if not data.isascii() and smtp.supports_extension("8bitmime") else []


def _utf8_headers(smtp: aiosmtplib.SMTP, data: bytes) -> bool:
    """Whether to declare SMTPUTF8 for an ASCII envelope: the header holds UTF-8 (RFC 6532;
    an answer to jörg@… and its BCC copy, a forward of internationalized mail) and the relay
    offers it. A relay without it gets the mail as it is, as 8-bit data above; so does a
    header in some legacy 8-bit charset, which is no UTF-8 to declare."""
    end = data.find(b"\r\n\r\n")
    head = data if end < 0 else data[:end]
    if head.isascii() or not smtp.supports_extension("smtputf8"):
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _commands(smtp: aiosmtplib.SMTP, mail: Mail, data: bytes) -> bytes:
    """A mail's MAIL, RCPT… and DATA as one pipelined group."""
    return (
        b"MAIL "
        + b" ".join(_mail_arguments(smtp, mail, data))
        + b"\r\n"
        + b"".join(b"RCPT TO:<" + address.encode() + b">\r\n" for address in mail.recipients)
        + b"DATA\r\n"
    )


def _refusal_before(
    exc: BaseException,
) -> aiosmtplib.SMTPRecipientsRefused | SMTPResponseException | None:
    """The relay's refusal that `exc` was raised while handling, if any (a few links up the
    exception's context: aiosmtplib re-raises a timeout from the TimeoutError)."""
    seen: BaseException | None = exc.__context__
    for _ in range(4):
        if seen is None:
            return None
        if isinstance(seen, aiosmtplib.SMTPRecipientsRefused | SMTPResponseException):
            return seen
        seen = seen.__context__
    return None


def _refusal(
    exc: aiosmtplib.SMTPRecipientsRefused | aiosmtplib.SMTPResponseException,
) -> DeliveryError:
    """A refusal of the relay as our error: permanent for 5xx (except 530), else retried."""
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
        codes = [e.code for e in exc.recipients]
        permanent = all(500 <= c < 600 and c != 530 for c in codes)
        return DeliveryError(
            f"recipients refused: {exc}", permanent=permanent, connection=530 in codes
        )
    # 530: the relay wants STARTTLS or AUTH first (RFC 3207, 4954). That is about our settings,
    # not this mail: it is retried, like a wrong password (535), so that the queue goes out once
    # the operator has fixed SMTPGATE_RELAY_*.
    return DeliveryError(
        f"{exc.code} {exc.message}",
        permanent=500 <= exc.code < 600 and exc.code != 530,
        code=exc.code,
        connection=exc.code == 530,  # the next mail would get it too: back off
    )


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


def _refused(
    mail: Mail, rcpt_replies: Sequence[SMTPResponse]
) -> list[aiosmtplib.SMTPRecipientRefused]:
    return [
        refusal
        for address, reply in zip(mail.recipients, rcpt_replies, strict=False)
        if (refusal := _rcpt_refusal(address, reply)) is not None
    ]


def _group_failure(
    mail: Mail, group: Sequence[SMTPResponse]
) -> aiosmtplib.SMTPSenderRefused | aiosmtplib.SMTPRecipientsRefused | None:
    """The refusal the replies to a group's MAIL and RCPTs (as many as were read) decide:
    MAIL refused, or every recipient; None while they decide nothing."""
    if group and group[0].code != 250:
        return aiosmtplib.SMTPSenderRefused(group[0].code, group[0].message, mail.mail_from)
    rcpt_replies = group[1 : 1 + len(mail.recipients)]
    refused = _refused(mail, rcpt_replies)
    if len(rcpt_replies) == len(mail.recipients) and len(refused) == len(mail.recipients):
        return aiosmtplib.SMTPRecipientsRefused(refused)
    return None


def _rcpt_refusal(address: str, reply: SMTPResponse) -> aiosmtplib.SMTPRecipientRefused | None:
    """The refusal of one recipient, or None when the relay took it."""
    if reply.code in (250, 251):
        return None
    return aiosmtplib.SMTPRecipientRefused(reply.code, reply.message, address)


def _delivered(
    end_reply: SMTPResponse, refused: list[aiosmtplib.SMTPRecipientRefused]
) -> tuple[dict[str, SMTPResponse], str]:
    """What `SMTP.sendmail` returns for the reply to the end of data, or its error."""
    if end_reply.code != 250:
        raise aiosmtplib.SMTPDataError(end_reply.code, end_reply.message)
    return {r.recipient: SMTPResponse(r.code, r.message) for r in refused}, end_reply.message


async def _write_data(
    transport: asyncio.BaseTransport | None, stuffed: bytes, stall_seconds: float
) -> None:
    """The dot-stuffed data, its end-of-data dot, and the wait until all of it left us."""
    if transport is None or transport.is_closing():  # lost, e.g. while DATA was answered
        raise aiosmtplib.SMTPServerDisconnected("connection lost")
    transport = cast(asyncio.WriteTransport, transport)
    if len(stuffed) <= _ONE_WRITE_BYTES:
        transport.write(stuffed + b".\r\n")  # one send() instead of two
    else:
        transport.write(stuffed)  # no copy of a large message just to append the dot
        transport.write(b".\r\n")
    await _all_sent(transport, stall_seconds)


def _stuffed(data: bytes) -> bytes:
    """The data dot-stuffed (RFC 5321 4.5.2); its line ends are CRLF already."""
    stuffed = data.replace(b"\r\n.", b"\r\n..")
    return b"." + stuffed if stuffed.startswith(b".") else stuffed


class _Ended(Exception):
    """The relay ended the connection before it took anything of this mail: MAIL answered
    421, or the connection gone before MAIL's reply (the relay closed after the last mail, as
    one with a limit of mails per connection does, or an idle connection timed out)."""

    def __init__(self, cause: BaseException | None) -> None:
        super().__init__(str(cause))
        self.cause = cause


class _Unusable(Exception):
    """The mail failed with `failure`, and the connection is in a state that cannot go on."""

    def __init__(
        self, failure: aiosmtplib.SMTPResponseException | aiosmtplib.SMTPRecipientsRefused
    ) -> None:
        super().__init__(str(failure))
        self.failure = failure


# aiosmtplib's limits for a reply line and a whole reply; replies kept unread at most (a
# group has 2 + its recipients).
_MAX_REPLY_LINE = 8192
_MAX_REPLY = 4 * _MAX_REPLY_LINE
_MAX_QUEUED_REPLIES = 1000


def _invalid(text: str) -> aiosmtplib.SMTPResponseException:
    """A reply that is not SMTP: aiosmtplib's code for it (-1), a transient failure."""
    return aiosmtplib.SMTPResponseException(SMTPStatus.invalid_response.value, text)


class _Replies(asyncio.Protocol):
    """The replies to pipelined commands, in order, while it is the transport's protocol. The
    connection's end and flow control are passed on to aiosmtplib's protocol, which is still
    the connection's owner."""

    def __init__(self, owner: aiosmtplib.protocol.SMTPProtocol) -> None:
        self._owner = owner
        self._buffer = bytearray()
        self._replies: deque[SMTPResponse | BaseException] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._lines: list[bytes] = []  # the lines of a multi-line reply so far
        self._size = 0

    def data_received(self, data: bytes) -> None:
        if len(self._replies) > _MAX_QUEUED_REPLIES:
            return  # see _put
        self._buffer += data
        while (end := self._buffer.find(b"\n")) != -1:
            line = bytes(self._buffer[: end + 1])
            del self._buffer[: end + 1]
            self._line(line)
        if len(self._buffer) > _MAX_REPLY_LINE:
            self._buffer.clear()
            self._put(_invalid("Response too long"))

    def _line(self, line: bytes) -> None:
        self._size += len(line)
        if len(line) > _MAX_REPLY_LINE or self._size > _MAX_REPLY:
            self._lines, self._size = [], 0
            self._put(_invalid("Response too long"))
            return
        try:
            code = int(line[:3])
        except ValueError:
            self._lines, self._size = [], 0
            self._put(_invalid(f"Malformed SMTP response line: {line[:80]!r}"))
            return
        self._lines.append(line[4:].strip(b" \t\r\n"))
        if line[3:4] != b"-":
            message = b"\n".join(self._lines).decode("utf-8", "surrogateescape")
            self._lines, self._size = [], 0
            self._put(SMTPResponse(code, message))

    def _put(self, reply: SMTPResponse | BaseException) -> None:
        if len(self._replies) >= _MAX_QUEUED_REPLIES:  # a relay that talks unasked
            if len(self._replies) > _MAX_QUEUED_REPLIES:
                return
            reply = _invalid("more replies than commands")
        self._replies.append(reply)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def next(self, seconds: float) -> SMTPResponse:
        if not self._replies:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                async with asyncio.timeout(seconds):
                    await self._waiter
            except TimeoutError:
                raise aiosmtplib.SMTPReadTimeoutError(
                    "Timed out waiting for server response"
                ) from None
            finally:
                self._waiter = None
        reply = self._replies.popleft()
        if isinstance(reply, BaseException):
            raise reply
        return reply

    def eof_received(self) -> bool:
        self._put(aiosmtplib.SMTPServerDisconnected("Unexpected EOF received"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._put(aiosmtplib.SMTPServerDisconnected("Connection lost"))
        self._owner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._owner.pause_writing()

    def resume_writing(self) -> None:
        self._owner.resume_writing()


def relay_tls_context(settings: Settings) -> ssl.SSLContext | None:
    """Verifying context for the relay unless SMTPGATE_RELAY_TLS_VERIFY is off."""
    if settings.relay_tls == "none":
        return None
    context = ssl.create_default_context()
    if not settings.relay_tls_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context
