"""The SMTP proxy over real sockets: test client -> triaged -> capturing next hop."""

from __future__ import annotations

import asyncio
import hashlib

import structlog
from conftest import CaptureServer, ListSink, SmtpTestClient, StartTriaged
from waiting import wait_until

from classifier import headers
from classifier.types import Classification, ClassifierError
from proxy.settings import ListenerSettings

MESSAGE = (
    b"From: Alice <alice@example.org>\r\n"
    b"To: bob@example.net\r\n"
    b"Subject: lunch\r\n"
    b"Message-ID: <m1@example.org>\r\n"
    b"\r\n"
    b"Hi Bob,\r\n"
    b".leading dot survives\r\n"
    b"..two dots too\r\n"
    b"\r\n"
    b"trailing spaces   \r\n"
)


async def client_for(srv: object) -> SmtpTestClient:
    host, port = srv.addresses[0]  # type: ignore[attr-defined]
    c = await SmtpTestClient.connect(host, port)
    assert (await c.reply())[0] == 220
    assert (await c.cmd("EHLO client.test"))[0] == 250
    return c


def split_stamped(data: bytes, original: bytes) -> tuple[bytes, bytes]:
    """(our added header lines, the rest) of a relayed message."""
    i = data.find(original[:20])
    assert i >= 0, data[:300]
    return data[:i], data[i:]


async def test_stamps_headers_and_keeps_body_byte_identical(
    start_triaged: StartTriaged, capture: CaptureServer
) -> None:
    sink = ListSink()
    srv = await start_triaged(sinks=[sink])
    c = await client_for(srv)
    code, text = await c.send_message("alice@example.org", ["bob@example.net"], MESSAGE)
    assert (code, text) == (250, "2.0.0 Ok: queued as CAPTURED")
    [got] = capture.messages
    added, rest = split_stamped(got.data, MESSAGE)
    assert hashlib.sha256(rest).digest() == hashlib.sha256(MESSAGE).digest()
    assert added == (
        b"X-Triage-Category: primary\r\nX-Triage-Score: 0.600\r\nX-Triage-Model: rules/1\r\n"
    )
    assert got.sender == "alice@example.org" and got.recipients == ["bob@example.net"]
    [rec] = sink.records
    assert (rec.category, rec.verdict, rec.reply_code, rec.message_id) == (
        "primary",
        "accept",
        250,
        "<m1@example.org>",
    )
    assert rec.size_bytes == len(MESSAGE)
    await c.cmd("QUIT")
    await c.close()


async def test_forged_triage_headers_are_removed(
    start_triaged: StartTriaged, capture: CaptureServer
) -> None:
    forged = (
        b"X-Triage-Category: primary\r\n"
        b"From: list@example.org\r\n"
        b"x-triage-score : 1.000\r\n"
        b"X-Triage-Model: evil/1\r\n\tcontinued\r\n"
        b"List-Post: <mailto:list@example.org>\r\n"
        b"Subject: s\r\n\r\nX-Triage-Category: in the body stays\r\n"
    )
    srv = await start_triaged()
    c = await client_for(srv)
    assert (await c.send_message("a@example.org", ["b@example.net"], forged))[0] == 250
    data = capture.messages[0].data
    head = headers.head(data)
    assert head.lower().count(b"x-triage-category") == 1
    assert b"X-Triage-Category: forums\r\n" in head
    assert b"evil" not in data and b"continued" not in data and b"1.000" not in data
    assert data.endswith(b"\r\n\r\nX-Triage-Category: in the body stays\r\n")
    await c.close()


async def test_rcpt_refusal_is_passed_through(start_triaged: StartTriaged, capture: CaptureServer) -> None:
    capture.refuse_rcpt["nobody@example.net"] = "550 5.1.1 <nobody@example.net>: User unknown"
    srv = await start_triaged()
    c = await client_for(srv)
    assert (await c.cmd("MAIL FROM:<a@example.org>"))[0] == 250
    assert await c.cmd("RCPT TO:<nobody@example.net>") == (550, "5.1.1 <nobody@example.net>: User unknown")
    assert (await c.cmd("RCPT TO:<bob@example.net>"))[0] == 250
    assert (await c.cmd("DATA"))[0] == 354
    assert (await c.data(MESSAGE))[0] == 250
    assert capture.messages[0].recipients == ["bob@example.net"]
    await c.close()


