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


@pytest.mark.parametrize("path", MESSAGES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_category_and_not_spam(model, path: Path) -> None:  # type: ignore[no-untyped-def]
    (got,) = model.predict([model.featurize(path.read_bytes())])
    assert got.category == path.parent.name, f"{path.name}: {got}"
    assert not got.spam, f"{path.name}: wanted mail called spam: {got}"


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
