"""Property tests (hypothesis) for the rule engine (spec 2.1) and the XML parser (xml-api.md):
case-insensitivity, rule order, after/before/between boundaries, and parser invariants."""

from __future__ import annotations

import dataclasses
from xml.sax.saxutils import escape

import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from smtpgate.config import AccountRule, DetectionRule, SkipRule
from smtpgate.mail import ParsedMessage, parse_message
from smtpgate.model import TRIM_CHARS, normalize_key
from smtpgate.rules.automated import (
    MAX_CANDIDATES,
    candidates,
    detection_matches,
    first_detection,
    first_skip,
    resolve,
)
from smtpgate.xmlapi import ERR_UNSAFE, find_transaction

BASE = parse_message(b"")


def collapsed(text: str) -> str:
    return " ".join(text.split())


def message(subject: str = "", sender: str = "") -> ParsedMessage:
    """A parsed message as the parser hands it on: the subject's white space collapsed."""
    return dataclasses.replace(BASE, subject=collapsed(subject), from_address=sender)


def contains(phrase: str, subject: str) -> bool:
    """The oracle: case-insensitive containment, white-space runs compared collapsed."""
    return collapsed(phrase).casefold() in collapsed(subject).casefold()


CASINGS = st.sampled_from([str.upper, str.lower, str.swapcase, str.title, str.casefold])
# Phrases from letters that never occur in the surrounding text, so the first occurrence of a
# phrase in a generated subject is the one the test placed there.
PHRASE = st.text(alphabet="QXZ Kw", min_size=1, max_size=12).filter(lambda s: s.strip())
FILLER = st.text(alphabet="abcdefghijlmnoprstuvy0123456789 .!?/", max_size=30)
WORD = st.text(alphabet="abcdefghijlmnoprstuvy0123456789", min_size=1, max_size=8)
VALUE = st.lists(WORD, min_size=1, max_size=5).map(" ".join)
PUNCT = st.text(alphabet=TRIM_CHARS, max_size=4)
DOMAIN = st.from_regex(r"[a-z]{1,8}\.(com|org|example)", fullmatch=True)
LOCAL = st.from_regex(r"[a-z0-9._-]{1,10}", fullmatch=True)
ANY_TEXT = st.text(max_size=60)


# --- detection: case-insensitive, AND, first match wins -------------------------------------


@given(phrase=ANY_TEXT.filter(str.strip), pre=ANY_TEXT, post=ANY_TEXT, casing=CASINGS)
def test_subject_phrase_matches_in_any_case_anywhere(
    phrase: str, pre: str, post: str, casing: object
) -> None:
    rule = DetectionRule(subject=phrase)
    shown = casing(rule.subject)  # type: ignore[operator]
    assume(shown.casefold() == str(rule.subject).casefold())
    assert detection_matches(rule, message(pre + shown + post))


@given(phrase=PHRASE, subject=FILLER)
def test_subject_phrase_absent_never_matches(phrase: str, subject: str) -> None:
    assert not detection_matches(DetectionRule(subject=phrase), message(subject))


@given(local=LOCAL, domain=DOMAIN, casing=CASINGS)
def test_sender_matches_in_any_case(local: str, domain: str, casing: object) -> None:
    address = f"{local}@{domain}"
    shown = casing(address)  # type: ignore[operator]
    assert detection_matches(DetectionRule(sender=[address.upper()]), message("", shown))
    assert detection_matches(DetectionRule(sender=[f"@{domain}"]), message("", shown))
    assert detection_matches(DetectionRule(sender=[f"*@{domain.upper()}"]), message("", shown))


@given(local=LOCAL, domain=DOMAIN, other=DOMAIN)
def test_domain_rule_matches_only_that_domain(local: str, domain: str, other: str) -> None:
    rule = DetectionRule(sender=[f"@{domain}"])
    assert detection_matches(rule, message("", f"{local}@{other}")) == (domain == other)