async def test_upstream_down_is_4xx(start_triaged: StartTriaged, capture: CaptureServer) -> None:
    await capture.stop()
    srv = await start_triaged(upstream_url="smtp://127.0.0.1:1")  # nothing listens on port 1
    c = await client_for(srv)
    code, text = await c.cmd("MAIL FROM:<a@example.org>")
    assert code == 451 and text.startswith("4.4.1")
    await c.close()


async def test_upstream_5xx_on_data_is_passed_through(
    start_triaged: StartTriaged, capture: CaptureServer
) -> None:
    capture.data_reply = "554 5.7.1 Rejected by content policy"
    srv = await start_triaged()
    c = await client_for(srv)
    assert await c.send_message("a@example.org", ["b@example.net"], MESSAGE) == (
        554,
        "5.7.1 Rejected by content policy",
    )
    # The session and the pooled upstream connection stay usable.
    capture.data_reply = "250 2.0.0 Ok"
    assert (await c.send_message("a@example.org", ["b@example.net"], MESSAGE))[0] == 250
    assert capture.connections == 1
    await c.close()


async def test_upstream_timeout_is_4xx_never_250(start_triaged: StartTriaged, capture: CaptureServer) -> None:
    capture.stall_on = "DATA-END"
    srv = await start_triaged(upstream={"data_timeout_s": 0.3})
    c = await client_for(srv)
    code, text = await c.send_message("a@example.org", ["b@example.net"], MESSAGE)
    assert code == 451 and text.startswith("4.4.2")
    await c.close()


async def test_upstream_stall_at_rcpt_is_4xx(start_triaged: StartTriaged, capture: CaptureServer) -> None:
    capture.stall_on = "RCPT"
    srv = await start_triaged(upstream={"command_timeout_s": 0.3})
    c = await client_for(srv)
    assert (await c.cmd("MAIL FROM:<a@example.org>"))[0] == 250
    code, _ = await c.cmd("RCPT TO:<b@example.net>")
    assert code == 451
    # Without a next hop the rest of the transaction is refused with 4xx too.
    assert (await c.cmd("DATA"))[0] == 503  # no recipient was accepted
    await c.close()


async def test_upstream_dropping_connection_is_4xx(start_triaged: StartTriaged, capture: CaptureServer) -> None:
    capture.drop_on = "DATA"
    srv = await start_triaged()
    c = await client_for(srv)
    code, _ = await c.send_message("a@example.org", ["b@example.net"], MESSAGE)
    assert 400 <= code < 500
    await c.close()


async def test_size_limit_is_552_after_data(start_triaged: StartTriaged, capture: CaptureServer) -> None:
    srv = await start_triaged(server={"max_message_bytes": 2048})
    c = await client_for(srv)
    big = MESSAGE + b"x" * 70 + b"\r\n"
    big = big * 40
    code, text = await c.send_message("a@example.org", ["b@example.net"], big)
    assert code == 552 and text.startswith("5.3.4")
    # Declared SIZE over the limit is refused at MAIL.
    assert (await c.cmd("MAIL FROM:<a@example.org> SIZE=999999"))[0] == 552
    # The session goes on: a small message passes.
    assert (await c.send_message("a@example.org", ["b@example.net"], MESSAGE))[0] == 250
    assert len(capture.messages) == 1
    await c.close()


async def test_inflight_byte_bound_is_4xx(start_triaged: StartTriaged, capture: CaptureServer) -> None:
    srv = await start_triaged(server={"max_inflight_data_bytes": 1024})
    c = await client_for(srv)
    code, text = await c.send_message("a@example.org", ["b@example.net"], MESSAGE * 20)
    assert code == 452 and text.startswith("4.3.1")
    assert (await c.send_message("a@example.org", ["b@example.net"], MESSAGE))[0] == 250
    await c.close()


async def test_connection_limit_is_421_at_once(start_triaged: StartTriaged) -> None:
    srv = await start_triaged(server={"max_connections": 1})
    first = await client_for(srv)
    host, port = srv.addresses[0]
    second = await SmtpTestClient.connect(host, port)
    code, text = await second.reply()
    assert code == 421 and text.startswith("4.7.0")
    await second.close()
    await first.close()


