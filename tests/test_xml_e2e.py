"""End-to-end: API by Email (spec 2.2, xml-api.md) through a real gateway and relay.

The parser and the record writer have their own unit tests (test_xmlapi, test_records); these
cases prove the branch as a whole: detection in every container, precedence, password, outcome,
response routing (SendResponseToEmail only, BCC, never a connector) and `explain`.
"""

from __future__ import annotations

import asyncio
import base64
import email
import email.policy
import json
import logging
import os
import quopri
import sys
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from smtpgate import pipeline
from smtpgate.app import Gateway
from smtpgate.cli import read_rows
from smtpgate.config import ConfigError, Rules, load_settings
from smtpgate.mail import parse_message
from smtpgate.model import Applied, Facts
from smtpgate.xmlapi import Transaction, find_transaction
from tests.conftest import FIXTURES, GatewayFactory, Received, RecordingRelay, make_settings
from tests.test_regular import RULES, deliver, settled

ACME = "CRDACME0000000000001"
GLOBEX = "CRDGLOBEX00000000002"
CONNECTOR = "connector@localhost"
RESULTS = "api-results@globex.example"
BCC = "audit@msp.example"
ENVELOPE = "script@forms.globex.example"  # the envelope sender: never answered
BOM = b"\xef\xbb\xbf"


def xml(
    kind: str | None,
    fields: Mapping[str, str],
    *,
    password: str | None = "s3cret",
    respond: str | None = RESULTS,
    return_id: str = "T-1",
    names: Mapping[str, str] | None = None,
) -> str:
    """A CommitCRMTransaction; `names` renames envelope elements (case variants)."""
    n = {
        "root": "CommitCRMTransaction",
        "app": "ExternalApplicationName",
        "respond": "SendResponseToEmail",
        "password": "Password",
        "return": "ReturnTransactionID",
        "kind": "DataKind",
        "data": "RecordData",
        **(names or {}),
    }
    parts = [f"<{n['app']}>Globex web form</{n['app']}>"]
    if respond is not None:
        parts.append(f"<{n['respond']}>{respond}</{n['respond']}>")
    if password is not None:
        parts.append(f"<{n['password']}>{password}</{n['password']}>")
    parts.append(f"<{n['return']}>{return_id}</{n['return']}>")
    if kind is not None:
        parts.append(f"<{n['kind']}>{kind}</{n['kind']}>")
    record = "".join(f"<{k}>{v}</{k}>" for k, v in fields.items())
    parts.append(f"<{n['data']}>{record}</{n['data']}>")
    body = "\n".join(parts)
    return (
        '<?xml version="1.0" encoding="utf-8"?>\n<?commitcrmxml version="1.0"?>\n'
        f"<{n['root']}>\n{body}\n</{n['root']}>\n"
    )


def envelope_headers(msg: EmailMessage, subject: str, sender: str) -> None:
    msg["From"] = sender
    msg["To"] = CONNECTOR
    msg["Subject"] = subject
    msg["Date"] = "Thu, 26 Nov 2026 12:00:00 +0000"
    msg["Message-ID"] = f"<{uuid.uuid4().hex}@forms.globex.example>"


def in_body(
    text: str,
    *,
    subject: str = "xml",
    sender: str = "Web Forms <forms@globex.example>",
    headers: Mapping[str, str] | None = None,
) -> bytes:
    msg = EmailMessage(policy=email.policy.SMTP)
    envelope_headers(msg, subject, sender)
    for key, value in (headers or {}).items():
        msg[key] = value
    msg.set_content(text)
    return msg.as_bytes()


def raw_mime(head: str, body: bytes) -> bytes:
    msg_id = f"<{uuid.uuid4().hex}@forms.globex.example>"
    return (
        f"From: forms@globex.example\r\nTo: {CONNECTOR}\r\nSubject: xml\r\n"
        f"Message-ID: {msg_id}\r\nMIME-Version: 1.0\r\n{head}"
    ).encode() + body


def as_part(text: str, ctype: str, cte: str, *, bom: bool = False) -> bytes:
    """A multipart/mixed message: a cover note and the XML as its own part."""
    data = (BOM if bom else b"") + text.encode()
    payload = base64.encodebytes(data) if cte == "base64" else quopri.encodestring(data)
    payload = payload.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    return raw_mime(
        'Content-Type: multipart/mixed; boundary="xb"\r\n\r\n',
        b"--xb\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nSee the transaction.\r\n"
        + f"--xb\r\nContent-Type: {ctype}\r\nContent-Transfer-Encoding: {cte}\r\n\r\n".encode()
        + payload
        + b"\r\n--xb--\r\n",
    )


def as_attachment(text: str, *, filename: str = "transaction.xml") -> bytes:
    msg = EmailMessage(policy=email.policy.SMTP)
    envelope_headers(msg, "xml attached", "forms@globex.example")
    msg.set_content("Please process the attached transaction.\n\n-- \nGlobex IT")
    msg.add_attachment(
        text.encode(), maintype="application", subtype="octet-stream", filename=filename
    )
    data = msg.as_bytes()
    assert b"Content-Transfer-Encoding: base64" in data
    return data


@dataclass
class World:
    gw: Gateway
    relay: RecordingRelay
    ticket: str = ""  # rec_id of ticket #1, added by XML

    @property
    def store(self) -> Any:
        assert self.gw.store is not None
        return self.gw.store


async def start_world(
    factory: GatewayFactory, relay: RecordingRelay, *, rules: str = RULES, **overrides: Any
) -> World:
    settings: dict[str, Any] = {
        "api_enabled": True,
        "api_password": "s3cret",
        "api_response_bcc": BCC,
        "acknowledge": True,
    }
    settings.update(overrides)
    gw = await factory(rules, **settings)
    assert gw.store is not None
    await gw.store.import_accounts(read_rows(FIXTURES / "accounts.csv", "accounts"))
    await gw.store.import_employees(read_rows(FIXTURES / "employees.csv", "employees"))
    world = World(gw, relay)
    first = xml("TICKET", {"FLDTKTCARDID": ACME, "FLDTKTPROBLEM": "Mail is slow"}, respond=None)
    row = await deliver(gw, in_body(first), ENVELOPE)
    assert row["outcome"]["action"] == "xml_applied", row["outcome"]
    assert row["outcome"]["ticket"] == 1
    world.ticket = row["outcome"]["record"]["rec_id"]
    return world


def parse_response(received: Received) -> etree._Element:
    msg = received.message
    assert msg.get_content_type() == "text/xml"
    content = msg.get_content()
    assert isinstance(content, str)
    return etree.fromstring(content.encode("utf-8"))


def text_of(root: etree._Element, tag: str) -> str | None:
    el = root.find(tag)
    assert el is not None, tag
    return el.text


def transaction_in(raw: bytes) -> Transaction:
    """The transaction the parser finds in a raw message, read without errors."""
    msg = parse_message(raw)
    tx = find_transaction(msg.xml_candidates, charsets=msg.xml_charsets)
    assert tx is not None
    assert tx.errors == ()
    return tx


# --- the table ----------------------------------------------------------------------------------

