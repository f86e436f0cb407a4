"""classifier.rule_overrides: sure header rules override the model's category,
never its spam verdict. Unit tests on the rules, then the real service with a
model trained here (tests/batching_models.py) on both runners, then a large
message, whose verdict must not depend on the runner or the batch."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from batching_models import tiny_message, train_tiny_model

from classifier.batch_metrics import BatchStats
from classifier.config import ClassifierSettings
from classifier.model import load_model
from classifier.overrides import apply_override, sure_category
from classifier.service import OnnxClassifierService
from classifier.types import Classification

PLAIN = b"From: Ann <ann@example.org>\r\nSubject: hi\r\n\r\nhello\r\n"


def with_headers(raw: bytes, *lines: str) -> bytes:
    return "".join(f"{line}\r\n" for line in lines).encode() + raw


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        ((), None),
        (("Return-Path: <>",), "updates"),
        (("Return-Path: < >",), "updates"),
        (("Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary=x",), "updates"),
        (("From: Mail Delivery System <MAILER-DAEMON@mx.example>",), "updates"),
        (("List-Post: <mailto:dev@lists.example>",), "forums"),
        (("X-BeenThere: dev@lists.example",), "forums"),
        (("X-Mailman-Version: 2.1.39",), "forums"),
        (("Mailing-List: contact dev-help@lists.example",), "forums"),
        (("Precedence: list",), "forums"),
        # A newsletter (List-Id + List-Unsubscribe) is not a discussion list.
        (("List-Id: <news.shop.example>", "List-Unsubscribe: <mailto:u@shop.example>"), None),
        (("Precedence: bulk",), None),
        # A bounce of a list post is a bounce.
        (("Return-Path: <>", "List-Post: <mailto:dev@lists.example>"), "updates"),
    ],
)
def test_sure_category(lines: tuple[str, ...], expected: str | None) -> None:
    assert sure_category(with_headers(PLAIN, *lines)) == expected


def test_only_the_header_block_counts() -> None:
    body_says = PLAIN + b"List-Post: <mailto:x@y>\r\nReturn-Path: <>\r\n"
    assert sure_category(body_says) is None


def test_apply_override_keeps_spam_and_needs_the_label() -> None:
    spam = Classification("primary", 0.8, "m/1", spam=True, spam_score=0.97)
    labels = frozenset({"primary", "forums", "updates"})
    got = apply_override(spam, "forums", labels)
    assert (got.category, got.spam, got.spam_score, got.model) == ("forums", True, 0.97, "m/1")
    assert got.score == 0.9
    # A site's own label set without "forums": the model's answer stands.
    assert apply_override(spam, "forums", frozenset({"invoices", "family"})) is spam
    assert apply_override(spam, "forums", None) is spam
    assert apply_override(spam, None, labels) is spam
    # Agreement keeps the model's own confidence.
    same = Classification("forums", 0.99, "m/1")
    assert apply_override(same, "forums", labels) is same


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("tiny")
    return train_tiny_model(work, work / "tiny.onnx", name="tiny")


async def classify_all(model: Path, raws: list[bytes], overrides: bool,
                       runner: str = "process") -> list[Classification]:
    s = ClassifierSettings(model_path=str(model), provider="cpu", rule_overrides=overrides,
                           runner=runner)  # type: ignore[arg-type]
    service = OnnxClassifierService(s)
    await service.start()
    try:
        return [await service.classify(r) for r in raws]
    finally:
        await service.close()


@pytest.mark.parametrize("runner", ["process", "thread"])
async def test_service_overrides_category_not_spam(tiny: Path, runner: str) -> None:
    family = tiny_message("primary", 900, seed=3)
    spam = tiny_message("spam", 901, seed=3)
    raws = [
        family,
        with_headers(family, "List-Post: <mailto:family@lists.example>"),
        with_headers(family, "Return-Path: <>"),
        with_headers(spam, "List-Post: <mailto:family@lists.example>"),
    ]
    plain = await classify_all(tiny, raws, overrides=False, runner=runner)
    over = await classify_all(tiny, raws, overrides=True, runner=runner)
    # Without overrides the model calls all three family messages primary.
    assert [r.category for r in plain[:3]] == ["primary"] * 3
    assert [r.category for r in over] == ["primary", "forums", "updates", "forums"]
    assert over[0] == plain[0]  # no sure rule: the model's verdict untouched
    # The spam verdict is always the model's.
    assert [(r.spam, r.spam_score) for r in over] == [(r.spam, r.spam_score) for r in plain]
    assert over[3].spam is True
    assert {r.model for r in over} == {"tiny/1"}


@pytest.mark.parametrize("runner", ["process", "thread"])
async def test_large_message_gets_the_offline_verdict_alone_or_in_a_batch(
    tiny: Path, runner: str
) -> None:
    small = tiny_message("updates", 902, seed=4)
    big = small + b"x" * (4 << 20)  # 4 MiB: one frame to the inference process
    offline = load_model(str(tiny))
    expected = offline.predict([offline.featurize(big)])[0]
    stats = BatchStats()
    s = ClassifierSettings(model_path=str(tiny), provider="cpu", rule_overrides=False,
                           runner=runner)  # type: ignore[arg-type]
    service = OnnxClassifierService(s, metrics=stats)
    await service.start()
    try:
        alone = await service.classify(big)
        batch = await asyncio.gather(*(service.classify(r) for r in [small, big, small] * 8))
    finally:
        await service.close()
    assert alone == expected
    assert all(r == expected for r in batch[1::3])
    assert max(stats.batch_sizes) > 1
    assert len(stats.features_s) == stats.batches  # timed in the runner, once per batch
