"""Automated-email rules (spec 2.1) as pure functions: detection, skip, and account detection.

Account detection is split in two pure halves around one indexed store probe: `candidates`
says which normalized values to look up, `resolve` picks the account from what was found.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from smtpgate.config import AccountRule, DetectionRule, SkipRule
from smtpgate.mail import ParsedMessage, address_domain
from smtpgate.model import address_key, domain_spellings, nfc, normalize_key

# A located value rarely has more words than this; the cap bounds the probe for hostile subjects.
MAX_CANDIDATES = 31
# Cut points looked at, whatever they yield: a hostile subject ("Acme" and 8,000 times " -")
# offers thousands of cuts that all normalize to the same key, and each costs a pass over its
# piece (quadratic: seconds of the event loop per rule).
MAX_CUTS = 8 * MAX_CANDIDATES
# Occurrences of a rule's phrase looked at until one names an account: those standing as words
# first ("on" in "... Monitor] Ping down on Acme Corp" after the one inside "Monitor"), each
# group in subject order, among the first MAX_SCANNED. Each occurrence offers its whole text and
# at most MAX_CANDIDATES shorter pieces, so a long subject cannot crowd out a later one's.
MAX_OCCURRENCES = 4
MAX_SCANNED = 64
MAX_VALUES = MAX_OCCURRENCES * (MAX_CANDIDATES + 1)
# Cut points for the longest word-boundary prefix/suffix: every position that is not inside a
# word, so "Acme Corp, Disk", "Acme Corp\SRV01" and "Acme Corp/HQ" all offer "Acme Corp".
_CUT = re.compile(r"(?<!\w)|(?!\w)")

Found = Mapping[str, Sequence[tuple[str, str | None]]]


def phrase_in(phrase: str, text: str) -> bool:
    # Subjects are whitespace-collapsed by the parser; a phrase is compared the same way.
    return " ".join(phrase.split()).casefold() in text.casefold()


def _phrase_pattern(phrase: str) -> re.Pattern[str]:
    """A located phrase, case-folded as `phrase_in` compares it (to search a `_fold`ed text),
    any white-space run matching any other. Its outer white space also matches the text's
    start or end, which the parser trims ("Acme Corp -" for "{site} - {message}")."""
    parts = re.split(r"\s+", phrase.casefold())
    pattern = r"\s+".join(re.escape(part) for part in parts)
    if len(parts) > 1 and not parts[0]:
        pattern = r"(?:^|\s+)" + pattern.removeprefix(r"\s+")
    if len(parts) > 1 and not parts[-1]:
        pattern = pattern.removesuffix(r"\s+") + r"(?:\s+|$)"
    return re.compile(pattern)


def _fold(text: str) -> tuple[str, list[int] | None]:
    """`text` case-folded, and when folding changed its length (ß is "ss", ﬁ is "fi") the
    position in `text` of each folded character, to cut `text` where the folded one matched."""
    folded = text.casefold()
    if len(folded) == len(text):  # each character folded to one: positions are the same
        return folded, None
    origin: list[int] = []
    for i, ch in enumerate(text):
        origin.extend(itertools.repeat(i, len(ch.casefold())))
    origin.append(len(text))
    return folded, origin


def _is_word(ch: str) -> bool:
    return ch.isalnum() or ch == "_"


def _occurrences(pattern: re.Pattern[str], text: str) -> list[re.Match[str]]:
    """The phrase's occurrences to try (MAX_OCCURRENCES): those standing as words first."""
    found = list(itertools.islice(pattern.finditer(text), MAX_SCANNED))

    def inside_a_word(m: re.Match[str]) -> bool:
        start, end = m.start(), m.end()
        return (start > 0 and _is_word(text[start - 1]) and _is_word(text[start])) or (
            end < len(text) and _is_word(text[end - 1]) and _is_word(text[end])
        )

    found.sort(key=inside_a_word)  # stable: subject order within each group
    return found[:MAX_OCCURRENCES]


