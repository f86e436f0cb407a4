"""End to end: SMTP messages through a running triaged (the importable Server
with the rules classifier, relaying to the capturing next hop) produce one
event each on a real Kafka-protocol broker, also across a broker outage."""

from __future__ import annotations

import asyncio
import hashlib
import statistics
import time
from pathlib import Path
from typing import Any

from conftest import CaptureServer, SmtpTestClient, StartTriaged
from kafka_broker import KAFKA_MARKS, KafkaBroker, SilentServer, free_port
from test_events_kafka import settings
from waiting import wait_until

from proxy.events import EventShipper, decode_event

pytestmark = [
    *KAFKA_MARKS,
]



def message(n: int) -> tuple[str, bytes]:
    mid = f"<e2e-{n:06d}@sender.example>"
    body = (
        f"From: Someone <someone@sender.example>\r\nTo: you@rcpt.example\r\n"
        f"Subject: [list] note {n}\r\nMessage-ID: {mid}\r\nList-Id: <list.example>\r\n\r\n"
        f"Hello {n}.\r\n" + "Some text for the classifier to read.\r\n" * 20
    ).encode()
    return mid, body


class Mailer:
    """`clients` SMTP sessions in parallel, reusing connections, as an MTA does."""

    def __init__(self, port: int, clients: int = 8) -> None:
        self.port = port
        self.clients = clients
        self.n = 0
        self.latency_ms: list[float] = []

    async def send(self, count: int) -> list[str]:
        numbers = list(range(self.n, self.n + count))
        self.n += count
        mids: list[str] = []

        async def one_client(mine: list[int]) -> None:
            c = await SmtpTestClient.connect("127.0.0.1", self.port)
            assert (await c.reply())[0] == 220
            assert (await c.cmd("EHLO client.example"))[0] == 250
            for n in mine:
                mid, body = message(n)
                t0 = time.perf_counter()
                code, text = await c.send_message("someone@sender.example", ["you@rcpt.example"], body)
                self.latency_ms.append((time.perf_counter() - t0) * 1000)
                assert code == 250, text
                mids.append(mid)
            await c.cmd("QUIT")
            await c.close()

        await asyncio.gather(*(one_client(numbers[i :: self.clients]) for i in range(self.clients)))
        return mids


def mid_hashes(mids: list[str]) -> list[str]:
    return sorted(hashlib.sha256(m.encode()).hexdigest()[:32] for m in mids)


def topic_hashes(records: list[tuple[int, bytes]]) -> list[str]:
    events = [decode_event(v) for _, v in records]
    assert len({e.id for e in events}) == len(events)
    return sorted(e.message_id_hash for e in events)


def report(label: str, ms: list[float]) -> float:
    """Print the latency figures (`-s` shows them); the median, for a robust bound."""
    ms = sorted(ms)
    median = statistics.median(ms)
    print(f"{label}: n={len(ms)} median={median:.2f}ms p99={ms[int(len(ms) * 0.99) - 1]:.2f}ms")
    return median


async def test_1000_messages_give_1000_events(
    tmp_path: Path, broker: KafkaBroker, start_triaged: StartTriaged, capture: CaptureServer
) -> None:
    shipper = EventShipper(settings(tmp_path, broker.bootstrap), instance_id="e2e")
    await shipper.start()
    srv: Any = await start_triaged(sinks=[shipper])
    mids = await Mailer(srv.addresses[0][1]).send(1000)
    assert len(capture.messages) == 1000
    await wait_until(lambda: shipper.sent == 1000)
    await shipper.close()
    records = await broker.consume(1000)
    assert topic_hashes(records) == mid_hashes(mids)
    ev = decode_event(records[0][1])
    assert (ev.verdict, ev.reply_code, ev.front_end, ev.sender_domain) == ("accept", 250, "smtp", "sender.example")
    assert ev.category is not None and ev.recipient_count == 1


async def test_broker_outage_mail_keeps_flowing_events_arrive_after_restart(
    tmp_path: Path, broker: KafkaBroker, start_triaged: StartTriaged, capture: CaptureServer
) -> None:
    shipper = EventShipper(settings(tmp_path, broker.bootstrap), instance_id="e2e")
    await shipper.start()
    srv: Any = await start_triaged(sinks=[shipper])
    mailer = Mailer(srv.addresses[0][1])

    await mailer.send(300)
    await wait_until(lambda: shipper.sent == 300)
    up_ms = list(mailer.latency_ms)

    broker.kill()
    down = await mailer.send(400)  # every one must still get 250
    down_ms = mailer.latency_ms[300:]
    await wait_until(lambda: shipper.spooled == 400)
    assert shipper.sent == 300

    broker.restart()  # a fresh, empty broker on the same port
    after = await mailer.send(300)
    await wait_until(lambda: shipper.sent + shipper.replayed == 1000 and shipper.spool_pending == 0)
    await shipper.close()
    assert len(capture.messages) == 1000
    assert shipper.dropped == 0 and shipper.replayed == shipper.spooled
    assert topic_hashes(await broker.consume(700)) == mid_hashes(down + after)
    up = report("SMTP transaction, Kafka up", up_ms)
    down_median = report("SMTP transaction, Kafka down", down_ms)
    # Mail never waits on Kafka: with the broker gone a transaction costs what
    # it cost with it up. The factor and floor are generous (a loaded 2-core
    # machine); awaiting the dead broker would cost a connect/retry cycle per
    # message, hundreds of ms, far outside them.
    assert down_median <= 5 * up + 50, (up, down_median)


async def test_silent_kafka_does_not_hold_mail(
    tmp_path: Path, start_triaged: StartTriaged, capture: CaptureServer
) -> None:
    silent = SilentServer()
    await silent.start()
    try:
        s = settings(tmp_path, f"127.0.0.1:{silent.port}", request_timeout_s=1.0, close_timeout_s=1.0)
        shipper = EventShipper(s, instance_id="e2e")
        await shipper.start()
        srv: Any = await start_triaged(sinks=[shipper])
        mailer = Mailer(srv.addresses[0][1])
        await mailer.send(300)
        assert len(capture.messages) == 300
        await wait_until(lambda: shipper.spooled == 300)
        assert shipper.sent == 0 and silent.connections >= 1
        await shipper.close()
        median = report("SMTP transaction, Kafka silent", mailer.latency_ms)
        # The silent broker answers nothing, so a transaction that awaited it
        # would last a whole request timeout (1 s); mail takes milliseconds.
        assert median < 500, median
    finally:
        await silent.close()


async def test_spool_full_mail_unaffected_drops_counted(
    tmp_path: Path, start_triaged: StartTriaged, capture: CaptureServer
) -> None:
    dead = f"127.0.0.1:{free_port()}"  # Kafka gone, and the spool holds only a few events
    s = settings(tmp_path, dead, spool_max_bytes=8192, spool_segment_bytes=4096)
    shipper = EventShipper(s, instance_id="e2e")
    await shipper.start()
    srv: Any = await start_triaged(sinks=[shipper])
    await Mailer(srv.addresses[0][1], clients=4).send(200)  # every one 250
    assert len(capture.messages) == 200
    await wait_until(lambda: shipper.spooled + shipper.dropped == 200)
    await shipper.close()
    assert 0 < shipper.spooled < 200 and shipper.dropped == 200 - shipper.spooled
    assert shipper.registry.get_sample_value("triaged_events_dropped_total", {"reason": "spool_full"}) == shipper.dropped
