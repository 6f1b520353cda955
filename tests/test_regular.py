"""End-to-end: regular email to ticket (spec 2.3) and loop protection (spec 2.4).

Every case runs through a real gateway on loopback, a recording relay and a real SQLite file:
the outcome is read back from the queue row, the mails from what the relay received.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import email
import email.policy
import email.utils
import itertools
import logging
import os
import re
import sqlite3
import tomllib
import unicodedata
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest

from smtpgate import outbound, pipeline
from smtpgate.app import Gateway
from smtpgate.cli import read_rows
from smtpgate.config import parse_rules
from smtpgate.mail import parse_message
from smtpgate.model import Facts, MailKind, Needs, OutboundMail, has_bare_line_end
from smtpgate.pipeline import Context, decide, fingerprint
from smtpgate.rules import regular
from smtpgate.store import ACK_BURST, CONTENT_DUPLICATE_SECONDS
from tests.conftest import (
    FIXTURES,
    GatewayFactory,
    Received,
    RecordingRelay,
    make_settings,
    send,
    simple_message,
    wait_processed,
    wait_until,
)

ACME = "CRDACME0000000000001"
GLOBEX = "CRDGLOBEX00000000002"
CONNECTOR = "connector@localhost"
SUPPORT = "support@msp.example"
RULES = (FIXTURES / "rules.toml").read_text(encoding="utf-8")
FIRST_SUBJECT = "Outlook keeps asking for my password"


# --- helpers --------------------------------------------------------------------------------


def new_id(domain: str = "client.example") -> str:
    return f"<{uuid.uuid4().hex}@{domain}>"


def mail(
    subject: str,
    sender: str = "Jane Roe <jane@acme.example>",
    body: str | None = "Hello.",
    *,
    html: str | None = None,
    headers: Mapping[str, str] | None = None,
    attachments: tuple[tuple[str, str, bytes], ...] = (),
    message_id: str | None = None,
) -> bytes:
    """A realistic client message: text and/or HTML body, attachments, extra headers."""
    msg = EmailMessage(policy=email.policy.SMTP)
    msg["From"] = sender
    msg["To"] = CONNECTOR
    msg["Subject"] = subject
    msg["Date"] = "Thu, 26 Nov 2026 14:00:00 +0000"
    msg["Message-ID"] = message_id or new_id()
    msg["MIME-Version"] = "1.0"
    for key, value in (headers or {}).items():
        msg[key] = value
    if body is not None:
        msg.set_content(body)
        if html is not None:
            msg.add_alternative(html, subtype="html")
    elif html is not None:
        msg.set_content(html, subtype="html")
    for name, ctype, data in attachments:
        maintype, subtype = ctype.split("/")
        msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=name)
    return msg.as_bytes()


def dsn(original_headers: str, *, subject: str = "Undelivered Mail Returned to Sender") -> bytes:
    """An RFC 3464 delivery status notification (multipart/report) as Postfix sends it."""
    boundary = "dsn-boundary-1"
    return (
        f"From: MAILER-DAEMON@mx.acme.example (Mail Delivery System)\r\n"
        f"To: {CONNECTOR}\r\n"
        f"Subject: {subject}\r\n"
        f"Date: Thu, 26 Nov 2026 14:05:00 +0000\r\n"
        f"Message-ID: {new_id('mx.acme.example')}\r\n"
        f"Auto-Submitted: auto-replied\r\n"
        f"MIME-Version: 1.0\r\n"
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"\r\n'
        f"\r\n"
        f"--{boundary}\r\n"
        f"Content-Type: text/plain; charset=us-ascii\r\n\r\n"
        f"This is the mail system at host mx.acme.example.\r\n"
        f"I'm sorry to have to inform you that your message could not be delivered.\r\n\r\n"
        f"--{boundary}\r\n"
        f"Content-Type: message/delivery-status\r\n\r\n"
        f"Reporting-MTA: dns; mx.acme.example\r\n\r\n"
        f"Final-Recipient: rfc822; gone@acme.example\r\n"
        f"Action: failed\r\n"
        f"Status: 5.1.1\r\n\r\n"
        f"--{boundary}\r\n"
        f"Content-Type: text/rfc822-headers\r\n\r\n"
        f"{original_headers}\r\n"
        f"--{boundary}--\r\n"
    ).encode()


async def deliver(
    gw: Gateway, data: bytes, mail_from: str, rcpt: tuple[str, ...] = (CONNECTOR,)
) -> dict[str, Any]:
    """Send one message and return its queue row once processed."""
    assert gw.store is not None
    store = gw.store
    code, text = await send(gw.smtp_port, data, mail_from=mail_from, rcpt=rcpt)
    assert code == 250, text
    queue_id = text.rsplit(" ", 1)[1]

    async def processed() -> bool:
        row = await store.get_inbound(queue_id)
        return row is not None and row["state"] in ("done", "dead")

    await wait_until(processed, what=f"{queue_id} processed")
    row = await store.get_inbound(queue_id)
    assert row is not None
    assert row["state"] == "done", row["last_error"]
    return row


async def settled(gw: Gateway, queue_id: str) -> list[dict[str, Any]]:
    """The outbox rows of one inbound message, once all of them are delivered."""
    assert gw.store is not None
    store = gw.store

    async def rows() -> list[dict[str, Any]]:
        return [r for r in await store.list_outbox(limit=10_000) if r["inbound_id"] == queue_id]

    async def all_done() -> bool:
        return all(r["state"] == "done" for r in await rows())

    await wait_until(all_done, what=f"outbox of {queue_id} delivered")
    return await rows()


def about(relay: RecordingRelay, message_id: str) -> list[Received]:
    """Relay deliveries that carry (forward) or answer (ack/response) a given message."""
    return [m for m in relay.messages if message_id.encode() in m.data]


def sent_pairs(outcome: Mapping[str, Any]) -> list[tuple[str, str]]:
    return sorted((m["kind"], to) for m in outcome["sent"] for to in m["to"])


def assert_forward(received: Received, original: bytes, action: str) -> None:
    """spec 2.4 "forward untouched": original bytes, Resent-* and our headers prepended."""
    assert received.rcpt_tos == [SUPPORT]
    assert received.mail_from == CONNECTOR
    msg = received.message
    assert msg["Resent-From"] == CONNECTOR
    assert msg["Resent-To"] == SUPPORT
    assert msg["Resent-Date"]
    assert msg["Resent-Message-ID"]
    assert str(msg["X-Smtpgate-Action"]).startswith(action)
    assert msg["X-Smtpgate-Loop"] == CONNECTOR
    assert msg["Auto-Submitted"] is not None
    assert msg["Auto-Submitted"] != "no"
    # The original bytes follow our headers and the front's Received: header unchanged.
    assert received.data.endswith(original)


@dataclass
class World:
    """A gateway with the sample accounts/employees loaded and ticket #1 opened by Jane."""

    gw: Gateway
    relay: RecordingRelay
    ack_id: str = ""
    ack_data: bytes = b""
    first_id: str = ""

    @property
    def store(self) -> Any:
        assert self.gw.store is not None
        return self.gw.store


async def load_directory(gw: Gateway, extra_accounts: tuple[dict[str, str], ...] = ()) -> None:
    assert gw.store is not None
    accounts = read_rows(FIXTURES / "accounts.csv", "accounts")
    accounts += [
        (10, {"file_as": "Shared One", "email2": "shared.example"}),
        (11, {"file_as": "Shared Two", "email2": "shared.example"}),
    ]
    accounts += [(20 + i, a) for i, a in enumerate(extra_accounts)]
    await gw.store.import_accounts(accounts)
    await gw.store.import_contacts(
        [(2, {"account_rec_id": GLOBEX, "name": "Bob Partner", "email": "Bob@Partner.example"})]
    )
    employees = read_rows(FIXTURES / "employees.csv", "employees")
    employees.append((3, {"name": "Old Tech", "email1": "old@msp.example", "active": "N"}))
    await gw.store.import_employees(employees)


async def start_world(
    factory: GatewayFactory,
    relay: RecordingRelay,
    *,
    rules: str = RULES,
    open_ticket: bool = True,
    extra_accounts: tuple[dict[str, str], ...] = (),
    **overrides: Any,
) -> World:
    settings: dict[str, Any] = {
        "acknowledge": True,
        "api_enabled": True,
        "api_password": "s3cret",
    }
    settings.update(overrides)
    gw = await factory(rules, **settings)
    await load_directory(gw, extra_accounts)
    world = World(gw, relay)
    if not open_ticket:
        return world
    world.first_id = new_id("acme.example")
    data = mail(FIRST_SUBJECT, body="Outlook asks every few minutes.", message_id=world.first_id)
    row = await deliver(gw, data, "jane@acme.example")
    assert row["outcome"]["action"] == "ticket_created"
    assert row["outcome"]["ticket"] == 1
    await settled(gw, row["id"])
    acks = [m for m in about(relay, world.first_id) if m.rcpt_tos == ["jane@acme.example"]]
    assert len(acks) == (1 if gw.settings.acknowledge else 0)
    for ack in acks:
        world.ack_id = str(ack.message["Message-ID"])
        world.ack_data = ack.data
    return world


# --- golden samples ---------------------------------------------------------------------------


async def test_samples_01_to_08_match_expected_toml(
    gateway_factory: GatewayFactory, relay: RecordingRelay
) -> None:
    """fixtures/expected.toml, processed one by one in file-name order (05-08: this issue)."""
    expected = tomllib.loads((FIXTURES / "expected.toml").read_text(encoding="utf-8"))["messages"]
    gw = await gateway_factory(RULES, acknowledge=True, api_enabled=True, api_password="s3cret")
    assert gw.store is not None
    await gw.store.import_accounts(read_rows(FIXTURES / "accounts.csv", "accounts"))
    await gw.store.import_employees(read_rows(FIXTURES / "employees.csv", "employees"))
    for name, want in expected.items():
        raw = (FIXTURES / name).read_bytes()
        sender = email.message_from_bytes(raw, policy=email.policy.default)["From"].addresses[0]
        row = await deliver(gw, raw, sender.addr_spec)
        out = row["outcome"]
        assert out["path"] == want["path"], name
        assert out["action"] == want["action"], name
        assert out["reason"] == want.get("reason", out["reason"]), name
        if "account" in want:
            assert out["account"] == want["account"], name
        if "ticket" in want:
            assert out["ticket"] == want["ticket"], name
        pairs = sent_pairs(out)
        for key, kind in (
            ("forwarded_to", "forward"),
            ("acknowledged_to", "ack"),
            ("response_to", "response"),
        ):
            if key in want:
                assert (kind, want[key]) in pairs, (name, pairs)
        if want["action"] == "forwarded":
            assert pairs == [("forward", want["forwarded_to"])], name
        await settled(gw, row["id"])
    ticket = await gw.store.get_ticket(3)
    assert ticket is not None
    assert ticket["source"] == "Email"
    assert ticket["account"] == ACME
    # 06 was filed on ticket 3 without the quoted text.
    reply = ticket["history"][-1]["description"]
    assert "It happened again just now." in reply
    assert "We are looking into it." not in reply
    assert (await gw.store.status())["tickets"] == 3  # 07 and 08 opened nothing


# --- the table ----------------------------------------------------------------------------------

Build = Callable[[World], bytes]


@dataclass(frozen=True)
class Case:
    id: str
    build: Build
    action: str
    reason: str | None = None
    mail_from: str | None = None  # None: the From address; "": the null sender
    ticket: int | None = None
    account: str | None = None
    sent: tuple[tuple[str, str], ...] = ()
    notes: tuple[str, ...] = ()  # substrings expected among the outcome notes
    filed_text: str | None = None  # for ticket_reply: text expected in the note on ticket 1
    contact: bool = False  # the new ticket names a contact
    settings: dict[str, Any] = field(default_factory=dict)


FWD = ("forward", SUPPORT)


def _from(data: bytes) -> str:
    msg = email.message_from_bytes(data, policy=email.policy.default)
    addresses = msg["From"].addresses if msg["From"] else ()
    return addresses[0].addr_spec if addresses else ""


def tagged(prefix: str, tag: str = "[Ticket #1]", **kw: Any) -> Build:
    return lambda w: mail(f"{prefix}{tag} {FIRST_SUBJECT}", body="Still broken, thanks.", **kw)


