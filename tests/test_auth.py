"""Authentication-Results from a trusted authserv-id adjust the spam score; others are ignored."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from classifier.auth import adjust, spam_log_odds, trusted_results
from classifier.config import ClassifierSettings
from classifier.inference import classify_batch
from classifier.model import load_model
from classifier.types import Classification

ROOT = Path(__file__).resolve().parent.parent
BODY = b"From: Shop <news@shop.example>\r\nSubject: hello\r\n\r\nHello there.\r\n"
FAIL = (
    b"Authentication-Results: mx.example.org;\r\n\tdkim=fail header.d=shop.example;\r\n"
    b"\tspf=pass smtp.mailfrom=shop.example; dmarc=fail (p=reject) header.from=shop.example\r\n"
)
FORGED = b"Authentication-Results: mx.example.org; dmarc=pass header.from=shop.example\r\n"
TRUSTED = frozenset({"mx.example.org"})


def test_only_the_topmost_trusted_field_counts() -> None:
    assert trusted_results(FAIL + BODY, frozenset()) is None  # the default: ignored
    assert trusted_results(FAIL + BODY, frozenset({"other.example"})) is None
    found = trusted_results(FAIL + BODY, TRUSTED)
    assert found is not None and found.results == {"dkim": "fail", "spf": "pass", "dmarc": "fail"}
    # A field the sender wrote sits below ours: ours (the topmost) wins.
    found = trusted_results(FAIL + FORGED + BODY, TRUSTED)
    assert found is not None and found.results["dmarc"] == "fail"
    # A field in the body is no header.
    assert trusted_results(b"From: a@b.example\r\n\r\n" + FAIL, TRUSTED) is None
    # authserv-id with a version and comments (RFC 8601 2.2).
    found = trusted_results(
        b"Authentication-Results: MX.example.org 1; (checked) spf=fail smtp.mailfrom=x\r\n\r\n",
        TRUSTED,
    )
    assert found is not None and found.results == {"spf": "fail"}


def test_failures_raise_the_score_passes_do_not() -> None:
    assert spam_log_odds(trusted_results(FAIL + BODY, TRUSTED)) == pytest.approx(2.7)
    assert spam_log_odds(trusted_results(FORGED + BODY, TRUSTED)) == 0.0
    c = Classification("promotions", 0.9, "m/1", spam=False, spam_score=0.3)
    up = adjust(c, FAIL + BODY, TRUSTED, threshold=0.5)
    assert up.spam_score is not None and up.spam_score > 0.8 and up.spam
    assert adjust(c, FORGED + BODY, TRUSTED, threshold=0.5) == c
    assert adjust(c, FAIL + BODY, frozenset(), threshold=0.5) == c


def test_setting_defaults_to_none_and_checks_ids() -> None:
    assert ClassifierSettings().trusted_authserv_ids == []
    s = msgspec.convert({"trusted_authserv_ids": ["mx.example.org"]}, ClassifierSettings)
    assert s.trusted_authserv_ids == ["mx.example.org"]
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"trusted_authserv_ids": ["bad id;"]}, ClassifierSettings)


def test_classify_batch_applies_it_with_the_real_model() -> None:
    model = load_model(str(ROOT / "models/default.onnx"))
    raws = [FAIL + BODY, BODY]
    plain, _ = classify_batch(model, raws, overrides=True, labels=None)
    trusted, _ = classify_batch(model, raws, overrides=True, labels=None, trusted=TRUSTED)
    assert isinstance(plain[0], Classification) and isinstance(trusted[0], Classification)
    assert plain[0].spam_score is not None and trusted[0].spam_score is not None
    assert trusted[0].spam_score > plain[0].spam_score
    assert trusted[1] == plain[1]  # no trusted field: untouched
