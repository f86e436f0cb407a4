"""DKIM signatures still verify after triaged stamped the message (RFC 6376).

triaged adds its X-Triage-* fields above the signed ones and relays the rest
byte for byte, so a signature over the original header fields and body must
still verify at the next hop, for both canonicalisations. The key is made
here with openssl; DNS is replaced by dkimpy's own `dnsfunc` hook returning
the test key's TXT record (the component under test is triaged, not DNS).
"""

from __future__ import annotations

import base64
import shutil
import smtplib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import dkim
import pytest
from smtp_sink import SmtpSink
from triaged_proc import TriagedProcess

SELECTOR = b"test2026"
DOMAIN = b"example.test"
OPENSSL = shutil.which("openssl")

pytestmark = pytest.mark.skipif(OPENSSL is None, reason="openssl is needed to make the test key")


class Key:
    def __init__(self, tmp: Path) -> None:
        assert OPENSSL is not None
        pem = tmp / "dkim.pem"
        subprocess.run([OPENSSL, "genrsa", "-out", str(pem), "2048"], check=True, capture_output=True)
        der = subprocess.run(
            [OPENSSL, "rsa", "-in", str(pem), "-pubout", "-outform", "DER"],
            check=True, capture_output=True,
        ).stdout
        self.private_pem = pem.read_bytes()
        self.txt = b"v=DKIM1; k=rsa; p=" + base64.b64encode(der)

    def dns(self, name: bytes, timeout: float = 5) -> bytes | None:
        """dkimpy's `dnsfunc`: the TXT record for our selector, nothing else."""
        return self.txt if name.rstrip(b".") == SELECTOR + b"._domainkey." + DOMAIN else None


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory) -> Key:
    return Key(tmp_path_factory.mktemp("dkim"))


@pytest.fixture(scope="module")
def relay() -> Iterator[tuple[SmtpSink, TriagedProcess]]:
    with SmtpSink() as sink, TriagedProcess(f"smtp://127.0.0.1:{sink.port}") as triaged:
        yield sink, triaged


MESSAGES = {
    "plain": (
        b"From: Alice Example <alice@example.test>\r\n"
        b"To: bob@example.test\r\n"
        b"Subject: quarterly numbers\r\n"
        b"Date: Thu, 26 Nov 2026 10:00:00 +0000\r\n"
        b"Message-ID: <dkim-plain@example.test>\r\n"
        b"\r\n"
        b"Hello Bob,\r\n\r\nthe numbers are attached.   \r\n.a line with a leading dot\r\n"
        b"\r\n\r\n"
    ),
    "list-8bit-folded": (
        b"From: =?utf-8?q?J=C3=B6rg?= <joerg@example.test>\r\n"
        b"To: list@lists.example.test\r\n"
        b"Subject: a long subject that is folded\r\n"
        b"  over two lines\r\n"
        b"List-Id: Test list <list.lists.example.test>\r\n"
        b"List-Unsubscribe: <mailto:leave@lists.example.test>\r\n"
        b"Date: Thu, 26 Nov 2026 10:00:00 +0000\r\n"
        b"Message-ID: <dkim-8bit@example.test>\r\n"
        b"MIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n"
        b"\r\n"
        + "Grüße aus Köln, 日本語のテキスト\r\n\ttabbed line\r\n".encode()
    ),
}


@pytest.mark.parametrize("canon", [(b"relaxed", b"relaxed"), (b"simple", b"simple")],
                         ids=["relaxed", "simple"])
@pytest.mark.parametrize("name", sorted(MESSAGES))
def test_dkim_signature_verifies_after_triaged(
    name: str, canon: tuple[bytes, bytes], key: Key, relay: tuple[SmtpSink, TriagedProcess]
) -> None:
    sink, triaged = relay
    message = MESSAGES[name]
    signed = dkim.sign(message, SELECTOR, DOMAIN, key.private_pem, canonicalize=canon) + message
    assert dkim.verify(signed, dnsfunc=key.dns)  # the key and signature are good to start with

    before = len(sink.deliveries)
    with smtplib.SMTP("127.0.0.1", triaged.port, timeout=30) as client:
        client.sendmail("alice@example.test", ["bob@example.test"], signed,
                        mail_options=["BODY=8BITMIME"])
    delivered = sink.wait_for(before + 1)[before].data

    assert b"\r\nX-Triage-Category: " in b"\r\n" + delivered  # it really was stamped
    assert delivered.endswith(signed)  # headers only added on top
    assert dkim.verify(delivered, dnsfunc=key.dns), "DKIM broke in transit"
    # ... and verification is not vacuous: one changed body byte fails it.
    at = delivered.index(b"\r\n\r\n") + 4  # the first body byte, a letter
    tampered = delivered[:at] + delivered[at : at + 1].swapcase() + delivered[at + 1 :]
    assert not dkim.verify(tampered, dnsfunc=key.dns)
