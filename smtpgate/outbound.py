"""Builds the mails the gateway sends (forwards, acknowledgements, XML responses): pure bytes.

Every mail carries Auto-Submitted and our loop header (spec 2.4) so it can never start a loop.
"""

from __future__ import annotations

import itertools
import os
import secrets
import time
from datetime import UTC, datetime
from email.header import Header
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime

from smtpgate.model import LINE_LIMIT, MailKind, OutboundMail, ascii_domain

LOOP_HEADER = "X-Smtpgate-Loop"
ACTION_HEADER = "X-Smtpgate-Action"


def new_message_id(hostname: str) -> str:
    """Unique without a system call: the time, this process and a counter, plus a random part
    drawn once per process (email.utils.make_msgid asked the system for the pid and for
    randomness on every call)."""
    unique = f"{time.time_ns()}.{_ids.pid}.{next(_ids.counter)}.{_ids.token}"
    return f"<{unique}@{hostname or 'smtpgate.invalid'}>"


class _Ids:
    def __init__(self) -> None:
        self.renew()

    def renew(self) -> None:
        self.pid = os.getpid()
        self.token = secrets.token_hex(4)
        self.counter = itertools.count()


_ids = _Ids()
os.register_at_fork(after_in_child=_ids.renew)  # a forked child: ids of its own


def mail_date() -> str:
    """The Date of a mail we write, now (RFC 5322 3.3), worked out once a second."""
    second = int(time.time())
    if second != _date.second:
        _date.second = second
        _date.text = format_datetime(datetime.fromtimestamp(second, UTC))
    return _date.text


class _Date:
    second = -1
    text = ""


_date = _Date()


# Headers we write ourselves are kept as written: the email package would fold a long
# Message-ID of In-Reply-To/References into an RFC 2047 encoded-word, which no mail client
# reads as a message id (an Outlook id is ~90 characters), so the thread would be lost.
_POLICY = SMTP.clone(refold_source="none")
_POLICY_UTF8 = _POLICY.clone(utf8=True)  # RFC 6532: an address with a non-ASCII local part


def _header_value(value: str) -> str:
    """Header text made safe: no CR/LF injection from subjects or rule names."""
    return " ".join(value.split())


def _threading_ids(ids: tuple[str, ...]) -> list[str]:
    """The message ids that can stand in a header as they are: printable ASCII, one line."""
    # "In-Reply-To: " and the id within 998 characters (RFC 5322 2.1.1)
    return [i for i in ids if i.isascii() and i.isprintable() and " " not in i and len(i) <= 985]


def break_long_lines(data: bytes) -> bytes:
    """`data` with every line over LINE_LIMIT octets broken (the listener takes lines up to
    1 MiB: real alert mail has long HTML lines; a relay that holds to RFC 5321's limit refused
    such a forward, `500 Line too long`, and it went dead, never reaching support). A line is
    broken before white space where it has some within the limit (in a header that is plain
    folding: unfolded it reads as before; in a body a line break), else after LINE_LIMIT
    octets with <CR><LF><SPACE> as Postfix's smtp_line_length_limit does, never inside a UTF-8
    character. Linear in the line: pieces are cut by index, not by re-slicing the rest."""
    out = []
    for line in data.split(b"\r\n"):
        pos, lead = 0, b""  # lead: the space a Postfix-style break puts before the next piece
        while len(line) - pos + len(lead) > LINE_LIMIT:
            end = pos + LINE_LIMIT - len(lead)  # the piece is line[pos:end] at most
            cut = max(line.rfind(b" ", pos + 1, end + 1), line.rfind(b"\t", pos + 1, end + 1))
            if cut > pos:  # the white space starts the next piece
                out.append(lead + line[pos:cut])
                pos, lead = cut, b""
                continue
            cut = end
            # Not inside a UTF-8 character: back over its continuation bytes, 3 at most (bytes
            # that only look like them would else cut the line into 1-byte pieces).
            while cut > max(pos + 1, end - 3) and 0x80 <= line[cut] < 0xC0:
                cut -= 1
            out.append(lead + line[pos:cut])
            pos, lead = cut, b" "
        out.append(lead + line[pos:] if pos or lead else line)
    return b"\r\n".join(out)


