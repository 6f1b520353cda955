"""The processing precedence (spec 2) as one ordered table of stages; the first that decides wins.

Decided purely, looked up at the edge: `needs` says what any stage may want from the directory
(accounts, the sender's employee standing, tickets), the store answers it all in one round trip
(`Facts`), and the stages are plain functions over the message, the configuration and those
facts, deciding with the pure rules of `smtpgate.rules`. Nothing here writes: the `Decision` is
applied by the store in one transaction, which is why `explain` can run the same code.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from smtpgate import outbound, xmlapi
from smtpgate.config import DetectionRule, Rules, Settings, SkipRule
from smtpgate.mail import ParsedMessage, strip_quotes
from smtpgate.model import (
    REUSED_ID,
    Action,
    Applied,
    Decision,
    Facts,
    FileReply,
    Lookup,
    MailBuilder,
    MailKind,
    Needs,
    NewTicket,
    OutboundMail,
    Path,
    TicketRef,
    ascii_domain,
    has_bare_line_end,
    no_mail,
)
from smtpgate.rules import automated, regular

log = logging.getLogger(__name__)

SOURCE_AUTOMATED = "Email Connector (automated)"
SOURCE_EMAIL = "Email"
# xml-api 2: the document could not be read (150001) or was refused for safety (150012).
UNREADABLE_CODES = frozenset({xmlapi.ERR_MALFORMED, xmlapi.ERR_UNSAFE})


# Ticket tags of one subject looked up at most: a reply quoting a thread of tickets names a few.
MAX_TAGS = 5


class Directory(Protocol):
    """Where the facts a decision needs are looked up (implemented by the store)."""

    async def look_up(self, needs: Needs) -> Facts:
        """All of `needs` answered, in one round trip."""
        ...


@dataclass(frozen=True, slots=True)
class Context:
    """A snapshot of configuration for one message (rules may be swapped by SIGHUP between)."""

    settings: Settings
    rules: Rules


@dataclass(slots=True)
class Inbound:
    raw: bytes
    mail_from: str
    msg: ParsedMessage
    hit: list[str] = field(default_factory=list)
    missed: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # from stages that passed, for the outcome
    _caught: Caught | None = field(default=None, repr=False)

    @property
    def sender(self) -> str:
        """spec 2.1: the sender is the From: address (the envelope sender when From is unusable)."""
        if self.msg.from_address or regular.is_null_sender(self.mail_from):
            return self.msg.from_address
        return self.mail_from.lower()

    def caught(self, rules: Rules) -> Caught:
        """The detection and skip rules that catch the message (asked by `needs` and by the
        automated stage: worked out once)."""
        if self._caught is None:
            detected, missed = automated.first_detection(rules.detection, self.msg, self.sender)
            skip: SkipRule | None = None
            skipped_by: list[str] = []
            if detected is not None:
                skip, skipped_by = automated.first_skip(rules.skip, self.msg.subject)
            self._caught = Caught(detected, skip, (*missed, *skipped_by))
        return self._caught


@dataclass(frozen=True, slots=True)
class Caught:
    """spec 2.1 steps 1 and 2: the first detection rule that catches a message, the first
    skip rule that then does, and the names of the rules tried before them."""

    detected: DetectionRule | None
    skip: SkipRule | None
    missed: tuple[str, ...]


StageFn = Callable[[Inbound, Context, Facts], Decision | None]


@dataclass(frozen=True, slots=True)
class Stage:
    name: str
    description: str
    enabled: Callable[[Settings], bool]
    run: StageFn


def _always(_: Settings) -> bool:
    return True


# --- effects shared by the stages (pure builders) ----------------------------------------------


def _forward(
    inb: Inbound,
    ctx: Context,
    target: str,
    action: Action,
    rule: str | None = None,
    *,
    reason: str | None = None,
) -> MailBuilder:
    """Forward untouched; X-Smtpgate-Action names the outcome (action and `reason`: support
    tells an out-of-office from a stranger's mail) and the rule that decided it (spec 2.4):
    `rule`, or else the last rule the message hit so far (the outcome's last `rules_hit`)."""
    rule = rule or (inb.hit[-1] if inb.hit else None)

    def build(_: Applied) -> list[OutboundMail]:
        return [
            outbound.forward_untouched(
                inb.raw,
                target=target,
                sender=ctx.settings.sender_address,
                connector=ctx.settings.connector_addresses[0],
                action=str(action),
                rule=rule,
                hostname=ctx.settings.hostname,
                # spec 2.4: "Auto-Submitted: no" (or an empty field, first in the forward)
                # does not mark our forward as automatic: ours goes first then.
                has_auto_submitted=inb.msg.auto_submitted not in (None, "", "no"),
                long_lines=inb.msg.long_lines,
                reason=reason,
            )
        ]

    return build


# A ReturnTransactionID longer than this is echoed in the response's XML only: the email
# package folds a long header in quadratic time (450 KB took 9 s), in the decision's transaction.
_SUBJECT_ID_MAX = 200


def _subject_id(return_id: str | None) -> str:
    return return_id if return_id and len(return_id) <= _SUBJECT_ID_MAX else ""


def note_text(inb: Inbound, ctx: Context, *, strip: bool) -> str:
    """The text filed on a ticket: a short header block and the (quote-stripped) body.

    A mail that is all quote keeps its whole text, unless it answers a mail and brings
    attachments: a reply whose only new content is a screenshot is filed with its attachment
    line (its "quote" is our acknowledgement or the earlier thread). Otherwise the quote is
    all there is to file: answers written into it unmarked, a forward without a prefix. (The
    images the HTML shows, a signature's logo, bring nothing.)"""
    msg = inb.msg
    text = msg.text
    if strip:
        stripped = strip_quotes(text, ctx.rules.compiled_quote_patterns())
        brings = any(not a.inline for a in msg.attachments)
        if stripped.strip() or (brings and (msg.in_reply_to or msg.references)):
            text = stripped
    return _note(inb, masked(text.strip(), _password_in(inb, ctx)))


def _note(inb: Inbound, text: str) -> str:
    """A short header block and `text` (stripped and masked by the caller)."""
    msg = inb.msg
    who = f"{msg.from_name} <{inb.sender}>" if msg.from_name else inb.sender
    head = [f"From: {who or '(unknown)'}", f"Subject: {msg.subject or '(no subject)'}"]
    if msg.attachments:
        head.append(
            "Attachments: "
            + "; ".join(
                f"{a.filename or '(unnamed)'} ({a.content_type}, {a.size} bytes)"
                for a in msg.attachments
            )
        )
    return "\n".join(head) + ("\n\n" + text if text else "")


# An XML transaction's <Password> element in its plain form (any case, spaces in the tags),
# and the root element's name, which text holding a transaction has.
_PASSWORD_ELEMENT = re.compile(r"(<\s*password\s*>)[^<]*(<\s*/\s*password\s*>)", re.IGNORECASE)
_TRANSACTION_NAME = re.compile("commitcrmtransaction", re.IGNORECASE)
_MASK = "********"


def masked(text: str, password: str | None) -> str:
    """`text` filed on a ticket with an XML transaction's password masked: a transaction an
    alert rule detects (spec 2 checks the automated branch first) is filed as an alert, and
    every technician reads its ticket. The password the parser read is masked wherever it
    stands (CDATA, a namespace prefix, attributes, a comment beside it), and the plain
    element's content whatever it holds. (A forward goes untouched, as the spec has it.)"""
    text = _PASSWORD_ELEMENT.sub(rf"\1{_MASK}\2", text)
    if password and len(password) >= 4:  # (a shorter one would mask ordinary words)
        text = text.replace(password, _MASK)
    return text


def _transaction_of(inb: Inbound, settings: Settings) -> xmlapi.Transaction | None:
    """The XML transaction the message holds (spec 2.2), or None for ordinary mail."""
    return xmlapi.find_transaction(
        inb.msg.xml_candidates,
        max_bytes=settings.api_max_xml_bytes,
        charsets=inb.msg.xml_charsets,
    )


def _password_in(inb: Inbound, ctx: Context) -> str | None:
    """The <Password> of the transaction the message holds, if it holds one."""
    if _TRANSACTION_NAME.search(inb.msg.text) is None:  # (no lowered copy of the text)
        return None
    tx = _transaction_of(inb, ctx.settings)
    return None if tx is None else tx.password


def _new_ticket(
    inb: Inbound, ctx: Context, account: str, contact: str | None, source: str
) -> NewTicket:
    """The subject as description, the whole body as details, the message filed as the first
    history note. Nothing is stripped: quotes are cut from replies filed on a ticket that
    already holds what they quote (spec 2.3), while a new ticket has no history, and the text
    below "Forwarded message" or "Original Message" is often the request itself."""
    msg = inb.msg
    body = masked(msg.text.strip(), _password_in(inb, ctx))  # the details, and the note's text
    return NewTicket(
        account=account,
        contact=contact,
        description=msg.subject or "(no subject)",
        details=body,
        source=source,
        note=_note(inb, body),
        attachments=_attachments(msg),
        message_id=msg.message_id,
    )


def _attachments(msg: ParsedMessage) -> tuple[dict[str, object], ...]:
    return tuple(
        {"filename": a.filename, "content_type": a.content_type, "size": a.size}
        for a in msg.attachments
    )


def _may_answer(inb: Inbound, ctx: Context, recipient: str | None) -> str | None:
    """Why an automatic mail to `recipient` must not be sent (spec 2.4), or None if it may."""
    if not recipient:
        return "no recipient"
    if ctx.settings.is_connector(recipient):
        return "recipient is a connector address"
    if ctx.settings.is_own_address(recipient):
        return "recipient is the gateway's own sender address"
    if regular.is_robot_address(recipient):
        return "recipient is a robot address"
    return regular.no_auto_answer_reason(inb.msg, inb.mail_from)


def _sender_lookups(inb: Inbound) -> tuple[Lookup, ...]:
    addresses, domains = automated.sender_keys(inb.sender)
    return ("email", tuple(addresses)), ("domain", tuple(domains))


def _account_by_sender(facts: Facts) -> tuple[automated.Match, str | None]:
    """The sender's account: by address (account email or contact), then domain; ambiguity →
    not found (spec 2.1.3). An address that names several accounts stops there: the sender is
    someone at one of them, and a third account holding the domain would be a guess."""
    for (search, keys), found in zip(facts.needs.by_sender, facts.by_sender, strict=True):
        if not keys:
            continue
        match = automated.resolve(keys, found)
        if match.account:
            return match, None
        if match.ambiguous:
            what = "sender address" if search == "email" else f"sender domain {keys[0]}"
            return automated.Match(None), f"{what} names {match.ambiguous} accounts (ambiguous)"
    return automated.Match(None), None


# --- the stages -------------------------------------------------------------------------------


# A reason the operator must hear of (a WARNING and a metric, Gateway._record): the mailbox a
# forward went to (support's, or the skip address's) refused it, and may be refusing every one.
FORWARD_BOUNCED = "forward_bounced"


def stage_loop(inb: Inbound, ctx: Context, facts: Facts) -> Decision | None:
    settings = ctx.settings
    marker = inb.msg.loop_header  # the parser's view also catches a folded field
    markers = regular.loop_markers(inb.raw) | ({marker} if marker else set())
    if any(settings.is_connector(m) for m in markers):
        return Decision(Path.REGULAR, Action.IGNORED, reason="loop")
    if regular.is_own_message_id(inb.msg.message_id, settings.hostname):
        # One of our acknowledgements or responses, back under its own Message-ID (a redirect
        # that dropped our headers): never the customer's reply.
        return Decision(
            Path.REGULAR, Action.IGNORED, reason="loop", notes=["our own Message-ID came back"]
        )
    # (A report goes the regular path: forwarded, if at all, to internal support.)
    targets = (settings.internal_support_address,)
    if inb.msg.is_delivery_report and regular.reports_failure_to(inb.raw, targets):
        # A bounce of a forward to support (its mailbox full): forwarded there, it bounced
        # back to us again, for ever. Not sent, but told (FORWARD_BOUNCED): it may be the one
        # trace of a support mailbox that loses every forward.
        return Decision(
            Path.REGULAR,
            Action.IGNORED,
            reason=FORWARD_BOUNCED,
            notes=["a delivery report about the address we forward to: not sent back there"],
        )
    if inb.msg.is_delivery_report or _encloses_message(inb.msg):
        # A bounce of one of our own mails, or one of our forwards sent back as an attachment
        # (a support mailbox's rule forwarding what we forwarded): answering or forwarding it
        # could loop for ever. (A customer sending back our acknowledgement as an attachment
        # is no loop: only forwards carry the action header.) Our loop header names the
        # connector with its domain in IDNA form (outbound); older mails as configured. A
        # bounce returning the mail base64-encoded (Domino) hides it from the raw bytes: the
        # parser tells its loop header.
        raw = inb.raw.lower()
        spellings = {s for c in settings.connector_addresses for s in (c, ascii_domain(c))}
        ours = any(f"{outbound.LOOP_HEADER}: {c}".lower().encode() in raw for c in spellings)
        ours = ours or any(settings.is_connector(m) for m in inb.msg.enclosed_loop_markers)
        forward = f"{outbound.ACTION_HEADER}:".lower().encode() in raw
        forward = forward or inb.msg.encloses_forward
        if ours and (inb.msg.is_delivery_report or forward):
            if not inb.msg.is_delivery_report and facts.employee:
                # A technician filing one of our forwards on its ticket ("FW: [Ticket #1]", the
                # forward attached) on purpose: an active employee's reply is only filed, and
                # sends nothing that could come back (spec 2.3.1).
                reply = stage_ticket_reply(inb, ctx, facts)
                if reply is not None:
                    return reply
            # A bounce of our forward: support's mailbox (or a redirect of it) refused it.
            bounced = inb.msg.is_delivery_report and forward
            return Decision(
                Path.REGULAR, Action.IGNORED, reason=FORWARD_BOUNCED if bounced else "loop"
            )
    return None


def _answers_mail(msg: ParsedMessage) -> bool:
    """An out-of-office or a bounce about an alert ("Automatic reply: Alert for Site …") is an
    answer to mail, not the alert: a subject rule would open a ticket for it. Spec 2.3 files it
    on its ticket, or forwards it to support. Only the sure signs count: an alert may well say
    "Auto: …" with Precedence: bulk, or come from postmaster@."""
    return msg.auto_submitted == "auto-replied" or bool(msg.report_structure)


def _encloses_message(msg: ParsedMessage) -> bool:
    return any(a.content_type.startswith("message/") for a in msg.attachments)


def stage_automated(inb: Inbound, ctx: Context, facts: Facts) -> Decision | None:
    rules, msg, settings = ctx.rules, inb.msg, ctx.settings
    if _answers_mail(msg):
        return None
    caught = inb.caught(rules)
    inb.missed += caught.missed
    if caught.detected is None:
        return None
    inb.hit.append(str(caught.detected.name))
    if (skip := caught.skip) is not None:
        inb.hit.append(str(skip.name))
        return Decision(
            Path.AUTOMATED,
            Action.AUTOMATED_SKIPPED,
            mails=_forward(inb, ctx, settings.skip_target, Action.AUTOMATED_SKIPPED, skip.name),
        )
    notes: list[str] = []
    match = automated.Match(None)
    misses: list[str] = []  # what each rule that found nothing looked for (for the operator)
    ambiguous = False
    # The rules' lookups (`needs`), resolved in rule order.
    looked_up = zip(rules.account, facts.needs.by_rule, facts.by_rule, strict=True)
    for rule, (_, values), found in looked_up:
        match = automated.resolve(values, found)
        if match.account:
            inb.hit.append(str(rule.name))
            break
        inb.missed.append(str(rule.name))
        if match.ambiguous:
            ambiguous = True
            notes.append(
                f"{rule.name}: {match.value!r} names {match.ambiguous} accounts (ambiguous)"
            )
        elif values:
            # The located text may be a whole (long, hostile) subject: the note shows its start.
            misses.append(f"{rule.name}: no account with {rule.search} {values[0][:100]!r}")
        elif automated.locate(rule, msg.subject):
            misses.append(f"{rule.name}: no text where its phrases point")
        elif rule.after and rule.before and automated.phrase_in(rule.after, msg.subject):
            misses.append(f"{rule.name}: no {rule.before!r} after {rule.after!r} in the subject")
        else:
            phrases = "its phrases are" if rule.after and rule.before else "its phrase is"
            misses.append(f"{rule.name}: {phrases} not in the subject")
    if not match.account and rules.account_by_sender:
        match, note = _account_by_sender(facts)
        ambiguous = ambiguous or note is not None  # the note is only about ambiguity
        if note:
            notes.append(note)
        if match.account:
            inb.hit.append("account_by_sender")
        else:
            inb.missed.append("account_by_sender")
    if match.account is None:
        # The action already says "no account"; a reason is given only when it was ambiguity
        # (spec 2.1.3: "say so in the outcome"), as the spec samples' expected.toml has it.
        return Decision(
            Path.AUTOMATED,
            Action.AUTOMATED_NO_ACCOUNT,
            reason="ambiguous" if ambiguous else None,
            notes=misses + notes,
            mails=_forward(
                inb,
                ctx,
                settings.internal_support_address,
                Action.AUTOMATED_NO_ACCOUNT,
                reason="ambiguous" if ambiguous else None,
            ),
        )
    return Decision(
        Path.AUTOMATED,
        Action.AUTOMATED_TICKET,
        account=match.account,
        notes=notes,
        new_ticket=_new_ticket(inb, ctx, match.account, match.contact, SOURCE_AUTOMATED),
    )


def stage_xml(inb: Inbound, ctx: Context, _: Facts) -> Decision | None:
    settings = ctx.settings
    tx = _transaction_of(inb, settings)
    if tx is None:
        return None
    tx = dataclasses.replace(tx, zone=settings.api_zone)
    unreadable = [e for e in tx.errors if e.code in UNREADABLE_CODES]
    if unreadable:
        # Malformed or refused for safety: nothing was read, not even the password or the
        # response address, so there is nobody to answer.
        return Decision(
            Path.XML,
            Action.XML_REJECTED,
            reason="unreadable",
            error_code=unreadable[0].code,
            notes=[e.message for e in unreadable[:5]],
        )
    password = settings.api_password.get_secret_value() if settings.api_password else None
    if not xmlapi.password_ok(tx, password):
        # xml-api 2: logged, never answered — a wrong password must not make us a reflector.
        log.warning("XML transaction with a wrong or missing password from %s", inb.sender)
        return Decision(
            Path.XML, Action.XML_REJECTED, reason="password", error_code=xmlapi.ERR_PASSWORD
        )
    why_not = _may_answer(inb, ctx, tx.response_to)
    notes: list[str] = []
    if tx.others:
        notes.append(
            f"{tx.others} more transaction(s) in this message not applied: one per message"
        )
    if not settings.api_send_response:
        why_not = "responses disabled"
    elif tx.response_to and why_not:
        notes.append(f"no response: {why_not}")
    elif tx.unusable_response_to:
        notes.append(
            f"no response: SendResponseToEmail {tx.unusable_response_to!r} is not one address"
        )
    bcc = (settings.api_response_bcc,) if settings.api_response_bcc else ()

    def respond(applied: Applied) -> list[OutboundMail]:
        if why_not or not tx.response_to:
            return []
        status = applied.error_code or 1
        body = xmlapi.response_xml(
            tx,
            status=status,
            rec_id=applied.record_id if status == 1 else None,
            errors=[xmlapi.XmlError(code, fld, text) for code, fld, text in applied.errors],
        )
        return outbound.compose(
            kind=MailKind.RESPONSE,
            sender=settings.sender_address,
            to=tx.response_to,
            subject=f"CommitCRM XML response: {_subject_id(tx.return_id)}".strip(),
            body=body.decode("utf-8"),
            connector=settings.connector_addresses[0],
            hostname=settings.hostname,
            in_reply_to=inb.msg.message_id,
            subtype="xml",
            bcc=bcc,
        )

    return Decision(Path.XML, Action.XML_APPLIED, transaction=tx, mails=respond, notes=notes)


def stage_ticket_reply(inb: Inbound, ctx: Context, facts: Facts) -> Decision | None:
    msg, settings = inb.msg, ctx.settings
    tagged, threaded, employee = facts.tickets, facts.threaded, facts.employee
    if facts.needs.ticket_numbers and not tagged:
        inb.missed.append("ticket_tag")  # a tag naming no ticket
    named = list(dict.fromkeys(t for t in (*tagged, threaded) if t is not None))
    if not named:
        return None
    notes: list[str] = []
    ticket = named[0]
    if len(named) > 1:
        ticket, why = _one_of(named, facts)
        listed = ", ".join(f"#{t[1]}" for t in named)
        notes.append(f"tickets {listed} named: filed on #{ticket[1]}, {why}")
    inb.hit.append("ticket_tag" if ticket in tagged else "in_reply_to")
    rec_id, number, account = ticket
    return Decision(
        Path.REGULAR,
        Action.TICKET_REPLY,
        account=account,
        reason="employee" if employee else None,
        notes=notes,
        reply=FileReply(
            rec_id,
            number,
            # spec 2.3 strips the quote of a reply; a forward's "quote" is what it forwards.
            note_text(inb, ctx, strip=not regular.is_forward(msg.subject)),
            _attachments(msg),
            msg.message_id,
        ),
        mails=_forward(inb, ctx, settings.internal_support_address, Action.TICKET_REPLY)
        if not employee
        else no_mail,
    )


def _one_of(named: Sequence[TicketRef], facts: Facts) -> tuple[TicketRef, str]:
    """The ticket a reply naming several (by tags, or a tag and its threading headers) is filed
    on, and why: the one both a tag and the thread name; else the first of the sender's own
    account (a customer's help desk numbering as "[Ticket #N]" too named another customer's
    ticket first); else, unless an employee sent it, the thread's; else the first tag (a tag
    names its ticket whoever sends it)."""
    tagged, threaded = facts.tickets, facts.threaded
    if threaded is not None and threaded in tagged:
        return threaded, "the ticket its tag and its threading headers both name"
    match, _ = _account_by_sender(facts)
    for ticket in named:
        if match.account is not None and ticket[2] == match.account:
            return ticket, "the ticket of the sender's account"
    if threaded is not None and not facts.employee:
        # Our own Message-ID is surer than a tag, which may be another help desk's number (a
        # technician retagging a reply on purpose is an employee: the tag wins there).
        return threaded, "the ticket its threading headers name"
    return tagged[0], "the first tag"


def stage_auto_reply(inb: Inbound, ctx: Context, _: Facts) -> Decision | None:
    if not regular.is_auto_reply(inb.msg, inb.mail_from):
        return None
    return Decision(
        Path.REGULAR,
        Action.FORWARDED,
        reason="auto_reply",
        mails=_forward(
            inb, ctx, ctx.settings.internal_support_address, Action.FORWARDED, reason="auto_reply"
        ),
    )


def stage_known_sender(inb: Inbound, ctx: Context, facts: Facts) -> Decision | None:
    msg, settings = inb.msg, ctx.settings
    match, note = _account_by_sender(facts)
    if match.account is None:
        if note:  # spec 2.1.3: an ambiguous sender is unknown, and the outcome says why
            inb.notes.append(note)
        return None
    inb.hit.append("known_sender")
    why_not = None if settings.acknowledge else "acknowledgements off"
    why_not = why_not or _may_answer(inb, ctx, inb.sender)
    word = ctx.rules.ticket_tag

    def acknowledge(applied: Applied) -> list[OutboundMail]:
        if why_not or applied.ticket_number is None:
            return []
        tag = regular.ticket_tag(word, applied.ticket_number)
        return outbound.compose(
            kind=MailKind.ACK,
            sender=settings.sender_address,
            to=inb.sender,
            subject=f"{tag} {msg.subject}".strip(),
            body=(
                f"Thank you for your message. We have opened ticket {applied.ticket_number}"
                f" and will be in touch.\n\nPlease keep {tag} in the subject when you reply.\n"
            ),
            connector=settings.connector_addresses[0],
            hostname=settings.hostname,
            in_reply_to=msg.message_id,
            references=msg.references,
            # Sent from a mailbox that is no connector (SMTPGATE_FROM_ADDRESS), the customer's
            # reply went there and never reached the ticket.
            reply_to=None
            if settings.is_connector(settings.sender_address)
            else settings.connector_addresses[0],
        )

    notes = [note] if note else []
    if settings.acknowledge and why_not:
        notes.append(f"no acknowledgement: {why_not}")
    return Decision(
        Path.REGULAR,
        Action.TICKET_CREATED,
        account=match.account,
        notes=notes,
        new_ticket=_new_ticket(inb, ctx, match.account, match.contact, SOURCE_EMAIL),
        mails=acknowledge,
    )


def stage_unknown_sender(inb: Inbound, ctx: Context, _: Facts) -> Decision | None:
    return Decision(
        Path.REGULAR,
        Action.FORWARDED,
        reason="unknown_sender",
        mails=_forward(
            inb,
            ctx,
            ctx.settings.internal_support_address,
            Action.FORWARDED,
            reason="unknown_sender",
        ),
    )


# The precedence (spec 2), in order. One row per stage; the first that returns a decision wins.
STAGES: tuple[Stage, ...] = (
    # spec 2.4: our own mail came back (loop header, our Message-ID, a bounce of ours): record
    # it and send nothing (an active employee filing our forward on its ticket: filed only).
    Stage("loop", "our own mail come back: recorded, not answered", _always, stage_loop),
    # spec 2.1: detection → skip → account detection → ticket or forward.
    Stage(
        "automated",
        "automated email: detection, skip and account rules",
        lambda s: s.automated_enabled,
        stage_automated,
    ),
    # spec 2.2: an XML transaction in the body, an XML part or an .xml attachment.
    Stage("xml", "API by Email: XML transaction", lambda s: s.api_enabled, stage_xml),
    # spec 2.3.1: ticket tag in the subject, or In-Reply-To/References of a ticket's message.
    Stage("ticket_reply", "reply filed on its ticket", _always, stage_ticket_reply),
    # spec 2.3.2: out-of-office, auto-replies and bounces never open a ticket.
    Stage("auto_reply", "auto-reply forwarded to support", _always, stage_auto_reply),
    # spec 2.3.3: a sender known by address, contact or domain gets a new ticket.
    Stage("known_sender", "new ticket for a known sender", _always, stage_known_sender),
    # spec 2.3.4: everything else goes to a human.
    Stage("unknown_sender", "forwarded to internal support", _always, stage_unknown_sender),
)


# Header fields put on top of a message on its way: by servers in transit (RFC 5321 4.4's
# trace fields and their kin: delivery, authentication and filter results), and by the mailbox
# or client a message was saved from (`explain` of such a file). A copy that came again by
# another route (a backup MX) has other ones.
_TRANSIT_FIELD = re.compile(
    rb"(?:(received)|return-path|delivered-to|x-original-to|x-received|received-spf"
    rb"|authentication-results|arc-[\w-]+|x-spam-[\w-]+|x-virus-[\w-]+|x-envelope-[\w-]+"
    rb"|x-mozilla-[\w-]+|x-account-key|x-uidl|status|x-status)[ \t]*:",
    re.IGNORECASE,
)
_OURS = b" (smtpgate) with "  # in the `by` clause of our own Received: (front.Handler)
_LINE_END = re.compile(rb"\r?\n")


def dedupe_key(message_id: str | None, raw: bytes) -> str:
    """spec 2.4: the Message-ID, or without one a hash of the content as the sender sent it:
    from its first hop's Received: field on (the oldest of those on top, ours left out), or,
    when it has none, from below the fields on top. A copy by another route (a backup MX: more
    fields above the first hop's) is the same content; the same alert sent again through the
    customer's relay (its Received: with another time and queue id, no Message-ID nor Date
    added) is not. Not the envelope either: an MTA delivers one message to two connector
    addresses of different domains in two transactions, and it is one message. A saved file
    (`explain`) is read as SMTP carried it: CRLF line ends, no mbox "From " line."""
    if message_id:
        return message_id
    if has_bare_line_end(raw):
        raw = _LINE_END.sub(b"\r\n", raw)
    if raw and not raw.endswith(b"\r\n"):
        raw += b"\r\n"
    start = raw.find(b"\r\n") + 2 if raw.startswith(b"From ") else 0
    origin = -1
    while (field := _TRANSIT_FIELD.match(raw, start)) is not None:
        end = raw.find(b"\r\n", start)  # the field's last line: folded lines go with it
        while end >= 0 and raw[end + 2 : end + 3] in (b" ", b"\t"):
            end = raw.find(b"\r\n", end + 2)
        end = len(raw) if end < 0 else end + 2
        if field.group(1) and raw.find(_OURS, start, end) < 0:
            origin = start
        start = end
    content = memoryview(raw)[origin if origin >= 0 else start :]
    return "sha256:" + hashlib.sha256(content).hexdigest()


def fingerprint(message_id: str | None, msg: ParsedMessage) -> str | None:
    """What tells two messages under one Message-ID apart (spec 2.4 keys duplicates on it): the
    Subject, the From address, the text as read and the attachments (name, type, size and a
    hash of the decoded bytes). A copy by another route has them all, whatever a hop did to
    its bytes (8bit to quoted-printable or base64, a new MIME boundary, other headers and Date,
    as N-central's re-sent notifications); the next alert of a device that reuses one fixed
    Message-ID, or a copier's next scan, has something else. "fp:<id>:<fingerprint>", 64 and
    128 bits of SHA-256. (A banner a filter adds to the text makes a copy look new.)"""
    if not message_id:
        return None
    parts = [msg.subject, msg.from_address, " ".join(msg.text.split())]
    parts += (f"{a.filename}|{a.content_type}|{a.size}|{a.digest}" for a in msg.attachments)
    seen = "\0".join(parts).encode("utf-8", "surrogatepass")
    id_hash = hashlib.sha256(message_id.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return f"fp:{id_hash}:{hashlib.sha256(seen).hexdigest()[:32]}"


def needs(inb: Inbound, ctx: Context) -> Needs:
    """Every lookup a stage may need for this message (pure): an alert's account rules (a
    detection rule catches it and no skip rule does), the sender's account (a new ticket,
    account-by-sender, a reply naming several tickets: not for an alert the automated stage
    decides by its rules alone), the subject's ticket tags, the threading headers' tickets
    and, where a ticket may be named, the sender's employee standing. Asking a little more
    than the deciding stage uses costs less than a second round trip."""
    msg, rules = inb.msg, ctx.rules
    alert = (
        ctx.settings.automated_enabled
        and not _answers_mail(msg)
        and inb.caught(rules).detected is not None
    )
    by_rule: tuple[Lookup, ...] = ()
    if alert and inb.caught(rules).skip is None:
        by_rule = tuple(
            (rule.search, tuple(automated.candidates(rule, msg.subject))) for rule in rules.account
        )
    numbers = tuple(dict.fromkeys(regular.tagged_numbers(rules.ticket_tag, msg.subject)[:MAX_TAGS]))
    message_ids = (*msg.in_reply_to, *msg.references[::-1])
    ticket_named = bool(numbers or message_ids or _encloses_message(msg))
    by_sender_needed = not alert or rules.account_by_sender or ticket_named
    return Needs(
        by_rule=by_rule,
        by_sender=_sender_lookups(inb) if by_sender_needed else (),
        employee=inb.sender if ticket_named else "",
        ticket_numbers=numbers,
        message_ids=message_ids,
    )


async def decide(
    raw: bytes, mail_from: str, msg: ParsedMessage, ctx: Context, directory: Directory
) -> Decision:
    """Look up what the message needs (one round trip), then run the precedence over it."""
    inb = Inbound(raw, mail_from, msg)
    return precedence(inb, ctx, await directory.look_up(needs(inb, ctx)))


def precedence(inb: Inbound, ctx: Context, facts: Facts) -> Decision:
    """The stages in order over one message and its facts (pure); the last always decides."""
    msg = inb.msg
    for stage in STAGES:
        if not stage.enabled(ctx.settings):
            continue
        decision = stage.run(inb, ctx, facts)
        if decision is not None:
            decision.rules_hit = inb.hit + decision.rules_hit
            decision.rules_missed = inb.missed + decision.rules_missed
            decision.notes[:0] = inb.notes
            if msg.defects:
                decision.notes.extend(f"parse: {d}" for d in msg.defects[:5])
            # Where a copy goes if its Message-ID came before with other content (fingerprint):
            # where this decision would forward it (a skipped alert to the skip target). An XML
            # transaction is never forwarded: it holds the API password.
            target = (
                ctx.settings.skip_target
                if decision.action == Action.AUTOMATED_SKIPPED
                else ctx.settings.internal_support_address
            )
            if decision.path != Path.XML:
                decision.reused_id_mails = _forward(
                    inb, ctx, target, Action.DUPLICATE, reason=REUSED_ID
                )
            return decision
    raise AssertionError("the last stage always decides")  # pragma: no cover
