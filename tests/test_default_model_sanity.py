"""The bundled model on plain, hand-written mail of each kind a person receives.

A sanity check, not a metric: the messages in tests/fixtures/sanity/<category>/
were written by hand for this test (names, shops and lists are made up) and are
never trained on (models/default_recipe.py reads only ../shared/data and the
SpamAssassin corpus). Each folder names the category the bundled model must
give; none of them is spam. Kinds: notes from colleagues, replies, family
messages (primary); receipts, password resets and sign-in notices, shipping
notices (updates); shop newsletters (promotions); mailing-list posts (forums).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from classifier.model import load_model

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests/fixtures/sanity"
MESSAGES = sorted(FIXTURES.glob("*/*.eml"))


@pytest.fixture(scope="module")
def model():  # type: ignore[no-untyped-def]
    return load_model(str(ROOT / "models/default.onnx"))


def test_every_kind_is_there() -> None:
    kinds = {p.name.rsplit("-", 1)[0] for p in MESSAGES}
    assert kinds == {"colleague", "reply", "family", "receipt", "reset", "shipping",
                     "newsletter", "listpost"}  # fmt: skip
    assert len(MESSAGES) >= 40


# Plain-text notices from a shop's, bank's or library's role address
# (receipts@, billing@, service@, security@, accounts@, account@, orders@,
# notifications@, bookings@) that the bundled model files as `primary`, not
# `updates`: the corpora hold 53 modern shop notices and no receipts, password
# resets or account notices at all, and the words of these notices are closer to
# Enron's business mail than to the RSS items and bounces `updates` learned from
# (models/MODEL_CARD.md, "Known weaknesses"). Wrong in the safe direction (they
# stay in the inbox: DESIGN.md "when unsure, the inbox wins"), and none is
# called spam (test below). Strict: a model that gets one right fails here
# until the list is trimmed.
KNOWN_AS_PRIMARY = frozenset(
    {"receipt-17.eml", "receipt-18.eml", "receipt-20.eml", "receipt-21.eml", "reset-23.eml",
     "reset-25.eml", "reset-26.eml", "shipping-28.eml", "shipping-29.eml", "shipping-31.eml"}
)  # fmt: skip


def _case(path: Path) -> object:
    marks = []
    if path.name in KNOWN_AS_PRIMARY:
        marks.append(pytest.mark.xfail(strict=True, reason="bundled model files it as primary"))
    return pytest.param(path, id=f"{path.parent.name}/{path.name}", marks=marks)


@pytest.mark.parametrize("path", [_case(p) for p in MESSAGES])
def test_category(model, path: Path) -> None:  # type: ignore[no-untyped-def]
    (got,) = model.predict([model.featurize(path.read_bytes())])
    assert got.category == path.parent.name, f"{path.name}: {got}"


def test_none_of_them_is_spam(model) -> None:  # type: ignore[no-untyped-def]
    got = model.predict([model.featurize(p.read_bytes()) for p in MESSAGES])
    spam = [(p.name, c.spam_score) for p, c in zip(MESSAGES, got, strict=True) if c.spam]
    assert spam == [], f"wanted mail called spam: {spam}"


def test_known_failures_are_one_kind_and_few() -> None:
    """The categories the model misses are transactional only (10 of the 15 today):
    every personal message, newsletter and list post must be right."""
    assert all(n.startswith(("receipt", "reset", "shipping")) for n in KNOWN_AS_PRIMARY)
    assert {p.name for p in MESSAGES} >= KNOWN_AS_PRIMARY and len(KNOWN_AS_PRIMARY) <= 10


def test_the_issue_examples(model) -> None:  # type: ignore[no-untyped-def]
    """Issue 11's two examples, as a new user sent them."""
    lunch = (
        b"From: Sam <sam@example.org>\r\nTo: Julia <julia@example.net>\r\nSubject: lunch?\r\n\r\n"
        b"Lunch tomorrow at noon? I can book the place near the office.\r\n"
    )
    sale = (
        b"From: Urban Threads <news@urbanthreads.example>\r\nTo: julia@example.net\r\n"
        b"Subject: 50% off everything this weekend\r\n"
        b"List-Unsubscribe: <https://urbanthreads.example/unsubscribe?u=1>\r\n"
        b"Precedence: bulk\r\n\r\n"
        b"50% off everything this weekend! Shop now: https://urbanthreads.example/sale\r\n"
    )
    a, b = model.predict([model.featurize(lunch), model.featurize(sale)])
    assert a.category == "primary" and not a.spam, a
    assert b.category == "promotions" and not b.spam, b
