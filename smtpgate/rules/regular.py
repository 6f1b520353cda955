"""Regular-email rules (spec 2.3, 2.4) as pure functions: ticket tags, auto-replies, loop checks."""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import lru_cache

from smtpgate.mail import BULK_PRECEDENCE, FORWARD_PREFIX, ROBOT_LOCALPARTS, ParsedMessage
from smtpgate.model import address_key


@lru_cache(maxsize=8)
def tag_pattern(word: str) -> re.Pattern[str]:
    """`[Ticket #123]`, tolerant of case, spaces and a missing '#' (spec 2.3.1)."""
    words = r"\s+".join(re.escape(w) for w in word.split())
    return re.compile(rf"\[\s*{words}\s*#?\s*(\d{{1,9}})\s*\]", re.IGNORECASE)


def ticket_tag(word: str, number: int) -> str:
    return f"[{word} #{number}]"


def tagged_numbers(word: str, subject: str) -> list[int]:
    """Ticket numbers tagged in a subject, in order of appearance (reply prefixes don't matter)."""
    return [int(m.group(1)) for m in tag_pattern(word).finditer(subject)]


def is_forward(subject: str) -> bool:
    """Whether the subject says the mail forwards another one (its first prefix): its text
    below the forwarded message's header block is the point of it, not a quote to strip."""
    return FORWARD_PREFIX.match(subject) is not None


# outbound.LOOP_HEADER, matched in the raw header section: every occurrence counts.
_LOOP_FIELD = re.compile(
    rb"^x-smtpgate-loop[ \t]*:[ \t]*<?([^\s<>]+)>?[ \t]*\r?$", re.IGNORECASE | re.MULTILINE
)


def loop_markers(raw: bytes) -> frozenset[str]:
    """spec 2.4: the addresses named by every X-Smtpgate-Loop field of the header section.

    Not only the first: when gateways are chained, another one's header may sit above ours.
    """
    end = len(raw)
    for separator in (b"\r\n\r\n", b"\n\n"):
        found = raw.find(separator, 0, end)
        if found >= 0:
            end = found
    return frozenset(
        m.group(1).decode("utf-8", "replace").lower() for m in _LOOP_FIELD.finditer(raw, 0, end)
    )


# The Message-IDs the gateway writes (outbound.new_message_id): <ns.pid.counter.token@host>.
_OWN_ID = re.compile(r"<[0-9]{16,}\.[0-9]+\.[0-9]+\.[0-9a-f]{8}@([^<>@\s]+)>")


def is_own_message_id(message_id: str | None, hostname: str) -> bool:
    """Whether `message_id` is one the gateway wrote (an acknowledgement or XML response of
    ours, come back under its own id)."""
    m = _OWN_ID.fullmatch(message_id or "")
    return m is not None and m.group(1).lower() == (hostname or "smtpgate.invalid").lower()


# RFC 3464 2.3.2/2.3.1: the recipient a delivery report is about.
_REPORTED = re.compile(
    rb"^(?:final|original)-recipient[ \t]*:[ \t]*rfc822[ \t]*;[ \t]*<?([^\s<>]+)>?",
    re.IGNORECASE | re.MULTILINE,
)


_REPORT_SCAN_BYTES = 2 << 20  # a report's fields are near its start; a big one is not read on


def reports_failure_to(raw: bytes, addresses: Iterable[str]) -> bool:
    """Whether a delivery report is about one of `addresses` (its Final- or
    Original-Recipient field)."""
    keys = {address_key(a) for a in addresses}
    return any(
        address_key(m.group(1).decode("utf-8", "replace")) in keys
        for m in _REPORTED.finditer(raw, 0, _REPORT_SCAN_BYTES)
    )


def is_robot_address(address: str) -> bool:
    local = address.lower().partition("@")[0]
    return local in ROBOT_LOCALPARTS


def is_null_sender(mail_from: str) -> bool:
    """RFC 5321 4.5.5: the null reverse-path; aiosmtpd reports `MAIL FROM:<>` as "<>"."""
    return mail_from.strip() in ("", "<>")


def no_auto_answer_reason(msg: ParsedMessage, mail_from: str) -> str | None:
    """Why no automatic response/ack may be sent for this message (spec 2.4), or None."""
    if is_null_sender(mail_from):
        return "null sender"
    if msg.auto_submitted is not None and msg.auto_submitted != "no":
        # An empty (or comment-only) field is malformed, and no "no": automatic, as RFC 3834's
        # safe reading and spec 2.4's "other than no" have it.
        return f"Auto-Submitted: {msg.auto_submitted or '(empty)'}"
    if msg.precedence in BULK_PRECEDENCE:
        return f"Precedence: {msg.precedence}"
    if msg.list_id:
        return "List-Id"
    if msg.list_unsubscribe:
        return "List-Unsubscribe"
    if msg.auto_response_suppress:
        return "X-Auto-Response-Suppress"
    if is_robot_address(mail_from) or is_robot_address(msg.from_address):
        return "robot sender"
    return None


def is_auto_reply(msg: ParsedMessage, mail_from: str) -> bool:
    """spec 2.3.2: auto-replies, out-of-office and delivery reports (null-sender bounces too)."""
    return msg.is_auto_reply or msg.is_delivery_report or is_null_sender(mail_from)