@given(
    sender_ok=st.booleans(),
    subject_ok=st.booleans(),
    local=LOCAL,
    domain=DOMAIN,
    phrase=PHRASE,
    filler=FILLER,
)
def test_sender_and_subject_both_given_means_and(
    sender_ok: bool, subject_ok: bool, local: str, domain: str, phrase: str, filler: str
) -> None:
    rule = DetectionRule(sender=[f"{local}@{domain}"], subject=phrase)
    sender = f"{local}@{domain}" if sender_ok else f"{local}x@{domain}"
    subject = filler + (phrase if subject_ok else "")
    assert detection_matches(rule, message(subject, sender)) == (sender_ok and subject_ok)


@given(
    phrases=st.lists(PHRASE, min_size=1, max_size=6),
    subject=st.lists(st.one_of(PHRASE, FILLER), max_size=5).map(" ".join),
)
def test_first_matching_detection_rule_wins_and_earlier_ones_are_missed(
    phrases: list[str], subject: str
) -> None:
    rules = [DetectionRule(subject=p, name=f"r{i}") for i, p in enumerate(phrases)]
    expected = next((i for i, r in enumerate(rules) if contains(str(r.subject), subject)), None)
    rule, missed = first_detection(rules, message(subject))
    if expected is None:
        assert rule is None
        assert missed == [r.name for r in rules]
    else:
        assert rule is rules[expected]
        assert missed == [r.name for r in rules[:expected]]


@given(
    phrases=st.lists(PHRASE, min_size=1, max_size=6),
    subject=st.lists(st.one_of(PHRASE, FILLER), max_size=5).map(" ".join),
    casing=CASINGS,
)
def test_first_matching_skip_rule_wins_in_any_case(
    phrases: list[str], subject: str, casing: object
) -> None:
    rules = [SkipRule(subject=p, name=f"s{i}") for i, p in enumerate(phrases)]
    expected = next((i for i, r in enumerate(rules) if contains(r.subject, subject)), None)
    rule, missed = first_skip(rules, collapsed(casing(subject)))  # type: ignore[operator]
    assert (rule is None) == (expected is None)
    if expected is not None:
        assert rule is rules[expected]
        assert missed == [r.name for r in rules[:expected]]


# --- account location: after / before / between ------------------------------------------


@given(
    after=PHRASE,
    before=PHRASE,
    pre=FILLER,
    value=VALUE,
    post=FILLER,
    p1=PUNCT,
    p2=PUNCT,
    casing=CASINGS,
)
def test_between_finds_exactly_the_trimmed_value(
    after: str,
    before: str,
    pre: str,
    value: str,
    post: str,
    p1: str,
    p2: str,
    casing: object,
) -> None:
    rule = AccountRule(search="file_as", after=after, before=before)
    shown = casing(str(rule.after))  # type: ignore[operator]
    subject = f"{pre}{shown}{p1}{value}{p2}{rule.before}{post}"
    assert candidates(rule, subject) == [normalize_key(value)]


@given(after=PHRASE, before=PHRASE, pre=FILLER, post=FILLER)
def test_between_needs_before_after_the_after_phrase(
    after: str, before: str, pre: str, post: str
) -> None:
    rule = AccountRule(search="file_as", after=after, before=before)
    a, b = str(rule.after).strip().casefold(), str(rule.before).strip().casefold()
    assume(a not in b and b not in a)  # else one phrase's occurrence is also the other's
    # The before phrase only ahead of the after phrase: nothing is located.
    assert candidates(rule, f"{pre}{rule.before} x {rule.after}{post}") == []
    # Phrases with nothing (or only punctuation) between them: nothing to look up.
    assert candidates(rule, f"{pre}{rule.after} :-# {rule.before}{post}") == []