Build = Callable[[World], bytes]
Check = Callable[[World, dict[str, Any]], Any]


@dataclass(frozen=True)
class Case:
    id: str
    build: Build
    action: str
    error_code: int | None = None
    kind: str | None = None  # record kind in the outcome
    status: int | None = None  # response Status; None: no response at all
    error_fields: tuple[str, ...] = ()  # fields named by <Error> entries
    ticket: int | None = None
    notes: tuple[str, ...] = ()
    path: str = "xml"
    check: Check | None = None
    settings: dict[str, Any] = field(default_factory=dict)


def body_tx(kind: str | None, fields: Mapping[str, str], **kw: Any) -> Build:
    return lambda w: in_body(xml(kind, fields, **kw))


def ticket_tx(**kw: Any) -> str:
    return xml("TICKET", {"FLDTKTCARDID": GLOBEX, "FLDTKTPROBLEM": "Printer"}, **kw)


async def check_problem(w: World, out: dict[str, Any], problem: str) -> None:
    ticket = await w.store.get_ticket(out["ticket"])
    assert ticket["description"] == problem


async def check_account_added(w: World, out: dict[str, Any]) -> None:
    accounts = {a["file_as"]: a for a in await w.store.list_accounts()}
    assert accounts["Initech"]["rec_id"] == out["record"]["rec_id"]
    assert accounts["Initech"]["email1"].lower() == "it@initech.example"
    # The new account is a known sender for the regular branch at once.
    row = await deliver(w.gw, in_body("Hello", sender="it@initech.example"), "it@initech.example")
    assert row["outcome"]["action"] == "ticket_created"
    assert row["outcome"]["account"] == out["record"]["rec_id"]


async def check_account_updated(w: World, out: dict[str, Any]) -> None:
    accounts = {a["rec_id"]: a for a in await w.store.list_accounts()}
    assert accounts[ACME]["company"] == "Acme Corporation International"
    assert accounts[ACME]["file_as"] == "Acme Corp"  # fields not given are unchanged


async def check_ticket_updated(w: World, out: dict[str, Any]) -> None:
    ticket = await w.store.get_ticket(1)
    assert ticket["status"] == 1000
    assert ticket["description"] == "Mail is slow"


async def check_note_on_ticket(w: World, out: dict[str, Any]) -> None:
    ticket = await w.store.get_ticket(1)
    assert any(n["description"] == "Called back" for n in ticket["history"])


async def check_nothing_added(w: World, out: dict[str, Any]) -> None:
    assert (await w.store.status())["tickets"] == 1