async def test_max_recipients_is_452(start_triaged: StartTriaged) -> None:
    srv = await start_triaged(server={"max_recipients": 2})
    c = await client_for(srv)
    await c.cmd("MAIL FROM:<a@example.org>")
    assert (await c.cmd("RCPT TO:<1@example.net>"))[0] == 250
    assert (await c.cmd("RCPT TO:<2@example.net>"))[0] == 250
    code, text = await c.cmd("RCPT TO:<3@example.net>")
    assert code == 452 and text.startswith("4.5.3")
    await c.close()


async def test_client_not_allowlisted_gets_554(start_triaged: StartTriaged) -> None:
    srv = await start_triaged(server={"allowed_clients": ["10.0.0.0/8"]})
    host, port = srv.addresses[0]
    c = await SmtpTestClient.connect(host, port)
    code, text = await c.reply()
    assert code == 554 and text.startswith("5.7.1")
    await c.close()


def _proxy_listener() -> dict[str, object]:
    return {"listeners": [ListenerSettings(address="127.0.0.1:0", proxy_protocol=True)]}


async def _proxied_transaction(srv: object, preamble: bytes) -> tuple[int, str]:
    host, port = srv.addresses[0]  # type: ignore[attr-defined]
    c = await SmtpTestClient.connect(host, port, preamble=preamble)
    try:
        code, text = await c.reply()
        if code != 220:
            return code, text
        await c.cmd("EHLO proxied.test")
        return await c.send_message("a@example.org", ["b@example.net"], MESSAGE)
    finally:
        await c.close()


async def test_proxy_protocol_v1_and_v2_give_the_real_client(start_triaged: StartTriaged) -> None:
    from proxy.proxyproto import encode_v1, encode_v2

    sink = ListSink()
    srv = await start_triaged(sinks=[sink], server=_proxy_listener())
    v1 = encode_v1(("127.10.0.1", 40000), ("127.0.0.1", 25))
    v2 = encode_v2(("127.20.0.2", 40001), ("127.0.0.1", 25))
    assert (await _proxied_transaction(srv, v1))[0] == 250
    assert (await _proxied_transaction(srv, v2))[0] == 250
    assert [r.client_address for r in sink.records] == ["127.10.0.1", "127.20.0.2"]


async def test_proxy_protocol_applies_the_allowlist_to_the_real_client(start_triaged: StartTriaged) -> None:
    from proxy.proxyproto import encode_v2

    srv = await start_triaged(server=_proxy_listener())
    code, text = await _proxied_transaction(srv, encode_v2(("192.0.2.7", 1), ("127.0.0.1", 25)))
    assert code == 554 and text.startswith("5.7.1")


async def test_proxy_v2_local_health_check_is_quiet(start_triaged: StartTriaged) -> None:
    from proxy.proxyproto import encode_v2

    srv = await start_triaged(server=_proxy_listener())
    host, port = srv.addresses[0]
    with structlog.testing.capture_logs() as logs:
        # HAProxy `check`: LOCAL header, then hang up, with and without reading.
        c = await SmtpTestClient.connect(host, port, preamble=encode_v2(None, None))
        await c.close()
        c = await SmtpTestClient.connect(host, port, preamble=encode_v2(None, None))
        assert (await c.reply())[0] == 220  # LOCAL: a normal session from the real peer
        assert (await c.cmd("QUIT"))[0] == 221
        await c.close()
        # Garbage instead of a PROXY header is refused (a warning, not an error).
        c = await SmtpTestClient.connect(host, port, preamble=b"EHLO x\r\n")
        assert await c.reader.read() == b""
        await c.close()
        await asyncio.sleep(0.05)
    assert [e for e in logs if e["log_level"] in ("error", "critical")] == []


async def test_xforward_is_forwarded_when_offered(start_triaged: StartTriaged, capture: CaptureServer) -> None:
    sink = ListSink()
    srv = await start_triaged(sinks=[sink])
    c = await client_for(srv)
    assert (await c.cmd("XFORWARD NAME=mx.example.org ADDR=192.0.2.9 PROTO=ESMTP"))[0] == 250
    assert (await c.cmd("XFORWARD IDENT=4Q1abc HELO=mx.example.org"))[0] == 250
    assert (await c.send_message("a@example.org", ["b@example.net"], MESSAGE))[0] == 250
    assert capture.messages[0].xforward == {
        "NAME": "mx.example.org",
        "ADDR": "192.0.2.9",
        "PROTO": "ESMTP",
        "IDENT": "4Q1abc",
        "HELO": "mx.example.org",
    }
    assert (sink.records[0].queue_id, sink.records[0].client_address) == ("4Q1abc", "192.0.2.9")
    # Attributes are per transaction.
    assert (await c.send_message("a@example.org", ["b@example.net"], MESSAGE))[0] == 250
    assert capture.messages[1].xforward == {}
    await c.close()


