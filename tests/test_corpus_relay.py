"""Every message of the SpamAssassin corpus relays through triaged intact.

"Byte-identical below the stamped headers" means, precisely:

    strip_stamp(received) == smtp_form(original)

- original: the corpus file's bytes, unchanged (5,453 of them begin with an
  mbox "From " line; they are sent as they are, it is part of the message).
- smtp_form(): what an SMTP client must put on the wire for those bytes
  (RFC 5321 2.3.8, 4.1.1.4): every CRLF, lone LF and lone CR becomes CRLF, and
  a final CRLF is added when missing. It is exactly aiosmtplib's
  `normalize_message_line_endings`, the client that sends them. Dot-stuffing
  (4.5.2) is applied by the client and undone by the receiving server, so it
  does not appear on either side.
- received: what the next hop's DATA handler got (dot-unstuffed, CRLF).
- strip_stamp(): removes the header fields at the very top whose names start
  with "X-Triage-" (with their folded continuation lines) and nothing else.

Each message's envelope sender carries its index, so a mismatch names the
file. The corpus (6,046 files, 32 MB; 24 have lines over RFC 5321's 1,000
octets, up to 48 KB; 514 have 8-bit bytes; 279 have lines starting with a dot;
8 have CRs) comes from `make corpus`.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections import Counter
from pathlib import Path

import aiosmtplib
import pytest
from aiosmtplib.protocol import normalize_message_line_endings
from smtp_sink import SmtpSink
from triaged_proc import TriagedProcess

CORPUS = Path(__file__).resolve().parent.parent / "data-cache/spamassassin/package/data"
EXPECTED_FILES = 6046
CONNECTIONS = 8

_STAMP_LINE = re.compile(rb"X-Triage-[!-9;-~]*:[^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*", re.IGNORECASE)


def smtp_form(raw: bytes) -> bytes:
    return normalize_message_line_endings(raw)


def strip_stamp(data: bytes) -> tuple[bytes, list[bytes]]:
    """(the message below our leading X-Triage-* fields, those fields)."""
    stamps: list[bytes] = []
    while (m := _STAMP_LINE.match(data)) is not None:
        stamps.append(m.group())
        data = data[m.end():]
    return data, stamps


def test_strip_stamp_is_exact() -> None:
    msg = b"From x  Thu\r\nSubject: s\r\nX-Triage-Category: forums\r\n\r\nbody\r\n"
    stamped = b"X-Triage-Category: forums\r\nX-Triage-Score: 0.900\r\n\tfolded\r\n" + msg
    rest, stamps = strip_stamp(stamped)
    assert rest == msg and len(stamps) == 2  # stops at the first field not ours
    assert strip_stamp(msg) == (msg, [])
    assert smtp_form(b"a\nb\r\nc\rd") == b"a\r\nb\r\nc\r\nd\r\n"


def _corpus_files() -> list[Path]:
    return sorted(CORPUS.glob("*/*.txt"))


@pytest.mark.slow
@pytest.mark.timeout(600)
# triaged runs as a child process (uvloop, as shipped); this loop only drives
# the clients, so running the test on both loops would only double its cost.
@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_whole_corpus_relays_byte_identical_below_stamp() -> None:
    files = _corpus_files()
    if not files:
        pytest.skip(f"corpus missing at {CORPUS}: run `make corpus`")
    assert len(files) == EXPECTED_FILES

    with SmtpSink() as sink, TriagedProcess(
        f"smtp://127.0.0.1:{sink.port}", log_level="warning"
    ) as triaged:
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(len(files)):
            queue.put_nowait(i)
        failures: list[str] = []

        async def sender() -> None:
            # One connection, many transactions: exercises triaged's
            # per-transaction reset as well as the bytes.
            client = aiosmtplib.SMTP(hostname="127.0.0.1", port=triaged.port, timeout=60)
            async with client:
                while not queue.empty():
                    i = queue.get_nowait()
                    raw = files[i].read_bytes()
                    options = ["BODY=8BITMIME"] if any(b > 127 for b in raw) else []
                    try:
                        await client.sendmail(f"c{i}@corpus.test", ["rcpt@example.test"], raw,
                                              mail_options=options)
                    except aiosmtplib.SMTPException as exc:
                        failures.append(f"{files[i].relative_to(CORPUS)}: {exc}")
                        if not client.is_connected:
                            await client.connect()

        await asyncio.gather(*(sender() for _ in range(CONNECTIONS)))
        assert failures == [], f"{len(failures)} refused, e.g. {failures[:5]}"
        deliveries = await sink.async_wait_for(len(files), wait_s=60)
        log = triaged.log_tail()

    seen = Counter(d.mail_from for d in deliveries)
    assert len(deliveries) == len(files), f"{len(deliveries)} delivered of {len(files)}"
    assert [k for k, n in seen.items() if n > 1] == []

    unstamped, mismatched = [], []
    for d in deliveries:
        i = int(d.mail_from[1:].split("@")[0])
        expected = smtp_form(files[i].read_bytes())
        assert b"X-Triage-" not in expected[:200]  # the corpus has none of its own
        body, stamps = strip_stamp(d.data)
        if not any(s.lower().startswith(b"x-triage-category:") for s in stamps):
            unstamped.append(str(files[i].relative_to(CORPUS)))
        if hashlib.sha256(body).digest() != hashlib.sha256(expected).digest():
            mismatched.append(str(files[i].relative_to(CORPUS)))
    assert mismatched == [], f"{len(mismatched)} altered, e.g. {mismatched[:5]}\n{log}"
    assert unstamped == [], f"{len(unstamped)} without a category, e.g. {unstamped[:5]}"