CASES: tuple[Case, ...] = (
    # --- 2.3.1 ticket replies by tag: case, spaces, missing '#', prefixes in many languages ---
    *(
        Case(
            f"tag-{name}",
            tagged(prefix, tag),
            "ticket_reply",
            ticket=1,
            account=ACME,
            sent=(FWD,),
            filed_text="Still broken, thanks.",
        )
        for name, prefix, tag in (
            ("RE", "RE: ", "[Ticket #1]"),
            ("Re-lower-no-hash", "Re: ", "[ticket 1]"),
            ("AW-spaces", "AW: ", "[ Ticket # 1 ]"),
            ("WG-AW-nested", "WG: AW: ", "[TICKET#1]"),
            ("SV-swedish", "SV: ", "[Ticket #1]"),
            ("VS-finnish", "VS: ", "[Ticket #1]"),
            ("FW-Fwd", "Fwd: FW: ", "[Ticket #1]"),
            ("RIF-italian", "R: RIF: ", "[Ticket #1]"),
            ("Re-count", "Re[2]: ", "[Ticket #1]"),
        )
    ),
    Case(
        "tag-in-encoded-word-subject",
        lambda w: mail(
            "=?utf-8?q?AW=3A_=5BTicket_=231=5D_Kennwortabfrage_h=C3=B6rt_nicht_auf?=",
            body="Immer noch.",
        ),
        "ticket_reply",
        ticket=1,
        account=ACME,
        sent=(FWD,),
        filed_text="Immer noch.",
    ),
    Case(
        "tag-reply-from-active-employee-filed-only",
        tagged("RE: ", sender="Dana Tech <Dana@MSP.example>"),
        "ticket_reply",
        reason="employee",
        ticket=1,
        account=ACME,
        sent=(),
        filed_text="Still broken, thanks.",
    ),
    Case(
        "tag-reply-from-inactive-employee-also-forwarded",
        tagged("RE: ", sender="Old Tech <old@msp.example>"),
        "ticket_reply",
        ticket=1,
        account=ACME,
        sent=(FWD,),
    ),
    Case(
        "tag-reply-from-stranger-filed-and-forwarded",
        tagged("Re: ", sender="Mallory <m@elsewhere.example>"),
        "ticket_reply",
        ticket=1,
        account=ACME,
        sent=(FWD,),
    ),
    # --- 2.3.1 threading: In-Reply-To / References naming the acknowledgement or filed mail ---
    Case(
        "in-reply-to-ack-only-gmail",
        lambda w: mail(
            f"Re: {FIRST_SUBJECT}",
            body="Now it also happens on my phone.\n\n"
            "On Thu, Nov 26, 2026 at 1:05 PM Support <connector@localhost> wrote:\n"
            "> Thank you for your message.\n",
            headers={"In-Reply-To": w.ack_id, "References": f"{w.first_id} {w.ack_id}"},
        ),
        "ticket_reply",
        ticket=1,
        account=ACME,
        sent=(FWD,),
        filed_text="Now it also happens on my phone.",
    ),
    Case(
        "references-only-to-filed-message",
        lambda w: mail(
            "Re: something else entirely",
            body="Adding a colleague.",
            headers={"References": f"{w.first_id} <unknown-1@other.example>"},
        ),
        "ticket_reply",
        ticket=1,
        account=ACME,
        sent=(FWD,),
    ),
    Case(
        "in-reply-to-from-employee-filed-only",
        lambda w: mail(
            "Re: ticket",
            sender="dana@msp.example",
            body="Called the customer.",
            headers={"In-Reply-To": w.ack_id},
        ),
        "ticket_reply",
        reason="employee",
        ticket=1,
        account=ACME,
        sent=(),
        filed_text="Called the customer.",
    ),
    Case(
        "missing-ticket-tag-falls-back-to-in-reply-to",
        lambda w: mail(
            "RE: [Ticket #999] Outlook",
            body="x",
            sender="stranger@elsewhere.example",
            headers={"In-Reply-To": w.ack_id},
        ),
        "ticket_reply",
        ticket=1,
        account=ACME,
        sent=(FWD,),
    ),
    # --- a tag of a ticket that does not exist is ignored ---
    Case(
        "missing-ticket-tag-from-stranger-is-forwarded",
        tagged("RE: ", "[Ticket #999]", sender="someone@elsewhere.example"),
        "forwarded",
        reason="unknown_sender",
        sent=(FWD,),
    ),
    Case(
        "missing-ticket-tag-from-customer-opens-ticket",
        tagged("RE: ", "[Ticket #999]"),
        "ticket_created",
        ticket=2,
        account=ACME,
        sent=(("ack", "jane@acme.example"),),
    ),
    # --- 2.3.3 known senders: email1/email2, contact, domain; acknowledgement ---
    Case(
        "known-by-email1",
        lambda w: mail("VPN down", sender="Globex Helpdesk <HelpDesk@globex.example>"),
        "ticket_created",
        ticket=2,
        account=GLOBEX,
        sent=(("ack", "helpdesk@globex.example"),),
    ),
    Case(
        "known-by-contact-address",
        lambda w: mail("New laptop", sender="Bob Partner <bob@partner.example>"),
        "ticket_created",
        ticket=2,
        account=GLOBEX,
        sent=(("ack", "bob@partner.example"),),
        contact=True,
    ),
    Case(
        "known-by-domain",
        lambda w: mail("Printer", sender="Joe <joe@ACME.example>"),
        "ticket_created",
        ticket=2,
        account=ACME,
        sent=(("ack", "joe@acme.example"),),
    ),
    Case(
        "known-by-at-domain",
        lambda w: mail("Server", sender="joe@initrode.example"),
        "ticket_created",
        ticket=2,
        account="CRDINITRODE000000003",
        sent=(("ack", "joe@initrode.example"),),
    ),
    Case(
        "ambiguous-domain-is-unknown",
        lambda w: mail("Who am I", sender="x@shared.example"),
        "forwarded",
        reason="unknown_sender",
        sent=(FWD,),
        notes=("sender domain shared.example names 2 accounts (ambiguous)",),
    ),
    Case(
        "acknowledge-off-no-ack",
        lambda w: mail("Printer", sender="joe@acme.example"),
        "ticket_created",
        ticket=2,
        account=ACME,
        sent=(),
        settings={"acknowledge": False},
    ),
    # --- 2.4 no automatic answer: ticket yes, acknowledgement no ---
    Case(
        "known-bulk-no-ack",
        lambda w: mail("Newsletter", sender="news@acme.example", headers={"Precedence": "bulk"}),
        "ticket_created",
        ticket=2,
        account=ACME,
        notes=("no acknowledgement: Precedence: bulk",),
    ),
    Case(
        "known-junk-no-ack",
        lambda w: mail("Spam", sender="x@acme.example", headers={"Precedence": "junk"}),
        "ticket_created",
        ticket=2,
        account=ACME,
        notes=("no acknowledgement",),
    ),
    Case(
        "known-list-id-no-ack",
        lambda w: mail(
            "[it-list] Outage",
            sender="list@acme.example",
            headers={"List-Id": "<it.acme.example>", "Precedence": "list"},
        ),
        "ticket_created",
        ticket=2,
        account=ACME,
        notes=("no acknowledgement",),
    ),
    Case(
        # Bulk senders (ESPs, RFC 8058 one-click unsubscribe) often set no Precedence/List-Id.
        "known-list-unsubscribe-no-ack",
        lambda w: mail(
            "Acme November newsletter",
            sender="news@acme.example",
            headers={
                "List-Unsubscribe": "<https://acme.example/unsub?u=1>",
                "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
            },
        ),
        "ticket_created",
        ticket=2,
        account=ACME,
        notes=("no acknowledgement: List-Unsubscribe",),
    ),
    Case(
        "known-x-auto-response-suppress-no-ack",
        lambda w: mail(
            "Meeting notes",
            sender="boss@acme.example",
            headers={"X-Auto-Response-Suppress": "All"},
        ),
        "ticket_created",
        ticket=2,
        account=ACME,
        notes=("no acknowledgement: X-Auto-Response-Suppress",),
    ),
    Case(
        "known-auto-generated-no-ack",
        lambda w: mail(
            "Backup report", sender="nas@acme.example", headers={"Auto-Submitted": "auto-generated"}
        ),
        "ticket_created",
        ticket=2,
        account=ACME,
        notes=("no acknowledgement: Auto-Submitted",),
    ),
    Case(
        "known-postmaster-no-ack",
        lambda w: mail("Mailbox quota policy", sender="postmaster@acme.example"),
        "ticket_created",
        ticket=2,
        account=ACME,
        notes=("no acknowledgement",),
    ),
    Case(
        # The parser's robot names and the acknowledgement's were two lists, apart.
        "known-mail-daemon-no-ack",
        lambda w: mail("Delivery problem", sender="mail-daemon@acme.example"),
        "ticket_created",
        ticket=2,
        account=ACME,
        notes=("no acknowledgement",),
    ),
    Case(
        "known-own-from-address-no-ack",
        lambda w: mail("Test from the gateway address", sender="gateway@msp.example"),
        "ticket_created",
        ticket=2,
        notes=("no acknowledgement",),
        settings={"from_address": "gateway@msp.example"},
    ),
    # --- 2.3.2 auto-replies that are not ticket replies: forwarded, never a ticket/ack ---
    Case(
        "ooo-auto-submitted",
        lambda w: mail(
            f"Automatic reply: {FIRST_SUBJECT}",
            body="I am out of the office until Monday.",
            headers={"Auto-Submitted": "auto-replied"},
        ),
        "forwarded",
        reason="auto_reply",
        sent=(FWD,),
    ),
    Case(
        "ooo-x-autoreply-header-only",
        lambda w: mail("Away", body="Back on Monday.", headers={"X-Autoreply": "yes"}),
        "forwarded",
        reason="auto_reply",
        sent=(FWD,),
    ),
    Case(
        # RFC 3834 allows a comment: Dovecot Pigeonhole and Cyrus write it so.
        "ooo-auto-submitted-with-comment",
        lambda w: mail(
            "Thanks for your message",
            body="I am away until Monday.",
            headers={"Auto-Submitted": "auto-replied (vacation)"},
        ),
        "forwarded",
        reason="auto_reply",
        sent=(FWD,),
    ),
    Case(
        "ooo-german-subject-answering-a-mail",
        lambda w: mail(
            "Abwesenheitsnotiz: Drucker",
            body="Ich bin bis Montag nicht im Büro.",
            headers={"In-Reply-To": new_id("msp.example")},
        ),
        "forwarded",
        reason="auto_reply",
        sent=(FWD,),
    ),
    Case(
        # The same kind of subject on a new mail with no sign of automation is a request.
        "ooo-subject-on-a-request",
        lambda w: mail("Out of Office: please set it up for Jane", body="She is away."),
        "ticket_created",
        ticket=2,
        account=ACME,
        sent=(("ack", "jane@acme.example"),),
    ),
    Case(
        "ooo-from-stranger",
        lambda w: mail(
            "Out of Office: hello",
            sender="someone@elsewhere.example",
            headers={"Auto-Submitted": "auto-replied"},
        ),
        "forwarded",
        reason="auto_reply",
        sent=(FWD,),
    ),
    Case(
        "dsn-null-sender-bounce",
        lambda w: dsn(
            "From: jane@acme.example\r\nTo: gone@acme.example\r\nSubject: hi\r\n"
            "Message-ID: <orig-1@acme.example>\r\n"
        ),
        "forwarded",
        reason="auto_reply",
        mail_from="",
        sent=(FWD,),
    ),
    Case(
        "null-sender-plain-message",
        lambda w: mail("Notification", body="Your password expires soon."),
        "forwarded",
        reason="auto_reply",
        mail_from="",
        sent=(FWD,),
    ),
    Case(
        "read-receipt-mdn",
        lambda w: (
            b"From: jane@acme.example\r\nTo: connector@localhost\r\n"
            b"Subject: Read: Outlook\r\nMessage-ID: " + new_id().encode() + b"\r\n"
            b"MIME-Version: 1.0\r\n"
            b'Content-Type: multipart/report; report-type=disposition-notification; boundary="b"'
            b"\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\nYour message was read.\r\n"
            b"--b\r\nContent-Type: message/disposition-notification\r\n\r\n"
            b"Final-Recipient: rfc822; jane@acme.example\r\n"
            b"Disposition: manual-action/MDN-sent-manually; displayed\r\n--b--\r\n"
        ),
        "forwarded",
        reason="auto_reply",
        sent=(FWD,),
    ),
    # An auto-reply that is a ticket reply is filed (and forwarded), never acknowledged.
    Case(
        "ooo-with-tag-is-ticket-reply",
        lambda w: mail(
            f"Automatic reply: [Ticket #1] {FIRST_SUBJECT}",
            body="I am out of the office.",
            headers={"Auto-Submitted": "auto-replied"},
        ),
        "ticket_reply",
        ticket=1,
        account=ACME,
        sent=(FWD,),
    ),
    # --- 2.4 our loop header came back: recorded, not processed ---
    Case(
        "own-ack-returned",
        lambda w: w.ack_data,
        "ignored",
        reason="loop",
        mail_from="jane@acme.example",
    ),
    Case(
        "own-loop-header-below-another-gateways",
        lambda w: (
            b"Resent-From: helpdesk@other-gateway.example\r\n"
            b"X-Smtpgate-Loop: helpdesk@other-gateway.example\r\n" + w.ack_data
        ),
        "ignored",
        reason="loop",
        mail_from="helpdesk@other-gateway.example",
    ),
    Case(
        "foreign-loop-header-only-is-processed",
        lambda w: mail(
            "Hello", sender="x@elsewhere.example", headers={"X-Smtpgate-Loop": "gw@other.example"}
        ),
        "forwarded",
        reason="unknown_sender",
        sent=(FWD,),
    ),
    Case(
        "bounce-of-own-ack",
        lambda w: dsn(
            w.ack_data.split(b"\r\n\r\n", 1)[0].decode(),
            subject="Undeliverable: [Ticket #1] " + FIRST_SUBJECT,
        ),
        "ignored",
        reason="loop",
        mail_from="",
    ),
    # --- 2.3.4 unknown senders ---
    Case(
        "unknown-sender",
        lambda w: mail("Partnership proposal", sender="Someone <someone@elsewhere.example>"),
        "forwarded",
        reason="unknown_sender",
        sent=(FWD,),
    ),
    Case(
        "unknown-sender-auto-submitted-no",
        lambda w: mail("Question", sender="q@elsewhere.example", headers={"Auto-Submitted": "no"}),
        "forwarded",
        reason="unknown_sender",
        sent=(FWD,),
    ),
    Case(
        "own-gateway-address-without-loop-header",
        lambda w: mail("Spoofed", sender=CONNECTOR),
        "forwarded",
        reason="unknown_sender",
        sent=(FWD,),
    ),
)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
async def test_regular_email(
    case: Case, gateway_factory: GatewayFactory, relay: RecordingRelay
) -> None:
    extra = (
        {"file_as": "MSP Internal", "email1": "gateway@msp.example"},
        {"rec_id": "CRDINITRODE000000003", "file_as": "Initrode", "email2": "@initrode.example"},
    )
    world = await start_world(gateway_factory, relay, extra_accounts=extra, **case.settings)
    store = world.store
    before = await store.get_ticket(1)
    data = case.build(world)
    mail_from = _from(data) if case.mail_from is None else case.mail_from
    seen = len(relay.messages)
    row = await deliver(world.gw, data, mail_from)
    out = row["outcome"]

    assert out["path"] == "regular"
    assert out["action"] == case.action
    assert out["reason"] == case.reason
    assert out["ticket"] == case.ticket
    if case.account is not None:
        assert out["account"] == case.account
    assert sent_pairs(out) == sorted(case.sent)
    for note in case.notes:
        assert any(note in n for n in out["notes"]), out["notes"]

    rows = await settled(world.gw, row["id"])
    assert sorted((r["kind"], to) for r in rows for to in r["recipients"]) == sorted(case.sent)
    message_id = row["message_id"]
    if message_id:
        delivered = [m for m in relay.messages[seen:] if message_id.encode() in m.data]
        assert len(delivered) == len(case.sent)
        for received in delivered:
            if received.rcpt_tos == [SUPPORT]:
                assert_forward(received, data, case.action)

    # The raw message is always kept.
    assert await store.raw_message(row["id"]) is not None
    tickets = (await store.status())["tickets"]
    after = await store.get_ticket(1)
    if case.action == "ticket_reply":
        assert len(after["history"]) == len(before["history"]) + 1
        note = after["history"][-1]
        assert note["inbound_id"] == row["id"]
        if case.filed_text:
            assert case.filed_text in note["description"]
            assert "> " not in note["description"]  # quoted text stripped
        assert tickets == 1
    else:
        assert after["history"] == before["history"]
    if case.action == "ticket_created":
        assert tickets == 2
        ticket = await store.get_ticket(2)
        assert ticket["source"] == "Email"
        assert ticket["account"] == out["account"]
        assert (ticket["contact"] is not None) == case.contact
        acks = [m for m in relay.messages if m.rcpt_tos == [mail_from.lower()]]
        if ("ack", mail_from.lower()) in case.sent:
            ack = acks[-1].message
            assert "[Ticket #2]" in str(ack["Subject"])
            assert ack["Auto-Submitted"] == "auto-replied"
            assert ack["X-Smtpgate-Loop"] == CONNECTOR
            assert ack["In-Reply-To"] == message_id
    elif case.action != "ticket_reply":
        assert tickets == 1  # never a ticket


# --- acknowledgement threading, duplicates, loop-backs, the hourly cap ------------------------


async def test_ack_carries_tag_and_its_message_id_threads_the_reply(
    gateway_factory: GatewayFactory, relay: RecordingRelay
) -> None:
    world = await start_world(gateway_factory, relay)
    ack = email.message_from_bytes(world.ack_data, policy=email.policy.default)
    assert ack["Subject"] == f"[Ticket #1] {FIRST_SUBJECT}"
    assert ack["To"] == "jane@acme.example"
    assert ack["From"] == CONNECTOR
    assert ack["In-Reply-To"] == world.first_id
    assert ack["Auto-Submitted"] == "auto-replied"
    assert ack["X-Smtpgate-Loop"] == CONNECTOR
    assert ack["Reply-To"] is None  # sent from the connector: replies come back to it anyway
    # Outlook replies without keeping the tag; only In-Reply-To names the acknowledgement.
    reply = mail(
        f"RE: {FIRST_SUBJECT}",
        body="Thanks!\n\n-----Original Message-----\nFrom: Support <connector@localhost>\n"
        "Sent: Thursday\nSubject: [Ticket #1]\n\nThank you for your message.",
        headers={"In-Reply-To": world.ack_id, "Thread-Index": "AdlBcDEfGh=="},
    )
    row = await deliver(world.gw, reply, "jane@acme.example")
    assert row["outcome"]["action"] == "ticket_reply"
    assert row["outcome"]["rules_hit"][-1] == "in_reply_to"
    note = (await world.store.get_ticket(1))["history"][-1]["description"]
    assert "Thanks!" in note
    assert "Thank you for your message." not in note


async def test_an_ack_from_a_mailbox_that_is_no_connector_asks_for_replies_to_the_connector(
    gateway_factory: GatewayFactory, relay: RecordingRelay
) -> None:
    """SMTPGATE_FROM_ADDRESS may be a helpdesk mailbox people read: a customer's reply to the
    acknowledgement went there, not to the connector, and never reached the ticket."""
    world = await start_world(gateway_factory, relay, from_address="helpdesk@msp.example")
    ack = email.message_from_bytes(world.ack_data, policy=email.policy.default)
    assert ack["From"] == "helpdesk@msp.example"
    assert ack["Reply-To"] == CONNECTOR


def head_lines(data: bytes) -> list[bytes]:
    """A mail's header fields as sent, each unfolded (continuation lines joined)."""
    return data.split(b"\r\n\r\n", 1)[0].replace(b"\r\n ", b" ").split(b"\r\n")


async def test_ack_threads_under_a_long_message_id_as_written(
    gateway_factory: GatewayFactory, relay: RecordingRelay
) -> None:
    """Outlook and Microsoft 365 ids are ~90 characters. The email package folded such a
    header into an RFC 2047 encoded-word, which mail clients do not read as a message id: the
    acknowledgement did not thread under the customer's mail."""
    world = await start_world(gateway_factory, relay, open_ticket=False)
    long_id = (
        "<PH0PR11MB5611D3F2A8B1C4E7F9A0B2C3D4E5F6A7B8C9D@PH0PR11MB5611.namprd11.prod.outlook.com>"
    )
    earlier = new_id("acme.example")
    data = mail("Printer jams", message_id=long_id, headers={"References": earlier})
    row = await deliver(world.gw, data, "jane@acme.example")
    assert row["outcome"]["action"] == "ticket_created"
    await settled(world.gw, row["id"])
    (ack,) = relay.to("jane@acme.example")
    fields = head_lines(ack.data)
    assert f"In-Reply-To: {long_id}".encode() in fields
    assert f"References: {earlier} {long_id}".encode() in fields
    assert all(len(line) <= 998 for line in ack.data.split(b"\r\n"))


def forward_of(action: str, rule: str | None = None) -> OutboundMail:
    """A forward of a small message to support, as the pipeline builds one."""
    return outbound.forward_untouched(
        b"Subject: x\r\n\r\nbody\r\n",
        target=SUPPORT,
        sender=CONNECTOR,
        connector=CONNECTOR,
        action=action,
        rule=rule,
        hostname="gateway.test",
        has_auto_submitted=False,
    )