async def test_xforward_refused_for_other_clients(start_triaged: StartTriaged) -> None:
    srv = await start_triaged(server={"xforward_clients": ["10.0.0.0/8"]})
    c = await client_for(srv)
    code, text = await c.cmd("XFORWARD ADDR=192.0.2.9")
    assert code == 550 and text.startswith("5.7.0")
    await c.close()


async def test_8bit_and_smtputf8_messages_are_intact(start_triaged: StartTriaged, capture: CaptureServer) -> None:
    body = (
        "From: Jürgen <jürgen@exämple.de>\r\nSubject: Grüße\r\n\r\n".encode()
        + "Schöne Grüße — 你好\r\n".encode()
        + b"latin-1 bytes: \xe9\xe8\xff\r\n"
        + b"x" * 1500
        + b"\r\n"  # a line longer than RFC 5321's 1000 octets is still relayed byte-exact
    )
    srv = await start_triaged()
    c = await client_for(srv)
    code, _ = await c.send_message(
        "jürgen@exämple.de", ["zoë@example.net"], body, mail_params="SMTPUTF8 BODY=8BITMIME"
    )
    assert code == 250
    got = capture.messages[0]
    assert got.sender == "jürgen@exämple.de" and got.recipients == ["zoë@example.net"]
    assert got.mail_params == ["SMTPUTF8", "BODY=8BITMIME"] or set(got.mail_params) == {
        "SMTPUTF8",
        "BODY=8BITMIME",
    }
    assert split_stamped(got.data, body)[1] == body
    await c.close()


async def test_pool_reuses_one_upstream_connection_and_resets_aborted_transactions(
    start_triaged: StartTriaged, capture: CaptureServer
) -> None:
    srv = await start_triaged()
    for _ in range(3):
        c = await client_for(srv)
        assert (await c.send_message("a@example.org", ["b@example.net"], MESSAGE))[0] == 250
        await c.cmd("QUIT")
        await c.close()
    c = await client_for(srv)
    await c.cmd("MAIL FROM:<a@example.org>")
    await c.cmd("RCPT TO:<b@example.net>")
    assert (await c.cmd("RSET"))[0] == 250
    assert (await c.send_message("c@example.org", ["d@example.net"], MESSAGE))[0] == 250
    await c.close()
    assert capture.connections == 1
    assert "RSET" in capture.commands
    assert [m.sender for m in capture.messages] == ["a@example.org"] * 3 + ["c@example.org"]


async def test_policy_actions(start_triaged: StartTriaged, capture: CaptureServer) -> None:
    srv = await start_triaged(
        policy={"category_actions": {"forums": "reject", "updates": "tempfail", "promotions": "tag"}}
    )
    c = await client_for(srv)
    forum = b"List-Post: <mailto:l@example.org>\r\nSubject: hi\r\n\r\nbody\r\n"
    update = b"Auto-Submitted: auto-generated\r\nSubject: cron\r\n\r\nbody\r\n"
    promo = b"List-Unsubscribe: <mailto:u@example.org>\r\nSubject: Sale\r\n\r\nbody\r\n"
    code, text = await c.send_message("a@example.org", ["b@example.net"], forum)
    assert (code, text[:5]) == (550, "5.7.1")
    code, text = await c.send_message("a@example.org", ["b@example.net"], update)
    assert (code, text[:5]) == (451, "4.7.1")
    assert (await c.send_message("a@example.org", ["b@example.net"], promo))[0] == 250
    [got] = capture.messages
    assert b"\r\nSubject: [promotions] Sale\r\n" in got.data
    await c.close()


class FailingClassifier:
    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def classify(self, raw: bytes) -> Classification:
        raise ClassifierError("model unavailable")


async def test_classifier_error_accepts_unstamped_or_tempfails(
    start_triaged: StartTriaged, capture: CaptureServer
) -> None:
    sink = ListSink()
    srv = await start_triaged(classifier=FailingClassifier(), sinks=[sink])
    c = await client_for(srv)
    assert (await c.send_message("a@example.org", ["b@example.net"], MESSAGE))[0] == 250
    assert capture.messages[0].data == MESSAGE  # no category headers at all
    assert sink.records[0].category is None
    await c.close()
    srv2 = await start_triaged(classifier=FailingClassifier(), policy={"on_classifier_error": "tempfail"})
    c = await client_for(srv2)
    code, text = await c.send_message("a@example.org", ["b@example.net"], MESSAGE)
    assert code == 451 and text.startswith("4.7.1")
    assert len(capture.messages) == 1
    await c.close()