CASES: tuple[Case, ...] = (
    # --- the sample and each supported kind, add and update ---
    Case(
        "sample-04",
        lambda w: (FIXTURES / "04-xml-new-ticket.eml").read_bytes(),
        "xml_applied",
        kind="TICKET",
        status=1,
        ticket=2,
    ),
    Case(
        "add-account",
        body_tx("ACCOUNT", {"FLDCRDFULLNAME": "Initech", "FLDCRDEMAIL1": "IT@initech.example"}),
        "xml_applied",
        kind="ACCOUNT",
        status=1,
        check=check_account_added,
    ),
    Case(
        "update-account",
        body_tx(
            "ACCOUNT", {"FLDCRDRECID": ACME, "FLDCRDCOMPANY": "Acme Corporation International"}
        ),
        "xml_applied",
        kind="ACCOUNT",
        status=1,
        check=check_account_updated,
    ),
    Case(
        "update-ticket",
        lambda w: in_body(xml("TICKET", {"FLDTKTRECID": w.ticket, "FLDTKTSTATUS": "1000"})),
        "xml_applied",
        kind="TICKET",
        status=1,
        ticket=1,
        check=check_ticket_updated,
    ),
    Case(
        "add-history-note-on-ticket",
        lambda w: in_body(
            xml("HISTORY-NOTE", {"FLDHISLINKRECID": w.ticket, "FLDHISDESCRIPTION": "Called back"})
        ),
        "xml_applied",
        kind="HISTORY-NOTE",
        status=1,
        check=check_note_on_ticket,
    ),
    Case(
        "add-charge-on-ticket",
        lambda w: in_body(
            xml(
                "CHARGE",
                {
                    "FLDSLPCARDID": ACME,
                    "FLDSLPTICKETID": w.ticket,
                    "FLDSLPQUANTITY": "1.5",
                    "FLDSLPSLIPDATE": "26/11/2026",
                    "FLDSLPBILLKIND": "B",
                },
            )
        ),
        "xml_applied",
        kind="CHARGE",
        status=1,
    ),
    Case(
        "add-appointment",
        body_tx(
            "APPOINTMENT-OR-TASK",
            {"FLDEVTEVENTDATE": "2026-11-30 10:00", "FLDEVTFREETEXT": "On-site visit"},
        ),
        "xml_applied",
        kind="APPOINTMENT-OR-TASK",
        status=1,
    ),
    Case(
        "add-item",
        body_tx("ITEM", {"FLDITMITEMNO": "LAB-1H", "FLDITMNAME": "Labour", "FLDITMSUSPENDED": "N"}),
        "xml_applied",
        kind="ITEM",
        status=1,
    ),
    Case(
        "add-asset",
        body_tx(
            "ASSET",
            {"FLDASTASSETTYPE": "Laptop", "FLDASTSTATUS": "Active", "FLDASTACCRECID": ACME},
        ),
        "xml_applied",
        kind="ASSET",
        status=1,
    ),
    Case(
        "datakind-by-code",
        body_tx("70", {"FLDTKTCARDID": GLOBEX, "FLDTKTPROBLEM": "By code"}),
        "xml_applied",
        kind="TICKET",
        status=1,
        ticket=2,
    ),
    # --- password: logged, never answered ---
    Case(
        "wrong-password",
        lambda w: in_body(ticket_tx(password="guess")),
        "xml_rejected",
        error_code=150011,
        check=check_nothing_added,
    ),
    Case(
        "missing-password",
        lambda w: in_body(ticket_tx(password=None)),
        "xml_rejected",
        error_code=150011,
        check=check_nothing_added,
    ),
    Case(
        "no-password-configured-accepts-any",
        lambda w: in_body(ticket_tx(password="anything")),
        "xml_applied",
        kind="TICKET",
        status=1,
        ticket=2,
        settings={"api_password": None},
    ),
    Case(
        "password-case-matters",
        lambda w: in_body(ticket_tx(password="S3CRET")),
        "xml_rejected",
        error_code=150011,
    ),
    # --- rejected transactions are answered with every problem found ---
    Case(
        "unknown-field",
        body_tx("TICKET", {"FLDTKTCARDID": GLOBEX, "FLDTKTPROBLEM": "x", "FLDTKTFOO": "1"}),
        "xml_rejected",
        error_code=150002,
        kind="TICKET",
        status=150002,
        error_fields=("FLDTKTFOO",),
        check=check_nothing_added,
    ),
    Case(
        "several-problems-all-listed",
        body_tx("TICKET", {"FLDTKTBAR": "1", "FLDTKTPRIORITY": "high"}),
        "xml_rejected",
        error_code=150002,
        kind="TICKET",
        status=150002,
        error_fields=("FLDTKTBAR", "FLDTKTPRIORITY", "FLDTKTCARDID", "FLDTKTPROBLEM"),
    ),
    Case(
        "missing-required-field",
        body_tx("ITEM", {"FLDITMNAME": "No code"}),
        "xml_rejected",
        error_code=150010,
        kind="ITEM",
        status=150010,
        error_fields=("FLDITMITEMNO",),
    ),
    Case(
        "missing-referenced-account",
        body_tx("TICKET", {"FLDTKTCARDID": "CRDNOSUCHACCOUNT0000", "FLDTKTPROBLEM": "x"}),
        "xml_rejected",
        error_code=150010,
        kind="TICKET",
        status=150010,
        error_fields=("FLDTKTCARDID",),
        check=check_nothing_added,
    ),
    Case(
        "update-missing-record",
        body_tx("TICKET", {"FLDTKTRECID": "TKTNOSUCHTICKET00000", "FLDTKTSTATUS": "1000"}),
        "xml_rejected",
        error_code=150003,
        kind="TICKET",
        status=150003,
        error_fields=("FLDTKTRECID",),
    ),
    Case(
        "unsupported-kind",
        body_tx("OPPORTUNITY", {"FLDOPPNAME": "Deal"}),
        "xml_rejected",
        error_code=150009,
        status=150009,
    ),
    Case(
        "unknown-kind",
        body_tx("WIDGET", {"FLDWIDNAME": "x"}),
        "xml_rejected",
        error_code=150009,
        status=150009,
    ),
    Case(
        "missing-kind",
        body_tx(None, {"FLDTKTPROBLEM": "x"}),
        "xml_rejected",
        error_code=150009,
        status=150009,
    ),
    # --- unsafe and unreadable XML: refused, nobody to answer ---
    Case(
        "xxe-external-entity",
        lambda w: in_body(
            '<?xml version="1.0"?>\n<!DOCTYPE x [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>\n'
            + ticket_tx().split("?>\n", 2)[2].replace("Printer", "&xxe;")
        ),
        "xml_rejected",
        error_code=150012,
        check=check_nothing_added,
    ),
    Case(
        "billion-laughs",
        lambda w: in_body(
            '<?xml version="1.0"?>\n<!DOCTYPE lolz [<!ENTITY lol "lol">'
            + "".join(
                f'<!ENTITY lol{i} "{("&lol" + (str(i - 1) if i > 1 else "") + ";") * 10}">'
                for i in range(1, 10)
            )
            + "]>\n<CommitCRMTransaction><DataKind>TICKET</DataKind><RecordData>"
            "<FLDTKTPROBLEM>&lol9;</FLDTKTPROBLEM></RecordData></CommitCRMTransaction>"
        ),
        "xml_rejected",
        error_code=150012,
    ),
    Case(
        "malformed-xml",
        lambda w: in_body(ticket_tx().replace("</RecordData>", "")),
        "xml_rejected",
        error_code=150001,
    ),
    Case(  # xml-api 1: the root element is not ours, so it is ordinary mail a person reads
        "wrong-root-naming-ours",
        lambda w: in_body('<?xml version="1.0"?>\n<Envelope><CommitCRMTransaction/></Envelope>'),
        "forwarded",
        path="regular",
    ),
    # --- containers and encodings ---
    Case(
        "text-xml-part-quoted-printable-bom",
        lambda w: as_part(ticket_tx(), "text/xml; charset=utf-8", "quoted-printable", bom=True),
        "xml_applied",
        kind="TICKET",
        status=1,
        ticket=2,
    ),
    Case(
        "application-xml-part-base64-bom",
        lambda w: as_part(ticket_tx(), "application/xml", "base64", bom=True),
        "xml_applied",
        kind="TICKET",
        status=1,
        ticket=2,
    ),
    Case(
        "xml-attachment-base64",
        lambda w: as_attachment(ticket_tx()),
        "xml_applied",
        kind="TICKET",
        status=1,
        ticket=2,
    ),
    Case(  # a mail client re-encoded the body and left the declaration (RFC 7303: charset rules)
        "latin1-body-declaring-utf8",
        lambda w: raw_mime(
            "Content-Type: text/plain; charset=iso-8859-1\r\n"
            "Content-Transfer-Encoding: 8bit\r\n\r\n",
            ticket_tx().replace("Printer", "Drucker von Müller").encode("latin-1"),
        ),
        "xml_applied",
        kind="TICKET",
        status=1,
        ticket=2,
        check=lambda w, out: check_problem(w, out, "Drucker von Müller"),
    ),
    Case(  # the other way round: declared ISO-8859-1, sent as UTF-8 (was stored "MÃ¼ller")
        "utf8-body-declaring-latin1",
        lambda w: raw_mime(
            "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n",
            ticket_tx()
            .replace('encoding="utf-8"', 'encoding="ISO-8859-1"')
            .replace("Printer", "Drucker von Müller")
            .encode(),
        ),
        "xml_applied",
        kind="TICKET",
        status=1,
        ticket=2,
        check=lambda w, out: check_problem(w, out, "Drucker von Müller"),
    ),
    Case(  # "<!" in CDATA is text, not a DOCTYPE (it was refused, 150012, unanswered)
        "doctype-in-cdata",
        lambda w: in_body(
            ticket_tx().replace("Printer", "<![CDATA[Site shows <!DOCTYPE html> error]]>")
        ),
        "xml_applied",
        kind="TICKET",
        status=1,
        ticket=2,
        check=lambda w, out: check_problem(w, out, "Site shows <!DOCTYPE html> error"),
    ),
    Case(
        "body-base64-with-bom",
        lambda w: raw_mime(
            "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n\r\n",
            base64.encodebytes(BOM + ticket_tx().encode()).replace(b"\n", b"\r\n"),
        ),
        "xml_applied",
        kind="TICKET",
        status=1,
        ticket=2,
    ),
    Case(
        "body-with-leading-blank-lines-and-footer",
        lambda w: in_body("\n\n  " + ticket_tx() + "\n-- \nSent from my iPhone\n"),
        "xml_applied",
        kind="TICKET",
        status=1,
        ticket=2,
    ),
    Case(
        "lower-case-element-names",
        body_tx(
            "ticket",
            {"fldtktcardid": GLOBEX, "FldTktProblem": "Lower case"},
            names={
                "root": "commitcrmtransaction",
                "kind": "datakind",
                "data": "recorddata",
                "password": "password",
                "respond": "sendresponsetoemail",
                "return": "returntransactionid",
            },
        ),
        "xml_applied",
        kind="TICKET",
        status=1,
        ticket=2,
    ),
    Case(
        "mixed-case-element-names",
        body_tx(
            "Ticket",
            {"FLDTKTCARDID": GLOBEX, "FLDTKTPROBLEM": "Mixed"},
            names={"kind": "Datakind", "data": "Recorddata", "respond": "SendResponseToEMail"},
        ),
        "xml_applied",
        kind="TICKET",
        status=1,
        ticket=2,
    ),
    # --- responses: only to SendResponseToEmail, never a connector ---
    Case(
        "response-to-connector-is-not-sent",
        lambda w: in_body(ticket_tx(respond=CONNECTOR)),
        "xml_applied",
        kind="TICKET",
        ticket=2,
        notes=("no response: recipient is a connector address",),
    ),
    Case(
        "response-to-connector-any-case",
        lambda w: in_body(ticket_tx(respond="Connector@LOCALHOST")),
        "xml_applied",
        kind="TICKET",
        ticket=2,
        notes=("no response",),
    ),
    Case(
        "response-to-the-gateways-sender-address-is-not-sent",
        lambda w: in_body(ticket_tx(respond="Gateway@msp.example")),
        "xml_applied",
        kind="TICKET",
        ticket=2,
        notes=("no response: recipient is the gateway's own sender address",),
        settings={"from_address": "gateway@msp.example"},
    ),
    Case(
        "response-to-connector-wrong-password-nothing",
        lambda w: in_body(ticket_tx(respond=CONNECTOR, password="x")),
        "xml_rejected",
        error_code=150011,
    ),
    Case(
        "response-to-mailer-daemon-is-not-sent",
        lambda w: in_body(ticket_tx(respond="MAILER-DAEMON@globex.example")),
        "xml_applied",
        kind="TICKET",
        ticket=2,
        notes=("no response: recipient is a robot address",),
    ),
    Case(  # applied, answered to nobody, and the outcome says why
        "response-to-two-addresses-is-not-sent",
        lambda w: in_body(ticket_tx(respond="a@globex.example, b@globex.example")),
        "xml_applied",
        kind="TICKET",
        ticket=2,
        notes=("no response: SendResponseToEmail 'a@globex.example, b@globex.example' is not",),
    ),
    Case(
        "no-response-address-no-response",
        lambda w: in_body(ticket_tx(respond=None)),
        "xml_applied",
        kind="TICKET",
        ticket=2,
    ),
    Case(
        "responses-disabled",
        lambda w: in_body(ticket_tx()),
        "xml_applied",
        kind="TICKET",
        ticket=2,
        settings={"api_send_response": False},
    ),
    Case(
        "auto-submitted-request-is-applied-not-answered",
        lambda w: in_body(ticket_tx(), headers={"Auto-Submitted": "auto-generated"}),
        "xml_applied",
        kind="TICKET",
        ticket=2,
        notes=("no response: Auto-Submitted",),
    ),
    Case(
        "no-bcc-configured",
        lambda w: in_body(ticket_tx()),
        "xml_applied",
        kind="TICKET",
        status=1,
        ticket=2,
        settings={"api_response_bcc": None},
    ),
    # --- precedence: automated first, XML before regular ---
    Case(
        "automated-branch-wins",
        lambda w: in_body(
            ticket_tx(),
            subject="Alert for Site Acme Corp, disk",
            sender="alerts@externalsystem.com",
        ),
        "automated_ticket",
        path="automated",
        ticket=2,
    ),
    Case(
        "xml-beats-known-sender",
        lambda w: in_body(ticket_tx(), sender="helpdesk@globex.example"),
        "xml_applied",
        kind="TICKET",
        status=1,
        ticket=2,
    ),
    Case(
        "xml-lookalike-text-is-regular-mail",
        lambda w: in_body("<?xml version='1.0'?>\n<Order><Id>1</Id></Order>\n"),
        "forwarded",
        path="regular",
    ),
)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
async def test_xml_transaction(
    case: Case, gateway_factory: GatewayFactory, relay: RecordingRelay
) -> None:
    world = await start_world(gateway_factory, relay, **case.settings)
    bcc = world.gw.settings.api_response_bcc
    seen = len(relay.messages)
    data = case.build(world)
    row = await deliver(world.gw, data, ENVELOPE)
    out = row["outcome"]

    assert out["path"] == case.path
    assert out["action"] == case.action
    assert out["error_code"] == case.error_code
    assert out["ticket"] == case.ticket
    if case.action == "xml_applied":
        assert out["record"]["kind"] == case.kind
        assert len(out["record"]["rec_id"]) == 20
    else:
        assert out["record"] is None  # a rejected transaction changes nothing
    for note in case.notes:
        assert any(note in n for n in out["notes"]), out["notes"]

    expected: list[tuple[str, str]] = []
    if case.status is not None:
        expected = [("response", RESULTS)] + ([("bcc", bcc)] if bcc else [])
    if case.path == "xml":
        assert sorted((m["kind"], m["to"][0]) for m in out["sent"]) == sorted(expected)
    rows = await settled(world.gw, row["id"])
    assert len(rows) == len(out["sent"])
    new = relay.messages[seen:]
    # Never the envelope sender, never a connector address.
    assert all(ENVELOPE not in m.rcpt_tos and CONNECTOR not in m.rcpt_tos for m in new)
    if case.path != "xml":
        if case.check is not None:
            await case.check(world, out)
        return
    if case.status is None:
        assert new == []
    else:
        (response,) = [m for m in new if m.rcpt_tos == [RESULTS]]
        copies = [m for m in new if m.rcpt_tos == [bcc]]
        assert len(copies) == (1 if bcc else 0)
        assert response.mail_from == CONNECTOR
        msg = response.message
        assert msg["From"] == CONNECTOR
        assert msg["To"] == RESULTS
        assert msg["Auto-Submitted"] == "auto-replied"
        assert msg["X-Smtpgate-Loop"] == CONNECTOR
        assert msg["In-Reply-To"] == row["message_id"]
        assert msg["Bcc"] is None  # the copy travels in its own envelope
        root = parse_response(response)
        assert root.tag == "CommitCRMTransactionResponse"
        return_id = "WEB-000123" if case.id == "sample-04" else "T-1"
        assert msg["Subject"] == f"CommitCRM XML response: {return_id}"
        assert text_of(root, "ReturnTransactionID") == return_id
        assert text_of(root, "Status") == str(case.status)
        errors = root.find("Errors")
        assert errors is not None
        if case.status == 1:
            assert text_of(root, "RecID") == out["record"]["rec_id"]
            assert len(errors) == 0
        else:
            assert not text_of(root, "RecID")
            codes = [int(e.get("code", "0")) for e in errors]
            assert case.status in codes
            assert [e.get("field") for e in errors if e.get("field")] == list(case.error_fields)
        for copy in copies:
            assert copy.message.get_content() == msg.get_content()
    if case.check is not None:
        await case.check(world, out)
    assert await world.store.raw_message(row["id"]) is not None


