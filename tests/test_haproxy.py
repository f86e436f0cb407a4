"""triaged behind a real HAProxy (mode tcp, send-proxy-v2, health checks on).

HAProxy's `check` on a send-proxy-v2 server sends a PROXY v2 LOCAL header
(TOOLING.md: Postfix 3.7 smtpd dies on it); triaged must keep answering and
log no error. Mail through the balancer must carry the real client address:
in the transaction record and, as XFORWARD ADDR, to the next hop.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import structlog
from conftest import CaptureServer, ListSink, SmtpTestClient, StartTriaged
from triaged_proc import free_port

from proxy.settings import ListenerSettings

pytestmark = pytest.mark.skipif(
    shutil.which("haproxy") is None, reason="haproxy not installed (.ci/run installs it)"
)

CLIENT_ADDRESS = "127.0.0.77"  # the "remote" client, distinct from HAProxy's 127.0.0.1
MESSAGE = b"From: a@example.org\r\nTo: b@example.net\r\nSubject: via haproxy\r\n\r\nhello\r\n"


def haproxy_config(front_port: int, back_port: int) -> str:
    return f"""
global
    maxconn 256
defaults
    mode tcp
    timeout connect 2s
    timeout client 30s
    timeout server 30s
frontend smtp_in
    bind 127.0.0.1:{front_port}
    default_backend triaged
backend triaged
    balance roundrobin
    server be1 127.0.0.1:{back_port} send-proxy-v2 check inter 100ms
"""


@pytest.fixture
def haproxy(tmp_path: Path):  # type: ignore[no-untyped-def]
    procs: list[subprocess.Popen[bytes]] = []

    def start(back_port: int) -> int:
        front = free_port()
        cfg = tmp_path / "haproxy.cfg"
        cfg.write_text(haproxy_config(front, back_port))
        subprocess.run(["haproxy", "-c", "-q", "-f", str(cfg)], check=True)
        procs.append(subprocess.Popen(["haproxy", "-db", "-f", str(cfg)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        return front

    yield start
    for p in procs:
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=10)


async def _connect_from(address: str, port: int) -> SmtpTestClient:
    for _ in range(100):  # until HAProxy listens
        try:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, local_addr=(address, 0), limit=1 << 20)
            return SmtpTestClient(reader, writer)
        except ConnectionRefusedError:
            await asyncio.sleep(0.05)
    raise AssertionError("haproxy did not listen")


async def test_mail_through_haproxy_keeps_the_real_client(
    start_triaged: StartTriaged, capture: CaptureServer, haproxy
) -> None:  # type: ignore[no-untyped-def]
    sink = ListSink()
    with structlog.testing.capture_logs() as logs:
        srv = await start_triaged(sinks=[sink], server={
            "listeners": [ListenerSettings(address="127.0.0.1:0", proxy_protocol=True)]})
        front = haproxy(srv.addresses[0][1])
        await asyncio.sleep(0.5)  # a few health checks (PROXY v2 LOCAL) go by
        for n in range(3):
            c = await _connect_from(CLIENT_ADDRESS, front)
            assert (await c.reply())[0] == 220
            assert (await c.cmd("EHLO client.test"))[0] == 250
            code, text = await c.send_message("a@example.org", ["b@example.net"], MESSAGE)
            assert code == 250, (n, text)
            assert (await c.cmd("QUIT"))[0] == 221
            await c.close()
        await asyncio.sleep(0.3)  # and more health checks after the mail

    assert len(capture.messages) == 3
    assert [r.client_address for r in sink.records] == [CLIENT_ADDRESS] * 3
    for got in capture.messages:
        assert got.xforward.get("ADDR") == CLIENT_ADDRESS
        assert b"X-Triage-Category: " in got.data.split(b"\r\n\r\n", 1)[0]
    # The health checks reached triaged as connections of their own and were served.
    accepted = srv.metrics.registry.get_sample_value(
        "triaged_connections_total", {"result": "accepted"})
    assert accepted is not None and accepted > 3
    assert [e for e in logs if e["log_level"] in ("error", "critical")] == []