@given(after=PHRASE, value=VALUE, rest=st.lists(WORD, max_size=5), p=PUNCT, casing=CASINGS)
def test_after_offers_every_word_boundary_prefix_longest_first(
    after: str, value: str, rest: list[str], p: str, casing: object
) -> None:
    rule = AccountRule(search="account_number", after=after)
    shown = casing(str(rule.after))  # type: ignore[operator]
    text = " ".join([value, *rest])
    found = candidates(rule, f"noise {shown}{p} {text}")
    assert normalize_key(value) in found
    assert found == sorted(found, key=len, reverse=True)
    assert found[0] == normalize_key(text)
    # The longest value naming an account wins over a shorter one.
    short = normalize_key(value.split()[0])
    assume(short != normalize_key(value))
    match = resolve(found, {short: [("CRDSHORT", None)], normalize_key(value): [("CRDLONG", None)]})
    assert match.account == "CRDLONG"


@given(before=PHRASE, value=VALUE, lead=st.lists(WORD, max_size=5), p=PUNCT)
def test_before_offers_every_word_boundary_suffix_longest_first(
    before: str, value: str, lead: list[str], p: str
) -> None:
    rule = AccountRule(search="field1", before=before)
    text = " ".join([*lead, value])
    found = candidates(rule, f"{text}{p} {rule.before} trailing")
    assert normalize_key(value) in found
    assert found == sorted(found, key=len, reverse=True)
    assert found[0] == normalize_key(text)


@given(after=PHRASE, words=st.lists(WORD, min_size=70, max_size=200))
@settings(max_examples=20)
def test_candidates_are_capped_for_hostile_subjects(after: str, words: list[str]) -> None:
    rule = AccountRule(search="file_as", after=after)
    found = candidates(rule, f"{rule.after} " + " ".join(words))
    # The whole located text, then at most MAX_CANDIDATES shorter pieces.
    assert 0 < len(found) <= MAX_CANDIDATES + 1
    assert found[0] == normalize_key(" ".join(words))


@pytest.mark.parametrize(
    ("rule", "subject", "expected"),
    [
        (AccountRule(search="file_as", after="Site"), "Alert for Site", []),
        (AccountRule(search="file_as", after="Site"), "Alert for Site ,;", []),
        (AccountRule(search="file_as", before=","), ", Acme", []),
        (AccountRule(search="file_as", after="for", before=","), "for,", []),
        (AccountRule(search="file_as", after="X", before="Y"), "no phrases here", []),
        (AccountRule(search="file_as", after="site", before=","), "SITE acme,", ["acme"]),
        (
            AccountRule(search="file_as", after="Site", before=","),
            "Site  Acme\t Corp  , Site Other,",
            ["acme corp", "other"],  # each occurrence in order: the first that names one wins
        ),
        (AccountRule(search="file_as", after="#"), "Ticket # 42 - x", ["42 - x", "42"]),
        (AccountRule(search="file_as", before="]"), "[ACME-001] down", ["acme-001", "001"]),
    ],
    ids=[
        "after-at-end",
        "after-then-punctuation",
        "before-at-start",
        "between-empty",
        "no-phrases",
        "case-insensitive",
        "occurrences-in-order-whitespace-collapsed",
        "after-prefixes",
        "before-suffixes",
    ],
)
def test_location_boundaries(rule: AccountRule, subject: str, expected: list[str]) -> None:
    assert candidates(rule, subject) == expected


@given(value=VALUE, accounts=st.lists(st.sampled_from(["CRDA", "CRDB", "CRDC"]), min_size=1))
def test_several_accounts_for_one_value_are_ambiguous(value: str, accounts: list[str]) -> None:
    key = normalize_key(value)
    match = resolve([key], {key: [(a, None) for a in accounts]})
    distinct = len(set(accounts))
    if distinct == 1:
        assert match.account == accounts[0]
    else:
        assert match.account is None
        assert match.ambiguous == distinct


# --- the XML parser -------------------------------------------------------------------------

