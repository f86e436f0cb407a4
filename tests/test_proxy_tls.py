"""STARTTLS on both sides: clients to triaged (when a certificate is set) and
triaged to the next hop (opportunistic or required)."""

from __future__ import annotations

import ssl

from conftest import CaptureServer, ListSink, SmtpTestClient, StartTriaged

MESSAGE = b"From: a@example.org\r\nSubject: tls\r\n\r\nsecret body\r\n"


def client_context() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


async def starttls_transaction(host: str, port: int) -> tuple[list[str], int]:
    c = await SmtpTestClient.connect(host, port)
    assert (await c.reply())[0] == 220
    _, ext = await c.cmd("EHLO client.test")
    assert "STARTTLS" in ext.splitlines()
    assert (await c.cmd("STARTTLS"))[0] == 220
    await c.writer.start_tls(client_context())
    _, ext_tls = await c.cmd("EHLO client.test")
    code, _ = await c.send_message("a@example.org", ["b@example.net"], MESSAGE)
    await c.cmd("QUIT")
    await c.close()
    return ext_tls.splitlines(), code


async def test_client_starttls(start_triaged: StartTriaged, capture: CaptureServer, tls_files: tuple[str, str]) -> None:
    cert, key = tls_files
    srv = await start_triaged(server={"tls_cert_file": cert, "tls_key_file": key})
    ext, code = await starttls_transaction(*srv.addresses[0])
    assert code == 250
    assert "STARTTLS" not in ext and not any(e.startswith("AUTH") for e in ext)
    assert capture.messages[0].data.endswith(MESSAGE)


async def test_upstream_opportunistic_starttls(
    start_triaged: StartTriaged, capture: CaptureServer, tls_files: tuple[str, str]
) -> None:
    cert, key = tls_files
    capture.tls_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    capture.tls_context.load_cert_chain(cert, key)
    srv = await start_triaged(upstream={"starttls": "opportunistic"})
    c = await SmtpTestClient.connect(*srv.addresses[0])
    await c.reply()
    await c.cmd("EHLO client.test")
    assert (await c.send_message("a@example.org", ["b@example.net"], MESSAGE))[0] == 250
    await c.close()
    assert capture.tls_sessions == 1 and len(capture.messages) == 1


async def test_upstream_required_starttls_missing_is_4xx(start_triaged: StartTriaged, capture: CaptureServer) -> None:
    sink = ListSink()
    srv = await start_triaged(upstream={"starttls": "require"}, sinks=[sink])
    c = await SmtpTestClient.connect(*srv.addresses[0])
    await c.reply()
    await c.cmd("EHLO client.test")
    code, text = await c.cmd("MAIL FROM:<a@example.org>")
    assert code == 451 and text.startswith("4.4.1")
    await c.close()
    assert capture.messages == []