async def test_maildir_delivery_is_atomic_and_complete(start_triaged: StartTriaged, tmp_maildir: object) -> None:
    from pathlib import Path

    md = Path(str(tmp_maildir))
    srv = await start_triaged(upstream_url=f"maildir:{md}")
    c = await client_for(srv)
    code, text = await c.send_message("a@example.org", ["b@example.net"], MESSAGE)
    assert code == 250 and text.startswith("2.0.0")
    assert list((md / "tmp").iterdir()) == []
    [path] = list((md / "new").iterdir())
    content = path.read_bytes()
    assert content.startswith(b"Return-Path: <a@example.org>\nX-Triage-Category: primary\n")
    assert content.endswith(MESSAGE.replace(b"\r\n", b"\n"))
    assert path.name in text
    await c.close()


async def test_stop_drains_and_refuses_new_mail(start_triaged: StartTriaged, capture: CaptureServer) -> None:
    srv = await start_triaged()
    idle = await client_for(srv)
    busy = await client_for(srv)
    await busy.cmd("MAIL FROM:<a@example.org>")
    await busy.cmd("RCPT TO:<b@example.net>")
    stopping = asyncio.create_task(srv.stop(drain_timeout_s=5.0))
    code, _ = await idle.reply()  # the idle session is closed with 421
    assert code == 421
    assert (await busy.cmd("DATA"))[0] == 354
    assert (await busy.data(MESSAGE))[0] == 250  # the open transaction finishes
    await stopping
    assert len(capture.messages) == 1
    await idle.close()
    await busy.close()


async def test_metrics_exposition(start_triaged: StartTriaged) -> None:
    import urllib.request

    srv = await start_triaged(metrics={"listen": "127.0.0.1:0"})
    c = await client_for(srv)
    assert (await c.send_message("a@example.org", ["b@example.net"], MESSAGE))[0] == 250
    await c.close()
    url = f"http://127.0.0.1:{srv.metrics_port}/metrics"
    body = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())
    assert 'triaged_transactions_total{category="primary",verdict="accept"} 1.0' in body
    assert 'triaged_connections_total{result="accepted"} 1.0' in body


async def test_stale_pooled_connection_is_retried_once_fresh(
    start_triaged: StartTriaged, capture: CaptureServer
) -> None:
    srv = await start_triaged()
    c = await client_for(srv)
    assert (await c.send_message("a@example.org", ["b@example.net"], MESSAGE))[0] == 250
    capture.drop_once = "MAIL"  # the pooled connection dies under the next MAIL
    assert (await c.send_message("a@example.org", ["b@example.net"], MESSAGE))[0] == 250
    assert capture.connections == 2 and len(capture.messages) == 2
    # A fresh connection failing the same way is not retried: 4xx.
    capture.drop_on = "MAIL"
    srv2 = await start_triaged()
    c2 = await client_for(srv2)
    assert (await c2.cmd("MAIL FROM:<a@example.org>"))[0] == 451
    await c.close()
    await c2.close()


async def test_idle_and_data_timeouts_close_the_session(
    start_triaged: StartTriaged, capture: CaptureServer
) -> None:
    # Idle 1 s: the slow client's own command gaps must stay under it on a
    # loaded machine (0.3 s failed once in CI between EHLO and MAIL).
    srv = await start_triaged(server={"idle_timeout_s": 1.0, "data_timeout_s": 0.3})
    idle = await client_for(srv)
    assert await asyncio.wait_for(idle.reader.read(), 5) == b""  # closed by us
    slow = await client_for(srv)
    await slow.cmd("MAIL FROM:<a@example.org>")
    await slow.cmd("RCPT TO:<b@example.net>")
    assert (await slow.cmd("DATA"))[0] == 354
    slow.writer.write(b"Subject: never finished\r\n")
    assert await asyncio.wait_for(slow.reader.read(), 5) == b""
    await wait_until(lambda: srv.ctx.inflight_bytes == 0, what="reserved DATA bytes returned")
    assert capture.messages == []
    await idle.close()
    await slow.close()


