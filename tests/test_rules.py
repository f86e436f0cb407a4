"""The header-rule classifier: each rule, folding, and agreement with the
weak labels of the SpamAssassin ham (needs `make corpus`, which `make test` runs)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from classifier.rules import RulesClassifier, header_fields

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO / "data-cache" / "spamassassin" / "package" / "data"
# A copy of shared/data/spamassassin-weak-labels.json.gz (138 KB), kept with the
# tests so that the only thing this test needs is the corpus `make corpus`
# unpacks under data-cache/ (shared/ is not beside every checkout).
LABELS = REPO / "tests" / "data" / "spamassassin-weak-labels.json.gz"


def msg(*headers: str, body: str = "hello\r\n") -> bytes:
    return ("\r\n".join(headers) + "\r\n\r\n" + body).encode()


@pytest.mark.parametrize(
    ("raw", "category"),
    [
        (msg("From: Bob <bob@example.org>", "Subject: lunch?"), "primary"),
        (msg("From: a@example.org", "List-Id: <dev.lists.example.org>"), "forums"),
        (msg("From: a@example.org", "List-Post: <mailto:dev@x>", "List-Unsubscribe: <mailto:u@x>"), "forums"),
        (msg("From: a@example.org", "Precedence: list"), "forums"),
        (msg("From: a@example.org", "X-BeenThere: python-dev@python.org"), "forums"),
        (msg("From: a@example.org", "Subject: Re: [SAdev] patch"), "forums"),
        (msg("From: shop@example.org", "List-Unsubscribe: <https://x/u>"), "promotions"),
        (msg("From: shop@example.org", "List-Id: <news.example.org>", "List-Unsubscribe: <mailto:u@x>"), "promotions"),
        (msg("From: a@example.org", "X-Mailer: MailChimp Mailer - **CID1234**"), "promotions"),
        (msg("From: Deals <deals@shop.example>"), "promotions"),
        (msg("From: a@example.org", "Precedence: bulk"), "promotions"),
        (msg("From: ci@example.org", "Auto-Submitted: auto-generated"), "updates"),
        (msg("From: ci@example.org", "Auto-Submitted: no"), "primary"),
        (msg("From: GitHub <noreply@github.com>", "List-Unsubscribe: <mailto:u@x>"), "updates"),
        (msg("From: Mail Delivery System <MAILER-DAEMON@mx.example.org>", "Precedence: list"), "updates"),
        (msg("From: a@example.org", "Return-Path: <>"), "updates"),
        (msg("From: a@example.org", 'Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary="b"'), "updates"),
        (msg("From: Cron Daemon <root@host.example>"), "updates"),
    ],
)
async def test_rules(raw: bytes, category: str) -> None:
    result = await RulesClassifier().classify(raw)
    assert result.category == category
    assert result.model == "rules/1"
    assert 0.0 <= result.score <= 1.0
    assert result.spam is None and result.spam_score is None  # no spam opinion


def test_header_scanner_unfolds_stops_at_body_and_keeps_first() -> None:
    raw = (
        b"Subject: one\r\n\tline two\r\nFrom: a@x\r\nSubject: second copy\r\n"
        b"\r\nList-Id: <in the body>\r\n"
    )
    fields = header_fields(raw)
    assert fields[b"subject"] == b"one line two"
    assert b"list-id" not in fields
    assert header_fields(b"From: a@x\n\nList-Post: body\n") == {b"from": b"a@x"}  # LF-only mail


@pytest.mark.skipif(not CORPUS.is_dir(), reason=f"SpamAssassin corpus not unpacked at {CORPUS} (make corpus)")
def test_agrees_with_weak_labels_on_the_spamassassin_ham() -> None:
    labels: dict[str, str] = json.loads(gzip.decompress(LABELS.read_bytes()))
    rules = RulesClassifier()
    agree = total = 0
    for name, label in labels.items():
        if label == "spam":
            continue  # the rules have no spam opinion
        got = rules.classify_now((CORPUS / name).read_bytes()).category
        agree += got == label.split("/")[0]
        total += 1
    assert total > 4000
    # Measured 95.4%; the weak labels themselves are heuristic (README).
    assert agree / total >= 0.93