@pytest.mark.parametrize("size", [2_000, 2 << 20], ids=["small", "over-1MiB"])
def test_long_lines_are_told_by_the_parser(size: int) -> None:
    short = b"x" * 76 + b"\r\n"
    head = b"From: a@example.org\r\nSubject: s\r\n\r\n"
    body = short * (size // len(short))
    assert not parse_message(head + body).long_lines
    assert parse_message(head + body + b"y" * 999 + b"\r\n").long_lines
    assert not parse_message(head + body + b"y" * 998).long_lines


def test_long_lines_break_before_white_space_or_between_characters() -> None:
    """Before white space where a line has it (in a header that is plain folding: unfolded it
    reads as before), else after 998 octets with <CR><LF><SPACE> as Postfix does, never inside
    a UTF-8 character (600 × "é" cut in half read as two broken lines); in linear time."""
    limit = outbound.LINE_LIMIT
    words = b"Subject: " + b" ".join([b"word"] * 400)  # 2,008 octets
    folded = outbound.break_long_lines(words)
    assert max(len(line) for line in folded.split(b"\r\n")) <= limit
    assert folded.replace(b"\r\n", b"") == words  # folding: nothing added, nothing lost
    accents = b"Subject: " + "é".encode() * 600
    broken = outbound.break_long_lines(accents)
    lines = broken.split(b"\r\n")
    assert max(len(line) for line in lines) <= limit
    for line in lines:
        line.decode()  # each line whole UTF-8
    assert b"".join(lines).replace(b" ", b"") == accents.replace(b" ", b"")
    assert lines[0] == b"Subject:"
    solid = b"y" * 2000
    assert outbound.break_long_lines(solid) == b"y" * 998 + b"\r\n " + b"y" * 997 + b"\r\n yyyyy"
    huge = (b"z" * 5_000 + b" ") * 400  # 2 MB on one line: linear, not a copy per piece
    assert max(len(line) for line in outbound.break_long_lines(huge).split(b"\r\n")) <= limit
    # Bytes that all look like UTF-8 continuations (no character to keep whole): the cut steps
    # back at most 3 bytes, so pieces stay ~998 long (it stepped back to 1-byte pieces: 80 s
    # and 4x the size for a 1 MiB line, in the decision's transaction).
    hostile = outbound.break_long_lines(b"\x80" * 100_000).split(b"\r\n")
    assert len(hostile) < 110
    assert all(len(line) <= limit for line in hostile)


def test_a_long_non_ascii_rule_name_is_folded_with_crlf_in_a_forward() -> None:
    """Header.encode() folds with a bare LF by default: the outbox holds CRLF only."""
    fwd = forward_of(
        "automated_skipped",
        rule="Überwachungsregel für Kunden mit Störungsmeldungen aus dem Rechenzentrum",
    )
    assert not has_bare_line_end(fwd.data)
    parsed = email.message_from_bytes(fwd.data, policy=email.policy.default)
    assert "Störungsmeldungen" in str(parsed["X-Smtpgate-Action"])


def test_our_mails_carry_the_current_date_and_ids_unique_across_processes() -> None:
    """The Date (worked out once a second) is now, and every message id differs, in a forked
    child too (its ids are drawn anew, not its parent's counter over again)."""
    before = datetime.now(UTC).replace(microsecond=0)
    fwd = forward_of("forwarded")
    parsed = email.message_from_bytes(fwd.data, policy=email.policy.default)
    assert before <= email.utils.parsedate_to_datetime(parsed["Resent-Date"]) <= datetime.now(UTC)
    assert parsed["Resent-Message-ID"] == fwd.message_id
    ids = [outbound.new_message_id("gateway.test") for _ in range(10_000)]
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"<[0-9a-f.]+@gateway\.test>", i) for i in ids)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its first ids, to the parent
        os.write(write, " ".join(outbound.new_message_id("x") for _ in range(3)).encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    with os.fdopen(read, "rb") as pipe:
        childs = pipe.read().decode().split()
    ours = [outbound.new_message_id("x") for _ in range(3)]
    assert len(childs) == 3
    assert not set(childs) & set(ours)
    assert {i.split(".")[3] for i in childs}.isdisjoint(i.split(".")[3] for i in ours)


def test_composed_mail_is_7bit_unless_it_needs_smtputf8_anyway() -> None:
    """A relay without 8BITMIME takes our acknowledgements and responses as they are."""
    common: dict[str, Any] = {
        "kind": MailKind.ACK,
        "sender": CONNECTOR,
        "subject": "Grüße",
        "body": "Ihr Ticket wurde eröffnet.\n",
        "connector": CONNECTOR,
        "hostname": "gateway.test",
    }
    (plain,) = outbound.compose(to="jane@acme.example", **common)
    assert plain.data.isascii()
    parsed = email.message_from_bytes(plain.data, policy=email.policy.default)
    assert parsed.get_content() == "Ihr Ticket wurde eröffnet.\r\n"
    (utf8,) = outbound.compose(to="jörg@acme.example", **common)  # sent with SMTPUTF8
    assert "Ihr Ticket wurde eröffnet.".encode() in utf8.data


@pytest.mark.parametrize(
    "subject",
    [
        "[Ticket #1] Drucker kaputt – bitte Hilfe für Müller",
        "[Ticket #12] " + "Störung im Netzwerk der Zweigstelle Süd, " * 6 + "bitte prüfen",
        '[Ticket #3] ünïcödé two spaces, a quote " and =?encoded?= look-alikes',
        "[Ticket #4] 日本語 の 件名 です",
    ],
)
@pytest.mark.parametrize("to", ["jane@acme.example", "jörg@acme.example"])
def test_composed_subject_reads_back_as_written(subject: str, to: str) -> None:
    """Python's folder (3.11–3.12) loses the space between two encoded words it folds apart:
    "Hilfe für Müller" read "Hilfe fürMüller" in every customer's mail client."""
    (ack,) = outbound.compose(
        kind=MailKind.ACK,
        sender=CONNECTOR,
        to=to,
        subject=subject,
        body="Ihr Ticket wurde eröffnet.\n",
        connector=CONNECTOR,
        hostname="gateway.test",
    )
    parsed = email.message_from_bytes(ack.data, policy=email.policy.default)
    assert parsed["Subject"] == subject
    head = ack.data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    assert max(len(line) for line in head) <= 998
    if to.isascii():  # encoded words: RFC 2047 2 allows 76 characters a line holding them
        start = next(i for i, line in enumerate(head) if line.startswith(b"Subject:"))
        folded = [head[start], *itertools.takewhile(lambda ln: ln[:1] == b" ", head[start + 1 :])]
        assert max(len(line) for line in folded) <= 76, folded
    if to.isascii():
        assert ack.data.isascii()


async def test_ack_to_a_non_ascii_address_names_it_in_utf8(
    gateway_factory: GatewayFactory, relay: RecordingRelay
) -> None:
    """RFC 6532: an address with a non-ASCII local part stands in the header as UTF-8 (sent
    with SMTPUTF8); an encoded-word inside an address is no address at all (RFC 2047 5)."""
    world = await start_world(gateway_factory, relay, open_ticket=False)
    data = mail("Drucker").replace(  # as an SMTPUTF8 client writes it; acme.example: Acme
        b"From: Jane Roe <jane@acme.example>", "From: Jörg Müller <jörg@acme.example>".encode()
    )
    row = await deliver(world.gw, data, "bounces@acme.example")
    assert row["outcome"]["action"] == "ticket_created"
    await settled(world.gw, row["id"])
    (ack,) = relay.to("jörg@acme.example")
    assert "To: jörg@acme.example".encode() in head_lines(ack.data)


async def test_a_new_ticket_keeps_the_forwarded_message_it_was_sent_with(
    gateway_factory: GatewayFactory, relay: RecordingRelay
) -> None:
    """A customer forwards the error mail they got: the forwarded part is the request."""
    world = await start_world(gateway_factory, relay, open_ticket=False)
    body = (
        "Hi, we keep getting this, please have a look.\n\n"
        "---------- Forwarded message ---------\n"
        "From: Backup Server <backup@acme.example>\nSubject: Backup job FAILED\n\n"
        "Job Nightly failed: VSS error 0x800423f4 on volume D:\n"
    )
    row = await deliver(world.gw, mail("Fwd: Backup job FAILED", body=body), "jane@acme.example")
    assert row["outcome"]["action"] == "ticket_created"
    ticket = await world.store.get_ticket(row["outcome"]["ticket"])
    assert "0x800423f4" in ticket["details"]
    assert "0x800423f4" in ticket["history"][-1]["description"]


async def test_an_internationalized_connector_writes_its_ascii_form_and_stops_its_loop(
    gateway_factory: GatewayFactory, relay: RecordingRelay
) -> None:
    """Headers name the connector with its domain in IDNA form (they were sent with "?" for
    each non-ASCII letter), and the loop header is recognised in any spelling: a forward sent
    back used to be forwarded again and again."""
    connector, ascii_connector = "tickets@bücher.example", "tickets@xn--bcher-kva.example"
    world = await start_world(
        gateway_factory, relay, open_ticket=False, connector_addresses=connector
    )
    to = (ascii_connector,)
    original = b"From: someone@elsewhere.example\r\nSubject: Partnership\r\n\r\nHello\r\n"
    row = await deliver(world.gw, original, "someone@elsewhere.example", to)
    assert row["outcome"]["reason"] == "unknown_sender"
    await settled(world.gw, row["id"])
    (forward,) = relay.to(SUPPORT)
    fields = head_lines(forward.data)
    assert f"Resent-From: {ascii_connector}".encode() in fields
    assert f"X-Smtpgate-Loop: {ascii_connector}".encode() in fields
    again = await deliver(world.gw, forward.data, SUPPORT, to)  # no Message-ID: no duplicate
    assert (again["outcome"]["action"], again["outcome"]["reason"]) == ("ignored", "loop")
    # An acknowledgement comes from the ASCII form too.
    row = await deliver(world.gw, mail("Printer"), "jane@acme.example", to)
    await settled(world.gw, row["id"])
    (ack,) = relay.to("jane@acme.example")
    assert f"From: {ascii_connector}".encode() in head_lines(ack.data)


@pytest.mark.parametrize(
    "written", ["Message-ID:\r\n <{id}>", "Message-ID: {id}"], ids=["folded", "no-brackets"]
)
async def test_a_reply_threads_to_a_message_whatever_the_form_of_its_message_id(
    gateway_factory: GatewayFactory, relay: RecordingRelay, written: str
) -> None:
    """The filed message's Message-ID is remembered as the parser reads it (unfolded, in angle
    brackets), the form a reply's In-Reply-To is looked up in: a colleague's reply-all files on
    the ticket instead of opening a second one."""
    world = await start_world(gateway_factory, relay, open_ticket=False)
    bare = new_id("acme.example")[1:-1]
    first = mail("Printer broken", message_id=f"<{bare}>")
    first = first.replace(f"Message-ID: <{bare}>".encode(), written.format(id=bare).encode())
    row = await deliver(world.gw, first, "jane@acme.example")
    assert row["outcome"]["action"] == "ticket_created"
    reply = mail(
        "RE: Printer broken",
        sender="Mallory <m@elsewhere.example>",
        headers={"In-Reply-To": f"<{bare}>", "References": f"<{bare}>"},
    )
    row = await deliver(world.gw, reply, "m@elsewhere.example")
    assert row["outcome"]["action"] == "ticket_reply"
    assert row["outcome"]["ticket"] == 1


async def test_duplicate_message_id_opens_one_ticket_and_sends_one_ack(
    gateway_factory: GatewayFactory, relay: RecordingRelay
) -> None:
    world = await start_world(gateway_factory, relay, open_ticket=False)
    data = mail("Same twice", sender="joe@acme.example", message_id="<dup-1@acme.example>")
    first = await deliver(world.gw, data, "joe@acme.example")
    second = await deliver(world.gw, data, "joe@acme.example")
    assert first["outcome"]["action"] == "ticket_created"
    assert second["outcome"]["action"] == "duplicate"
    assert second["outcome"]["reason"] == "message_id"
    assert second["outcome"]["sent"] == []
    assert await settled(world.gw, second["id"]) == []
    assert (await world.store.status())["tickets"] == 1
    # Without a Message-ID, a hash of the content decides.
    raw = b"From: joe@acme.example\r\nTo: connector@localhost\r\nSubject: no id\r\n\r\nHi\r\n"
    a = await deliver(world.gw, raw, "joe@acme.example")
    b = await deliver(world.gw, raw, "joe@acme.example")
    assert (a["outcome"]["action"], b["outcome"]["action"]) == ("ticket_created", "duplicate")
    assert b["outcome"]["reason"] == "content_hash"
    assert (await world.store.status())["tickets"] == 2


async def test_a_copy_without_a_message_id_by_another_route_is_a_duplicate(
    gateway_factory: GatewayFactory, relay: RecordingRelay, tmp_path: Path
) -> None:
    """spec 2.4: without a Message-ID, a hash of the content. The hash took in every header
    field after our Received: line, so a copy that came again through a backup MX (its
    Received: and a spam filter's fields on top) opened a second ticket; and `explain` did not
    say that a copy of such a message would be a duplicate."""
    world = await start_world(gateway_factory, relay, open_ticket=False)
    raw = (
        b"Received: from mta.acme.example by mx1.acme.example; Thu, 26 Nov 2026 10:00:00 +0000\r\n"
        b"From: joe@acme.example\r\nTo: connector@localhost\r\nSubject: UPS on battery\r\n"
        b"Date: Thu, 26 Nov 2026 10:00:00 +0000\r\n\r\nOn battery since 09:59.\r\n"
    )
    by_backup_mx = (
        b"Received: from mx1.acme.example by backup-mx.msp.example; Thu, 26 Nov 2026 10:05:00"
        b" +0000\r\nX-Spam-Status: No, score=0.1\r\nReceived-SPF: pass\r\n" + raw
    )
    first = await deliver(world.gw, raw, "joe@acme.example")
    again = await deliver(world.gw, by_backup_mx, "joe@acme.example")
    assert first["outcome"]["action"] == "ticket_created"
    assert (again["outcome"]["action"], again["outcome"]["reason"]) == ("duplicate", "content_hash")
    assert (await world.store.status())["tickets"] == 1
    # The same alert an hour later (another Date): a new one.
    later = raw.replace(b"10:00:00", b"11:00:00")
    assert (await deliver(world.gw, later, "joe@acme.example"))["outcome"]["action"] == (
        "ticket_created"
    )
    # explain of the message as a mail client saved it (its own trace fields on top, LF line
    # ends) says a copy would be a duplicate.
    saved = tmp_path / "saved.eml"
    saved.write_bytes(
        b"Return-Path: <joe@acme.example>\nDelivered-To: support@msp.example\n"
        + by_backup_mx.replace(b"\r\n", b"\n")
    )
    msg = parse_message(saved.read_bytes())
    ctx = Context(world.gw.settings, world.gw.rules)
    decision = await decide(saved.read_bytes(), "joe@acme.example", msg, ctx, world.store)
    outcome = await world.store.simulate(
        decision,
        None,
        content_key=pipeline.dedupe_key(None, saved.read_bytes()),
        hourly_limit=20,
    )
    assert any(f"already processed as {first['id']}" in n for n in outcome.notes), outcome.notes


UPS_ALERT = (
    b"From: ups@acme.example\r\nTo: connector@localhost\r\nSubject: UPS on battery\r\n"
    b"\r\nUPS-1 is on battery power.\r\n"
)


def through_the_customers_relay(queue_id: str, when: str) -> bytes:
    """UPS_ALERT as the customer's Postfix passes it on: its Received:, and no Message-ID nor
    Date added for a LAN client (Postfix >= 2.6, local_header_rewrite_clients)."""
    return (
        f"Received: from ups1.lan (ups1.lan [10.0.0.9])\r\n\tby mx1.acme.example (Postfix)"
        f" with ESMTP id {queue_id}\r\n\tfor <connector@localhost>; Thu, 26 Nov 2026 {when}"
        f" +0000 (UTC)\r\n"
    ).encode() + UPS_ALERT


async def test_the_same_alert_again_through_the_customers_relay_is_a_new_one(
    gateway_factory: GatewayFactory, relay: RecordingRelay
) -> None:
    """Two power failures an hour apart, relayed: the copies differ only in the relay's
    Received: (time, queue id). Dropping every Received: from the hash made the second a
    `duplicate` no one heard of; the first hop's Received: is the message's own."""
    world = await start_world(gateway_factory, relay, open_ticket=False)
    first = through_the_customers_relay("4Qx1A2B3C4", "10:00:00")
    again = through_the_customers_relay("4Qx9Z8Y7X6", "11:00:00")
    assert (await deliver(world.gw, first, "ups@acme.example"))["outcome"]["action"] == (
        "ticket_created"
    )
    outcome = (await deliver(world.gw, again, "ups@acme.example"))["outcome"]
    assert outcome["action"] == "ticket_created", outcome


async def test_a_relayed_alert_after_the_same_one_straight_to_the_mx_is_a_new_one(
    gateway_factory: GatewayFactory, relay: RecordingRelay
) -> None:
    """The UPS's relay was down at 10:00, so it sent "on battery" straight to the MX; at 14:00
    the next power failure went through the relay. Matching a copy's content from below the
    fields on top as well (to catch a device's copy through the backup MX) made this second
    outage a `duplicate` no one heard of: the two look alike, and a missed alert is worse
    than a second ticket."""
    world = await start_world(gateway_factory, relay, open_ticket=False)
    assert (await deliver(world.gw, UPS_ALERT, "ups@acme.example"))["outcome"]["action"] == (
        "ticket_created"
    )
    later = through_the_customers_relay("4Qx9Z8Y7X6", "14:00:00")
    outcome = (await deliver(world.gw, later, "ups@acme.example"))["outcome"]
    assert outcome["action"] == "ticket_created", outcome


@pytest.mark.parametrize(
    "saved",
    [
        # an mbox's "From " line (Thunderbird, mutt, formail), LF line ends
        b"From - Thu Nov 26 10:00:05 2026\nReturn-Path: <ups@acme.example>\n"
        + UPS_ALERT.replace(b"\r\n", b"\n"),
        # Thunderbird's own fields on top
        b"X-Mozilla-Status: 0001\r\nX-Mozilla-Status2: 00000000\r\nX-Mozilla-Keys: \r\n"
        b"Return-Path: <ups@acme.example>\r\nDelivered-To: alerts@msp.example\r\n" + UPS_ALERT,
        # written without its last line end
        UPS_ALERT.replace(b"\r\n", b"\n").rstrip(b"\n"),
    ],
    ids=["mbox-from-line", "thunderbird-fields", "no-final-line-end"],
)
async def test_explain_of_a_saved_copy_says_it_would_be_a_duplicate(
    gateway_factory: GatewayFactory, relay: RecordingRelay, saved: bytes
) -> None:
    """What a mailbox or a client adds to a message saved from it (an mbox line, its own fields,
    LF line ends, no last newline) is not the content SMTP carried: explain said nothing of the
    duplicate the gateway would make of the copy."""
    world = await start_world(gateway_factory, relay, open_ticket=False)
    first = await deliver(world.gw, UPS_ALERT, "ups@acme.example")
    assert first["outcome"]["action"] == "ticket_created"
    msg = parse_message(saved)
    ctx = Context(world.gw.settings, world.gw.rules)
    decision = await decide(saved, "ups@acme.example", msg, ctx, world.store)
    outcome = await world.store.simulate(
        decision, None, content_key=pipeline.dedupe_key(None, saved), hourly_limit=20
    )
    assert any(f"already processed as {first['id']}" in n for n in outcome.notes), outcome.notes


async def test_explain_says_until_when_a_copy_is_a_duplicate(
    gateway_factory: GatewayFactory, relay: RecordingRelay
) -> None:
    """The window runs from the copy that was processed, not from now: 23 hours after it,
    explain still said "a new copy within 24 hours would be a duplicate"."""
    world = await start_world(gateway_factory, relay, open_ticket=False)
    first = await deliver(world.gw, UPS_ALERT, "ups@acme.example")
    processed_at = datetime.now(UTC).timestamp() - 23 * 3600
    with contextlib.closing(sqlite3.connect(world.gw.settings.db_path)) as db, db:
        db.execute(
            "UPDATE seen_messages SET seen_at = ? WHERE key = ?",
            (processed_at, pipeline.dedupe_key(None, UPS_ALERT)),
        )
    msg = parse_message(UPS_ALERT)
    ctx = Context(world.gw.settings, world.gw.rules)
    decision = await decide(UPS_ALERT, "ups@acme.example", msg, ctx, world.store)
    outcome = await world.store.simulate(
        decision, None, content_key=pipeline.dedupe_key(None, UPS_ALERT), hourly_limit=20
    )
    until = datetime.fromtimestamp(processed_at + 24 * 3600, UTC).strftime("%Y-%m-%d %H:%M")
    notes = [n for n in outcome.notes if first["id"] in n]
    assert any(f"until {until} UTC" in n for n in notes), notes


async def test_a_forward_with_lines_over_998_octets_reaches_a_relay_that_enforces_them(
    gateway_factory: GatewayFactory, relay: RecordingRelay
) -> None:
    """The listener takes lines up to 1 MiB (real alert mail has long HTML lines), but a
    forward sent as it was got `500 Line too long` from a relay that holds to RFC 5321's 998
    octets (as the recording relay, aiosmtpd, does) and went dead: the alert never reached
    support. Long lines are broken before white space, else as Postfix's smtp_line_length_limit
    does (<CR><LF><SPACE> after 998 octets)."""
    world = await start_world(gateway_factory, relay, open_ticket=False)
    raw = (
        b"From: stranger@nowhere.example\r\nTo: connector@localhost\r\nSubject: long\r\n"
        b"X-Long: " + b"h" * 1500 + b"\r\nMessage-ID: <long-1@nowhere.example>\r\n"
        b"Content-Type: text/html\r\n\r\n<p>" + b"word " * 1000 + b"</p>\r\nshort\r\n"
    )
    row = await deliver(world.gw, raw, "stranger@nowhere.example")
    assert row["outcome"]["action"] == "forwarded"
    assert [r["state"] for r in await settled(world.gw, row["id"])] == ["done"]
    [forward] = relay.to(world.gw.settings.internal_support_address)
    assert max(len(line) for line in forward.data.split(b"\r\n")) <= 998
    # The body's line broken before spaces (exact once unfolded), the header without any
    # after 998 octets with a space put in (as Postfix does).
    assert b"<p>" + b"word " * 1000 + b"</p>\r\nshort\r\n" in forward.data.replace(b"\r\n ", b" ")
    assert b"X-Long:\r\n " + b"h" * 997 + b"\r\n " + b"h" * 503 + b"\r\n" in forward.data


async def test_a_message_id_reused_with_other_content_goes_to_support(
    gateway_factory: GatewayFactory, relay: RecordingRelay
) -> None:
    """spec 2.4 keys duplicates on the Message-ID. A device or script that sends every alert
    with one fixed Message-ID had each later alert recorded as a `duplicate` and seen by no
    one. Another body under a known Message-ID is still no second ticket, but it is forwarded
    to support untouched, once; a copy of the same body (other headers: another route) stays
    a plain duplicate."""
    world = await start_world(gateway_factory, relay, open_ticket=False)
    fixed = "<alert@ups.acme.example>"
    first = mail("UPS on battery", sender="joe@acme.example", message_id=fixed, body="Battery.")
    row = await deliver(world.gw, first, "joe@acme.example")
    assert row["outcome"]["action"] == "ticket_created"
    await settled(world.gw, row["id"])
    # The same message by another route: a header more, the same body.
    again = await deliver(world.gw, b"X-Relayed-By: backup-mx\r\n" + first, "joe@acme.example")
    assert (again["outcome"]["action"], again["outcome"]["reason"]) == ("duplicate", "message_id")
    assert again["outcome"]["sent"] == []
    # The next alert under the same Message-ID.
    later = mail("UPS back on mains", sender="joe@acme.example", message_id=fixed, body="Mains.")
    reused = await deliver(world.gw, later, "joe@acme.example")
    outcome = reused["outcome"]
    assert (outcome["action"], outcome["reason"]) == ("duplicate", "message_id_reused")
    assert outcome["sent"] == [{"kind": "forward", "to": [SUPPORT]}]
    assert outcome["notes"] == [
        f"Message-ID {fixed} was first processed as {row['id']} with other content: forwarded"
        " untouched"
    ]
    await settled(world.gw, reused["id"])
    (forward,) = [m for m in relay.to(SUPPORT) if m.message["Subject"] == "UPS back on mains"]
    assert (
        forward.message["X-Smtpgate-Action"]
        == "duplicate; reason=message_id_reused; rule=known_sender"
    )
    assert forward.data.endswith(later)  # untouched
    # That copy again: a plain duplicate now.
    last = await deliver(world.gw, later, "joe@acme.example")
    assert (last["outcome"]["action"], last["outcome"]["reason"]) == ("duplicate", "message_id")
    assert (await world.store.status())["tickets"] == 1


async def test_a_message_id_seen_before_fingerprints_were_kept_is_a_plain_duplicate(
    gateway_factory: GatewayFactory, relay: RecordingRelay
) -> None:
    """A Message-ID processed before this version kept no fingerprint: its next copy is a
    duplicate as before (a sender's redelivery after the upgrade is not sent to support); from
    then on a copy with another body is told."""
    world = await start_world(gateway_factory, relay, open_ticket=False)
    fixed = "<old@acme.example>"
    first = mail("Printer", sender="joe@acme.example", message_id=fixed, body="One.")
    row = await deliver(world.gw, first, "joe@acme.example")
    with contextlib.closing(sqlite3.connect(world.gw.settings.db_path, timeout=10)) as db, db:
        gone = db.execute("DELETE FROM seen_messages WHERE key LIKE 'fp%'").rowcount
    assert gone == 1  # the first copy's fingerprint
    other = mail("Printer again", sender="joe@acme.example", message_id=fixed, body="Two.")
    copy = await deliver(world.gw, other, "joe@acme.example")
    assert (copy["outcome"]["action"], copy["outcome"]["reason"]) == ("duplicate", "message_id")
    third = mail("Printer still", sender="joe@acme.example", message_id=fixed, body="Three.")
    told = await deliver(world.gw, third, "joe@acme.example")
    assert told["outcome"]["reason"] == "message_id_reused"
    assert row["id"] != told["id"]


async def test_same_content_without_ids_a_day_later_is_new_mail(
    gateway_factory: GatewayFactory, relay: RecordingRelay
) -> None:
    """A device that sends no Message-ID and no Date sends the same bytes for the same alert
    every time: a copy a sender redelivers (our 250 lost) comes within hours, but the next
    day's identical mail is a new event, not a duplicate to record and tell no one of."""
    world = await start_world(gateway_factory, relay, open_ticket=False)
    raw = (
        b"From: joe@acme.example\r\nTo: connector@localhost\r\n"
        b"Subject: UPS on battery\r\n\r\nOn battery\r\n"
    )
    first = await deliver(world.gw, raw, "joe@acme.example")
    assert first["outcome"]["action"] == "ticket_created"
    with contextlib.closing(sqlite3.connect(world.gw.settings.db_path, timeout=10)) as db, db:
        aged = db.execute(
            "UPDATE seen_messages SET seen_at = seen_at - ? WHERE inbound_id = ?",
            (CONTENT_DUPLICATE_SECONDS + 60, first["id"]),
        ).rowcount
    assert aged == 1
    later = await deliver(world.gw, raw, "joe@acme.example")
    assert later["outcome"]["action"] == "ticket_created"
    again = await deliver(world.gw, raw, "joe@acme.example")  # within the window of `later`
    assert again["outcome"]["action"] == "duplicate"
    assert again["outcome"]["notes"] == [f"first processed as {later['id']}"]
    assert (await world.store.status())["tickets"] == 2
    # A Message-ID is an identity, not a content: it never expires.
    data = mail("Same id", sender="joe@acme.example", message_id="<once@acme.example>")
    once = await deliver(world.gw, data, "joe@acme.example")
    with contextlib.closing(sqlite3.connect(world.gw.settings.db_path, timeout=10)) as db, db:
        db.execute(
            "UPDATE seen_messages SET seen_at = seen_at - ? WHERE inbound_id = ?",
            (100 * CONTENT_DUPLICATE_SECONDS, once["id"]),
        )
    assert (await deliver(world.gw, data, "joe@acme.example"))["outcome"]["action"] == "duplicate"


async def test_retention_forgets_content_hashes_past_the_window(
    gateway_factory: GatewayFactory, relay: RecordingRelay
) -> None:
    world = await start_world(gateway_factory, relay, open_ticket=False)
    raw = b"From: joe@acme.example\r\nTo: connector@localhost\r\nSubject: no id\r\n\r\nHi\r\n"
    first = await deliver(world.gw, raw, "joe@acme.example")
    kept = await deliver(
        world.gw, mail("Kept", message_id="<kept@acme.example>"), "joe@acme.example"
    )
    with contextlib.closing(sqlite3.connect(world.gw.settings.db_path, timeout=10)) as db, db:
        db.execute(
            "UPDATE seen_messages SET seen_at = seen_at - ?", (CONTENT_DUPLICATE_SECONDS + 60,)
        )
    await world.store.purge(30)
    with contextlib.closing(sqlite3.connect(world.gw.settings.db_path, timeout=10)) as db:
        left = db.execute("SELECT key, inbound_id FROM seen_messages ORDER BY key").fetchall()
    assert [(key.partition(":")[0], inbound) for key, inbound in left] == [
        ("<kept@acme.example>", kept["id"]),
        ("fp", kept["id"]),  # its fingerprint (a Message-ID reused for other content)
    ]
    assert first["id"] != kept["id"]
    with contextlib.closing(sqlite3.connect(world.gw.settings.db_path, timeout=10)) as db, db:
        db.execute("UPDATE seen_messages SET seen_at = seen_at - ?", (31 * 86400,))
    await world.store.purge(30)
    with contextlib.closing(sqlite3.connect(world.gw.settings.db_path, timeout=10)) as db:
        left = db.execute("SELECT key FROM seen_messages").fetchall()
    assert sorted(key.partition(":")[0] for (key,) in left) == ["<kept@acme.example>", "fp"]


async def test_own_forward_sent_back_is_recorded_not_processed(
    gateway_factory: GatewayFactory, relay: RecordingRelay
) -> None:
    world = await start_world(gateway_factory, relay, open_ticket=False)
    original = mail("Partnership", sender="someone@elsewhere.example")
    row = await deliver(world.gw, original, "someone@elsewhere.example")
    await settled(world.gw, row["id"])
    (forward,) = relay.to(SUPPORT)
    # support@ has a rule that sends everything back to the connector:
    again = await deliver(world.gw, forward.data, SUPPORT)
    assert again["outcome"]["action"] == "ignored"
    assert again["outcome"]["reason"] == "loop"
    assert again["outcome"]["sent"] == []
    assert await settled(world.gw, again["id"]) == []
    assert await world.store.raw_message(again["id"]) is not None  # recorded
    # A sentinel goes through after it: the loop produced nothing in between.
    sentinel = await deliver(world.gw, mail("sentinel", sender="s@elsewhere.example"), "s@x.org")
    await settled(world.gw, sentinel["id"])
    assert len(relay.to(SUPPORT)) == 2
    assert (await world.store.status())["tickets"] == 0


async def test_hourly_cap_per_recipient_suppresses_further_acks(
    gateway_factory: GatewayFactory, relay: RecordingRelay
) -> None:
    world = await start_world(gateway_factory, relay, auto_mail_hourly_limit=1)
    # Jane already got one acknowledgement this hour (ticket #1).
    row = await deliver(world.gw, mail("Another problem"), "jane@acme.example")
    out = row["outcome"]
    assert out["action"] == "ticket_created"
    assert out["ticket"] == 2
    assert out["sent"] == []
    assert any("hourly cap" in n for n in out["notes"])
    # Another recipient is not affected by Jane's cap.
    row = await deliver(world.gw, mail("VPN", sender="joe@acme.example"), "joe@acme.example")
    assert sent_pairs(row["outcome"]) == [("ack", "joe@acme.example")]
    # Forwards to support are not automatic answers: never capped.
    for i in range(3):
        row = await deliver(world.gw, mail(f"x{i}", sender="a@elsewhere.example"), "a@x.org")
        assert sent_pairs(row["outcome"]) == [FWD]


# --- 2.3 quote stripping and HTML/attachments --------------------------------------------------

QUOTES: tuple[tuple[str, str], ...] = (
    (
        "outlook-original-message",
        "-----Original Message-----\nFrom: Support <connector@localhost>\n"
        "Sent: Thursday, November 26, 2026 1:05 PM\nTo: Jane\nSubject: [Ticket #1]\n\nQUOTED",
    ),
    (
        "outlook-underscore-rule",
        "________________________________\nFrom: Support\nSent: Thursday\n\nQUOTED",
    ),
    (
        "outlook-german-von",
        "Von: Support <connector@localhost>\nGesendet: Donnerstag, 26. November 2026\n\nQUOTED",
    ),
    (
        "gmail-on-wrote",
        "On Thu, Nov 26, 2026 at 1:05 PM Support <connector@localhost> wrote:\n\n> QUOTED",
    ),
    (
        "gmail-on-wrote-wrapped",
        "On Thu, Nov 26, 2026 at 1:05 PM Support Team of the MSP <\nconnector@localhost>"
        " wrote:\n\n> QUOTED",
    ),
    (
        "gmail-attribution-wrapped-before-wrote",
        "On Thu, 26 Nov 2026 at 13:05, Support Team of the MSP <connector@localhost>\n"
        "wrote:\n\n> QUOTED",
    ),
    (
        "apple-mail",
        "> On 26 Nov 2026, at 13:05, Support <connector@localhost> wrote:\n>\n> QUOTED",
    ),
    ("thunderbird", "On 26/11/2026 13:05, Support wrote:\n> QUOTED"),
    (
        "german-schrieb",
        "Am Do., 26. Nov. 2026 um 13:05 Uhr schrieb Support <connector@localhost>:\n\n> QUOTED",
    ),
    (
        "french-a-ecrit",
        "Le jeu. 26 nov. 2026 à 13:05, Support <connector@localhost> a écrit :\n\n> QUOTED",
    ),
    ("angle-quoting-only", "> QUOTED\n> more QUOTED"),
    (
        "telekom-original-nachricht",
        "-----Original-Nachricht-----\nBetreff: [Ticket #1] x\nDatum: 2026-11-26T14:05:00+0100\n"
        'Von: "Support" <connector@localhost>\nAn: "Jane Roe" <jane@acme.example>\n\nQUOTED',
    ),
    (
        "zimbra-german",
        '----- Ursprüngliche Mail -----\nVon: "Support" <connector@localhost>\nAn: Jane\n'
        "Gesendet: Donnerstag, 26. November 2026 14:05:00\nBetreff: [Ticket #1] x\n\nQUOTED",
    ),
    (
        "zoho",
        "---- On Thu, 26 Nov 2026 13:05:00 +0100 Support <connector@localhost> wrote ----\n\n"
        "> QUOTED",
    ),
    (
        "gmx-plain-text-date-first",
        "Gesendet: Donnerstag, 26. November 2026 um 14:05 Uhr\n"
        'Von: "Support" <connector@localhost>\nAn: "Jane Roe" <jane@acme.example>\n'
        "Betreff: [Ticket #1] x\n\nQUOTED",
    ),
)


@pytest.mark.parametrize(("shape", "quote"), QUOTES, ids=[q[0] for q in QUOTES])
async def test_quote_stripping_files_new_text_and_keeps_raw(
    shape: str, quote: str, gateway_factory: GatewayFactory, relay: RecordingRelay
) -> None:
    world = await start_world(gateway_factory, relay)
    body = f"NEWTEXT line one.\nSecond line.\n\n{quote}\n"
    row = await deliver(world.gw, mail("RE: [Ticket #1] x", body=body), "jane@acme.example")
    assert row["outcome"]["action"] == "ticket_reply", shape
    note = (await world.store.get_ticket(1))["history"][-1]["description"]
    assert note.endswith("\n\nNEWTEXT line one.\nSecond line.")  # no separator left over
    assert "QUOTED" not in note
    assert "connector@localhost" not in note.split("\n\n", 1)[1]  # no attribution residue
    assert "wrote:" not in note
    raw = await world.store.raw_message(row["id"])
    assert raw is not None
    assert b"QUOTED" in raw  # the raw message is always kept


async def test_quote_patterns_are_configurable(
    gateway_factory: GatewayFactory, relay: RecordingRelay
) -> None:
    rules = 'quote_patterns = ["^=+ reply above this line =+$", "wrote:$"]\n' + RULES
    world = await start_world(gateway_factory, relay, rules=rules)
    for body in (
        "Fixed, thanks.\n===== reply above this line =====\nOLD TEXT\n",
        "Fixed, thanks.\nRegards, Jane\nSupport wrote:\nOLD TEXT\n",
    ):
        row = await deliver(world.gw, mail("RE: [Ticket #1] x", body=body), "jane@acme.example")
        assert row["outcome"]["action"] == "ticket_reply"
        note = (await world.store.get_ticket(1))["history"][-1]["description"]
        assert "Fixed, thanks." in note
        assert "OLD TEXT" not in note
    # An unanchored pattern matching a line on its own never eats the line above it.
    assert "Regards, Jane" in note
    # The default patterns are replaced: an Outlook separator is filed as text now.
    body = "Hi\n-----Original Message-----\nOLD TEXT\n"
    await deliver(world.gw, mail("RE: [Ticket #1] x", body=body), "jane@acme.example")
    assert "OLD TEXT" in (await world.store.get_ticket(1))["history"][-1]["description"]


async def test_custom_ticket_tag_word(
    gateway_factory: GatewayFactory, relay: RecordingRelay
) -> None:
    world = await start_world(gateway_factory, relay, rules='ticket_tag = "Case"\n' + RULES)
    ack = email.message_from_bytes(world.ack_data, policy=email.policy.default)
    assert str(ack["Subject"]).startswith("[Case #1]")
    row = await deliver(world.gw, mail("AW: [case 1] x"), "jane@acme.example")
    assert row["outcome"]["action"] == "ticket_reply"
    row = await deliver(world.gw, mail("AW: [Ticket #1] x"), "jane@acme.example")
    assert row["outcome"]["action"] == "ticket_created"  # the default word no longer tags


HTML = (
    "<html><head><style>p {color: red}</style><title>t</title></head><body>"
    "<p>Hello&nbsp;team,</p><p>the <b>scanner</b> &amp; printer are offline.</p>"
    "<table><tr><td>Room</td><td>2.14</td></tr></table>"
    "<script>alert(1)</script></body></html>"
)


async def test_html_only_mail_filed_as_text_with_attachments_listed(
    gateway_factory: GatewayFactory, relay: RecordingRelay
) -> None:
    world = await start_world(gateway_factory, relay, open_ticket=False)
    pdf = b"%PDF-1.4 " + b"x" * 1000
    png = b"\x89PNG\r\n\x1a\n" + b"\0" * 300
    data = mail(
        "Scanner offline",
        sender="joe@acme.example",
        body=None,
        html=HTML,
        attachments=(
            ("report.pdf", "application/pdf", pdf),
            ("screen.png", "image/png", png),
            ("Rechnung März.txt", "text/plain", b"Summe: 10 EUR\n"),
        ),
    )
    row = await deliver(world.gw, data, "joe@acme.example")
    assert row["outcome"]["action"] == "ticket_created"
    ticket = await world.store.get_ticket(1)
    for text in (ticket["details"], ticket["history"][0]["description"]):
        assert "Hello team," in text.replace("\xa0", " ")
        assert "the scanner & printer are offline." in text
        assert "<" not in text.replace("<joe@acme.example>", "")
        assert "alert(1)" not in text
        assert "color: red" not in text
    note = ticket["history"][0]
    assert "report.pdf (application/pdf, 1009 bytes)" in note["description"]
    assert "screen.png (image/png, 308 bytes)" in note["description"]
    assert note["attachments"] == [
        {"filename": "report.pdf", "content_type": "application/pdf", "size": 1009},
        {"filename": "screen.png", "content_type": "image/png", "size": 308},
        {"filename": "Rechnung März.txt", "content_type": "text/plain", "size": 14},
    ]
    assert "Summe" not in ticket["details"]  # a text attachment is not the body


async def test_the_text_below_a_pasted_screenshot_reaches_the_ticket(
    gateway_factory: GatewayFactory, relay: RecordingRelay
) -> None:
    """A web mailer sends a pasted screenshot as a ~3 MB data: URI in an HTML-only mail: the
    HTML source was cut at 2,000,000 characters, inside the <img> tag, and everything written
    below the picture was missing from the ticket."""
    world = await start_world(gateway_factory, relay, open_ticket=False)
    picture = base64.b64encode(bytes(range(256)) * 9000).decode()
    html = (
        "<html><body><p>Hello, the printer shows this error:</p>"
        f'<p><img src="data:image/png;base64,{picture}"></p>'
        "<p>It started after the Windows update yesterday. Please call me on 555-0100.</p>"
        "</body></html>"
    )
    data = mail("Printer error after update", body=None, html=html)
    row = await deliver(world.gw, data, "jane@acme.example")
    assert row["outcome"]["action"] == "ticket_created"
    ticket = await world.store.get_ticket(row["outcome"]["ticket"])
    assert ticket["details"] == (
        "Hello, the printer shows this error:\n\n"
        "It started after the Windows update yesterday. Please call me on 555-0100."
    )


def gmx_reply(sent: str, date: str, sender: str, to: str, subject: str) -> str:
    """A GMX / WEB.DE (German) or mail.com (English) HTML reply: the quote in a <div
    name="quote"> (no <blockquote>), its header block with the date before the sender."""
    return (
        '<html><body><div style="font-family: Verdana;font-size: 12.0px;"><div>Works again, '
        'thank you!</div>\n<div>&nbsp;\n<div>&nbsp;\n<div name="quote" style="margin:10px '
        '5px 5px 10px; padding: 10px 0 10px 10px; border-left:2px solid #C3D9E5;">\n'
        f'<div style="margin:0 0 10px 0;"><b>{sent}:</b>&nbsp;{date}<br/>\n'
        f"<b>{sender}:</b>&nbsp;&quot;Support&quot; &lt;connector@localhost&gt;<br/>\n"
        f"<b>{to}:</b>&nbsp;&quot;Jane Roe&quot; &lt;jane@acme.example&gt;<br/>\n"
        f"<b>{subject}:</b>&nbsp;[Ticket #1] x</div>\n\n"
        '<div name="quoted-content">OLD QUOTED TEXT<br/>\n<br/>\nMore of it.</div>\n'
        "</div>\n</div>\n</div></div></body></html>"
    )


HTML_REPLIES: tuple[tuple[str, str], ...] = (
    (
        "gmail",
        '<div dir="ltr">Works again, thank you!</div><br><div class="gmail_quote">'
        '<div dir="ltr" class="gmail_attr">On Thu, Nov 26, 2026 at 1:05 PM Support &lt;'
        '<a href="mailto:connector@localhost">connector@localhost</a>&gt; wrote:<br></div>'
        '<blockquote class="gmail_quote">OLD QUOTED TEXT</blockquote></div>',
    ),
    (
        "outlook-web",
        "<html><body><div>Works again, thank you!</div><hr><div id=divRplyFwdMsg>"
        "<b>From:</b> Support &lt;connector@localhost&gt;<br><b>Sent:</b> Thursday<br>"
        "<b>Subject:</b> [Ticket #1] x</div><div>OLD QUOTED TEXT</div></body></html>",
    ),
    (
        "outlook-desktop-german",
        "<html><body><p class=MsoNormal>Works again, thank you!<o:p></o:p></p>"
        '<div style="border:none;border-top:solid #E1E1E1 1.0pt"><p class=MsoNormal>'
        "<b><span lang=DE>Von:</span></b><span lang=DE> Support &lt;connector@localhost&gt;"
        "<br><b>Gesendet:</b> Donnerstag</span></p></div><p>OLD QUOTED TEXT</p></body></html>",
    ),
    (
        "gmx-de",
        gmx_reply("Gesendet", "Donnerstag, 26. November 2026 um 14:05 Uhr", "Von", "An", "Betreff"),
    ),
    (
        "mailcom-en",
        gmx_reply("Sent", "Thursday, November 26, 2026 at 2:05 PM", "From", "To", "Subject"),
    ),
)


@pytest.mark.parametrize(("client", "html"), HTML_REPLIES, ids=[h[0] for h in HTML_REPLIES])
async def test_html_only_reply_is_filed_as_stripped_text(
    client: str, html: str, gateway_factory: GatewayFactory, relay: RecordingRelay
) -> None:
    world = await start_world(gateway_factory, relay)
    data = mail("Re: [Ticket #1] x", body=None, html=html)
    row = await deliver(world.gw, data, "jane@acme.example")
    assert row["outcome"]["action"] == "ticket_reply", client
    note = (await world.store.get_ticket(1))["history"][-1]["description"]
    assert "Works again, thank you!" in note
    assert "OLD QUOTED TEXT" not in note
    assert "connector@localhost" not in note.split("\n\n", 1)[1]  # nor the header block
    assert "<div" not in note
    assert "<b>" not in note


async def test_known_sender_needs_no_rules_file(
    gateway_factory: GatewayFactory, relay: RecordingRelay
) -> None:
    """spec 2.3.3 always matches senders; account_by_sender only governs the automated branch."""
    world = await start_world(gateway_factory, relay, rules="", open_ticket=False)
    assert world.gw.rules.account_by_sender is False
    row = await deliver(world.gw, mail("Help", sender="joe@acme.example"), "joe@acme.example")
    assert row["outcome"]["action"] == "ticket_created"
    assert row["outcome"]["account"] == ACME


# --- found by a review of the regular branch (27 November 2026) ----------------------------


async def test_forward_into_a_ticket_keeps_the_forwarded_text(
    gateway_factory: GatewayFactory, relay: RecordingRelay
) -> None:
    """A technician forwards the vendor's answer into ticket #1: "FW:" is no reply, and the
    forwarded message is the content; only "FYI" was filed (the forwarded block starts with a
    "From: Name <address>" line, a quote header of a reply)."""
    world = await start_world(gateway_factory, relay)
    body = (
        "FYI, the vendor's answer for this ticket.\n\n"
        "---------- Forwarded message ---------\n"
        "From: Vendor Support <help@vendor.example>\n"
        "Date: Thu, 26 Nov 2026 at 13:05\n"
        "Subject: License\n\n"
        "Your license key ABC-123 expired; the renewal is on its way.\n"
    )
    data = mail("FW: [Ticket #1] License", sender="Dana Tech <dana@msp.example>", body=body)
    row = await deliver(world.gw, data, "dana@msp.example")
    assert row["outcome"]["action"] == "ticket_reply"
    assert row["outcome"]["sent"] == []  # an employee's mail is only filed: the note is all
    note = (await world.store.get_ticket(1))["history"][-1]["description"]
    assert "license key ABC-123 expired" in note


@pytest.mark.parametrize(
    "prefix", ["PD:", "转发:", "轉寄:", "전달:", "İLT:", "ΠΡΘ:", "Továbbítás:", "PŘ:"]
)
async def test_a_localized_forward_into_a_ticket_keeps_the_forwarded_text(
    gateway_factory: GatewayFactory, relay: RecordingRelay, prefix: str
) -> None:
    """Outlook's forward prefix in Polish, Chinese, Korean, Turkish, Greek, Hungarian or Czech
    was taken for a reply's: a technician forwarding the vendor's answer onto the ticket got
    the note cut at the vendor mail's header block, and the vendor's text was lost."""
    world = await start_world(gateway_factory, relay)
    body = (
        "Vendor's answer below.\n\n"
        "From: Vendor Support <support@vendor.example>\n"
        "Sent: Thursday, November 26, 2026 12:00 PM\n"
        "To: Dana Tech <dana@msp.example>\n"
        "Subject: Case 12345 - licence\n\n"
        "Your licence for the backup agent expired on 20 November; renew it in the portal.\n"
    )
    subject = f"{prefix} [Ticket #1] {FIRST_SUBJECT}"
    data = mail(subject, sender="Dana Tech <dana@msp.example>", body=body)
    row = await deliver(world.gw, data, "dana@msp.example")
    assert (row["outcome"]["action"], row["outcome"]["reason"]) == ("ticket_reply", "employee")
    note = (await world.store.get_ticket(1))["history"][-1]["description"]
    assert "licence for the backup agent expired" in note


SCREENSHOT = ("screenshot.png", "image/png", b"\x89PNG\r\n\x1a\n" + b"\0" * 60)
ALL_QUOTE = (
    "\n\n\nFrom: Support <connector@localhost>\nSent: Thursday, November 26, 2026 2:05 PM\n"
    "To: Jane Roe <jane@acme.example>\nSubject: [Ticket #1] Outlook keeps asking for my password"
    "\n\nThank you for your message. We have opened ticket 1 and will be in touch.\n"
)


async def test_a_reply_that_brings_only_an_attachment_files_no_quote(
    gateway_factory: GatewayFactory, relay: RecordingRelay
) -> None:
    """A customer answers "here is the screenshot" with the attachment alone (Outlook, nothing
    typed above the quote): with nothing left once the quote was cut, the whole text was filed,
    our acknowledgement again as if it were the customer's words."""
    world = await start_world(gateway_factory, relay)
    data = mail(
        "RE: [Ticket #1] Outlook keeps asking for my password",
        body=ALL_QUOTE,
        headers={"In-Reply-To": world.ack_id},
        attachments=(SCREENSHOT,),
    )
    row = await deliver(world.gw, data, "jane@acme.example")
    assert row["outcome"]["action"] == "ticket_reply"
    note = (await world.store.get_ticket(1))["history"][-1]["description"]
    assert note == (
        "From: Jane Roe <jane@acme.example>\n"
        "Subject: RE: [Ticket #1] Outlook keeps asking for my password\n"
        "Attachments: screenshot.png (image/png, 68 bytes)"
    )


@pytest.mark.parametrize(
    ("subject", "answers", "attachments"),
    [
        # an answer with nothing but the quote (answers written into it unmarked, a slip)
        ("RE: [Ticket #1] x", True, ()),
        # a mail put onto the ticket by its tag alone, all of it a forwarded block
        ("[Ticket #1] the vendor's answer", False, (SCREENSHOT,)),
    ],
    ids=["answer-without-attachments", "no-answer-with-attachments"],
)
async def test_a_mail_that_is_all_quote_otherwise_files_its_whole_text(
    gateway_factory: GatewayFactory,
    relay: RecordingRelay,
    subject: str,
    answers: bool,
    attachments: tuple[tuple[str, str, bytes], ...],
) -> None:
    """Only an answer to a mail that brings attachments is filed without its all-quote text:
    without them the note would say nothing, and a mail that answers none (no In-Reply-To or
    References) is more likely a forward without a prefix, whose "quote" is its content."""
    world = await start_world(gateway_factory, relay)
    headers = {"In-Reply-To": world.ack_id} if answers else {}
    data = mail(subject, body=ALL_QUOTE, headers=headers, attachments=attachments)
    row = await deliver(world.gw, data, "jane@acme.example")
    assert row["outcome"]["action"] == "ticket_reply"
    note = (await world.store.get_ticket(1))["history"][-1]["description"]
    assert note.endswith("We have opened ticket 1 and will be in touch.")


async def test_a_new_ticket_without_text_has_a_note_without_blank_lines(
    gateway_factory: GatewayFactory, relay: RecordingRelay
) -> None:
    """A scan sent with an empty body opens a ticket whose note ends with its attachments."""
    world = await start_world(gateway_factory, relay, open_ticket=False)
    data = mail("Scan", body="\n", attachments=(SCREENSHOT,))
    row = await deliver(world.gw, data, "jane@acme.example")
    note = (await world.store.get_ticket(row["outcome"]["ticket"]))["history"][0]["description"]
    assert note == (
        "From: Jane Roe <jane@acme.example>\nSubject: Scan\n"
        "Attachments: screenshot.png (image/png, 68 bytes)"
    )


async def test_inline_answers_below_the_attribution_are_filed(
    gateway_factory: GatewayFactory, relay: RecordingRelay
) -> None:
    """spec 2.3 strips the quote; a customer's answers written between the quoted lines, below
    "On … wrote:", are no quote: only "Answers below." was filed."""
    world = await start_world(gateway_factory, relay)
    body = (
        "Answers below.\n\n"
        "On Thu, Nov 26, 2026 at 1:05 PM Support <connector@localhost> wrote:\n"
        "> Which Office version?\n"
        "Office 2021, build 1234.\n"
        "> Does it happen on the phone too?\n"
        "Yes, also on the iPhone.\n"
    )
    row = await deliver(world.gw, mail("Re: [Ticket #1] x", body=body), "jane@acme.example")
    assert row["outcome"]["action"] == "ticket_reply"
    note = (await world.store.get_ticket(1))["history"][-1]["description"]
    assert "Office 2021, build 1234." in note
    assert "Yes, also on the iPhone." in note


async def test_a_reply_processed_beside_the_message_it_answers_files_on_its_ticket(
    gateway_factory: GatewayFactory, relay: RecordingRelay
) -> None:
    """A customer writes, then adds a line in reply to their own mail a moment later. The first
    is big (its parse takes a while), so both are processed at once: the reply must wait for
    the first message's ticket instead of opening a second one."""
    world = await start_world(gateway_factory, relay, open_ticket=False)
    first_id = new_id("acme.example")
    log = ("server.log", "text/plain", b"x" * (3 << 20))  # parsed in a thread
    first = mail("Server down", message_id=first_id, attachments=(log,))
    # Exchange folds a long Message-ID onto the next line: still known while it is parsed.
    first = first.replace(
        f"Message-ID: {first_id}".encode(), f"Message-ID:\r\n {first_id}".encode()
    )
    assert f"Message-ID:\r\n {first_id}".encode() in first
    reply = mail("Re: Server down", body="Also the printer.", headers={"In-Reply-To": first_id})
    code, text = await send(world.gw.smtp_port, first, mail_from="jane@acme.example")
    assert code == 250, text
    second = await deliver(world.gw, reply, "jane@acme.example")
    await wait_processed(world.gw, 2)
    opened = await world.store.get_inbound(text.rsplit(" ", 1)[1])
    assert opened["outcome"]["action"] == "ticket_created"
    assert second["outcome"]["action"] == "ticket_reply"
    assert second["outcome"]["ticket"] == opened["outcome"]["ticket"] == 1
    assert (await world.store.status())["tickets"] == 1


@pytest.mark.parametrize("value", ["", "(no value, a comment only)"])
async def test_an_empty_auto_submitted_field_is_automatic_mail(
    gateway_factory: GatewayFactory, relay: RecordingRelay, value: str
) -> None:
    """spec 2.4: no answer to mail with Auto-Submitted "other than no"; an empty (malformed)
    field is no "no". It got an acknowledgement, and a forward of it kept the empty field first
    instead of our "auto-generated"."""
    world = await start_world(gateway_factory, relay, open_ticket=False)
    headers = {"Auto-Submitted": value}
    row = await deliver(
        world.gw,
        mail("Printer broken", sender="joe@acme.example", headers=headers),
        "joe@acme.example",
    )
    assert row["outcome"]["action"] == "ticket_created"
    await settled(world.gw, row["id"])
    assert relay.to("joe@acme.example") == []
    row = await deliver(
        world.gw,
        mail("Hello", sender="x@elsewhere.example", headers=headers),
        "x@elsewhere.example",
    )
    await settled(world.gw, row["id"])
    (forward,) = relay.to(SUPPORT)
    assert forward.message["Auto-Submitted"] == "auto-generated"


async def our_forward_attached(world: World, sender: str, subject: str, text: str) -> bytes:
    """An unknown sender's mail is forwarded to support; `sender` then mails the connector
    `text` with that forward attached (a mailbox rule, or a technician filing it)."""
    row = await deliver(
        world.gw, mail("Partnership", sender="someone@elsewhere.example"), "someone@x.example"
    )
    await settled(world.gw, row["id"])
    (ours,) = world.relay.to(SUPPORT)
    back = EmailMessage(policy=email.policy.SMTP)
    back["From"], back["To"], back["Subject"] = sender, CONNECTOR, subject
    back["Message-ID"] = new_id("msp.example")
    back.set_content(text)
    back.add_attachment(email.message_from_bytes(ours.data, policy=email.policy.SMTP))
    return back.as_bytes()


async def test_our_forward_sent_back_as_an_attachment_is_not_forwarded_again(
    gateway_factory: GatewayFactory, relay: RecordingRelay
) -> None:
    """spec 2.4: a message carrying our loop header is recorded, not processed again. A support
    mailbox rule that forwards our forward back as an attachment hid it in the enclosed
    message: each round was forwarded again, growing."""
    world = await start_world(gateway_factory, relay, open_ticket=False)
    back = await our_forward_attached(world, SUPPORT, "FW: Partnership", "Forwarded by rule.")
    again = await deliver(world.gw, back, SUPPORT)
    await settled(world.gw, again["id"])
    assert (again["outcome"]["action"], again["outcome"]["reason"]) == ("ignored", "loop")
    assert len(relay.to(SUPPORT)) == 1


@pytest.mark.parametrize(
    ("sender", "filed"),
    [("dana@msp.example", True), (SUPPORT, False), ("old@msp.example", False)],
    ids=["active-employee", "mailbox-rule", "inactive-employee"],
)
async def test_a_technician_files_our_forward_on_its_ticket_as_an_attachment(
    gateway_factory: GatewayFactory, relay: RecordingRelay, sender: str, filed: bool
) -> None:
    """spec 2.3.1: an active employee's mail with a ticket tag is only filed. A technician
    attaching one of our forwards to "FW: [Ticket #1] …" was taken for a mailbox rule's loop
    and dropped without a word. Filing sends nothing, so it cannot loop; anyone else (a rule,
    an inactive employee, who would be forwarded to support again) still can."""
    world = await start_world(gateway_factory, relay)
    subject = "FW: [Ticket #1] Invoice question from the customer's accountant"
    back = await our_forward_attached(world, sender, subject, "Filing this, see the attached.")
    again = await deliver(world.gw, back, sender)
    await settled(world.gw, again["id"])
    outcome = again["outcome"]
    if filed:
        assert (outcome["action"], outcome["reason"], outcome["ticket"]) == (
            "ticket_reply",
            "employee",
            1,
        )
    else:
        assert (outcome["action"], outcome["reason"]) == ("ignored", "loop")
    assert outcome["sent"] == []
    assert len(relay.to(SUPPORT)) == 1


async def test_our_acknowledgement_sent_back_as_an_attachment_is_filed(
    gateway_factory: GatewayFactory, relay: RecordingRelay
) -> None:
    """A customer attaching our acknowledgement to a question is no loop (only our forwards
    carry the action header that marks one)."""
    world = await start_world(gateway_factory, relay)
    reply = EmailMessage(policy=email.policy.SMTP)
    reply["From"], reply["To"], reply["Subject"] = "jane@acme.example", CONNECTOR, "Any news?"
    reply["Message-ID"] = new_id("acme.example")
    reply["In-Reply-To"] = world.ack_id
    reply.set_content("See the attached. Any news?")
    reply.add_attachment(email.message_from_bytes(world.ack_data, policy=email.policy.SMTP))
    row = await deliver(world.gw, reply.as_bytes(), "jane@acme.example")
    assert row["outcome"]["action"] == "ticket_reply"


async def test_active_employee_with_an_idn_domain_is_recognised_in_its_ascii_spelling(
    gateway_factory: GatewayFactory, relay: RecordingRelay
) -> None:
    """Accounts match a sender's domain in either IDNA spelling (README); employees did not, so
    an MSP on müller-it.example got every technician's reply forwarded to support."""
    world = await start_world(gateway_factory, relay)
    await world.store.import_employees([(2, {"name": "Uwe", "email1": "uwe@müller-it.example"})])
    data = mail("RE: [Ticket #1] x", sender="Uwe <uwe@xn--mller-it-65a.example>", body="Done.")
    row = await deliver(world.gw, data, "uwe@xn--mller-it-65a.example")
    assert row["outcome"]["action"] == "ticket_reply"
    assert row["outcome"]["reason"] == "employee"
    assert row["outcome"]["sent"] == []


@pytest.mark.parametrize(
    ("subject", "forward"),
    [
        ("FW: [Ticket #1] License", True),
        ("Fwd: x", True),
        ("WG: Rechnung", True),
        ("TR : facture", True),
        ("Fwd[2]: x", True),
        ("I: [Ticket #1] Licenza", True),  # Italian Outlook
        # Outlook in Polish, Czech, Chinese, Korean, Turkish, Greek, Hungarian
        ("PD: [Ticket #1] Licencja", True),
        ("PŘ: Licence", True),
        ("转发: 许可证", True),
        ("转发：许可证", True),  # a full-width colon
        ("轉寄: 授權", True),
        ("轉發: 授權", True),
        ("전달: 라이선스", True),
        ("İLT: Lisans", True),
        ("ΠΡΘ: Άδεια", True),
        ("Továbbítás: Licenc", True),
        ("RE: FW: x", False),  # a reply to a forward: its quote is stripped
        ("AW: x", False),
        # their replies are no forwards: "VS:" is Finnish for a reply (Danish and Norwegian for
        # a forward), "SV:" a Scandinavian reply
        *((f"{reply} x", False) for reply in ("Odp:", "ODP:", "回复:", "答复:", "回覆:", "회신:")),
        *((f"{reply} x", False) for reply in ("YNT:", "ΑΠ:", "ΣΧΕΤ:", "Válasz:", "השב:", "VS:")),
        *((f"{reply} x", False) for reply in ("SV:", "Antw:", "RES:", "R:", "RIF:")),
        ("Fwd x", False),
        ("Forwarding rules", False),
    ],
)
def test_a_forward_is_told_by_its_subjects_first_prefix(subject: str, forward: bool) -> None:
    assert regular.is_forward(subject) is forward


# --- a Message-ID reused: what tells two messages under it apart ---------------------------

FIXED = "<fixed-id@ups.acme.example>"
HEAD = (
    "From: Joe <joe@acme.example>\r\n"
    "To: connector@localhost\r\n"
    "Subject: Printer on 3rd floor jams\r\n"
    "Date: Thu, 26 Nov 2026 14:00:00 +0000\r\n"
    f"Message-ID: {FIXED}\r\n"
    "MIME-Version: 1.0\r\n"
    "Content-Type: text/plain; charset=utf-8\r\n"
)
TEXT = "Grüße, the printer in Müller's office jams on every page.\r\n"


def original_8bit() -> bytes:
    return (HEAD + "Content-Transfer-Encoding: 8bit\r\n\r\n" + TEXT).encode()


def via_backup_mx_qp() -> bytes:
    """The same message after a hop without 8BITMIME (RFC 6152 3: downgraded to QP), as a
    backup MX or a filtering relay hands it on: a trace header more, the body re-encoded."""
    qp = binascii.b2a_qp(TEXT.encode(), istext=True).replace(b"\n", b"\r\n")
    return (
        b"Received: from mx2.msp.example (backup MX) by relay; Thu, 26 Nov 2026 14:05:00 +0000\r\n"
        + (HEAD + "Content-Transfer-Encoding: quoted-printable\r\n\r\n").encode()
        + qp
    )


def via_base64_rewrap() -> bytes:
    """The same message re-encoded by a relay that rewrites MIME (8bit -> base64)."""
    b64 = base64.encodebytes(TEXT.encode()).replace(b"\n", b"\r\n")
    return (
        b"Received: from smarthost.msp.example by relay; Thu, 26 Nov 2026 14:05:00 +0000\r\n"
        + (HEAD + "Content-Transfer-Encoding: base64\r\n\r\n").encode()
        + b64
    )


# --- 1. a genuine redelivery whose body bytes changed en route is sent to support ----------


@pytest.mark.parametrize("copy", [via_backup_mx_qp, via_base64_rewrap], ids=lambda f: f.__name__)
async def test_a_redelivery_re_encoded_en_route_is_a_plain_duplicate(
    gateway_factory: GatewayFactory, relay: RecordingRelay, copy
) -> None:
    """spec 2.4: a copy of a processed message is a `duplicate`: nothing created, nothing sent.
    A hop may re-encode it (8bit to quoted-printable for a next hop without 8BITMIME, a
    MIME-rewriting smarthost): a fingerprint of the raw body sent such a copy to support as
    `message_id_reused`; the text as read is the same."""
    world = await start_world(gateway_factory, relay, open_ticket=False)
    first = await deliver(world.gw, original_8bit(), "joe@acme.example")
    assert first["outcome"]["action"] == "ticket_created"
    again = await deliver(world.gw, copy(), "joe@acme.example")
    # the text is the same message: the parser reads both the same way
    assert parse_message(copy()).text.strip().endswith(TEXT.strip())
    assert (again["outcome"]["action"], again["outcome"]["reason"]) == ("duplicate", "message_id")
    assert again["outcome"]["sent"] == []


async def test_a_scripts_retry_that_rebuilds_its_multipart_is_a_plain_duplicate(
    gateway_factory: GatewayFactory, relay: RecordingRelay
) -> None:
    """A script retrying after a lost 250 with the same Message-ID (the same message, xml-api.md)
    that builds its MIME message again gets a new random boundary from the email package; a
    fingerprint of the raw body forwarded the copy to support (a script's XML mail with its
    <Password>)."""
    world = await start_world(gateway_factory, relay, open_ticket=False)

    def build() -> bytes:
        msg = EmailMessage(policy=email.policy.SMTP)
        msg["From"] = "joe@acme.example"
        msg["To"] = "connector@localhost"
        msg["Subject"] = "report"
        msg["Message-ID"] = "<script-run-42@acme.example>"
        msg.set_content("Nightly report attached.")
        msg.add_attachment(
            b"col1,col2\r\n1,2\r\n", maintype="text", subtype="csv", filename="r.csv"
        )
        return msg.as_bytes()

    a, b = build(), build()
    assert a != b  # another boundary each time
    first = await deliver(world.gw, a, "joe@acme.example")
    assert first["outcome"]["action"] == "ticket_created"
    again = await deliver(world.gw, b, "joe@acme.example")
    assert (again["outcome"]["action"], again["outcome"]["reason"]) == ("duplicate", "message_id")
    assert again["outcome"]["sent"] == []


# --- 2. the retention purge re-creates "no body known": the next alert is seen by no one ---


async def test_a_fixed_id_device_quiet_past_the_retention_is_still_told(
    gateway_factory: GatewayFactory, relay: RecordingRelay
) -> None:
    """A device sending every alert under one fixed Message-ID, quiet for a month: purging its
    fingerprints with the retention made the next alert look like a Message-ID from before
    fingerprints were kept, a plain duplicate seen by no one. They are kept like the id."""
    world = await start_world(gateway_factory, relay, open_ticket=False)
    first = mail("UPS on battery", sender="joe@acme.example", message_id=FIXED, body="Battery.")
    row = await deliver(world.gw, first, "joe@acme.example")
    assert row["outcome"]["action"] == "ticket_created"
    await settled(world.gw, row["id"])
    # a month and a day later (what the hourly retention sweep sees then)
    with contextlib.closing(sqlite3.connect(world.gw.settings.db_path, timeout=10)) as db, db:
        db.execute("UPDATE seen_messages SET seen_at = seen_at - ?", (31 * 86400,))
    await world.store.purge(30)
    later = mail("UPS overload", sender="joe@acme.example", message_id=FIXED, body="Overload!")
    told = await deliver(world.gw, later, "joe@acme.example")
    assert (told["outcome"]["action"], told["outcome"]["reason"]) == (
        "duplicate",
        "message_id_reused",
    )
    assert told["outcome"]["sent"] == [{"kind": "forward", "to": [SUPPORT]}]


async def test_retention_days_zero_forgets_every_body_each_hour(
    gateway_factory: GatewayFactory, relay: RecordingRelay
) -> None:
    """SMTPGATE_RETENTION_DAYS=0 is allowed: a sweep must not forget a Message-ID's
    fingerprints (the first other content after each sweep was swallowed)."""
    world = await start_world(gateway_factory, relay, open_ticket=False, retention_days=0)
    first = mail("UPS on battery", sender="joe@acme.example", message_id=FIXED, body="Battery.")
    await deliver(world.gw, first, "joe@acme.example")
    await world.store.purge(world.gw.settings.retention_days)
    later = mail("UPS overload", sender="joe@acme.example", message_id=FIXED, body="Overload!")
    told = await deliver(world.gw, later, "joe@acme.example")
    assert told["outcome"]["reason"] == "message_id_reused"


# --- 3. skip-rule alerts under a reused id go to internal support, not the skip target -----


async def test_a_skipped_alert_under_a_reused_id_goes_to_the_skip_forward_address(
    gateway_factory: GatewayFactory, relay: RecordingRelay
) -> None:
    """spec 2.1.2: a skipped alert goes to the skip-forward address. Under a reused Message-ID
    the forward went to internal support, the queue the operator routed such mail away from."""
    skip_to = "noise@msp.example"
    world = await start_world(
        gateway_factory, relay, open_ticket=False, skip_forward_address=skip_to
    )

    def healed(time: str) -> bytes:
        return (
            "From: Monitoring <alerts@externalsystem.com>\r\nTo: connector@localhost\r\n"
            "Subject: Alert Self Healed for Site Acme Corp, Disk C: low on free space\r\n"
            f"Date: Thu, 26 Nov 2026 {time}:00 +0000\r\nMessage-ID: {FIXED}\r\n"
            "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
            f"Cleared at {time}.\r\n"
        ).encode()

    first = await deliver(world.gw, healed("10:30"), "alerts@externalsystem.com")
    assert first["outcome"]["action"] == "automated_skipped"
    assert first["outcome"]["sent"] == [{"kind": "forward", "to": [skip_to]}]
    later = await deliver(world.gw, healed("11:30"), "alerts@externalsystem.com")
    assert later["outcome"]["reason"] == "message_id_reused"
    assert later["outcome"]["sent"] == [{"kind": "forward", "to": [skip_to]}]


# --- 4. explain does not say that a reused id would be forwarded -------------------------


async def test_explain_says_a_reused_id_with_another_body_goes_to_support(
    gateway_factory: GatewayFactory, relay: RecordingRelay
) -> None:
    """spec 5: explain shows what would happen. For a known Message-ID with other content it
    said only that a copy would be a duplicate, not that it would go to support."""
    world = await start_world(gateway_factory, relay, open_ticket=False)
    first = mail("UPS on battery", sender="joe@acme.example", message_id=FIXED, body="Battery.")
    await deliver(world.gw, first, "joe@acme.example")
    later = mail("UPS overload", sender="joe@acme.example", message_id=FIXED, body="Overload!")
    msg = parse_message(later)
    ctx = Context(world.gw.settings, world.gw.rules)
    decision = await decide(later, "joe@acme.example", msg, ctx, world.store)
    outcome = (
        await world.store.simulate(
            decision, msg.message_id, fingerprint(msg.message_id, msg), hourly_limit=20
        )
    ).to_json()
    text = " ".join(outcome["notes"])
    assert "support" in text or {"kind": "forward", "to": [SUPPORT]} in outcome["sent"], outcome


# --- 5. the fingerprint ignores the header: an alert that differs only in Subject/Date -----


async def test_a_fixed_id_alert_that_differs_only_in_its_subject_is_told(
    gateway_factory: GatewayFactory, relay: RecordingRelay
) -> None:
    """Alert devices often put the event in the Subject (spec 2.1's example: "Alert for Site
    Acme Corp, Disk C: low") with a constant body: under one fixed Message-ID, a fingerprint
    of the body alone made the next alert (another site, the same text) a plain duplicate."""
    world = await start_world(gateway_factory, relay, open_ticket=False)

    def alert(subject: str, date: str) -> bytes:
        return (
            "From: Monitoring <alerts@externalsystem.com>\r\nTo: connector@localhost\r\n"
            f"Subject: {subject}\r\nDate: {date}\r\nMessage-ID: {FIXED}\r\n"
            "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
            "This alert was generated by the monitoring system.\r\n"
        ).encode()

    first = await deliver(
        world.gw,
        alert("Alert for Site Acme Corp, Disk C: low", "Thu, 26 Nov 2026 10:30:00 +0000"),
        "alerts@externalsystem.com",
    )
    assert first["outcome"]["action"] == "automated_ticket"
    later = await deliver(
        world.gw,
        alert("Alert for Site Globex, Disk D: low", "Fri, 27 Nov 2026 08:00:00 +0000"),
        "alerts@externalsystem.com",
    )
    assert later["outcome"]["reason"] == "message_id_reused", later["outcome"]


def ups(subject: str, body: str) -> bytes:
    return mail(subject, sender="joe@acme.example", message_id=FIXED, body=body)


async def test_a_recurring_alert_under_a_fixed_id_is_told_again_after_a_day(
    gateway_factory: GatewayFactory, relay: RecordingRelay
) -> None:
    """A UPS reusing one Message-ID: on battery (ticket), back on mains (told), on battery
    again a week later: same Subject, sender and text as the first -> plain duplicate,
    nothing sent, seen by no one (exactly what the feature was meant to stop)."""
    world = await start_world(gateway_factory, relay, open_ticket=False)
    first = await deliver(world.gw, ups("UPS on battery", "Battery."), "joe@acme.example")
    assert first["outcome"]["action"] == "ticket_created"
    mains = await deliver(world.gw, ups("UPS back on mains", "Mains."), "joe@acme.example")
    assert mains["outcome"]["reason"] == "message_id_reused"
    await settled(world.gw, mains["id"])
    # a week passes
    with contextlib.closing(sqlite3.connect(world.gw.settings.db_path, timeout=10)) as db, db:
        db.execute("UPDATE seen_messages SET seen_at = seen_at - ?", (7 * 86400,))
    again = await deliver(world.gw, ups("UPS on battery", "Battery."), "joe@acme.example")
    assert again["outcome"]["reason"] == "message_id_reused", again["outcome"]
    assert again["outcome"]["sent"] == [{"kind": "forward", "to": [SUPPORT]}]


async def test_a_scan_under_a_fixed_id_with_another_attachment_is_told(
    gateway_factory: GatewayFactory, relay: RecordingRelay
) -> None:
    """A scan-to-email copier with a fixed Message-ID: constant Subject and text, a new PDF
    each time. The fingerprint has no part of the attachments: every later scan is a plain
    duplicate, nothing sent."""
    world = await start_world(gateway_factory, relay, open_ticket=False)

    def scan(pdf: bytes) -> bytes:
        return mail(
            "Scanned from MFP-3F",
            sender="joe@acme.example",
            message_id=FIXED,
            body="Please find the scanned document attached.",
            attachments=(("scan.pdf", "application/pdf", pdf),),
        )

    first = await deliver(world.gw, scan(b"%PDF-1.4 invoice " + os.urandom(64)), "joe@acme.example")
    assert first["outcome"]["action"] == "ticket_created"
    later = await deliver(
        world.gw, scan(b"%PDF-1.4 contract " + os.urandom(999)), "joe@acme.example"
    )
    assert later["outcome"]["reason"] == "message_id_reused", later["outcome"]


async def test_big_messages_under_a_reused_id_are_told_and_their_copies_not(
    gateway_factory: GatewayFactory, relay: RecordingRelay
) -> None:
    world = await start_world(gateway_factory, relay, open_ticket=False)
    big = "x" * 400_000
    first = await deliver(world.gw, ups("Big one", "A " + big), "joe@acme.example")
    assert first["outcome"]["action"] == "ticket_created"
    again = await deliver(
        world.gw, b"X-Hop: 2\r\n" + ups("Big one", "A " + big), "joe@acme.example"
    )
    assert (again["outcome"]["reason"], again["outcome"]["sent"]) == ("message_id", [])
    other = await deliver(world.gw, ups("Big one", "B " + big), "joe@acme.example")
    assert other["outcome"]["reason"] == "message_id_reused"


async def test_a_transaction_under_a_reused_id_is_not_forwarded_with_its_password(
    gateway_factory: GatewayFactory, relay: RecordingRelay
) -> None:
    """xml-api: a transaction is never forwarded to anyone (a wrong password is logged, not
    answered). Under a reused Message-ID the next transaction goes to internal support
    untouched, API password in clear."""
    from tests import test_xml_e2e as x  # its world: the API on

    world = await x.start_world(gateway_factory, relay)
    fixed = "<run@forms.globex.example>"
    first = x.xml("TICKET", {"FLDTKTCARDID": x.ACME, "FLDTKTPROBLEM": "One"}, respond=None)
    a = await deliver(world.gw, _with_id(x.in_body(first), fixed), x.ENVELOPE)
    assert a["outcome"]["action"] == "xml_applied"
    second = x.xml("TICKET", {"FLDTKTCARDID": x.ACME, "FLDTKTPROBLEM": "Two"}, respond=None)
    b = await deliver(world.gw, _with_id(x.in_body(second), fixed), x.ENVELOPE)
    await settled(world.gw, b["id"])
    leaked = [m for m in relay.messages if b"<Password>s3cret</Password>" in m.data]
    assert not leaked, (b["outcome"]["reason"], [m.rcpt_tos for m in leaked])


def _with_id(raw: bytes, mid: str) -> bytes:
    return re.sub(rb"Message-ID: <[^>]*>", b"Message-ID: " + mid.encode(), raw, count=1)


async def test_copies_under_one_id_decided_together_tell_one(
    gateway_factory: GatewayFactory, relay: RecordingRelay
) -> None:
    world = await start_world(gateway_factory, relay, open_ticket=False)
    same = ups("UPS on battery", "Battery.")
    rows = await asyncio.gather(
        deliver(world.gw, same, "joe@acme.example"),
        deliver(world.gw, b"X-Hop: 1\r\n" + same, "joe@acme.example"),
        deliver(world.gw, ups("UPS back on mains", "Mains."), "joe@acme.example"),
    )
    reasons = sorted(str(r["outcome"]["reason"]) for r in rows)
    actions = sorted(r["outcome"]["action"] for r in rows)
    assert (await world.store.status())["tickets"] == 1
    assert actions.count("duplicate") == 2
    # whichever came first, exactly one of the other two is told
    assert reasons.count("message_id_reused") == 1, reasons


# --- loops, bounces and answers of answers (a review of round trips) ---------------------------


def bounce(
    final_recipient: str, enclosed: bytes | None = None, *, base64_enclosed: bool = False
) -> bytes:
    """An RFC 3464 delivery report, from MAILER-DAEMON, about `final_recipient`; the failed
    mail enclosed as message/rfc822 (base64-encoded as Domino sends it) or left out."""
    parts = [
        b"--R\r\nContent-Type: text/plain\r\n\r\nYour message could not be delivered.\r\n",
        b"--R\r\nContent-Type: message/delivery-status\r\n\r\n"
        b"Reporting-MTA: dns; mx.msp.example\r\n\r\nFinal-Recipient: rfc822; "
        + final_recipient.encode()
        + b"\r\nAction: failed\r\n"
        b"Status: 5.2.2\r\n",
    ]
    if enclosed is not None:
        if base64_enclosed:
            body = base64.encodebytes(enclosed).replace(b"\n", b"\r\n")
            parts.append(
                b"--R\r\nContent-Type: message/rfc822\r\nContent-Transfer-Encoding: base64\r\n\r\n"
                + body
            )
        else:
            parts.append(b"--R\r\nContent-Type: message/rfc822\r\n\r\n" + enclosed + b"\r\n")
    return (
        b"From: Mail Delivery System <MAILER-DAEMON@mx.msp.example>\r\nTo: "
        + CONNECTOR.encode()
        + b"\r\nSubject: Undelivered Mail Returned to Sender\r\nMessage-ID: "
        + new_id("mx.msp.example").encode()
        + b"\r\nAuto-Submitted: auto-replied\r\n"
        b"MIME-Version: 1.0\r\nContent-Type: multipart/report; report-type=delivery-status;"
        b' boundary="R"\r\n\r\n' + b"".join(parts) + b"--R--\r\n"
    )


async def test_a_bounce_about_the_support_mailbox_is_not_sent_back_to_it_but_told_loudly(
    gateway_factory: GatewayFactory, relay: RecordingRelay, caplog: pytest.LogCaptureFixture
) -> None:
    """Support's mailbox full: its bounce came to us (the envelope sender of our forwards) and
    was forwarded to support again, whose bounce came back, and so on for ever. A delivery
    report about the address a forward would go to is recorded, not forwarded; so is one that
    encloses our forward base64-encoded (Domino), where the raw bytes hide our loop header.
    Recorded as a plain `loop` at INFO, it was the only trace of a support mailbox that lost
    every forward from then on: its reason is `forward_bounced`, with a WARNING and a metric."""
    world = await start_world(
        gateway_factory, relay, open_ticket=False, skip_forward_address="skipped@archive.example"
    )
    with caplog.at_level(logging.INFO, logger="smtpgate"):
        row = await deliver(world.gw, bounce(SUPPORT), "")
    assert (row["outcome"]["action"], row["outcome"]["reason"]) == ("ignored", "forward_bounced")
    assert row["outcome"]["sent"] == []
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert f"internal support address {SUPPORT}" in warning.getMessage(), warning
    assert "forward of ours bounced" in warning.getMessage(), warning
    assert row["id"] in warning.getMessage()
    assert world.gw.metrics.forward_bounces._value.get() == 1
    forward = outbound.forward_untouched(
        mail("Printer jammed", sender="stranger@nowhere.example"),
        target=SUPPORT, sender=CONNECTOR, connector=CONNECTOR, action="forwarded",
        rule=None, hostname="gw.example", has_auto_submitted=False,
    )  # fmt: skip
    row = await deliver(world.gw, bounce("x@full.example", forward.data, base64_enclosed=True), "")
    assert (row["outcome"]["action"], row["outcome"]["reason"]) == ("ignored", "forward_bounced")
    assert world.gw.metrics.forward_bounces._value.get() == 2
    # The skip address's bounce would go to support, another mailbox: no loop, support told.
    # (One that returns our skip forward is taken for a loop: it may be a forward to support
    # that support's mailbox redirected there.)
    row = await deliver(world.gw, bounce("skipped@archive.example"), "")
    assert row["outcome"]["action"] == "forwarded"
    await settled(world.gw, row["id"])
    # A report about someone else, with nothing of ours in it, still reaches support.
    row = await deliver(world.gw, bounce("someone@elsewhere.example"), "")
    assert row["outcome"]["action"] == "forwarded"
    await settled(world.gw, row["id"])
    assert len(relay.to(SUPPORT)) == 2


def test_our_loop_header_is_found_in_any_encoded_enclosure_of_a_report() -> None:
    """Returned headers sent base64-encoded (RFC 6522 text/rfc822-headers) and a base64
    message enclosing our forward as an attachment hid our loop header from the raw bytes."""
    forward = outbound.forward_untouched(
        mail("Printer jammed", sender="stranger@nowhere.example"),
        target=SUPPORT, sender=CONNECTOR, connector=CONNECTOR, action="forwarded",
        rule=None, hostname="gw.example", has_auto_submitted=False,
    ).data  # fmt: skip
    head = forward.split(b"\r\n\r\n", 1)[0] + b"\r\n"
    wrapper = (
        b"From: desk@elsewhere.example\r\nSubject: FW\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="W"\r\n\r\n--W\r\n'
        b"Content-Type: text/plain\r\n\r\nsee attached\r\n--W\r\n"
        b"Content-Type: message/rfc822\r\n\r\n" + forward + b"\r\n--W--\r\n"
    )
    for part_type, enclosed in (("text/rfc822-headers", head), ("message/rfc822", wrapper)):
        body = base64.encodebytes(enclosed).replace(b"\n", b"\r\n")
        raw = bounce("x@full.example").replace(
            b"--R--\r\n",
            b"--R\r\nContent-Type: " + part_type.encode() + b"\r\n"
            b"Content-Transfer-Encoding: base64\r\n\r\n" + body + b"--R--\r\n",
        )
        assert CONNECTOR in parse_message(raw).enclosed_loop_markers, part_type


def test_enclosed_loop_values_are_bounded() -> None:
    """A hostile report of returned headers holding thousands of loop fields: each value was
    kept and then checked on the event loop (9.8 s for 670,000)."""
    fields = b"".join(b"X-Smtpgate-Loop: a%d@x%d.example\r\n" % (n, n) for n in range(5000))
    body = base64.encodebytes(fields).replace(b"\n", b"\r\n")
    raw = bounce("x@full.example").replace(
        b"--R--\r\n",
        b"--R\r\nContent-Type: text/rfc822-headers\r\nContent-Transfer-Encoding: base64\r\n"
        b"\r\n" + body + b"--R--\r\n",
    )
    assert 0 < len(parse_message(raw).enclosed_loop_markers) <= 16


async def test_tags_of_two_tickets_file_the_reply_where_its_thread_and_sender_are(
    gateway_factory: GatewayFactory, relay: RecordingRelay
) -> None:
    """A customer's own help desk numbering as "[Ticket #N]" too: "[Ticket #2] RE: [Ticket
    #1] …" from Acme, in reply to our acknowledgement of Acme's ticket 1, was filed on ticket 2
    (the first tag), another customer's."""
    world = await start_world(gateway_factory, relay)
    row = await deliver(
        world.gw, mail("VPN down", sender="helpdesk@globex.example"), "helpdesk@globex.example"
    )
    assert (row["outcome"]["action"], row["outcome"]["ticket"]) == ("ticket_created", 2)
    reply = mail(
        f"[Ticket #2] RE: [Ticket #1] {FIRST_SUBJECT}",
        sender="it@acme.example",
        headers={"In-Reply-To": world.ack_id},
    )
    row = await deliver(world.gw, reply, "it@acme.example")
    assert (row["outcome"]["action"], row["outcome"]["ticket"]) == ("ticket_reply", 1)
    assert any("#2" in note and "#1" in note for note in row["outcome"]["notes"])
    # Without a thread, the ticket of the sender's account among the tags.
    plain = mail("[Ticket #2] Your request [Ticket #1] was received", sender="it@acme.example")
    row = await deliver(world.gw, plain, "it@acme.example")
    assert (row["outcome"]["action"], row["outcome"]["ticket"]) == ("ticket_reply", 1)
    # A sender of no account (Acme's outsourced help desk) in the thread of ticket 1: the
    # thread, our own Message-ID, over a tag that may be another help desk's number.
    outsourced = mail(
        f"[Ticket #2] RE: {FIRST_SUBJECT}",
        sender="desk@outsourced.example",
        headers={"In-Reply-To": world.ack_id},
    )
    row = await deliver(world.gw, outsourced, "desk@outsourced.example")
    assert (row["outcome"]["action"], row["outcome"]["ticket"]) == ("ticket_reply", 1)


async def test_forwards_say_why_they_were_forwarded(
    gateway_factory: GatewayFactory, relay: RecordingRelay
) -> None:
    """Support could not tell an out-of-office from a stranger's mail: both said only
    `X-Smtpgate-Action: forwarded` (spec 2.4 asks for outcome and rule)."""
    world = await start_world(gateway_factory, relay, open_ticket=False)
    ooo = mail("Automatic reply: holiday", sender="stranger@nowhere.example",
               headers={"Auto-Submitted": "auto-replied"})  # fmt: skip
    first = await deliver(world.gw, ooo, "stranger@nowhere.example")
    second = await deliver(
        world.gw, mail("Hello", sender="other@nowhere.example"), "other@nowhere.example"
    )
    await settled(world.gw, first["id"])
    await settled(world.gw, second["id"])
    actions = sorted(str(m.message["X-Smtpgate-Action"]) for m in relay.to(SUPPORT))
    assert actions == ["forwarded; reason=auto_reply", "forwarded; reason=unknown_sender"]


async def test_our_own_mail_back_under_its_message_id_is_recorded_not_filed(
    gateway_factory: GatewayFactory, relay: RecordingRelay
) -> None:
    """An Exchange redirect that dropped our X- headers sent our acknowledgement back under its
    own Message-ID: it was filed on the ticket as the customer's reply and forwarded."""
    world = await start_world(gateway_factory, relay)
    back = world.ack_data.replace(b"X-Smtpgate-Loop", b"X-Dropped-Loop")
    row = await deliver(world.gw, back, "jane@acme.example")
    assert (row["outcome"]["action"], row["outcome"]["reason"]) == ("ignored", "loop")
    assert row["outcome"]["sent"] == []


async def test_a_responder_answering_each_acknowledgement_is_braked_within_minutes(
    gateway_factory: GatewayFactory, relay: RecordingRelay
) -> None:
    """A customer's ticket system that answers every mail with a fresh subject and no
    automatic headers: our ack, its answer (a new ticket), our ack, … — 21 tickets until the
    hourly cap. After ACK_BURST acknowledgements to an address within ACK_BURST_SECONDS its
    next acknowledgement is not sent (the ticket is still opened), and the ping-pong ends."""
    world = await start_world(gateway_factory, relay)  # ticket 1, acknowledged to jane
    # XML responses to the same address are no acknowledgements: they do not count.
    from tests import test_xml_e2e as x

    for n in range(ACK_BURST):
        request = x.xml("TICKET", {"FLDTKTCARDID": x.ACME, "FLDTKTPROBLEM": f"P{n}"},
                        respond="jane@acme.example", return_id=f"WEB-{n}")  # fmt: skip
        row = await deliver(world.gw, x.in_body(request), x.ENVELOPE)
        assert [m["to"] for m in row["outcome"]["sent"]] == [["jane@acme.example"]]
    rows = []
    for n in range(ACK_BURST):  # the responder's answers, each to the ack before it
        answer = mail(f"Request #{4711 + n} received", sender="Jane Roe <jane@acme.example>")
        rows.append(await deliver(world.gw, answer, "jane@acme.example"))
    assert [r["outcome"]["action"] for r in rows] == ["ticket_created"] * ACK_BURST
    assert [r["outcome"]["ticket"] for r in rows] == [2 + ACK_BURST + n for n in range(ACK_BURST)]
    assert [len(r["outcome"]["sent"]) for r in rows] == [1] * (ACK_BURST - 1) + [0]
    assert any("suppressed" in note for note in rows[-1]["outcome"]["notes"]), rows[-1]


async def test_automatic_mail_caps_count_an_address_in_any_spelling(
    gateway_factory: GatewayFactory, relay: RecordingRelay
) -> None:
    """The caps counted an address by its lower case: jane@bücher.example in NFC, NFD and its
    xn-- form were three addresses, each with caps of its own."""
    world = await start_world(
        gateway_factory,
        relay,
        open_ticket=False,
        extra_accounts=({"file_as": "Bücher GmbH", "email1": "jane@bücher.example"},),
    )
    spellings = (
        "jane@bücher.example",
        unicodedata.normalize("NFD", "jane@bücher.example"),
        "jane@xn--bcher-kva.example",
        "JANE@BÜCHER.example",
    )
    rows = []
    for n, address in enumerate(spellings):
        data = (  # as an SMTPUTF8 client writes it (the test client's envelope stays ASCII)
            f"From: {address}\r\nTo: {CONNECTOR}\r\nSubject: Problem {n}\r\n"
            f"Message-ID: {new_id()}\r\n\r\nHello.\r\n"
        ).encode()
        rows.append(await deliver(world.gw, data, "jane@xn--bcher-kva.example"))
    assert [r["outcome"]["action"] for r in rows] == ["ticket_created"] * len(spellings)
    assert [len(r["outcome"]["sent"]) for r in rows] == [1] * ACK_BURST + [0]


async def test_answers_typed_into_the_quote_survive_a_signature_logo(
    gateway_factory: GatewayFactory, relay: RecordingRelay
) -> None:
    """A reply that is all quote and answers a mail is filed without that text only when it
    brings attachments (a screenshot as the whole answer): an HTML signature's inline logo
    (image001.png, a related part with a Content-ID) counted as one, and a customer's answers
    typed into the quoted mail were lost."""
    world = await start_world(gateway_factory, relay)
    quote = (
        "From: Support <connector@localhost>\nSent: Thursday, November 26, 2026 2:05 PM\n"
        "To: Jane Roe <jane@acme.example>\n"
        "Subject: [Ticket #1] Outlook keeps asking for my password\n\n"
        "Which Outlook version do you use?\nANSWER: Outlook 2021, build 2311\n"
    )
    msg = EmailMessage(policy=email.policy.SMTP)
    msg["From"] = "Jane Roe <jane@acme.example>"
    msg["To"] = CONNECTOR
    msg["Subject"] = "RE: [Ticket #1] Outlook keeps asking for my password"
    msg["Message-ID"] = new_id()
    msg["In-Reply-To"] = world.ack_id
    msg.set_content(quote)
    msg.add_alternative(
        "<html><body><p>" + quote.replace("\n", "<br>") + '</p><img src="cid:logo1"></body></html>',
        subtype="html",
    )
    logo = b"\x89PNG\r\n\x1a\n" + b"\0" * 60
    msg.get_payload()[1].add_related(
        logo, maintype="image", subtype="png", cid="<logo1>", filename="image001.png",
        disposition="inline",  # as Outlook sends it
    )  # fmt: skip
    row = await deliver(world.gw, msg.as_bytes(), "jane@acme.example")
    assert row["outcome"]["action"] == "ticket_reply"
    note = (await world.store.get_ticket(1))["history"][-1]["description"]
    assert "Outlook 2021" in note, note


async def test_explain_agrees_with_processing_when_a_cap_suppresses_the_ack(
    gateway_factory: GatewayFactory,
) -> None:
    """`explain` ran the decision's mail builder but not the caps: with
    SMTPGATE_AUTO_MAIL_HOURLY_LIMIT=0 it said `would send ack` for what processing suppresses,
    to an operator asking why a customer got no acknowledgement."""
    gw = await gateway_factory(acknowledge=True, auto_mail_hourly_limit=0)
    assert gw.store is not None
    await gw.store.import_accounts([(2, {"file_as": "Acme", "email1": "acme.example"})])
    raw = simple_message(
        "Printer broken", "Jane <jane@acme.example>", message_id="<p1@acme.example>"
    )
    assert (await send(gw.smtp_port, raw, mail_from="jane@acme.example"))[0] == 250
    await wait_processed(gw, 1)
    (row,) = await gw.store.list_inbound()
    assert (row["outcome"]["action"], row["outcome"]["sent"]) == ("ticket_created", [])
    other = simple_message(
        "Scanner broken", "Jane <jane@acme.example>", message_id="<p2@acme.example>"
    )
    msg = parse_message(other)
    decision = await decide(
        other, "jane@acme.example", msg, Context(gw.settings, gw.rules), gw.store
    )
    explained = await gw.store.simulate(
        decision, msg.message_id, fingerprint(msg.message_id, msg), hourly_limit=0
    )
    assert (explained.action, explained.sent) == ("ticket_created", [])
    assert any("suppressed: hourly cap" in n for n in explained.notes), explained.notes
    assert [r["state"] for r in await gw.store.list_outbox()] == []  # explain wrote nothing


@pytest.mark.parametrize(
    "subject",
    [
        "Automatski odgovor: Račun za studeni",
        "Автоматична відповідь: Рахунок за листопад",
        "Samodejni odgovor: Račun za november",
        "Resposta automàtica: Factura de novembre",
        "Automaatne vastus: Arve novembri eest",  # in no list: Exchange's headers tell
    ],
)
async def test_an_exchange_out_of_office_in_any_language_opens_no_ticket(
    gateway_factory: GatewayFactory, relay: RecordingRelay, subject: str
) -> None:
    """spec 2.3.2: a recognisable out-of-office never opens a ticket. Exchange's, in a language
    outside the list, answering a mail the MSP sent from the connector address (its
    In-Reply-To unknown to the gateway), opened one for the customer."""
    world = await start_world(gateway_factory, relay, open_ticket=False)
    data = mail(
        subject,
        body="Out of the office until Monday.",
        headers={
            "In-Reply-To": "<psa-123@msp.example>",
            "References": "<psa-123@msp.example>",
            "X-Auto-Response-Suppress": "All",
            "X-MS-Exchange-Inbox-Rules-Loop": "jane@acme.example",
            "Auto-Submitted": "auto-generated",
            "X-MS-Exchange-Generated-Message-Source": "Mailbox Rules Agent",
        },
    )
    row = await deliver(world.gw, data, "jane@acme.example")
    assert (row["outcome"]["action"], row["outcome"]["reason"]) == ("forwarded", "auto_reply")


# --- the precedence is pure over the facts it is given; one lookup a message -----------------

ACME_TICKET = ("TKTACME0000000000007", 7, ACME)
OTHER_TICKET = ("TKTGLOB0000000000009", 9, GLOBEX)
REPLY = "Re: [Ticket #7] Printer jammed"


def acme_by_sender(needs: Needs) -> tuple[dict[str, list[tuple[str, str | None]]], ...]:
    """What the directory finds for the sender searches when jane@acme.example is Acme's."""
    return tuple(
        {v: [(ACME_TICKET[2], None)] for v in values if v.endswith("acme.example")}
        for _, values in needs.by_sender
    )


def facts_for(needs: Needs, kind: str) -> Facts:
    if kind == "nothing known":
        return Facts(needs, tuple({} for _ in needs.by_rule), tuple({} for _ in needs.by_sender))
    known = acme_by_sender(needs)
    by_rule: tuple[dict[str, list[tuple[str, str | None]]], ...] = tuple({} for _ in needs.by_rule)
    if kind == "known sender":
        return Facts(needs, by_rule, known)
    if kind == "tagged ticket":
        return Facts(needs, by_rule, known, tickets=(ACME_TICKET,))
    if kind == "tagged ticket, employee":
        return Facts(needs, by_rule, known, employee=True, tickets=(ACME_TICKET,))
    assert kind == "tag and thread disagree"
    return Facts(needs, by_rule, known, tickets=(OTHER_TICKET,), threaded=ACME_TICKET)


@pytest.mark.parametrize(
    ("kind", "action", "reason", "ticket"),
    [
        ("nothing known", "forwarded", "unknown_sender", None),
        ("known sender", "ticket_created", None, None),
        ("tagged ticket", "ticket_reply", None, 7),
        ("tagged ticket, employee", "ticket_reply", "employee", 7),
        # the sender's own account's ticket wins over another customer's tag
        ("tag and thread disagree", "ticket_reply", None, 7),
    ],
)
def test_the_precedence_decides_from_the_message_and_its_facts_alone(
    tmp_path: Path, kind: str, action: str, reason: str | None, ticket: int | None
) -> None:
    """design.md: decide purely. The stages see no store: the same message with other facts
    (as a store would find them) is decided otherwise, with no I/O at all."""
    raw = mail(REPLY, headers={"In-Reply-To": "<ours@gateway.test>"})
    ctx = Context(make_settings(tmp_path, 25), parse_rules(RULES))
    inb = pipeline.Inbound(raw, "jane@acme.example", parse_message(raw))
    needs = pipeline.needs(inb, ctx)
    assert needs.ticket_numbers == (7,)
    assert needs.message_ids == ("<ours@gateway.test>",)
    assert needs.employee == "jane@acme.example"  # a ticket may be named: its sender's standing
    decision = pipeline.precedence(inb, ctx, facts_for(needs, kind))
    assert (str(decision.action), decision.reason) == (action, reason)
    assert (decision.reply.ticket_number if decision.reply else None) == ticket


async def test_a_decision_looks_its_facts_up_in_one_round_trip(
    gateway_factory: GatewayFactory, relay: RecordingRelay, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reply naming two tickets (a tag and its thread) from a customer: the tag, the thread,
    the sender's employee standing and the sender's account were four or five lookups, each a
    pass through the store's read path. Now one."""
    world = await start_world(gateway_factory, relay)
    other = await deliver(world.gw, mail("Scanner offline"), "jane@acme.example")
    assert other["outcome"]["ticket"] == 2
    raw = mail("Re: [Ticket #2] Scanner offline", headers={"In-Reply-To": world.first_id})
    calls: list[object] = []
    real = world.store._lookup

    async def counted(fn: Any) -> Any:
        calls.append(fn)
        return await real(fn)

    monkeypatch.setattr(world.store, "_lookup", counted)
    ctx = Context(world.gw.settings, world.gw.rules)
    decision = await decide(raw, "jane@acme.example", parse_message(raw), ctx, world.store)
    assert len(calls) == 1
    assert decision.reply is not None
    # Both are Jane's (Acme's) tickets: the one its tag and its thread both name is not there,
    # the sender's own account's first is the tag's.
    assert decision.reply.ticket_number == 2
    assert any("tickets #2, #1 named" in n for n in decision.notes), decision.notes
