"""Automated-email rules (spec 2.1): detection, skip and account detection as pure functions,
table-driven with ids, plus hypothesis properties; account-by-sender against a real store."""

from __future__ import annotations

import contextlib
import email.header
import string
import unicodedata
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smtpgate.config import AccountRule, DetectionRule, Rules, SkipRule, load_settings, parse_rules
from smtpgate.mail import parse_message
from smtpgate.model import Action, Decision, Envelope, Outcome, normalize_key
from smtpgate.pipeline import Context, decide, dedupe_key
from smtpgate.rules import automated
from smtpgate.rules.automated import (
    MAX_CANDIDATES,
    Match,
    candidates,
    detection_matches,
    first_detection,
    first_skip,
    resolve,
)
from smtpgate.store import Store, new_queue_id


def message(subject: str, sender: str = "Monitoring <alerts@rmm.example>") -> bytes:
    return (
        f"From: {sender}\r\nTo: connector@localhost\r\nSubject: {subject}\r\n"
        "Message-ID: <t@rmm.example>\r\n\r\nbody\r\n"
    ).encode()


# --- detection ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Det:
    id: str
    sender: tuple[str, ...]
    subject: str | None
    from_header: str
    subject_header: str
    matches: bool


DETECTION = (
    Det("sender-only", ("alerts@rmm.example",), None, "alerts@rmm.example", "x", True),
    Det("sender-other", ("alerts@rmm.example",), None, "bob@rmm.example", "Alert", False),
    Det(
        "sender-case-and-display-name",
        ("Alerts@RMM.example",),
        None,
        '"RMM, Alerts" <ALERTS@rmm.EXAMPLE>',
        "x",
        True,
    ),
    Det("sender-list-second", ("a@x.example", "b@x.example"), None, "B@X.example", "x", True),
    Det("sender-domain", ("@rmm.example",), None, "Datto <noreply@rmm.example>", "x", True),
    Det("sender-domain-star", ("*@rmm.example",), None, "noreply@rmm.example", "x", True),
    Det("sender-domain-not-sub", ("@rmm.example",), None, "a@eu.rmm.example", "x", False),
    Det("subject-only", (), "Alert", "anyone@else.example", "Disk Alert for Site X", True),
    Det("subject-case", (), "ALERT for", "anyone@else.example", "an alert FOR site", True),
    Det("subject-missing", (), "Alert", "anyone@else.example", "Disk warning", False),
    Det("and-both", ("alerts@rmm.example",), "Alert", "alerts@rmm.example", "Alert: x", True),
    Det("and-subject-fails", ("alerts@rmm.example",), "Alert", "alerts@rmm.example", "x", False),
    Det("and-sender-fails", ("alerts@rmm.example",), "Alert", "bob@rmm.example", "Alert", False),
    Det("sender-from-not-reply-to", ("alerts@rmm.example",), None, "bob@x.example", "x", False),
    Det(
        "subject-encoded-word",
        (),
        "Störung",
        "a@b.example",
        "=?iso-8859-1?q?St=F6rung_auf_SRV01?=",
        True,
    ),
    Det("subject-folded", (), "Alert for Site", "a@b.example", "Alert for\r\n Site X", True),
    Det("rule-phrase-extra-spaces", (), "Alert  for   Site", "a@b.example", "Alert for Site", True),
)


@pytest.mark.parametrize("case", DETECTION, ids=lambda c: c.id)
def test_detection(case: Det) -> None:
    rule = DetectionRule(sender=case.sender, subject=case.subject)
    raw = message(case.subject_header, case.from_header)
    if case.id == "sender-from-not-reply-to":
        raw = raw.replace(b"\r\n\r\n", b"\r\nReply-To: alerts@rmm.example\r\n\r\n", 1)
    assert detection_matches(rule, parse_message(raw)) is case.matches


def test_first_detection_is_ordered_and_names_the_rules_missed() -> None:
    rules = parse_rules(
        "[[detection]]\nsubject = 'nope'\n"
        "[[detection]]\nname = 'datto'\nsender = ['noreply@rmm.example']\n"
        "[[detection]]\nname = 'later'\nsubject = 'Alert'\n"
    )
    msg = parse_message(message("Alert", "noreply@rmm.example"))
    rule, missed = first_detection(rules.detection, msg)
    assert rule is not None
    assert rule.name == "datto"
    assert missed == ["detection[1]"]
    none, missed = first_detection(rules.detection, parse_message(message("hello", "x@y.example")))
    assert none is None
    assert missed == ["detection[1]", "datto", "later"]


@pytest.mark.parametrize(
    ("phrase", "subject", "skipped"),
    [
        ("Alert Self Healed", "Alert Self Healed for Site Acme Corp, Disk C: low", True),
        ("self healed", "ALERT SELF HEALED for Site Acme", True),
        ("Resolved", "Problem: CPU on srv1 [Resolved]", True),  # anywhere in the subject
        ("Self  Healed", "Alert Self Healed", True),
        ("Alert Self Healed", "Alert for Site Acme Corp, Self Healed", False),
    ],
    ids=["exact", "case", "anywhere", "phrase-spaces", "words-apart"],
)
def test_skip(phrase: str, subject: str, skipped: bool) -> None:
    rules = (SkipRule(name="other", subject="zzz"), SkipRule(name="s", subject=phrase))
    rule, missed = first_skip(rules, subject)
    assert (rule is not None) is skipped
    assert missed == (["other"] if skipped else ["other", "s"])


# --- account detection in the subject ---------------------------------------------------------

ACME, ACMECORP, BAU, GLOBEX, EAST, WEST = "CRDA", "CRDB", "CRDC", "CRDD", "CRDE", "CRDF"
# normalized searched value → accounts holding it (what the store's account_keys index answers)
DIRECTORY: dict[str, tuple[str, ...]] = {
    "acme": (ACME,),
    "acme corp": (ACMECORP,),
    "acme-bau gmbh": (BAU,),
    "globex": (GLOBEX,),
    "gl-7781": (GLOBEX,),
    "contoso": (EAST, WEST),
    "bäckerei müller gmbh": (BAU,),
    "crdacme0000000000001": (ACMECORP,),
}