async def test_xxe_payload_reads_no_file(
    gateway_factory: GatewayFactory, relay: RecordingRelay, tmp_path: Path
) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET-CONTENT")
    world = await start_world(gateway_factory, relay)
    payload = (
        f'<?xml version="1.0"?>\n<!DOCTYPE x [<!ENTITY xxe SYSTEM "file://{secret}">]>\n'
        + ticket_tx().split("?>\n", 2)[2].replace("Printer", "&xxe;")
    )
    row = await deliver(world.gw, as_attachment(payload), ENVELOPE)
    assert row["outcome"]["error_code"] == 150012
    assert await settled(world.gw, row["id"]) == []
    dump = json.dumps(row["outcome"]) + json.dumps(await world.store.list_tickets())
    assert "TOP-SECRET" not in dump


async def test_a_customers_mail_with_other_xml_attached_is_a_ticket_not_a_refusal(
    gateway_factory: GatewayFactory, relay: RecordingRelay
) -> None:
    """API enabled: a known customer's request with an Apple plist (a DOCTYPE) or a cut-off log
    attached as .xml is not an XML transaction (its root is not CommitCRMTransaction, xml-api
    1). It opens a ticket, as any mail of theirs; before, it was recorded xml_rejected (150012
    or 150001), answered nobody and reached no person."""
    world = await start_world(gateway_factory, relay)
    plist = (
        '<?xml version="1.0"?>\n<!DOCTYPE plist PUBLIC "-//Apple//DTD PLIST 1.0//EN"'
        ' "http://www.apple.com/DTDs/PropertyList-1.0.dtd">\n<plist><dict/></plist>'
    )
    for attached, name in ((plist, "vpn.xml"), ('<?xml version="1.0"?><log><e>disk', "log.xml")):
        data = as_attachment(attached, filename=name).replace(
            b"forms@globex.example", b"helpdesk@globex.example"
        )
        row = await deliver(world.gw, data, ENVELOPE)
        assert (row["outcome"]["path"], row["outcome"]["action"]) == ("regular", "ticket_created")


