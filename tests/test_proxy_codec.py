"""Pure pieces of the proxy: PROXY header parser (fed bytes), header stamping,
reply formatting."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy import verdict as V
from proxy.proxyproto import V2_SIGNATURE, ProxyError, ProxyHeader, encode_v1, encode_v2, parse
from proxy.smtp.stamp import stamp


def feed(data: bytes) -> tuple[ProxyHeader, int]:
    """Drive the parser the way the session does: read exactly what it asks."""
    buf = b""
    pos = 0
    while True:
        result = parse(buf)
        if not isinstance(result, int):
            return result
        assert result > 0
        buf += data[pos : pos + result]
        pos += result
        assert pos <= len(data) + 1, "parser asked for more than the header"


def test_v1_tcp4_and_tcp6_and_unknown() -> None:
    h, n = feed(b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 25\r\nEHLO x\r\n")
    assert (h.version, h.local, h.source, h.destination) == (1, False, ("192.0.2.1", 56324), ("198.51.100.2", 25))
    assert n == len(b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 25\r\n")
    h, _ = feed(b"PROXY TCP6 2001:db8::1 2001:db8::2 4000 25\r\n")
    assert h.source == ("2001:db8::1", 4000)
    h, _ = feed(b"PROXY UNKNOWN\r\n")
    assert h.local and h.source is None


def test_v2_proxy_and_local_consume_exactly_the_header() -> None:
    header = encode_v2(("203.0.113.5", 1234), ("127.0.0.1", 25))
    h, n = feed(header + b"EHLO x\r\n")
    assert (h.version, h.source, n) == (2, ("203.0.113.5", 1234), len(header))
    h, n = feed(encode_v2(("2001:db8::5", 1), ("2001:db8::6", 25)))
    assert h.source == ("2001:db8::5", 1)
    local = encode_v2(None, None)
    h, n = feed(local)
    assert h.local and h.source is None and n == 16


def test_v2_tlvs_after_addresses_are_skipped() -> None:
    body = bytes([192, 0, 2, 1, 127, 0, 0, 1]) + struct.pack("!HH", 5, 25) + b"\x04\x00\x01X"
    header = V2_SIGNATURE + bytes([0x21, 0x11]) + struct.pack("!H", len(body)) + body
    h, n = feed(header)
    assert h.source == ("192.0.2.1", 5) and n == len(header)


@pytest.mark.parametrize(
    "bad",
    [
        b"EHLO example.org\r\n",
        b"PROXY TCP4 999.0.0.1 1.2.3.4 1 2\r\n",
        b"PROXY TCP4 ::1 1.2.3.4 1 2\r\n",
        b"PROXY TCP4 1.2.3.4 1.2.3.4 1 99999\r\n",
        b"PROXY SCTP 1.2.3.4 1.2.3.4 1 2\r\n",
        b"PROXY " + b"x" * 200,
        V2_SIGNATURE[:11] + b"X" + b"\x21\x11\x00\x00",
        V2_SIGNATURE + b"\x11\x11\x00\x00",  # version 1 in a v2 header
        V2_SIGNATURE + b"\x22\x11\x00\x00",  # unknown command
        V2_SIGNATURE + b"\x21\x11\x00\x04abcd",  # address block too short
    ],
)
def test_invalid_headers_raise(bad: bytes) -> None:
    with pytest.raises(ProxyError):
        feed(bad)


@given(
    st.ip_addresses(),
    st.integers(0, 65535),
    st.integers(0, 65535),
)
def test_round_trip(ip: object, sport: int, dport: int) -> None:
    src = (str(ip), sport)
    dst = ("::1" if ":" in str(ip) else "127.0.0.1", dport)
    for header in (encode_v1(src, dst), encode_v2(src, dst)):
        h, n = feed(header)
        assert (h.source, h.destination, n) == (src, dst, len(header))


FIELDS = [("X-Triage-Category", "forums"), ("X-Triage-Score", "0.900")]
NAMES = ["X-Triage-Category", "X-Triage-Score", "X-Triage-Model"]


def test_stamp_prepends_and_keeps_everything_else() -> None:
    raw = b"From: a@x\r\nSubject: s\r\n\r\nbody\r\n"
    assert stamp(raw, FIELDS, NAMES) == b"X-Triage-Category: forums\r\nX-Triage-Score: 0.900\r\n" + raw


def test_stamp_removes_forged_fields_with_continuations_only_in_the_header() -> None:
    raw = (
        b"X-TRIAGE-SCORE: 1\r\nFrom: a@x\r\nX-Triage-Model: m\r\n continued\r\n\tmore\r\n"
        b"Subject: s\r\n\r\nX-Triage-Score: body line\r\n"
    )
    out = stamp(raw, FIELDS, NAMES)
    assert out == (
        b"X-Triage-Category: forums\r\nX-Triage-Score: 0.900\r\n"
        b"From: a@x\r\nSubject: s\r\n\r\nX-Triage-Score: body line\r\n"
    )


def test_stamp_subject_tag_and_headerless_messages() -> None:
    raw = b"Subject: Sale\r\n\r\nbody\r\n"
    assert stamp(raw, [], NAMES, "[promotions]") == b"Subject: [promotions] Sale\r\n\r\nbody\r\n"
    assert stamp(b"Subject: [promotions] Sale\r\n\r\n", [], NAMES, "[promotions]") == (
        b"Subject: [promotions] Sale\r\n\r\n"
    )
    assert stamp(b"\r\nbody only\r\n", FIELDS[:1], NAMES) == b"X-Triage-Category: forums\r\n\r\nbody only\r\n"
    assert stamp(b"From: a@x\r\n", [], NAMES, "[t]") == b"From: a@x\r\nSubject: [t]\r\n"


@given(st.binary(max_size=400))
def test_stamp_never_touches_the_body(body: bytes) -> None:
    raw = b"From: a@x\r\nX-Triage-Score: 9\r\n\r\n" + body
    out = stamp(raw, FIELDS, NAMES)
    assert out.endswith(b"\r\n\r\n" + body)
    assert out.count(b"X-Triage-Score: 9") == body.count(b"X-Triage-Score: 9")


def test_enhanced_codes_are_added_where_missing() -> None:
    assert V.with_enhanced("250 OK") == "250 2.0.0 OK"
    assert V.with_enhanced("503 Error: need MAIL command") == "503 5.5.1 Error: need MAIL command"
    assert V.with_enhanced("552 Error: too big") == "552 5.3.4 Error: too big"
    assert V.with_enhanced("451 4.4.1 x") == "451 4.4.1 x"
    assert V.with_enhanced("220 host ESMTP") == "220 host ESMTP"
    assert V.with_enhanced("354 go") == "354 go"
    for reply in (
        V.TOO_MANY_CONNECTIONS,
        V.TOO_MANY_RECIPIENTS,
        V.MESSAGE_TOO_BIG,
        V.UPSTREAM_UNREACHABLE,
        V.POLICY_REJECT,
        V.POLICY_TEMPFAIL,
        V.GREETING_DENIED,
        V.INSUFFICIENT_MEMORY,
    ):
        assert V.with_enhanced(reply) == reply


def test_passthrough_keeps_upstream_text_and_maps_421() -> None:
    assert V.passthrough(550, "5.1.1 <x@y>: User unknown") == "550 5.1.1 <x@y>: User unknown"
    assert V.passthrough(550, "User unknown") == "550 5.0.0 User unknown"
    assert V.passthrough(250, "2.0.0 Ok\nqueued") == "250-2.0.0 Ok\r\n250 2.0.0 queued"
    assert V.passthrough(421, "4.3.2 closing") == V.UPSTREAM_FAILED


async def test_fast_session_init_sets_everything_aiosmtpd_does(tmp_path: object) -> None:
    """TriageSMTP skips SMTP.__init__ (per-connection introspection and a
    stream layer it does not use); this catches an aiosmtpd upgrade that adds
    state we would then lack."""
    import asyncio
    from pathlib import Path

    from aiosmtpd.smtp import SMTP

    from classifier.rules import RulesClassifier
    from proxy.metrics import Metrics
    from proxy.pipeline import Pipeline
    from proxy.settings import Settings
    from proxy.smtp.session import RelayContext, TriageSMTP
    from proxy.smtp.upstream import MaildirUpstream

    settings = Settings()
    ctx = RelayContext(
        settings, Pipeline(settings, RulesClassifier()), MaildirUpstream(Path(str(tmp_path))), Metrics(), None
    )
    ours = TriageSMTP(ctx, settings.server.listeners[0])
    theirs = SMTP(ctx.handler, loop=asyncio.get_running_loop())
    # The stream layer (StreamReaderProtocol's reader, writer and flow
    # control) is replaced by the session's LineBuffer and transport writes.
    stream_layer = set(vars(asyncio.StreamReaderProtocol(asyncio.StreamReader(), lambda r, w: None)))
    assert set(vars(theirs)) - stream_layer <= set(vars(ours))
    assert set(theirs._handle_hooks) == set(ours._handle_hooks)
    assert set(theirs._smtp_methods) - set(ours._smtp_methods) == {"AUTH"}
    for arg in ("<a@example.org>", "<a.b+c@example.org> SIZE=5 BODY=8BITMIME", "<>", '<"q b"@x.org>'):
        assert ours._getaddr(arg) == theirs._getaddr(arg)


def test_stamp_values_cannot_inject_fields() -> None:
    out = stamp(b"From: a@x\r\n\r\n", [("X-Triage-Model", "evil/1\r\nBcc: x@y")], NAMES)
    assert out.startswith(b"X-Triage-Model: evil/1 Bcc: x@y\r\nFrom: a@x\r\n")
