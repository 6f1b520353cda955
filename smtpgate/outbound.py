"""Builds the mails the gateway sends (forwards, acknowledgements, XML responses): pure bytes.

Every mail carries Auto-Submitted and our loop header (spec 2.4) so it can never start a loop.
"""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime, make_msgid

from smtpgate.model import MailKind, OutboundMail

LOOP_HEADER = "X-Smtpgate-Loop"
ACTION_HEADER = "X-Smtpgate-Action"


def new_message_id(hostname: str) -> str:
    return make_msgid(idstring=secrets.token_hex(4), domain=hostname or "smtpgate.invalid")


def _header_value(value: str) -> str:
    """Header text made safe: no CR/LF injection from subjects or rule names."""
    return " ".join(value.split())


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
) -> OutboundMail:
    """spec 2.4: the original bytes unchanged, with Resent-* and our headers prepended."""
    message_id = new_message_id(hostname)
    detail = f"{action}; rule={rule}" if rule else action
    lines = [
        f"Resent-From: {sender}",
        f"Resent-To: {target}",
        f"Resent-Date: {format_datetime(datetime.now(UTC))}",
        f"Resent-Message-ID: {message_id}",
        f"{ACTION_HEADER}: {_header_value(detail)}",
        f"{LOOP_HEADER}: {connector}",
    ]
    if not has_auto_submitted:
        lines.append("Auto-Submitted: auto-generated")
    head = ("\r\n".join(lines) + "\r\n").encode("ascii", "replace")
    return OutboundMail(MailKind.FORWARD, sender, (target,), head + raw, message_id)


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
) -> list[OutboundMail]:
    """A new mail from the gateway (ack or response); BCC copies become their own outbox rows."""
    msg = EmailMessage(policy=SMTP)
    msg["From"] = sender
    msg["To"] = to
    msg["Subject"] = _header_value(subject)
    msg["Date"] = format_datetime(datetime.now(UTC))
    message_id = new_message_id(hostname)
    msg["Message-ID"] = message_id
    if in_reply_to:
        msg["In-Reply-To"] = in_reply_to
        msg["References"] = " ".join((*references, in_reply_to)[-20:])
    msg["Auto-Submitted"] = "auto-replied"
    msg["X-Auto-Response-Suppress"] = "All"
    msg[LOOP_HEADER] = connector
    msg.set_content(body, subtype=subtype, charset="utf-8")
    data = msg.as_bytes()
    mails = [OutboundMail(kind, sender, (to,), data, message_id)]
    mails.extend(OutboundMail(MailKind.BCC, sender, (addr,), data, None) for addr in bcc)
    return mails