async def test_a_second_transaction_in_the_message_is_noted_not_applied(
    gateway_factory: GatewayFactory, relay: RecordingRelay
) -> None:
    world = await start_world(gateway_factory, relay)
    msg = EmailMessage(policy=email.policy.SMTP)
    envelope_headers(msg, "two transactions", "forms@globex.example")
    msg.set_content(ticket_tx())
    other = xml("ACCOUNT", {"FLDCRDFULLNAME": "Initech"}, return_id="T-2")
    msg.add_attachment(other.encode(), maintype="application", subtype="xml", filename="a.xml")
    row = await deliver(world.gw, msg.as_bytes(), ENVELOPE)
    out = row["outcome"]
    assert (out["action"], out["record"]["kind"]) == ("xml_applied", "TICKET")
    assert any("1 more transaction(s)" in note for note in out["notes"])
    assert "Initech" not in {a["file_as"] for a in await world.store.list_accounts()}


async def test_api_disabled_xml_is_ordinary_mail(
    gateway_factory: GatewayFactory, relay: RecordingRelay
) -> None:
    gw = await gateway_factory(RULES, api_enabled=False, api_password="s3cret")
    assert gw.store is not None
    await gw.store.import_accounts(read_rows(FIXTURES / "accounts.csv", "accounts"))
    row = await deliver(gw, in_body(ticket_tx()), ENVELOPE)
    assert row["outcome"]["path"] == "regular"
    assert row["outcome"]["action"] == "forwarded"
    assert row["outcome"]["reason"] == "unknown_sender"
    assert row["outcome"]["record"] is None
    # From a known sender it becomes a ticket like any mail, not a transaction.
    row = await deliver(gw, in_body(ticket_tx(), sender="helpdesk@globex.example"), ENVELOPE)
    assert row["outcome"]["action"] == "ticket_created"
    assert row["outcome"]["record"] is None
    await settled(gw, row["id"])
    assert relay.to(RESULTS) == []


async def test_duplicate_transaction_is_applied_once(
    gateway_factory: GatewayFactory, relay: RecordingRelay
) -> None:
    world = await start_world(gateway_factory, relay)
    data = in_body(ticket_tx())
    first = await deliver(world.gw, data, ENVELOPE)
    second = await deliver(world.gw, data, ENVELOPE)
    assert first["outcome"]["action"] == "xml_applied"
    assert second["outcome"]["action"] == "duplicate"
    assert second["outcome"]["sent"] == []
    await settled(world.gw, second["id"])
    assert (await world.store.status())["tickets"] == 2
    assert len(relay.to(RESULTS)) == 1


async def test_hourly_cap_applies_to_responses(
    gateway_factory: GatewayFactory, relay: RecordingRelay
) -> None:
    world = await start_world(gateway_factory, relay, auto_mail_hourly_limit=2)
    outcomes = [(await deliver(world.gw, in_body(ticket_tx()), ENVELOPE))["outcome"] for _ in "abc"]
    assert [len(o["sent"]) for o in outcomes] == [2, 2, 0]
    assert outcomes[2]["action"] == "xml_applied"  # applied all the same
    assert any("hourly cap" in n for n in outcomes[2]["notes"])


async def test_the_audit_copy_follows_its_response_and_is_not_capped_itself(
    gateway_factory: GatewayFactory, relay: RecordingRelay
) -> None:
    """The BCC copy went to the operator's own address and counted against the hourly cap
    there: with a busy form, the audit trail stopped after AUTO_MAIL_HOURLY_LIMIT responses an
    hour while the responses went on. It now goes with every response sent, and with none that
    is suppressed."""
    world = await start_world(gateway_factory, relay, auto_mail_hourly_limit=2)
    outcomes = []
    for i, to in enumerate(("a@globex.example", "b@globex.example", "c@globex.example")):
        tx = ticket_tx(respond=to, return_id=f"T-{i}")
        outcomes.append((await deliver(world.gw, in_body(tx), ENVELOPE))["outcome"])
    assert [[(m["kind"], m["to"]) for m in o["sent"]] for o in outcomes] == [
        [("response", [to]), ("bcc", [BCC])]
        for to in ("a@globex.example", "b@globex.example", "c@globex.example")
    ]
    for i in range(2):  # two more to a: its cap is reached, and the copy goes with it
        tx = ticket_tx(respond="a@globex.example", return_id=f"T-a{i}")
        outcomes.append((await deliver(world.gw, in_body(tx), ENVELOPE))["outcome"])
    assert [len(o["sent"]) for o in outcomes[3:]] == [2, 0]
    assert any("hourly cap" in n for n in outcomes[-1]["notes"])
    await relay.wait_for(8)  # 4 responses, 4 copies
    assert len(relay.to(BCC)) == 4


async def test_the_hourly_cap_counts_an_address_whatever_its_case(
    gateway_factory: GatewayFactory, relay: RecordingRelay
) -> None:
    """The response goes out as addressed (a local part may be case-sensitive), but the cap
    counts one mailbox: changing the case of its letters does not buy more mail to it."""
    world = await start_world(gateway_factory, relay, auto_mail_hourly_limit=2)
    outcomes = []
    for i, to in enumerate(
        ("Victim@Globex.example", "vIctim@globex.example", "victim@GLOBEX.example")
    ):
        tx = ticket_tx(respond=to, return_id=f"T-{i}")
        outcomes.append((await deliver(world.gw, in_body(tx), ENVELOPE))["outcome"])
    assert [len(o["sent"]) for o in outcomes] == [2, 2, 0]  # response and BCC, twice
    assert outcomes[0]["sent"][0]["to"] == ["Victim@globex.example"]
    assert any("response to victim@globex.example suppressed" in n for n in outcomes[2]["notes"])