async def test_upstream_silent_at_greeting_is_4xx(start_triaged: StartTriaged, capture: CaptureServer) -> None:
    capture.stall_on = "greeting"
    srv = await start_triaged(upstream={"connect_timeout_s": 0.3})
    c = await client_for(srv)
    code, text = await c.cmd("MAIL FROM:<a@example.org>")
    assert code == 451 and text.startswith("4.4.1")
    await c.close()


async def test_tricky_bodies_round_trip_byte_identical(
    start_triaged: StartTriaged, capture: CaptureServer
) -> None:
    """Dot lines, bare CR/LF, 8-bit bytes, long lines, an empty body, chunk
    boundaries: what arrives upstream is exactly what was sent, or, with a
    bare CR or LF in it (server.bare_lf = "reject", the default), nothing
    and a 550 5.5.2 (tests/test_session_safety.py has the smuggling cases)."""
    import random

    rng = random.Random(20261126)
    pieces = [b".", b"..", b"...", b".\r\n", b"\r\n.\r\n", b"\r\n..\r\n", b"\n.\n", b"\r", b"\n",
              b"x" * 999, b"\xff\xfe\x00", "é".encode(), b" ", b"\t", b"--b\r\n", b"\r\n\r\n"]
    bodies = [b"", b".\r\n", b"..\r\n", b"\r\n", b"x" * 3_000_000 + b"\r\n.\r\n.\r\n"]
    for _ in range(40):
        bodies.append(b"".join(rng.choice(pieces) for _ in range(rng.randint(1, 60))) + b"\r\n")
    srv = await start_triaged()
    c = await client_for(srv)
    for i, body in enumerate(bodies):
        message = b"Subject: %d\r\n\r\n" % i + body
        bare = message.count(b"\n") != message.count(b"\r\n") or message.count(b"\r") != message.count(b"\r\n")
        code, text = await c.send_message("a@example.org", ["b@example.net"], message)
        if bare:
            assert (code, text[:5]) == (550, "5.5.2"), i
            assert (await c.cmd("RSET"))[0] == 250
            continue
        assert code == 250, i
        got = capture.messages[-1].data
        assert split_stamped(got, message)[1] == message, i
    assert srv.ctx.inflight_bytes == 0
    await c.close()


async def test_client_vanishing_mid_command_returns_the_pool_slot(
    start_triaged: StartTriaged, capture: CaptureServer
) -> None:
    capture.stall_on = "MAIL"
    srv = await start_triaged(upstream={"pool_size": 1, "connect_timeout_s": 2.0})
    gone = await client_for(srv)
    gone.writer.write(b"MAIL FROM:<a@example.org>\r\n")
    await wait_until(lambda: "MAIL" in capture.commands, what="MAIL reached the next hop")
    await gone.close()  # hangs up while triaged waits for the next hop
    capture.stall_on = ""
    c = await client_for(srv)
    assert (await c.send_message("a@example.org", ["b@example.net"], MESSAGE))[0] == 250
    await c.close()


async def test_xforward_not_sent_when_next_hop_lacks_it(start_triaged: StartTriaged, capture: CaptureServer) -> None:
    capture.offer_xforward = False
    srv = await start_triaged()
    c = await client_for(srv)
    assert (await c.cmd("XFORWARD ADDR=192.0.2.9"))[0] == 250
    assert (await c.send_message("a@example.org", ["b@example.net"], MESSAGE))[0] == 250
    assert "XFORWARD" not in capture.commands and capture.messages[0].xforward == {}
    await c.close()


async def test_client_vanishing_mid_data_returns_the_reserved_bytes(
    start_triaged: StartTriaged, capture: CaptureServer
) -> None:
    srv = await start_triaged()
    c = await client_for(srv)
    await c.cmd("MAIL FROM:<a@example.org>")
    await c.cmd("RCPT TO:<b@example.net>")
    assert (await c.cmd("DATA"))[0] == 354
    c.writer.write(b"Subject: big\r\n\r\n" + (b"y" * 998 + b"\r\n") * 3000)  # 3 MB, no end
    await c.writer.drain()
    await wait_until(lambda: srv.ctx.inflight_bytes >= 2_000_000, what="2 MB of DATA reserved")
    await c.close()
    await wait_until(lambda: not srv.ctx.connections, what="the connection is gone")
    assert srv.ctx.inflight_bytes == 0 and capture.messages == []
