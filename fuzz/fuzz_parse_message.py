"""atheris fuzz target for message parsing and the XML finder (not run by the test suite).

    pip install atheris
    python fuzz/fuzz_parse_message.py -max_len=200000 -timeout=5 [corpus_dir]

Invariants checked: `parse_message` never raises and returns bounded text; every XML candidate
it yields goes through `find_transaction` without raising. A crash or a timeout is a bug.
"""

from __future__ import annotations

import sys

import atheris  # type: ignore[import-untyped,unused-ignore]

with atheris.instrument_imports():
    from smtpgate.mail import parse_message
    from smtpgate.xmlapi import find_transaction


def test_one_input(data: bytes) -> None:
    msg = parse_message(data)
    assert len(msg.subject) <= 16_384
    assert len(msg.text) <= 2_000_000
    find_transaction(msg.xml_candidates)
    find_transaction([data])


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