async def test_a_transaction_over_the_parsers_4_mib_is_refused_not_taken_for_mail(
    gateway_factory: GatewayFactory, relay: RecordingRelay
) -> None:
    """The parser keeps at most 4 MiB of an XML candidate. A bigger transaction used to be
    dropped from the candidates and processed as ordinary mail (a ticket from a known sender);
    it is refused as too large (150012), whatever SMTPGATE_API_MAX_XML_BYTES allows."""
    world = await start_world(gateway_factory, relay, api_max_xml_bytes=4 * 1024 * 1024)
    big = ticket_tx().replace("Printer", "Printer" + "x" * (5 * 1024 * 1024), 1)
    row = await deliver(world.gw, in_body(big, sender="helpdesk@globex.example"), ENVELOPE)
    assert (row["outcome"]["action"], row["outcome"]["error_code"]) == ("xml_rejected", 150012)


def test_the_xml_size_limit_is_at_most_what_the_parser_keeps() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(_env_file=None, api_max_xml_bytes=4 * 1024 * 1024 + 1)
    assert "SMTPGATE_API_MAX_XML_BYTES" in str(info.value)


@pytest.mark.parametrize(
    "variable", ["api_response_bcc", "internal_support_address", "skip_forward_address"]
)
def test_configuration_sending_to_a_connector_is_rejected(variable: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(
            _env_file=None,
            connector_addresses="connector@localhost,api@localhost",
            **{variable: "API@localhost"},
        )
    assert f"SMTPGATE_{variable.upper()}" in str(info.value)
    assert "connector" in str(info.value)


async def _explain(data_dir: Path, eml: Path, cwd: Path) -> dict[str, Any]:
    env = {
        "PATH": os.environ.get("PATH", ""),
        "SMTPGATE_DATA_DIR": str(data_dir),
        "SMTPGATE_CONNECTOR_ADDRESSES": CONNECTOR,
        "SMTPGATE_INTERNAL_SUPPORT_ADDRESS": "support@msp.example",
        "SMTPGATE_API_ENABLED": "true",
        "SMTPGATE_API_PASSWORD": "s3cret",
        "SMTPGATE_API_RESPONSE_BCC": BCC,
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "smtpgate",
        "explain",
        str(eml),
        "--json",
        env=env,
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    result: dict[str, Any] = json.loads(out)
    return result


async def test_explain_shows_what_a_transaction_would_do(
    gateway_factory: GatewayFactory, relay: RecordingRelay, tmp_path: Path
) -> None:
    world = await start_world(gateway_factory, relay)
    data_dir = world.gw.settings.data_dir
    ok = await _explain(data_dir, FIXTURES / "04-xml-new-ticket.eml", tmp_path)
    assert ok["path"] == "xml"
    assert ok["action"] == "xml_applied"
    assert ok["error_code"] is None
    assert ok["record"]["kind"] == "TICKET"
    assert ok["ticket"] == 2
    assert sorted((m["kind"], m["to"][0]) for m in ok["sent"]) == [
        ("bcc", BCC),
        ("response", "api-results@globex.example"),
    ]
    bad = tmp_path / "bad.eml"
    bad.write_bytes(in_body(ticket_tx(password="nope")))
    rejected = await _explain(data_dir, bad, tmp_path)
    assert (rejected["action"], rejected["error_code"], rejected["sent"]) == (
        "xml_rejected",
        150011,
        [],
    )
    unknown = tmp_path / "unknown.eml"
    unknown.write_bytes(in_body(xml("TICKET", {"FLDTKTFOO": "1"})))
    result = await _explain(data_dir, unknown, tmp_path)
    assert (result["action"], result["error_code"]) == ("xml_rejected", 150002)
    # explain changed nothing.
    assert (await world.store.status())["tickets"] == 1
    assert relay.to("api-results@globex.example") == []


async def test_wrong_password_is_logged_and_never_answered(
    gateway_factory: GatewayFactory, relay: RecordingRelay, caplog: pytest.LogCaptureFixture
) -> None:
    world = await start_world(gateway_factory, relay)
    with caplog.at_level(logging.WARNING, logger="smtpgate"):
        row = await deliver(world.gw, in_body(ticket_tx(password="guess")), ENVELOPE)
    assert row["outcome"]["error_code"] == 150011
    assert any("password" in r.getMessage() for r in caplog.records)
    assert all("guess" not in r.getMessage() for r in caplog.records)  # never log the secret
    # A sentinel from the same script is answered: the rejection sent nothing before it.
    sentinel = await deliver(world.gw, in_body(ticket_tx()), ENVELOPE)
    await settled(world.gw, sentinel["id"])
    assert await settled(world.gw, row["id"]) == []
    assert len(relay.to(RESULTS)) == 1


async def test_a_response_to_an_internationalized_address_is_relayed_with_smtputf8(
    gateway_factory: GatewayFactory, relay: RecordingRelay
) -> None:
    world = await start_world(gateway_factory, relay, api_response_bcc=None)
    row = await deliver(world.gw, in_body(ticket_tx(respond="jörg@bücher.example")), ENVELOPE)
    assert [m["to"] for m in row["outcome"]["sent"]] == [["jörg@bücher.example"]]
    [out] = await settled(world.gw, row["id"])
    assert out["state"] == "done"
    assert relay.to("jörg@bücher.example")
    # and the relay senders are all still working
    row = await deliver(world.gw, in_body(ticket_tx()), ENVELOPE)
    await settled(world.gw, row["id"])
    assert relay.to(RESULTS)


TICKET_FIELDS = {"FLDTKTCARDID": ACME, "FLDTKTPROBLEM": "Printer"}


def test_nested_comment_in_response_address_does_not_raise() -> None:
    """A few hundred "(" in SendResponseToEmail: the email package's address parser recurses
    once per nested comment (RecursionError), before the password is checked."""
    doc = xml("TICKET", TICKET_FIELDS, respond="(" * 600)
    tx = find_transaction([doc.encode()])  # RecursionError escapes here
    assert tx is not None
    assert tx.response_to is None


async def test_forged_transaction_with_nested_comment_is_rejected_not_dead(
    gateway_factory: GatewayFactory, relay: RecordingRelay
) -> None:
    world = await start_world(gateway_factory, relay, process_max_attempts=1)
    forged = xml("TICKET", TICKET_FIELDS, password="wrong", respond="(" * 600)
    row = await deliver(world.gw, in_body(forged), ENVELOPE)  # asserts state == "done": not dead
    assert (row["outcome"]["action"], row["outcome"]["error_code"]) == ("xml_rejected", 150011)


@pytest.mark.parametrize(
    ("return_id", "in_subject"), [("WEB-1 " * 33, True), ("ab " * 150_000, False)]
)
async def test_a_long_return_transaction_id_is_echoed_in_the_xml_not_the_subject(
    tmp_path: Path, return_id: str, in_subject: bool
) -> None:
    """ReturnTransactionID went into the response's Subject whatever its length, and the email
    package folds a long header of many words in quadratic time (450 KB: 9 s), inside the
    decision's transaction. Up to 200 characters it is in the Subject; always in the XML."""
    raw = in_body(xml("TICKET", TICKET_FIELDS, return_id=return_id))
    settings = make_settings(
        tmp_path, 25, api_enabled=True, api_password="s3cret", api_response_bcc=None
    )
    inb = pipeline.Inbound(raw, ENVELOPE, parse_message(raw))
    decision = pipeline.stage_xml(inb, pipeline.Context(settings, Rules()), Facts())
    assert decision is not None
    assert decision.transaction is not None
    (mail,) = decision.mails(Applied(record_kind="TICKET", record_id="TKT" + "A" * 17))
    assert mail.recipients == (RESULTS,)
    response = email.message_from_bytes(mail.data, policy=email.policy.default)
    subject = f"CommitCRM XML response: {return_id.strip()}" if in_subject else None
    assert response["Subject"] == (subject or "CommitCRM XML response:")  # as without an id
    echoed = etree.fromstring(response.get_content().encode()).findtext("ReturnTransactionID")
    assert echoed == return_id.strip()


JA = "プリンターが壊れた"


def _body_in(charset: str, codec: str) -> bytes:
    doc = xml("TICKET", {"FLDTKTCARDID": ACME, "FLDTKTPROBLEM": JA})
    return (
        "From: forms@globex.example\r\nTo: connector@localhost\r\nSubject: xml\r\n"
        "Message-ID: <ja-1@globex.example>\r\nMIME-Version: 1.0\r\n"
        f"Content-Type: text/plain; charset={charset}\r\nContent-Transfer-Encoding: 7bit\r\n\r\n"
    ).encode() + doc.encode(codec).replace(b"\n", b"\r\n")


@pytest.mark.parametrize(("charset", "codec"), [("ISO-2022-JP", "iso2022_jp"), ("UTF-7", "utf-7")])
def test_seven_bit_mime_charset_is_honoured(charset: str, codec: str) -> None:
    """docs/xml-api.md 2: the MIME charset before the declaration. It was consulted for
    non-ASCII bytes only, and these charsets write Japanese in ASCII: ISO-2022-JP (Japanese
    mail's usual charset) was refused (150001, its ESC bytes), UTF-7 stored undecoded."""
    assert transaction_in(_body_in(charset, codec)).fields["FLDTKTPROBLEM"] == JA


async def test_same_message_without_message_id_to_two_connectors_is_applied_once(
    gateway_factory: GatewayFactory, relay: RecordingRelay
) -> None:
    """spec 2.4: without a Message-ID, a hash of the content. The key also hashed the envelope,
    so one message an MTA delivered once per connector address (one transaction per domain)
    was applied twice."""
    world = await start_world(
        gateway_factory, relay, connector_addresses="connector@localhost,api@connector.example"
    )
    body = xml("TICKET", TICKET_FIELDS, respond=None)
    data = (
        b"From: forms@globex.example\r\nTo: connector@localhost, api@connector.example\r\n"
        b"Subject: xml\r\nDate: Thu, 26 Nov 2026 12:00:00 +0000\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n\r\n"
    ) + body.replace("\n", "\r\n").encode()
    first = await deliver(world.gw, data, ENVELOPE, ("connector@localhost",))
    second = await deliver(world.gw, data, ENVELOPE, ("api@connector.example",))
    assert first["outcome"]["action"] == "xml_applied"
    assert second["outcome"]["action"] == "duplicate", second["outcome"]


# --- found by a review against xml-api.md ------------------------------------------------------


def test_a_utf16_body_labelled_by_its_charset_may_start_with_white_space() -> None:
    """xml-api 1: leading white space is allowed. .NET's System.Net.Mail sends UTF-16LE without
    a byte order mark: after a line break its "<" was not seen next to a NUL, the document was
    read as UTF-8 full of NULs, and the transaction became ordinary mail (no response)."""
    text = "\r\n" + xml("TICKET", {"FLDTKTCARDID": ACME, "FLDTKTPROBLEM": "Printer"})
    for codec in ("utf-16-le", "utf-16-be"):
        raw = raw_mime(
            f"Content-Type: text/plain; charset={codec}\r\n"
            "Content-Transfer-Encoding: base64\r\n\r\n",
            base64.encodebytes(text.encode(codec)),
        )
        assert transaction_in(raw).fields["FLDTKTPROBLEM"] == "Printer", codec


def test_the_charset_of_an_application_xml_part_is_honoured() -> None:
    """xml-api 1 names application/xml parts; RFC 7303 3.2 makes their charset authoritative
    too. A document without a declaration in ISO-8859-2 was stored as "dzia³a w £odzi"."""
    problem = "Drukarka nie działa w Łodzi"
    text = xml("TICKET", {"FLDTKTCARDID": ACME, "FLDTKTPROBLEM": problem}).split("\n", 1)[1]
    part = base64.encodebytes(text.encode("iso-8859-2"))
    raw = raw_mime(
        'Content-Type: multipart/mixed; boundary="xb"\r\n\r\n',
        b"--xb\r\nContent-Type: text/plain\r\n\r\nSee the transaction.\r\n"
        b"--xb\r\nContent-Type: application/xml; charset=iso-8859-2\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n" + part + b"\r\n--xb--\r\n",
    )
    assert transaction_in(raw).fields["FLDTKTPROBLEM"] == problem


@pytest.mark.parametrize("delsp", [False, True])
def test_a_format_flowed_body_is_read_unflowed(delsp: bool) -> None:
    """RFC 3676: a flowed body's text is the unflowed one. Thunderbird breaks long lines after
    a space (the value kept a line break mid-sentence); Apple Mail (delsp=yes) breaks inside
    words, a tag name too (refused as unreadable, 150001, and never answered)."""
    problem = "The printer on the second floor has not printed for a week now, since the update"
    doc = xml("TICKET", {"FLDTKTCARDID": ACME, "FLDTKTPROBLEM": problem})
    if delsp:
        flowed = doc.replace("<FLDTKTPROBLEM>", "<FLDTKT \nPROBLEM>").replace("week ", "we \nek ")
    else:
        flowed = doc.replace("week now, ", "week now, \n")
    assert flowed != doc
    raw = raw_mime(
        "Content-Type: text/plain; charset=utf-8; format=flowed"
        + ("; delsp=yes" if delsp else "")
        + "\r\nContent-Transfer-Encoding: 8bit\r\n\r\n",
        flowed.replace("\n", "\r\n").encode(),
    )
    assert transaction_in(raw).fields["FLDTKTPROBLEM"] == problem


async def test_the_outcome_names_the_account_a_transaction_touched(
    gateway_factory: GatewayFactory, relay: RecordingRelay
) -> None:
    """spec 5: an outcome's `account` is a rec_id or null. It was null for every transaction,
    so monitoring and `explain` could not tell whose ticket an integration opened."""
    world = await start_world(gateway_factory, relay)
    cases = [
        (xml("TICKET", {"FLDTKTCARDID": GLOBEX, "FLDTKTPROBLEM": "Toner"}), GLOBEX),
        (xml("TICKET", {"FLDTKTRECID": world.ticket, "FLDTKTSTATUS": "200"}), ACME),
        (xml("HISTORY-NOTE", {"FLDHISLINKRECID": world.ticket, "FLDHISDESCRIPTION": "x"}), ACME),
        (xml("CHARGE", {"FLDSLPCARDID": GLOBEX, "FLDSLPQUANTITY": "1"}), GLOBEX),
        (xml("ACCOUNT", {"FLDCRDRECID": ACME, "FLDCRDCOMPANY": "Acme Corporation"}), ACME),
        (xml("ITEM", {"FLDITMITEMNO": "LAB-1H", "FLDITMNAME": "Labour"}), None),
    ]
    for doc, account in cases:
        row = await deliver(world.gw, in_body(doc, subject=f"tx {account}"), ENVELOPE)
        assert row["outcome"]["action"] == "xml_applied", row["outcome"]
        assert row["outcome"]["account"] == account, (doc, row["outcome"])
    added = await deliver(
        world.gw, in_body(xml("ACCOUNT", {"FLDCRDFULLNAME": "Initech"})), ENVELOPE
    )
    assert added["outcome"]["account"] == added["outcome"]["record"]["rec_id"]


def test_the_same_transaction_in_a_flowed_body_and_attached_is_one() -> None:
    """A form mailer that puts the XML in the body and attaches the same file: one transaction
    and no "others" note. Unflowed, the body's bytes (LF line ends, space-stuffing gone) no
    longer equal the attachment's, and the copy was counted as another transaction."""
    doc = xml("TICKET", {"FLDTKTCARDID": ACME, "FLDTKTPROBLEM": "Printer down"})
    msg = EmailMessage(policy=email.policy.SMTP)
    envelope_headers(msg, "xml", "forms@globex.example")
    msg.set_content(doc, cte="7bit")
    msg.replace_header("Content-Type", 'text/plain; charset="utf-8"; format=flowed')
    msg.add_attachment(
        doc.replace("\n", "\r\n").encode(), "application", "octet-stream", filename="tx.xml"
    )
    assert transaction_in(msg.as_bytes()).others == 0
    # A different transaction attached is still counted.
    other = xml("TICKET", {"FLDTKTCARDID": ACME, "FLDTKTPROBLEM": "Scanner down"})
    msg.get_payload()[1].set_content(
        other.encode(), "application", "octet-stream", filename="b.xml"
    )
    assert transaction_in(msg.as_bytes()).others == 1


def test_a_transaction_in_a_second_inline_text_part_is_read() -> None:
    """A script's shape: a cover note, then the XML as a second text/plain part without a file
    name. Only the first body part was a candidate: the transaction went to support as mail."""
    doc = xml("TICKET", {"FLDTKTCARDID": ACME, "FLDTKTPROBLEM": "Printer"})
    raw = raw_mime(
        'Content-Type: multipart/mixed; boundary="xb"\r\n\r\n',
        b"--xb\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nSee the transaction.\r\n"
        b"--xb\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
        + doc.replace("\n", "\r\n").encode()
        + b"\r\n--xb--\r\n",
    )
    assert transaction_in(raw).fields["FLDTKTPROBLEM"] == "Printer"


async def test_note_times_given_without_a_zone_are_in_the_api_zone_and_sort_with_ours(
    gateway_factory: GatewayFactory, relay: RecordingRelay
) -> None:
    """A note's FLDHISNOTEDATETIME was stored as given (wall time, no zone) beside the times
    the gateway writes (UTC): at UTC+2 a note written an hour earlier was listed after one
    written now. Taken in SMTPGATE_API_TIME_ZONE and kept in UTC, they sort as written."""
    world = await start_world(gateway_factory, relay, api_time_zone="Etc/GMT-2")  # UTC+2
    hour_ago = datetime.now(UTC) + timedelta(hours=2) - timedelta(hours=1)  # UTC+2 wall time
    for text, at in (("an hour ago", hour_ago.strftime("%Y-%m-%d %H:%M")), ("now", None)):
        fields = {"FLDHISLINKRECID": world.ticket, "FLDHISDESCRIPTION": text}
        if at:
            fields["FLDHISNOTEDATETIME"] = at
        row = await deliver(world.gw, in_body(xml("HISTORY-NOTE", fields), subject=text), ENVELOPE)
        assert row["outcome"]["action"] == "xml_applied", row["outcome"]
    ticket = await world.store.get_ticket(1)
    notes = [(n["description"], n["note_at"]) for n in ticket["history"]]
    assert [d for d, _ in notes][-2:] == ["an hour ago", "now"], notes
    assert notes[-2][1] == (hour_ago - timedelta(hours=2)).strftime("%Y-%m-%dT%H:%M:00Z")
    assert all(at.endswith("Z") for _, at in notes), notes


def test_an_unknown_api_time_zone_stops_start_up_naming_it() -> None:
    with pytest.raises(ConfigError, match="SMTPGATE_API_TIME_ZONE"):
        load_settings(_env_file=None, api_time_zone="Mars/Olympus_Mons")


async def test_a_transactions_password_is_not_filed_when_an_alert_rule_takes_it(
    gateway_factory: GatewayFactory, relay: RecordingRelay
) -> None:
    """An RMM sending alerts and API transactions from one address with an alert's subject:
    spec 2 checks the automated branch first, so the transaction is filed as an alert (not
    applied; docs/xml-api.md says so), and its <Password> went into the ticket's details and
    its note, which every technician reads. Filed text shows it masked."""
    world = await start_world(gateway_factory, relay)
    rmm = "alerts@externalsystem.com"  # the spec's detection rule: this sender and "Alert"
    doc = xml("TICKET", {"FLDTKTCARDID": ACME, "FLDTKTPROBLEM": "Disk full"}, return_id="R1")
    row = await deliver(
        world.gw, in_body(doc, subject="Alert for Site Acme Corp, disk", sender=rmm), rmm
    )
    assert row["outcome"]["action"] == "automated_ticket", row["outcome"]
    ticket = await world.store.get_ticket(row["outcome"]["ticket"])
    filed = [ticket["details"], *(n["description"] for n in ticket["history"])]
    assert all("s3cret" not in text for text in filed), filed
    assert all("<Password>********</Password>" in text for text in filed), filed


@pytest.mark.parametrize(
    "element",
    [
        "<Password><![CDATA[s3cret]]></Password>",
        '<c:Password xmlns:c="urn:x">s3cret</c:Password>',
        '<Password type="plain">s3cret</Password>',
        "<Password><!-- api -->s3cret</Password>",
        "<Password>s3cret</Password>",
    ],
)
def test_the_password_the_parser_reads_is_masked_in_every_form(element: str) -> None:
    """The mask matched the plain element only, but the parser also reads a password in CDATA,
    with a namespace prefix, with attributes or beside a comment."""
    doc = (
        '<CommitCRMTransaction xmlns:c="urn:x"><ExternalApplicationName>x'
        f"</ExternalApplicationName>{element}<DataKind>TICKET</DataKind><RecordData>"
        "<FLDTKTPROBLEM>p</FLDTKTPROBLEM></RecordData></CommitCRMTransaction>"
    )
    tx = find_transaction([doc.encode()])
    assert tx is not None
    assert tx.password == "s3cret"
    assert "s3cret" not in pipeline.masked(doc, tx.password)
    assert pipeline.masked("a word is no password", "a") == "a word is no password"