def lookup(values: Sequence[str], directory: Mapping[str, tuple[str, ...]] = DIRECTORY) -> Match:
    found = {v: [(a, None) for a in directory[v]] for v in values if v in directory}
    return resolve(values, found)


@dataclass(frozen=True)
class Loc:
    id: str
    after: str | None
    before: str | None
    subject: str
    account: str | None
    ambiguous: int = 0


LOCATE = (
    # between: exact match only, trimmed of whitespace and : - # , ; [ ] ( ) " '
    Loc("between-spec-example", "Alert for Site", ",", "Alert for Site Acme Corp, Disk C: low",
        ACMECORP),
    Loc("between-trim-punctuation", "Site", ":", "Site [ 'Acme Corp' ]: down", ACMECORP),
    Loc("between-collapses-spaces", "Site", ",", "Site  Acme \t Corp , x", ACMECORP),
    Loc("between-case", "alert FOR site", ",", "ALERT for SITE acme CORP, x", ACMECORP),
    Loc("between-exact-only", "Site", ",", "Site Acme Corp West, x", None),
    Loc("between-before-after-the-after", "Site", "-", "Ping - Site Acme Corp", None),
    Loc("between-spaced-dash", "Alert:", " - ", "Alert: Acme-Bau GmbH - Node down", BAU),
    # a phrase's outer spaces at the subject's ends, which the parser trims ("{site} - {msg}"
    # with an empty message); inside, they are still needed
    Loc("before-spaced-at-the-end", None, " - ", "Acme Corp -", ACMECORP),
    Loc("after-spaced-at-the-start", " - ", None, "- Acme Corp", ACMECORP),
    Loc("before-spaced-not-inside-a-word", None, " - ", "Acme-Bau GmbH-x -y", None),
    Loc("between-rule-spaces", "Alert  for   Site", ",", "Alert for Site Acme Corp, x",
        ACMECORP),
    Loc("between-ambiguous", "Group:", ";", "Group: CONTOSO; disk", None, ambiguous=2),
    # after only: exact, else the longest word-boundary prefix
    Loc("after-exact", "Customer:", None, "Customer: Globex", GLOBEX),
    Loc("after-longest-prefix", "Site", None, "Site Acme Corp server down", ACMECORP),
    Loc("after-shorter-prefix", "Site", None, "Site Acme Ltd server down", ACME),
    Loc("after-word-boundary", "Site", None, "Site Acmeware down", None),
    Loc("after-not-mid-word", "Site", None, "Site Acme Corporation down", ACME),
    Loc("after-slash", "[PRTG]", None, "[PRTG] Acme Corp/fw01 Ping Down", ACMECORP),
    Loc("after-backslash", "FAILED -", None, "FAILED - Acme Corp\\SRV01 - Disk", ACMECORP),
    Loc("after-pipe-id", "NinjaOne |", None, "NinjaOne | GL-7781 | PC03 | Patch", GLOBEX),
    Loc("after-unicode", "Site:", None, "Site: Bäckerei Müller GmbH/Router down", BAU),
    Loc("after-missing-phrase", "Customer:", None, "Site Acme Corp down", None),
    Loc("after-ambiguous-no-fallback", "Group", None, "Group contoso acme", None, ambiguous=2),
    Loc("after-rec-id", "[", None, "[crdacme0000000000001] disk", ACMECORP),
    # before only: exact, else the longest word-boundary suffix
    Loc("before-suffix", None, "\\", "Agent Offline - Globex\\GLX-PC22", GLOBEX),
    Loc("before-longest-suffix", None, "(", "Disk low on Acme Corp (SRV01)", ACMECORP),
    Loc("before-word-boundary", None, "(", "Disk low on MegaAcme Corp2 (x)", None),
    Loc("before-exact", None, "::", "Acme Corp :: disk", ACMECORP),
    Loc("before-id-case", None, "(NinjaOne)", "Patch failures for gl-7781 (NinjaOne)", GLOBEX),
    Loc("before-first-occurrence", None, "|", "Globex | Acme Corp | x", GLOBEX),
    Loc("before-missing-phrase", None, "(", "Disk low on Acme Corp", None),
    # the phrase's occurrences in order, until one names an account (the first used to be
    # the only one, even inside a word)
    Loc("after-later-occurrence", "on", None,
        "[PRTG Network Monitor] Ping Down on Acme Corp router", ACMECORP),
    Loc("after-inside-a-word-first", "Site", None,
        "Alert: Website check failed at Site Acme Corp", ACMECORP),
    Loc("before-later-occurrence", None, "(", "(Warning) Disk low on Acme Corp (SRV01)",
        ACMECORP),
    Loc("between-later-occurrence", "Site", ",", "Website down, Site Acme Corp, x", ACMECORP),
)  # fmt: skip


@pytest.mark.parametrize("case", LOCATE, ids=lambda c: c.id)
def test_account_location(case: Loc) -> None:
    rule = AccountRule(search="file_as", after=case.after, before=case.before)
    values = candidates(rule, case.subject)
    match = lookup(values)
    assert match.account == case.account
    assert match.ambiguous == case.ambiguous


