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


# Plain-text notices from a shop's role address (receipts@, billing@, service@,
# security@, orders@, bookings@) that the bundled model files as `primary`, not
# `updates`: the corpora hold 53 modern shop notices and no receipts, password
# resets or account notices at all (models/MODEL_CARD.md, "Known weaknesses").
# Wrong in the safe direction (they stay in the inbox: DESIGN.md "when unsure,
# the inbox wins"), and none is called spam. Strict: a model that gets one
# right fails here until the list is trimmed.
KNOWN_AS_PRIMARY = frozenset(
    {"receipt-17.eml", "receipt-21.eml", "reset-23.eml", "shipping-28.eml", "shipping-31.eml"}
)  # fmt: skip
# Wanted mail the bundled model calls spam: none in this build. (A trial build
# with the whole text bag dropped for 30% of the steps called the family note
# family-13.eml spam; that recipe was not shipped.)
KNOWN_CALLED_SPAM: frozenset[str] = frozenset()


def _case(path: Path) -> object:
    marks = []
    if path.name in KNOWN_AS_PRIMARY:
        marks.append(pytest.mark.xfail(strict=True, reason="bundled model files it as primary"))
    return pytest.param(path, id=f"{path.parent.name}/{path.name}", marks=marks)


@pytest.mark.parametrize("path", [_case(p) for p in MESSAGES])
def test_category(model, path: Path) -> None:  # type: ignore[no-untyped-def]
    (got,) = model.predict([model.featurize(path.read_bytes())])
    assert got.category == path.parent.name, f"{path.name}: {got}"


def _spam_case(path: Path) -> object:
    marks = []
    if path.name in KNOWN_CALLED_SPAM:
        marks.append(pytest.mark.xfail(strict=True, reason="bundled model calls it spam"))
    return pytest.param(path, id=f"{path.parent.name}/{path.name}", marks=marks)


@pytest.mark.parametrize("path", [_spam_case(p) for p in MESSAGES])
def test_not_spam(model, path: Path) -> None:  # type: ignore[no-untyped-def]
    (got,) = model.predict([model.featurize(path.read_bytes())])
    assert not got.spam, f"{path.name}: wanted mail called spam: {got}"


def test_known_failures_are_few() -> None:
    """What the model misses: 5 of the 15 transactional notices (as primary, the
    safe direction); every personal message, reply, newsletter and list post
    must be right, and none of the 41 may be spam."""
    assert all(n.startswith(("receipt", "reset", "shipping")) for n in KNOWN_AS_PRIMARY)
    assert all(n.startswith("family") for n in KNOWN_CALLED_SPAM)
    names = {p.name for p in MESSAGES}
    assert names >= KNOWN_AS_PRIMARY | KNOWN_CALLED_SPAM
    assert len(KNOWN_AS_PRIMARY) <= 5 and not KNOWN_CALLED_SPAM


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
    # As swaks sends it (README: `make run`, then swaks): Date, Message-Id, X-Mailer.
    swaks = (
        b"Date: Tue, 01 Dec 2026 15:00:00 +0000\r\nTo: you@example.org\r\n"
        b"From: me@example.com\r\nSubject: lunch?\r\n"
        b"Message-Id: <20261201150000.012345@host.example.com>\r\n"
        b"X-Mailer: swaks v20240103.0 jetmore.org/john/code/swaks/\r\n\r\n"
        b"Lunch tomorrow at noon? I can book the place near the office.\r\n"
    )
    a, b, c = model.predict([model.featurize(x) for x in (lunch, sale, swaks)])
    assert a.category == "primary" and not a.spam, a
    assert b.category == "promotions" and not b.spam, b
    assert c.category == "primary" and not c.spam, c