def sender_matches(rule: DetectionRule, address: str) -> bool:
    """The address, in any case and either IDNA spelling of its domain (`model.address_key`,
    as the rule's senders are kept), is one of the rule's, or has one of its @domains."""
    key = address_key(address).rstrip(".")
    return any(key.endswith(s) if s.startswith("@") else key == s for s in rule.sender)


def detection_matches(rule: DetectionRule, msg: ParsedMessage, sender: str | None = None) -> bool:
    """spec 2.1.1: sender condition and/or subject phrase; both given → both must hold.

    The sender is the From: address unless the caller names one (the pipeline passes the
    envelope sender when From: is unusable)."""
    address = msg.from_address if sender is None else sender
    if rule.sender and not sender_matches(rule, address):
        return False
    return not (rule.subject and not phrase_in(rule.subject, msg.subject))


def first_detection(
    rules: Sequence[DetectionRule], msg: ParsedMessage, sender: str | None = None
) -> tuple[DetectionRule | None, list[str]]:
    """The first matching detection rule and the names of those tried before it."""
    missed: list[str] = []
    for rule in rules:
        if detection_matches(rule, msg, sender):
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


def locate(rule: AccountRule, subject: str) -> list[tuple[str, str]]:
    """The texts the rule points at, one per occurrence of its phrase (`_occurrences`), each
    with its mode: 'exact' (after and before), 'prefix' (after only) or 'suffix' (before
    only). "(Warning) Disk low on Acme Corp (SRV01)" has two texts before "(": an empty one,
    and the one that names the account. Phrases are found case-folded, as detection finds
    them; the texts are cut from the subject as written."""
    folded, origin = _fold(subject)

    def at(k: int) -> int:
        return k if origin is None else origin[k]

    located: list[tuple[str, str]] = []
    if rule.after:
        before = _phrase_pattern(rule.before) if rule.before else None
        for m in _occurrences(_phrase_pattern(rule.after), folded):
            if before is None:
                located.append(("prefix", subject[at(m.end()) :]))
            elif (end := before.search(folded, m.end())) is not None:
                located.append(("exact", subject[at(m.end()) : at(end.start())]))
    elif rule.before:
        for m in _occurrences(_phrase_pattern(rule.before), folded):
            located.append(("suffix", subject[: at(m.start())]))
    return located


def candidates(rule: AccountRule, subject: str) -> list[str]:
    """Normalized values to look up for this rule, most preferred first: for each place the
    rule points at, in order, its whole text, then (after or before only) its longest
    word-boundary prefix or suffix first."""
    values: list[str] = []
    seen: set[str] = set()
    for mode, text in locate(rule, subject):
        for value in _values(mode, text):
            if value not in seen:
                seen.add(value)
                values.append(value)
        if len(values) >= MAX_VALUES:  # later occurrences would only cost the probe
            break
    return values[:MAX_VALUES]


def _values(mode: str, text: str) -> list[str]:
    whole = normalize_key(text)
    if not whole:
        return []
    if mode == "exact":
        return [whole]
    # spec 2.1.3: the whole text (exact match) first, then the longest word-boundary prefix
    # (after only) or suffix (before only). Values are short, so the pieces are collected from
    # the anchored end outwards: a long subject cannot push the short values out of the probe.
    cuts = [m.start() for m in _CUT.finditer(text)]
    pieces = (text[:k] for k in cuts) if mode == "prefix" else (text[k:] for k in reversed(cuts))
    shorter: list[str] = []
    for piece in itertools.islice(pieces, MAX_CUTS):
        key = normalize_key(piece)
        if key and key != whole and key not in shorter:
            shorter.append(key)
            if len(shorter) >= MAX_CANDIDATES:
                break
    return [whole, *reversed(shorter)]


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


def sender_keys(address: str) -> tuple[list[str], list[str]]:
    """The address and domain keys for account-by-sender (spec 2.1 step 3, sender part): as
    given (composed: a decomposed ü matched no stored address), and with the domain in its
    other IDNA spelling (model.domain_spellings)."""
    address = nfc(address).lower()
    domain = address_domain(address)
    if not domain:
        return ([address] if address else []), []
    local = address[: address.rfind("@")]
    domains = domain_spellings(domain)
    return [f"{local}@{d}" for d in domains] if local else [], domains