def test_detection_sender_matches_in_any_spelling_of_the_same_address() -> None:
    """A rule's sender, the From: address: IDNA forms of the domain, NFC, a trailing dot."""
    ascii_from = parse_message(message("Disk low", "Mon <alerts@xn--bcher-kva.example>"))
    utf8_from = parse_message(message("Disk low", "Mon <alerts@bücher.example>"))
    assert detection_matches(DetectionRule(sender=("alerts@bücher.example",)), ascii_from)
    assert detection_matches(DetectionRule(sender=("@bücher.example",)), ascii_from)
    assert detection_matches(DetectionRule(sender=("@xn--bcher-kva.example",)), utf8_from)
    nfd = unicodedata.normalize("NFD", "alerts@bücher.example")
    assert detection_matches(DetectionRule(sender=(nfd,)), utf8_from)
    dotted = parse_message(message("Disk low", "alerts@rmm.example."))
    assert detection_matches(DetectionRule(sender=("alerts@rmm.example",)), dotted)
    assert detection_matches(DetectionRule(sender=("@rmm.example",)), dotted)
    assert not detection_matches(DetectionRule(sender=("@bücher.example",)), dotted)


def test_account_phrase_is_as_case_insensitive_as_the_detection_phrase() -> None:
    """Detection folds case fully (ß is SS); the account rule's phrases must find the same."""
    rules = parse_rules(
        '[[detection]]\nsubject = "Außenstelle"\n'
        '[[account]]\nsearch = "file_as"\nafter = "Außenstelle"\nbefore = ","\n'
    )
    msg = parse_message(message("AUSSENSTELLE Acme Corp, Festplatte voll"))
    assert detection_matches(rules.detection[0], msg)
    assert lookup(candidates(rules.account[0], msg.subject)).account == ACMECORP
    # Expanding folds before the phrase keep the located text where it is in the subject.
    subject = "Straße İstanbul ﬁle: Acme Corp, x"
    assert lookup(candidates(AccountRule(search="file_as", after="FILE:"), subject)).account == (
        ACMECORP
    )


def test_the_word_occurrence_is_not_crowded_out_by_occurrences_inside_words() -> None:
    rule = AccountRule(search="file_as", after="on")
    subject = "[PRTG Network Monitor] Connection monitoring down on Acme Corp"
    assert lookup(candidates(rule, subject)).account == ACMECORP


def test_a_long_subject_keeps_the_short_pieces_of_a_later_occurrence() -> None:
    rule = AccountRule(search="file_as", after="Site")
    tail = " ".join(f"w{i}" for i in range(70))
    subject = f"Site down at Site Acme Corp: {tail}"  # the shortest pieces are the last ones
    assert lookup(candidates(rule, subject)).account == ACMECORP


def test_long_subject_still_offers_the_short_prefix() -> None:
    # A long alert text after the phrase must not push the account name out of the probe.
    tail = " ".join(f"word{i}" for i in range(200))
    rule = AccountRule(search="file_as", after="Customer:")
    values = candidates(rule, f"Customer: Acme Corp - {tail}")
    assert len(values) <= MAX_CANDIDATES + 1  # one occurrence: its whole text and the pieces
    assert lookup(values).account == ACMECORP
    rule = AccountRule(search="file_as", before="(end)")
    values = candidates(rule, f"{tail} on Acme Corp (end)")
    assert lookup(values).account == ACMECORP


def test_many_occurrences_of_the_phrase_stay_within_the_probe_bound() -> None:
    subject = " - ".join(f"Site word{i} more{i} text{i}" for i in range(200))
    values = candidates(AccountRule(search="file_as", after="Site"), subject)
    assert len(values) == automated.MAX_VALUES
    assert values[0] == normalize_key(subject.partition("Site")[2])  # the first one's first