ELEMENT_TEXT = st.text(
    alphabet=st.characters(blacklist_categories=("Cs", "Cc")) | st.sampled_from("\t\n"),
    max_size=40,
)
TICKET_FIELDS = ["FLDTKTCARDID", "FLDTKTPROBLEM", "FLDTKTPRIORITY", "FLDTKTSOLUTION"]


def transaction(envelope: dict[str, str], fields: dict[str, str], casing: object) -> bytes:
    c = casing  # element names are case-insensitive (xml-api.md)
    env = "".join(f"<{c(k)}>{escape(v)}</{c(k)}>" for k, v in envelope.items())  # type: ignore[operator]
    body = "".join(f"<{c(k)}>{escape(v)}</{c(k)}>" for k, v in fields.items())  # type: ignore[operator]
    return (
        f"<CommitCRMTransaction>{env}<{c('RecordData')}>{body}</{c('RecordData')}>"  # type: ignore[operator]
        "</CommitCRMTransaction>"
    ).encode()


@given(
    values=st.lists(ELEMENT_TEXT, min_size=4, max_size=4),
    app=ELEMENT_TEXT,
    casing=st.sampled_from([str.upper, str.lower, str.swapcase, lambda s: s]),
    lead=st.sampled_from([b"", b"\xef\xbb\xbf", b"  \r\n\t", b'<?xml version="1.0"?>\n']),
)
@example(values=["a", "b", "c", "d"], app="x", casing=str.lower, lead=b"")
def test_fields_round_trip_whatever_the_case_of_element_names(
    values: list[str], app: str, casing: object, lead: bytes
) -> None:
    fields = dict(zip(TICKET_FIELDS, values, strict=True))
    envelope = {"ExternalApplicationName": app, "DataKind": "TICKET"}
    tx = find_transaction([lead + transaction(envelope, fields, casing)])
    assert tx is not None
    assert tx.data_kind == "TICKET"
    assert dict(tx.fields) == {k: v.strip() for k, v in fields.items()}
    assert all(e.code != ERR_UNSAFE for e in tx.errors)


@given(
    values=st.lists(ELEMENT_TEXT, min_size=4, max_size=4),
    decl=st.sampled_from(
        [
            b'<!DOCTYPE CommitCRMTransaction [<!ENTITY e "x">]>',
            b'<!DOCTYPE CommitCRMTransaction SYSTEM "file:///etc/passwd">',
            b'<!ENTITY e SYSTEM "http://127.0.0.1/">',
            b"<!doctype commitcrmtransaction>",
        ]
    ),
    where=st.sampled_from(["start", "after-declaration", "inside"]),
)
def test_any_dtd_or_entity_declaration_refuses_the_whole_document(
    values: list[str], decl: bytes, where: str
) -> None:
    fields = dict(zip(TICKET_FIELDS, values, strict=True))
    body = transaction({"DataKind": "TICKET"}, fields, lambda s: s)
    if where == "start":
        data = decl + body
    elif where == "after-declaration":
        data = b'<?xml version="1.0"?>\n' + decl + b"\n" + body
    else:
        data = body.replace(b"<RecordData>", b"<RecordData>" + decl)
    tx = find_transaction([data])
    assert tx is not None
    assert [e.code for e in tx.errors] == [ERR_UNSAFE]
    assert dict(tx.fields) == {}


@given(st.lists(st.binary(max_size=200), max_size=4), st.binary(max_size=100))
def test_garbage_candidates_never_raise_and_never_hide_a_clean_transaction(
    junk: list[bytes], prefix: bytes
) -> None:
    good = transaction({"DataKind": "TICKET"}, {"FLDTKTPROBLEM": "p"}, lambda s: s)
    # Garbage before the document in the same candidate: refused or ignored, never raises.
    find_transaction([prefix + good, *junk])
    # A clean candidate after any garbage candidates is the one found.
    tx = find_transaction([*junk, prefix + good, good])
    assert tx is not None
    assert dict(tx.fields) == {"FLDTKTPROBLEM": "p"}
