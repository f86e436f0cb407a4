"""Issue 9, findings 3 and 4, over the real server: test client -> triaged -> capture.

3. Forged copies of our fields written with whitespace before the colon (RFC
   5322 4.5 obs-optional, read as the field by SpamAssassin and many readers)
   are removed, stamped or not.
4. A message with bare-LF line endings keeps every body line: the header ends
   at its first empty line, LF or CRLF, for stamping as for the classifier.
"""

from __future__ import annotations

from conftest import CaptureServer, ListSink, SmtpTestClient, StartTriaged

from classifier import headers
from classifier.types import Classification, ClassifierError

OURS = (b"x-triage-category", b"x-triage-score", b"x-triage-spam", b"x-triage-spam-score",
        b"x-triage-model")  # fmt: skip

KEPT = b"From: list@example.org\r\nList-Post: <mailto:list@example.org>\r\nSubject: s\r\n"
# Each forgery alone (one that any other spelling would give away proves nothing),
# then all of them among the kept fields.
SPELLINGS = (
    b"X-Triage-Spam\t: no\r\n",
    b"X-Triage-Category  : primary\r\n",
    b"x-triage-score \t:\r\n 0.999\r\n",  # folded, value on the next line
    b"X-TRIAGE-SPAM-SCORE\t\t: 0.001\r\n",
    b"X-Triage-Model\t:evil/1\r\n\tcontinued\r\n",
)
BODY = b"\r\nX-Triage-Category  : in the body stays\r\nX-Triage-Spam\t: body\r\n"


async def client_for(srv: object) -> SmtpTestClient:
    host, port = srv.addresses[0]  # type: ignore[attr-defined]
    c = await SmtpTestClient.connect(host, port)
    assert (await c.reply())[0] == 220
    assert (await c.cmd("EHLO client.test"))[0] == 250
    return c


def forgeries() -> list[bytes]:
    """Messages with forged fields: each spelling on top, then all of them
    interleaved with the kept fields. Below the forgeries: KEPT + BODY."""
    out = [f + KEPT + BODY for f in SPELLINGS]
    out.append(SPELLINGS[0] + SPELLINGS[1] + KEPT[:24] + b"".join(SPELLINGS[2:]) + KEPT[24:] + BODY)
    return out


def our_fields(data: bytes) -> list[bytes]:
    """Names of our fields in the header of `data`, as any lenient reader sees them."""
    return [m.group(1).lower() for m in headers.FIELD.finditer(headers.head(data))
            if m.group(1).lower() in OURS]  # fmt: skip


async def test_forged_fields_with_whitespace_before_the_colon_are_removed(
    start_triaged: StartTriaged, capture: CaptureServer
) -> None:
    srv = await start_triaged()
    c = await client_for(srv)
    added = b"X-Triage-Category: forums\r\nX-Triage-Score: 0.900\r\nX-Triage-Model: rules/1\r\n"
    for i, raw in enumerate(forgeries()):
        assert our_fields(raw)  # the forgeries are fields, as a reader sees them
        assert (await c.send_message("a@example.org", ["b@example.net"], raw))[0] == 250
        data = capture.messages[i].data
        assert data == added + KEPT + BODY, raw  # the forgery gone, every other byte kept
    await c.close()


class FailingClassifier:
    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def classify(self, raw: bytes) -> Classification:
        raise ClassifierError("model unavailable")


async def test_forged_fields_are_removed_when_the_message_passes_unstamped(
    start_triaged: StartTriaged, capture: CaptureServer
) -> None:
    sink = ListSink()
    srv = await start_triaged(classifier=FailingClassifier(), sinks=[sink])
    c = await client_for(srv)
    for i, raw in enumerate(forgeries()):
        assert (await c.send_message("a@example.org", ["b@example.net"], raw))[0] == 250
        assert sink.records[i].category is None  # accepted unclassified (on_classifier_error)
        assert capture.messages[i].data == KEPT + BODY, raw
    await c.close()


# Bare LF throughout but the last line (DATA ends with CRLF.CRLF whatever the
# message's own line endings); the body has lines that look like our fields.
BARE_LF = (
    b"From: Alice <alice@example.org>\n"
    b"X-Triage-Category  : primary\n"
    b"Subject: lunch\n"
    b"Message-ID: <lf@example.org>\n"
    b"\n"
    b"X-Triage-Category: in the body stays\n"
    b"X-Triage-Spam: no, still body\n"
    b"List-Post: <mailto:body@example.org>\n"
    b"last line\r\n"
)


async def test_bare_lf_message_keeps_its_body_lines(
    start_triaged: StartTriaged, capture: CaptureServer
) -> None:
    sink = ListSink()
    # The default server.bare_lf = "reject" refuses bare LF with 550 5.5.2
    # (tests/test_session_safety.py); "normalize" lets it through as CRLF.
    srv = await start_triaged(sinks=[sink], server={"bare_lf": "normalize"})
    c = await client_for(srv)
    code, text = await c.send_message("a@example.org", ["b@example.net"], BARE_LF)
    assert code == 250, text
    data = capture.messages[0].data
    # The session may relay bare LF as is or normalise it to CRLF: either way
    # the same lines, with the forged header field gone and the body intact.
    lines = data.replace(b"\r\n", b"\n")
    expected_body = BARE_LF[BARE_LF.index(b"\n\n") + 2 :].replace(b"\r\n", b"\n")
    assert lines.endswith(b"\n\n" + expected_body)
    assert lines == (
        b"X-Triage-Category: primary\nX-Triage-Score: 0.600\nX-Triage-Model: rules/1\n"
        b"From: Alice <alice@example.org>\nSubject: lunch\nMessage-ID: <lf@example.org>\n\n"
        + expected_body
    )
    # The List-Post line in the body made no list mail, and the Message-ID was found.
    assert (sink.records[0].category, sink.records[0].message_id) == ("primary", "<lf@example.org>")
    await c.close()
