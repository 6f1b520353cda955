"""Automated-email rules (spec 2.1) as pure functions: detection, skip, and account detection.

Account detection is split in two pure halves around one indexed store probe: `candidates`
says which normalized values to look up, `resolve` picks the account from what was found.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from smtpgate.config import AccountRule, DetectionRule, SkipRule
from smtpgate.mail import ParsedMessage, address_domain
from smtpgate.model import TRIM_CHARS, normalize_key

# A located value rarely has more words than this; the cap bounds the probe for hostile subjects.
MAX_CANDIDATES = 64
# Word boundaries for the longest-prefix/suffix search: white space or the trimmed punctuation.
_BOUNDARY = re.compile(r"[\s:\-#,;\[\]()\"']+")

Found = Mapping[str, Sequence[tuple[str, str | None]]]


def phrase_in(phrase: str, text: str) -> bool:
    return phrase.casefold() in text.casefold()


def sender_matches(rule: DetectionRule, address: str) -> bool:
    address = address.lower()
    return any(address.endswith(s) if s.startswith("@") else address == s for s in rule.sender)


def detection_matches(rule: DetectionRule, msg: ParsedMessage) -> bool:
    """spec 2.1.1: sender condition and/or subject phrase; both given → both must hold."""
    if rule.sender and not sender_matches(rule, msg.from_address):
        return False
    return not (rule.subject and not phrase_in(rule.subject, msg.subject))


def first_detection(
    rules: Sequence[DetectionRule], msg: ParsedMessage
) -> tuple[DetectionRule | None, list[str]]:
    """The first matching detection rule and the names of those tried before it."""
    missed: list[str] = []
    for rule in rules:
        if detection_matches(rule, msg):
            return rule, missed
        missed.append(str(rule.name))
    return None, missed


def first_skip(rules: Sequence[SkipRule], subject: str) -> tuple[SkipRule | None, list[str]]:
    missed: list[str] = []
    for rule in rules:
        if phrase_in(rule.subject, subject):
            return rule, missed
        missed.append(str(rule.name))
    return None, missed


def locate(rule: AccountRule, subject: str) -> tuple[str, str] | None:
    """The text the rule points at and its mode: ('exact'|'prefix'|'suffix', text), or None."""
    start, end = 0, len(subject)
    if rule.after:
        m = re.search(re.escape(rule.after), subject, re.IGNORECASE)
        if m is None:
            return None
        start = m.end()
    if rule.before:
        m = re.compile(re.escape(rule.before), re.IGNORECASE).search(subject, start)
        if m is None:
            return None
        end = m.start()
    text = subject[start:end]
    if rule.after and rule.before:
        return "exact", text
    return ("prefix" if rule.after else "suffix"), text


def candidates(rule: AccountRule, subject: str) -> list[str]:
    """Normalized values to look up for this rule, most preferred first (longest first)."""
    located = locate(rule, subject)
    if located is None:
        return []
    mode, text = located
    text = text.strip(TRIM_CHARS)
    if not text:
        return []
    if mode == "exact":
        return [normalize_key(text)]
    if mode == "prefix":
        cuts = [m.start() for m in _BOUNDARY.finditer(text)] + [len(text)]
        pieces = [text[:cut] for cut in sorted(set(cuts), reverse=True)]
    else:
        cuts = [0] + [m.end() for m in _BOUNDARY.finditer(text)]
        pieces = [text[cut:] for cut in sorted(set(cuts))]
    out: list[str] = []
    for piece in pieces:
        key = normalize_key(piece)
        if key and key not in out:
            out.append(key)
        if len(out) >= MAX_CANDIDATES:
            break
    return out


@dataclass(frozen=True, slots=True)
class Match:
    account: str | None
    contact: str | None = None
    ambiguous: int = 0  # number of accounts sharing the best value, when more than one
    value: str | None = None


def resolve(values: Sequence[str], found: Found) -> Match:
    """The first (longest) candidate that names accounts wins; several accounts: ambiguous."""
    for value in values:
        hits = found.get(value)
        if not hits:
            continue
        accounts = {account for account, _ in hits}
        if len(accounts) > 1:
            return Match(None, ambiguous=len(accounts), value=value)
        contacts = {contact for _, contact in hits if contact}
        contact = next(iter(contacts)) if len(contacts) == 1 else None
        return Match(hits[0][0], contact, value=value)
    return Match(None)


def sender_keys(address: str) -> tuple[str, str]:
    """(address, domain) keys for account-by-sender (spec 2.1 step 3, sender part)."""
    address = address.lower()
    return address, address_domain(address)