@pytest.mark.parametrize("mode", ["after", "before"])
def test_a_hostile_subject_costs_a_bounded_number_of_pieces(
    mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Thousands of cut points that all normalize to the same key ("Acme - - - …") must not
    each cost a pass over their piece: that was seconds of the event loop per rule."""
    noise = " -" * 8000
    subject = f"Site: Acme{noise}" if mode == "after" else f"{noise} Acme (end)"
    rule = AccountRule(search="file_as", **{mode: "Site:" if mode == "after" else "(end)"})
    seen: list[str] = []

    def counted(text: str) -> str:
        seen.append(text)
        return normalize_key(text)

    monkeypatch.setattr(automated, "normalize_key", counted)
    values = candidates(rule, subject)
    assert "acme" in values
    assert len(seen) <= automated.MAX_CUTS + 1  # the pieces, and the whole text once
    assert len(seen) < len(noise) // 20  # far fewer than the 16,000 cut points


def test_candidates_longest_first_and_exact_first() -> None:
    rule = AccountRule(search="file_as", after="Site")
    assert candidates(rule, "Site Acme Corp, Disk C: low") == [
        "acme corp, disk c: low",
        "acme corp, disk c",
        "acme corp, disk",
        "acme corp",
        "acme",
    ]


def test_resolve_names_the_single_contact_behind_a_value() -> None:
    found = {"a@x.example": [("CRD1", "CON1")]}
    assert resolve(["a@x.example"], found) == Match("CRD1", "CON1", value="a@x.example")
    two = {"x.example": [("CRD1", None), ("CRD2", None)]}
    assert resolve(["x.example"], two) == Match(None, ambiguous=2, value="x.example")
    assert automated.sender_keys("Bob@Sub.Example.COM") == (
        ["bob@sub.example.com"],
        ["sub.example.com"],
    )
    # Either IDNA spelling of the domain, the one given first.
    assert automated.sender_keys("Info@XN--MLLER-BAU-Q9A.example") == (
        ["info@xn--mller-bau-q9a.example", "info@müller-bau.example"],
        ["xn--mller-bau-q9a.example", "müller-bau.example"],
    )
    assert automated.sender_keys("hans@müller-bau.example")[1] == [
        "müller-bau.example",
        "xn--mller-bau-q9a.example",
    ]
    assert automated.sender_keys("x@xn--zz.example") == (["x@xn--zz.example"], ["xn--zz.example"])
    assert automated.sender_keys("x@xn--ab-.example") == (
        ["x@xn--ab-.example"],
        ["xn--ab-.example"],
    )
    # The other spelling of the same name, never another name: straße.example is
    # xn--strae-oqa.example (IDNA 2008), not strasse.example (IDNA 2003's mapping).
    assert automated.sender_keys("info@straße.example")[1] == [
        "straße.example",
        "xn--strae-oqa.example",
    ]
    assert automated.sender_keys("info@xn--strae-oqa.example")[1] == [
        "xn--strae-oqa.example",
        "straße.example",
    ]


# --- decoding before matching (spec 2.1 with 5) -------------------------------------------------


@pytest.mark.parametrize(
    ("header", "decoded"),
    [
        ("=?UTF-8?B?QWxlcnQgZm9yIFNpdGUgQsOkY2tlcmVpIE3DvGxsZXIgR21iSCwgQ1BV?=",
         "Alert for Site Bäckerei Müller GmbH, CPU"),
        ("=?iso-8859-1?Q?Alert_for_Site_B=E4ckerei_M=FCller_GmbH=2C_CPU?=",
         "Alert for Site Bäckerei Müller GmbH, CPU"),
        ("=?windows-1252?Q?Alert_for_Site_Acme_Corp=2C_=93disk=94?=",
         "Alert for Site Acme Corp, “disk”"),
        ("=?koi8-r?B?9MXT1A==?= Alert for Site Acme Corp, x", "Тест Alert for Site Acme Corp, x"),
        ("Alert for Site =?utf-8?q?Acme?=\r\n =?utf-8?q?_Corp?=, x", "Alert for Site Acme Corp, x"),
        ("Alert   for\r\n\tSite  Acme Corp, x", "Alert for Site Acme Corp, x"),
        ("=?utf-8?q?Alert_for_Site_Acme_Corp,_x?=", "Alert for Site Acme Corp, x"),
    ],
    ids=["b-utf8", "q-latin1", "q-cp1252", "koi8r-mixed", "split-words", "folded", "q-comma"],
)  # fmt: skip
def test_subject_decoded_before_matching(header: str, decoded: str) -> None:
    msg = parse_message(message(header))
    assert msg.subject == decoded
    rule = AccountRule(search="file_as", after="Alert for Site", before=",")
    site = normalize_key(decoded.split("Site ", 1)[1].split(",")[0])
    assert site in candidates(rule, msg.subject)


@pytest.mark.parametrize(
    ("subject_bytes", "decoded"),
    [
        ("Alert for Site Bäckerei Müller GmbH, x".encode(),
         "Alert for Site Bäckerei Müller GmbH, x"),
        ("Alert for Site Bäckerei Müller GmbH, x".encode("latin-1"),
         "Alert for Site Bäckerei Müller GmbH, x"),
    ],
    ids=["raw-utf8", "raw-latin1"],
)  # fmt: skip
def test_raw_8bit_subjects(subject_bytes: bytes, decoded: str) -> None:
    raw = message("PLACEHOLDER").replace(b"PLACEHOLDER", subject_bytes)
    msg = parse_message(raw)
    assert msg.subject == decoded
    rule = AccountRule(search="file_as", after="Site", before=",")
    assert lookup(candidates(rule, msg.subject)).account == BAU


# --- properties ---------------------------------------------------------------------------------

WORD = st.text(string.ascii_letters + string.digits, min_size=1, max_size=8)
VALUE = st.lists(WORD, min_size=1, max_size=4).map(" ".join)
SEPARATOR = st.sampled_from([" ", ", ", "/", "\\", " - ", ": ", " | ", " (", "; "])
TAIL = st.lists(WORD, min_size=0, max_size=80).map(" ".join)


def recase(text: str, flips: list[bool]) -> str:
    return "".join(c.swapcase() if flips[i % len(flips)] else c for i, c in enumerate(text))


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(value=VALUE, sep=SEPARATOR, tail=TAIL, flips=st.lists(st.booleans(), min_size=1))
def test_prefix_rule_finds_any_value_followed_by_a_boundary(
    value: str, sep: str, tail: str, flips: list[bool]
) -> None:
    subject = recase(f"Customer: {value}{sep}{tail}".rstrip(), flips)
    rule = AccountRule(search="file_as", after="CUSTOMER:")
    values = candidates(rule, subject)
    assert len(values) <= MAX_CANDIDATES + 1
    assert values == sorted(values, key=len, reverse=True) or values[0] == normalize_key(
        subject.split(":", 1)[1]
    )
    assert lookup(values, {normalize_key(value): ("CRDX",)}).account == "CRDX"


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(value=VALUE, sep=SEPARATOR, head=TAIL, flips=st.lists(st.booleans(), min_size=1))
def test_suffix_rule_finds_any_value_preceded_by_a_boundary(
    value: str, sep: str, head: str, flips: list[bool]
) -> None:
    subject = recase(f"{head}{sep}{value} (agent)".lstrip(), flips)
    rule = AccountRule(search="file_as", before="(AGENT)")
    assert lookup(candidates(rule, subject), {normalize_key(value): ("CRDX",)}).account == "CRDX"


@settings(max_examples=200)
@given(subject=st.text(max_size=300), after=st.text(max_size=10), before=st.text(max_size=10))
def test_candidates_are_total_and_bounded(subject: str, after: str, before: str) -> None:
    after, before = (after if after.strip() else ""), (before if before.strip() else "")
    if not after and not before:
        after = "x"  # a phrase of white space only is refused by the rules file
    rule = AccountRule(search="field1", after=after or None, before=before or None)
    values = candidates(rule, subject)
    assert len(values) <= automated.MAX_VALUES
    assert all(v == normalize_key(v) and v for v in values)


RULE = (
    st.tuples(
        st.lists(st.sampled_from(["a@x.example", "b@x.example", "@y.example"]), max_size=2),
        st.one_of(st.none(), st.sampled_from(["alert", "DISK", "Self Healed", "cpu"])),
    )
    .filter(lambda t: bool(t[0] or t[1]))
    .map(lambda t: DetectionRule(sender=tuple(t[0]), subject=t[1]))
)


@settings(max_examples=200)
@given(
    rules=st.lists(RULE, min_size=1, max_size=6),
    sender=st.sampled_from(["a@x.example", "B@X.example", "c@y.example", "d@z.example"]),
    subject=st.sampled_from(["Alert: disk", "self healed CPU", "nothing", "ALERT cpu"]),
    flips=st.lists(st.booleans(), min_size=1),
)
def test_detection_is_case_insensitive_and_first_match_wins(
    rules: list[DetectionRule], sender: str, subject: str, flips: list[bool]
) -> None:
    named = Rules(detection=tuple(rules)).detection
    msg = parse_message(message(subject, sender))
    recased = parse_message(message(recase(subject, flips), recase(sender, flips)))
    hits = [i for i, r in enumerate(named) if detection_matches(r, msg)]
    assert hits == [i for i, r in enumerate(named) if detection_matches(r, recased)]
    rule, missed = first_detection(named, msg)
    if hits:
        assert rule is named[hits[0]]
        assert missed == [str(r.name) for r in named[: hits[0]]]
    else:
        assert rule is None
        assert len(missed) == len(named)


# --- account by sender and the whole automated stage, against a real store ----------------------

SENDER_RULES = """
account_by_sender = true
[[detection]]
subject = "Alert"
[[skip]]
subject = "Self Healed"
[[account]]
name = "site"
search = "file_as"
after = "Site"
before = ","
[[account]]
name = "group"
search = "field1"
after = "Group:"
"""

ACCOUNTS = [
    {"rec_id": "CRDACME0000000000001", "file_as": "Acme Corp", "email1": "it@acme.example",
     "email2": "acme.example", "field1": "shared"},
    {"rec_id": "CRDGLOBEX00000000002", "file_as": "Globex", "email1": "helpdesk@globex.example",
     "field1": "shared"},
    {"rec_id": "CRDINITECH0000000003", "file_as": "Initech", "email2": "@initech.example"},
    {"rec_id": "CRDCONTOSOA000000004", "file_as": "Contoso A", "email1": "noc@shared.example",
     "email2": "contoso.example"},
    {"rec_id": "CRDCONTOSOB000000005", "file_as": "Contoso B", "email1": "contoso.example",
     "email2": "NOC@shared.example"},
    # The domain of the address two accounts share: an ambiguous address is not "no address"
    # and does not fall through to an unrelated account holding its domain.
    {"rec_id": "CRDHOSTING0000000006", "file_as": "Shared Hosting", "email1": "shared.example"},
]  # fmt: skip


@dataclass(frozen=True)
class Flow:
    id: str
    subject: str
    sender: str
    action: Action
    account: str | None = None
    reason: str | None = None
    hit: tuple[str, ...] = ()
    contact: bool = False


FLOWS = (
    Flow("rule-wins", "Alert for Site Globex, x", "it@acme.example", Action.AUTOMATED_TICKET,
         "CRDGLOBEX00000000002", hit=("detection[1]", "site")),
    Flow("skip-before-accounts", "Alert Self Healed Site Globex, x", "it@acme.example",
         Action.AUTOMATED_SKIPPED, hit=("detection[1]", "skip[1]")),
    Flow("email1", "Alert: disk", "IT@Acme.Example", Action.AUTOMATED_TICKET,
         "CRDACME0000000000001", hit=("detection[1]", "account_by_sender")),
    Flow("contact-address", "Alert: disk", "noc@x.example", Action.AUTOMATED_TICKET,
         "CRDGLOBEX00000000002", hit=("detection[1]", "account_by_sender"), contact=True),
    Flow("domain-value", "Alert: disk", "rmm@acme.example", Action.AUTOMATED_TICKET,
         "CRDACME0000000000001"),
    Flow("at-domain-value", "Alert: disk", "rmm@initech.example", Action.AUTOMATED_TICKET,
         "CRDINITECH0000000003"),
    Flow("domain-ambiguous", "Alert: disk", "rmm@contoso.example", Action.AUTOMATED_NO_ACCOUNT,
         reason="ambiguous"),
    Flow("address-ambiguous", "Alert: disk", "noc@shared.example", Action.AUTOMATED_NO_ACCOUNT,
         reason="ambiguous"),
    Flow("rule-ambiguous-then-sender", "Alert Group: shared", "helpdesk@globex.example",
         Action.AUTOMATED_TICKET, "CRDGLOBEX00000000002",
         hit=("detection[1]", "account_by_sender")),
    Flow("rule-ambiguous-nothing", "Alert Group: shared", "x@nowhere.example",
         Action.AUTOMATED_NO_ACCOUNT, reason="ambiguous"),
    Flow("no-account", "Alert for Site Nobody, x", "x@nowhere.example",
         Action.AUTOMATED_NO_ACCOUNT),
    Flow("subdomain-is-not-domain", "Alert: disk", "x@eu.acme.example",
         Action.AUTOMATED_NO_ACCOUNT),
)  # fmt: skip


@pytest.fixture
async def directory(tmp_path: Path) -> Store:
    store = await Store.open(tmp_path / "smtpgate.db")
    await store.import_accounts([(i, a) for i, a in enumerate(ACCOUNTS, 2)])
    contact = {"account_rec_id": "CRDGLOBEX00000000002", "name": "NOC", "email": "NOC@x.example"}
    await store.import_contacts([(2, contact)])
    return store


@pytest.mark.parametrize("case", FLOWS, ids=lambda c: c.id)
async def test_automated_stage(case: Flow, directory: Store, tmp_path: Path) -> None:
    ctx = Context(
        load_settings(_env_file=None, data_dir=tmp_path, internal_support_address="s@msp.example"),
        parse_rules(SENDER_RULES),
    )
    raw = message(case.subject, case.sender)
    try:
        decision = await decide(raw, case.sender, parse_message(raw), ctx, directory)
        outcome = await directory.simulate(decision, "<t@rmm.example>", hourly_limit=20)
    finally:
        await directory.close()
    assert (outcome.path, outcome.action) == ("automated", case.action)
    assert outcome.account == case.account
    assert outcome.reason == case.reason
    for rule in case.hit:
        assert rule in outcome.rules_hit
    if case.action == Action.AUTOMATED_TICKET:
        assert decision.new_ticket is not None
        assert decision.new_ticket.source == "Email Connector (automated)"
        assert decision.new_ticket.description == case.subject
        assert (decision.new_ticket.contact is not None) is case.contact
        assert outcome.sent == []
    else:
        target = "s@msp.example"
        assert outcome.sent == [{"kind": "forward", "to": [target]}]


async def test_detection_uses_from_and_the_envelope_only_without_a_usable_from(
    tmp_path: Path,
) -> None:
    store = await Store.open(tmp_path / "smtpgate.db")
    ctx = Context(
        load_settings(_env_file=None, data_dir=tmp_path),
        parse_rules('[[detection]]\nsender = ["noreply@rmm.example"]\n'),
    )
    no_from = b"To: connector@localhost\r\nSubject: disk low\r\n\r\nx\r\n"
    with_from = b"From: Someone <someone@else.example>\r\n" + no_from
    try:
        decision = await decide(no_from, "NoReply@RMM.example", parse_message(no_from), ctx, store)
        assert (decision.path, decision.action) == ("automated", Action.AUTOMATED_NO_ACCOUNT)
        decision = await decide(
            with_from, "noreply@rmm.example", parse_message(with_from), ctx, store
        )
        assert decision.path == "regular"
        assert decision.rules_missed[0] == "detection[1]"
    finally:
        await store.close()


# --- Unicode: canonically equivalent text matches (NFC and NFD) ------------------------------

CAFE = "Café Müller"


def nfc(text: str) -> str:
    return unicodedata.normalize("NFC", text)


def nfd(text: str) -> str:
    return unicodedata.normalize("NFD", text)


def test_keys_of_canonically_equivalent_text_are_equal() -> None:
    assert nfc(CAFE) != nfd(CAFE)
    assert normalize_key(nfc(CAFE)) == normalize_key(nfd(CAFE)) == nfc("café müller")
    # case folding can leave decomposed text behind (U+01F0 folds to j + U+030C): composed again
    assert normalize_key("\u01f0") == normalize_key("J\u030c") == "\u01f0"


@pytest.mark.parametrize(
    ("stored", "phrase", "subject"),
    [
        (nfd(CAFE), nfc("Störung bei"), nfc("Störung bei Café Müller, Disk voll")),
        (nfc(CAFE), nfd("Störung bei"), nfd("Störung bei Café Müller, Disk voll")),
        (nfc(CAFE), nfc("Störung bei"), nfd("Störung bei Café Müller, Disk voll")),
    ],
    ids=["account-nfd", "rules-nfd", "subject-nfd"],
)
async def test_an_account_is_found_whatever_the_unicode_normal_form(
    stored: str, phrase: str, subject: str, tmp_path: Path
) -> None:
    """A macOS export stores decomposed names, a Windows mailer sends composed subjects."""
    store = await Store.open(tmp_path / "smtpgate.db")
    await store.import_accounts([(2, {"rec_id": "CRDCAFE0000000000001", "file_as": stored})])
    rules = parse_rules(
        f'[[detection]]\nsubject = "{phrase}"\n'
        f'[[account]]\nsearch = "file_as"\nafter = "{phrase}"\nbefore = ","\n'
    )
    ctx = Context(load_settings(_env_file=None, data_dir=tmp_path), rules)
    encoded = email.header.Header(subject, "utf-8").encode()
    raw = message(encoded)
    try:
        decision = await decide(raw, "alerts@rmm.example", parse_message(raw), ctx, store)
    finally:
        await store.close()
    assert decision.action == Action.AUTOMATED_TICKET
    assert decision.new_ticket is not None
    assert decision.new_ticket.account == "CRDCAFE0000000000001"


async def test_an_account_rule_that_finds_nothing_says_what_it_looked_for(
    directory: Store, tmp_path: Path
) -> None:
    """`rules missed: site` alone left the operator guessing why an alert was forwarded."""
    ctx = Context(
        load_settings(_env_file=None, data_dir=tmp_path, internal_support_address="s@msp.example"),
        parse_rules(SENDER_RULES),
    )
    raw = message("Alert for Site Acme Corporation, disk", "x@nowhere.example")
    unended = message("Alert for Site Acme Corp disk", "x@nowhere.example")  # no ","
    try:
        decision = await decide(raw, "x@nowhere.example", parse_message(raw), ctx, directory)
        other = await decide(unended, "x@nowhere.example", parse_message(unended), ctx, directory)
    finally:
        await directory.close()
    assert decision.action == Action.AUTOMATED_NO_ACCOUNT
    assert decision.notes[:2] == [
        "site: no account with file_as 'acme corporation'",
        "group: its phrase is not in the subject",
    ]
    assert other.notes[0] == "site: no ',' after 'Site' in the subject"
    # A long subject is not copied whole into the outcome.
    long = message("Alert for Site " + "x" * 5000 + ", disk", "x@nowhere.example")
    store = await Store.open(tmp_path / "again.db")
    try:
        decision = await decide(long, "x@nowhere.example", parse_message(long), ctx, store)
    finally:
        await store.close()
    assert decision.notes[0] == f"site: no account with file_as {'x' * 100!r}"


# --- account by sender and replies: found by review --------------------------------------------

SPEC_RULES = (Path(__file__).parent / "fixtures" / "rules.toml").read_text(encoding="utf-8")
OLD_CO, NEW_CO = "CRDOLDCO000000000001", "CRDNEWCO000000000002"
ACME_BY_DOMAIN = {"rec_id": OLD_CO, "file_as": "Acme Corp", "email2": "acme.example"}


def spec_context(tmp_path: Path, rules: str = SPEC_RULES) -> Context:
    return Context(
        load_settings(
            _env_file=None,
            data_dir=tmp_path,
            acknowledge=True,
            internal_support_address="support@msp.example",
        ),
        parse_rules(rules),
    )


@contextlib.asynccontextmanager
async def store_with(tmp_path: Path, *accounts: dict[str, str]) -> AsyncIterator[Store]:
    """A store holding these accounts (one CSV line each), closed afterwards."""
    store = await Store.open(tmp_path / "smtpgate.db")
    try:
        await store.import_accounts([(n, row) for n, row in enumerate(accounts, start=2)])
        yield store
    finally:
        await store.close()


async def decide_for(store: Store, tmp_path: Path, subject: str, sender: str) -> Decision:
    raw = message(subject, sender)
    address = sender.rpartition("<")[2].rstrip(">")
    return await decide(raw, address, parse_message(raw), spec_context(tmp_path), store)


async def process(
    store: Store, ctx: Context, raw: bytes, mail_from: str
) -> tuple[Decision, Outcome | None]:
    """What a worker does with one queued message: claim, decide, complete."""
    msg = parse_message(raw)
    envelope = Envelope("127.0.0.1", "client", mail_from, ("connector@localhost",))
    await store.enqueue(envelope, raw, msg.message_id, new_queue_id())
    (job,) = await store.claim(1, 60)
    decision = await decide(job.raw, mail_from, msg, ctx, store)
    return decision, await store.complete(
        job, decision, dedupe_key=dedupe_key(msg.message_id, job.raw), auto_mail_hourly_limit=20
    )


# A contact moved to another account by a re-import kept a lookup key on the old account.
async def test_contact_moved_to_another_account_is_found_on_its_new_account(
    tmp_path: Path,
) -> None:
    old, new = {"rec_id": OLD_CO, "file_as": "Old Co"}, {"rec_id": NEW_CO, "file_as": "New Co"}
    async with store_with(tmp_path, old, new) as store:
        jo = {"rec_id": "CONJO000000000000001", "name": "Jo", "email": "jo@mail.example"}
        await store.import_contacts([(2, {**jo, "account_rec_id": OLD_CO})])
        await store.import_contacts([(2, {**jo, "account_rec_id": NEW_CO})])  # corrected
        decision = await decide_for(store, tmp_path, "Printer offline", "Jo <jo@mail.example>")
    assert (decision.action, decision.account) == (Action.TICKET_CREATED, NEW_CO), decision.notes


# A UTF-7 encoded-word or body yields a lone surrogate that SQLite cannot store: the
# message fails on every attempt (dead) instead of becoming a ticket or a forward.
async def test_utf7_subject_from_a_known_sender_still_opens_a_ticket(tmp_path: Path) -> None:
    async with store_with(tmp_path, ACME_BY_DOMAIN) as store:
        raw = message("Drucker =?utf-7?Q?+2D0-?=", "Jane <jane@acme.example>")
        _, outcome = await process(store, spec_context(tmp_path), raw, "jane@acme.example")
    assert outcome is not None
    assert outcome.action == Action.TICKET_CREATED


# Account domains are compared as typed: a customer whose From: carries the domain in its
# ASCII (IDNA) form, as mail without SMTPUTF8 must, is an unknown sender.
async def test_sender_domain_matches_an_account_domain_in_either_idna_form(
    tmp_path: Path,
) -> None:
    muller = {"rec_id": OLD_CO, "file_as": "Müller Bau", "email2": "müller-bau.example"}
    async with store_with(tmp_path, muller) as store:
        # = info@müller-bau.example
        sender = "Hans <info@xn--mller-bau-q9a.example>"
        decision = await decide_for(store, tmp_path, "Drucker druckt nicht", sender)
    assert (decision.action, decision.account) == (Action.TICKET_CREATED, OLD_CO), decision.reason


# A tag naming no ticket, the reply found by In-Reply-To: the outcome and the forward's
# X-Smtpgate-Action credit "ticket_tag" (which missed) instead of "in_reply_to".
async def test_reply_found_by_in_reply_to_is_credited_to_in_reply_to(tmp_path: Path) -> None:
    ctx = spec_context(tmp_path)
    async with store_with(tmp_path, ACME_BY_DOMAIN) as store:
        first = message("Printer offline", "Jane <jane@acme.example>")
        first = first.replace(b"<t@rmm.example>", b"<first@acme.example>")
        _, created = await process(store, ctx, first, "jane@acme.example")
        assert created is not None
        assert created.ticket == 1
        reply = message("RE: [Ticket #99] Printer offline", "Jane <jane@acme.example>")
        reply = reply.replace(
            b"Message-ID: <t@rmm.example>",
            b"Message-ID: <reply@acme.example>\r\nIn-Reply-To: <first@acme.example>",
        )
        _decision, outcome = await process(store, ctx, reply, "jane@acme.example")
    assert outcome is not None
    assert (outcome.action, outcome.ticket) == (Action.TICKET_REPLY, 1)
    assert outcome.rules_hit[-1] == "in_reply_to", outcome.rules_hit
    assert "ticket_tag" in outcome.rules_missed, outcome.rules_missed


async def test_a_sharp_s_domain_is_not_another_customers_ss_domain(tmp_path: Path) -> None:
    """straße.example and strasse.example are two domains, often of two owners. Looked up in
    its IDNA 2003 spelling, mail from straße.example opened a ticket on Strasse GmbH's account
    (a review of the change that looks up both spellings found it)."""
    strasse = {"rec_id": NEW_CO, "file_as": "Strasse GmbH", "email2": "strasse.example"}
    async with store_with(tmp_path, strasse) as store:
        decision = await decide_for(store, tmp_path, "Drucker", "Info <info@straße.example>")
    assert decision.account is None
    assert decision.action == Action.FORWARDED


@pytest.mark.parametrize(
    "raw",
    [
        # The support mailbox's out-of-office answering one of our forwarded alerts
        (
            b"From: Support <support@msp.example>\r\nTo: connector@localhost\r\n"
            b"Subject: Automatic reply: Alert for Site Globex, disk C: low\r\n"
            b"Auto-Submitted: auto-replied\r\nMessage-ID: <ooo@msp.example>\r\n\r\n"
            b"I am out of the office.\r\n"
        ),
        # A delivery report about an alert
        (
            b"From: Mail Delivery System <MAILER-DAEMON@mx.example>\r\nTo: connector@localhost"
            b"\r\nSubject: Undeliverable: Alert for Site Globex, disk C: low\r\n"
            b"Message-ID: <dsn@mx.example>\r\nMIME-Version: 1.0\r\n"
            b'Content-Type: multipart/report; report-type=delivery-status; boundary="b"\r\n\r\n'
            b"--b\r\nContent-Type: text/plain\r\n\r\nCould not deliver.\r\n"
            b"--b\r\nContent-Type: message/delivery-status\r\n\r\nAction: failed\r\n--b--\r\n"
        ),
    ],
    ids=["out-of-office", "delivery-report"],
)
async def test_an_auto_reply_is_never_an_alert(
    raw: bytes, directory: Store, tmp_path: Path
) -> None:
    """A subject-only detection rule ("Alert") took an out-of-office or a bounce about an alert
    for the alert itself and opened a ticket for Globex. They are answers to mail: spec 2.3.2
    forwards them to support (auto_reply) unless they reply to a ticket."""
    ctx = Context(
        load_settings(_env_file=None, data_dir=tmp_path, internal_support_address="s@msp.example"),
        parse_rules(SENDER_RULES),
    )
    msg = parse_message(raw)
    try:
        decision = await decide(raw, "support@msp.example", msg, ctx, directory)
    finally:
        await directory.close()
    assert (decision.path, decision.action, decision.reason) == (
        "regular",
        Action.FORWARDED,
        "auto_reply",
    )
    assert decision.new_ticket is None


ALERT_RULES = """
[[detection]]
sender = ["alerts@rmm.example", "postmaster@exch01.acme.example"]
[[account]]
name = "site"
search = "file_as"
after = "Site"
before = ","
"""


@pytest.mark.parametrize(
    ("sender", "subject", "extra"),
    [
        # an "Auto:" subject with the Auto-Submitted every monitoring tool sends
        ("alerts@rmm.example", "Auto: Backup failed for Site Globex, nightly",
         "Auto-Submitted: auto-generated\r\n"),
        ("alerts@rmm.example", "Auto Response - service restarted for Site Globex, SRV01",
         "Precedence: bulk\r\n"),
        # a mail server's queue monitor mailing as postmaster@, a bounce word in the subject
        ("postmaster@exch01.acme.example", "Alert for Site Globex, 250 undelivered in queue", ""),
        ("alerts@rmm.example", "Alert for Site Globex, disk C: low", "X-Autoreply: no\r\n"),
    ],
)  # fmt: skip
async def test_an_alert_that_looks_automatic_is_still_an_alert(
    sender: str, subject: str, extra: str, directory: Store, tmp_path: Path
) -> None:
    """Only what surely answers mail (Auto-Submitted: auto-replied, an RFC 3464 delivery
    report) skips the automated branch: the guesses (a subject prefix with Precedence: bulk, a
    daemon sender with a bounce word) took these alerts for auto-replies, and no ticket."""
    ctx = Context(
        load_settings(_env_file=None, data_dir=tmp_path, internal_support_address="s@msp.example"),
        parse_rules(ALERT_RULES),
    )
    raw = (
        f"From: {sender}\r\nTo: connector@localhost\r\nSubject: {subject}\r\n{extra}"
        "Message-ID: <a1@rmm.example>\r\n\r\nalert body\r\n"
    ).encode()
    try:
        decision = await decide(raw, sender, parse_message(raw), ctx, directory)
    finally:
        await directory.close()
    assert (decision.action, decision.new_ticket is not None) == (Action.AUTOMATED_TICKET, True)


@pytest.mark.parametrize(
    ("value", "sender"),
    [
        ("acme.example.", "it@acme.example"),  # a root dot: the sender's is dropped too
        ("it@acme.example.", "it@acme.example"),
        (unicodedata.normalize("NFD", "bücher.example"), "it@bücher.example"),  # decomposed
        (unicodedata.normalize("NFD", "jörg@bücher.example"), "jörg@bücher.example"),
    ],
)
async def test_an_account_email_value_matches_its_sender_however_spelled(
    value: str, sender: str, tmp_path: Path
) -> None:
    """Values the import takes must match: stored with a root dot or decomposed, they never
    did (the sender's address is compared without the dot, composed)."""
    store = await Store.open(tmp_path / "s.db")
    account = {"rec_id": "CRDACME0000000000001", "file_as": "Acme", "email1": value}
    await store.import_accounts([(2, account)])
    ctx = Context(
        load_settings(_env_file=None, data_dir=tmp_path, internal_support_address="s@msp.example"),
        parse_rules(""),
    )
    raw = f"From: {sender}\r\nTo: connector@localhost\r\nSubject: printer\r\n\r\nhelp\r\n"
    try:
        decision = await decide(raw.encode(), sender, parse_message(raw.encode()), ctx, store)
    finally:
        await store.close()
    assert (decision.action, decision.account) == (Action.TICKET_CREATED, account["rec_id"])