def forward_untouched(
    raw: bytes,
    *,
    target: str,
    sender: str,
    connector: str,
    action: str,
    rule: str | None,
    hostname: str,
    has_auto_submitted: bool,
    long_lines: bool = False,
    reason: str | None = None,
) -> OutboundMail:
    """spec 2.4: the original bytes unchanged, with Resent-* and our headers prepended (and,
    when the parser found `long_lines`, lines over 998 octets broken: `break_long_lines`)."""
    message_id = new_message_id(hostname)
    # spec 2.4: the outcome (its action and reason) and the rule that decided it.
    detail = "; ".join(
        [action, *([f"reason={reason}"] if reason else []), *([f"rule={rule}"] if rule else [])]
    )
    detail = _header_value(detail)
    if not detail.isascii():  # a rule's name may be in any language
        detail = Header(detail, "utf-8").encode(linesep="\r\n")  # outbox rows: CRLF only
    # Addresses with their domain in IDNA form; a non-ASCII local part stays UTF-8 (RFC 6532):
    # the envelope then holds it too, so the relay sends with SMTPUTF8.
    lines = [
        f"Resent-From: {ascii_domain(sender)}",
        f"Resent-To: {ascii_domain(target)}",
        f"Resent-Date: {mail_date()}",
        f"Resent-Message-ID: {message_id}",
        f"{ACTION_HEADER}: {detail}",
        f"{LOOP_HEADER}: {ascii_domain(connector)}",
    ]
    if not has_auto_submitted:
        lines.append("Auto-Submitted: auto-generated")
    head = ("\r\n".join(lines) + "\r\n").encode()
    data = head + (break_long_lines(raw) if long_lines else raw)
    return OutboundMail(MailKind.FORWARD, sender, (target,), data, message_id)


def compose(
    *,
    kind: MailKind,
    sender: str,
    to: str,
    subject: str,
    body: str,
    connector: str,
    hostname: str,
    in_reply_to: str | None = None,
    references: tuple[str, ...] = (),
    subtype: str = "plain",
    bcc: tuple[str, ...] = (),
    reply_to: str | None = None,
) -> list[OutboundMail]:
    """A new mail from the gateway (ack or response); BCC copies become their own outbox rows."""
    sender, to = ascii_domain(sender), ascii_domain(to)
    utf8 = not (sender.isascii() and to.isascii())
    msg = EmailMessage(policy=_POLICY_UTF8 if utf8 else _POLICY)
    msg["From"] = sender
    msg["To"] = to
    subject = _header_value(subject)
    if utf8 or subject.isascii():
        msg["Subject"] = subject
    else:
        # Encoded words of our own: Python's folder (3.11, 3.12) drops the space between two
        # encoded words it folds apart ("Hilfe für Müller" read "Hilfe fürMüller").
        encoded = Header(subject, "utf-8", maxlinelen=76, header_name="Subject")
        msg.set_raw("Subject", encoded.encode(linesep="\r\n"))
    msg["Date"] = mail_date()
    message_id = new_message_id(hostname)
    msg["Message-ID"] = message_id
    earlier = tuple(r for r in references if r != in_reply_to)
    thread = _threading_ids((*earlier, in_reply_to)[-20:] if in_reply_to else ())
    if thread and thread[-1] == in_reply_to:
        msg.set_raw("In-Reply-To", in_reply_to)
        msg.set_raw("References", "\r\n ".join(thread))  # folded between ids, never inside
    if reply_to:
        msg["Reply-To"] = ascii_domain(reply_to)
    msg["Auto-Submitted"] = "auto-replied"
    msg["X-Auto-Response-Suppress"] = "All"
    msg[LOOP_HEADER] = ascii_domain(connector)
    # 7-bit unless the mail needs SMTPUTF8 anyway: a relay without 8BITMIME takes it as it is.
    cte = "quoted-printable" if not utf8 and not body.isascii() else None
    msg.set_content(body, subtype=subtype, charset="utf-8", cte=cte)
    data = msg.as_bytes()
    mails = [OutboundMail(kind, sender, (to,), data, message_id)]
    mails.extend(OutboundMail(MailKind.BCC, sender, (addr,), data, None) for addr in bcc)
    return mails
