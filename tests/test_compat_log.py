"""proxy/smtp/compat.py item 3: aiosmtpd's per-command `sanitized_log` asks
the logger's level first; with the level on it logs what aiosmtpd logged."""

from __future__ import annotations

import logging

import aiosmtpd.smtp as aiosmtpd_smtp
import pytest

from proxy.smtp import compat


def test_installed_in_aiosmtpd() -> None:
    # aiosmtpd's command loop looks the name up in its module at call time.
    assert aiosmtpd_smtp.sanitized_log is compat._level_first_sanitized_log
    assert compat._original_sanitized_log is not compat._level_first_sanitized_log


def test_level_off_skips_the_work(monkeypatch: pytest.MonkeyPatch) -> None:
    log = logging.getLogger("mail.log.test-off")
    log.setLevel(logging.WARNING)

    def boom(text: bytes) -> bytes:
        raise AssertionError("sanitize ran for a disabled level")

    monkeypatch.setattr(aiosmtpd_smtp, "sanitize", boom)
    aiosmtpd_smtp.sanitized_log(log.info, "%r >> %r", "peer", b"MAIL FROM:<a@b>")
    aiosmtpd_smtp.sanitized_log(log.debug, "readline: %r", b"RCPT TO:<a@b>")


def test_level_on_logs_sanitized(caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("mail.log.test-on")
    with caplog.at_level(logging.DEBUG, logger="mail.log.test-on"):
        aiosmtpd_smtp.sanitized_log(log.info, "%r >> %r", "peer", b"AUTH PLAIN c2VjcmV0\r\n")
    assert len(caplog.records) == 1
    text = caplog.records[0].getMessage()
    assert "c2VjcmV0" not in text and "********" in text
