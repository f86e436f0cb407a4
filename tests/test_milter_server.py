"""The milter front end of the real Server, over real sockets, on both loops.

An MTA side written byte by byte (milter_client.py) talks to `Server` with
a milter listener; the classifier is the rules one (or a test double where
the test is about classifier failures). Every test runs on the stdlib loop
and on uvloop.
"""

from __future__ import annotations

import asyncio
import os
import stat
import struct
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import pytest
import structlog
import uvloop
from milter_client import MilterClient, pkt, z

from classifier.config import ClassifierSettings
from classifier.rules import RulesClassifier
from classifier.types import Classification, ClassifierError
from proxy.server import Server
from proxy.settings import ListenerSettings, ServerSettings, Settings, UpstreamSettings
from proxy.transaction import TransactionRecord

T = TypeVar("T")
LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
Run = Callable[[Callable[[], Awaitable[T]]], T]


@pytest.fixture(params=list(LOOPS))
def run(request: pytest.FixtureRequest) -> Run[Any]:
    def runner(fn: Callable[[], Awaitable[T]]) -> T:
        async def main() -> T:
            return await fn()

        with asyncio.Runner(loop_factory=LOOPS[request.param]) as r:
            return r.run(main())

    return runner


class ListSink:
    def __init__(self) -> None:
        self.records: list[TransactionRecord] = []

    def record(self, record: TransactionRecord) -> None:
        self.records.append(record)


def milter_settings(address: str = "inet:127.0.0.1:0", **sections: dict[str, Any]) -> Settings:
    listener = ListenerSettings(address=address, protocol="milter")
    settings = Settings(
        server=ServerSettings(listeners=[listener]),
        upstream=UpstreamSettings(url="maildir:" + tempfile.mkdtemp(prefix="triaged-milter-md-")),
        classifier=ClassifierSettings(kind="rules"),
    )
    for name, changes in sections.items():
        section = getattr(settings, name)
        if name == "server" and "listeners" not in changes:
            changes = {**changes, "listeners": [listener]}
        settings = msgspec.structs.replace(settings, **{name: msgspec.structs.replace(section, **changes)})
    return settings


async def started(settings: Settings, classifier: Any = None, sinks: Any = ()) -> Server:
    srv = Server(settings, classifier=classifier if classifier is not None else RulesClassifier(), sinks=sinks)
    await srv.start()
    return srv


def address(srv: Server) -> tuple[str, int] | str:
    return srv.milter_listeners[0].address


HEADERS = [
    (b"From", b" Alice <alice@example.test>"),
    (b"To", b" bob@example.test"),
    (b"Subject", b" hello there"),
    (b"Message-ID", b" <m1@example.test>"),
    (b"x-triage-CATEGORY", b" forged"),
    (b"X-Triage-Score", b" 0.999\n\tfolded forgery"),
    (b"X-Triage-Category ", b" forged again, space before the colon"),
]
BODY = b"Hello Bob,\r\n.a leading dot\r\n\r\nbye\r\n"


def parse_mods(packets: list[tuple[bytes, bytes]]) -> list[tuple[str, int, bytes, bytes]]:
    out = []
    for code, data in packets:
        if code in (b"i", b"m"):
            (index,) = struct.unpack_from("!I", data)
            name, value, _ = data[4:].split(b"\0")
            out.append((code.decode(), index, name, value))
        elif code in (b"h",):
            name, value, _ = data.split(b"\0")
            out.append(("h", 0, name, value))
        elif code == b"q":
            out.append(("q", 0, b"", data.rstrip(b"\0")))
    return out


def test_stamps_removes_forged_copies_and_records(run: Run[None]) -> None:
    sink = ListSink()

    async def body() -> None:
        srv = await started(milter_settings(), sinks=[sink])
        try:
            client = await MilterClient.connect(address(srv))
            _, protocol, _ = await client.negotiate()
            assert protocol & 0x100000  # values with their leading space
            packets = await client.message(HEADERS, BODY)
            await client.close()
        finally:
            await srv.stop(drain_timeout_s=1.0)
        assert packets[-1] == (b"c", b"")
        mods = parse_mods(packets)
        # Forged copies first, by per-name index (case-insensitive, also
        # "name :"), highest first; then ours at index 0, last one first.
        assert mods[:3] == [
            ("m", 2, b"X-Triage-Category ", b""),
            ("m", 1, b"x-triage-CATEGORY", b""),
            ("m", 1, b"X-Triage-Score", b""),
        ]
        inserted = [(name, value) for kind, index, name, value in mods[3:] if kind == "i" and index == 0]
        assert len(inserted) == len(mods) - 3
        assert [n for n, _ in reversed(inserted)] == [b"X-Triage-Category", b"X-Triage-Score", b"X-Triage-Model"]
        assert dict(inserted)[b"X-Triage-Category"] == b" primary"
        (rec,) = sink.records
        assert (rec.front_end, rec.queue_id, rec.client_address) == ("milter", "QID1", "192.0.2.7")
        assert rec.sender == "alice@example.test" and rec.recipients == ("bob@example.test",)
        assert rec.message_id == "<m1@example.test>" and rec.category == "primary"
        assert rec.verdict == "accept" and rec.reply_code == 250

    run(body)


def test_several_messages_per_connection_and_the_budget_comes_back(run: Run[None]) -> None:
    sink = ListSink()

    async def body() -> None:
        srv = await started(milter_settings(), sinks=[sink])
        try:
            client = await MilterClient.connect(address(srv))
            await client.negotiate()
            for i in range(5):
                headers = [(b"List-Id", b" <list.example.test>")] if i % 2 else []
                packets = await client.message(headers + HEADERS[:4], BODY * 100, queue_id=b"Q%d" % i, chunk=1000)
                assert packets[-1] == (b"c", b"")
            client.writer.write(pkt(b"A"))  # Postfix aborts between transactions
            await client.close()
            assert srv.ctx is not None
            for _ in range(100):
                if not srv.milter or not srv.milter.connections:
                    break
                await asyncio.sleep(0.02)
            assert srv.ctx.inflight_bytes == 0
        finally:
            await srv.stop(drain_timeout_s=1.0)
        assert [r.queue_id for r in sink.records] == ["Q0", "Q1", "Q2", "Q3", "Q4"]
        assert [r.category for r in sink.records] == ["primary", "forums"] * 2 + ["primary"]

    run(body)


@pytest.mark.parametrize(
    ("action", "expect"),
    [
        ("reject", (b"y", b"550 5.7.1 Message rejected by policy\x00")),
        ("tempfail", (b"y", b"451 4.7.1 Message deferred by policy, try again later\x00")),
    ],
)
def test_refusals_are_reply_codes_without_changes(run: Run[None], action: str, expect: tuple[bytes, bytes]) -> None:
    async def body() -> None:
        srv = await started(milter_settings(policy={"category_actions": {"forums": action}}))
        try:
            client = await MilterClient.connect(address(srv))
            await client.negotiate()
            packets = await client.message([(b"List-Id", b" <l.example.test>"), *HEADERS], BODY)
            assert packets == [expect]
            packets = await client.message(HEADERS, BODY)  # the connection goes on
            assert packets[-1] == (b"c", b"")
            await client.close()
        finally:
            await srv.stop(drain_timeout_s=1.0)

    run(body)


def test_quarantine_and_tag(run: Run[None]) -> None:
    actions = {"promotions": "quarantine", "forums": "tag"}

    async def body() -> None:
        srv = await started(milter_settings(policy={"category_actions": actions}))
        try:
            client = await MilterClient.connect(address(srv))
            await client.negotiate()
            packets = await client.message([(b"List-Unsubscribe", b" <mailto:x@example.test>"), *HEADERS], BODY)
            assert packets[-1] == (b"c", b"")
            assert ("q", 0, b"", b"triaged: category promotions score 0.800") in parse_mods(packets)
            packets = await client.message([(b"List-Id", b" <l.example.test>"), *HEADERS], BODY)
            assert ("m", 1, b"Subject", b" [forums] hello there") in parse_mods(packets)
            no_subject = [h for h in HEADERS if h[0] != b"Subject"]
            packets = await client.message([(b"List-Id", b" <l.example.test>"), *no_subject], BODY)
            assert ("h", 0, b"Subject", b" [forums]") in parse_mods(packets)
            await client.close()
        finally:
            await srv.stop(drain_timeout_s=1.0)

    run(body)


def test_without_leading_space_values_get_none(run: Run[None]) -> None:
    async def body() -> None:
        srv = await started(milter_settings())
        try:
            client = await MilterClient.connect(address(srv))
            _, protocol, _ = await client.negotiate(protocol=0x1FFFFF & ~0x100000)
            assert not protocol & 0x100000
            packets = await client.message([(b"Subject", b"hi")], BODY)
            inserted = {n: v for k, _, n, v in parse_mods(packets) if k == "i"}
            assert inserted[b"X-Triage-Category"] == b"primary"
            await client.close()
        finally:
            await srv.stop(drain_timeout_s=1.0)

    run(body)


class FailingClassifier(RulesClassifier):
    async def classify(self, raw: bytes) -> Classification:
        raise ClassifierError("model exploded: secret internals")


@pytest.mark.parametrize("policy", ["accept", "tempfail"])
def test_classifier_error_follows_policy_and_hides_the_exception(run: Run[None], policy: str) -> None:
    async def body() -> None:
        srv = await started(milter_settings(policy={"on_classifier_error": policy}), FailingClassifier())
        try:
            client = await MilterClient.connect(address(srv))
            await client.negotiate()
            packets = await client.message(HEADERS, BODY)
            await client.close()
        finally:
            await srv.stop(drain_timeout_s=1.0)
        assert b"secret" not in b"".join(d for _, d in packets)
        if policy == "tempfail":
            assert packets == [(b"y", b"451 4.7.1 Message could not be classified, try again later\x00")]
        else:
            # Unclassified: no stamp, never a guess; forged copies still go.
            assert packets[-1] == (b"c", b"")
            assert {k for k, *_ in parse_mods(packets)} == {"m"}

    run(body)


def test_memory_budget_refuses_with_452_and_keeps_the_protocol_in_step(run: Run[None]) -> None:
    async def body() -> None:
        settings = milter_settings(server={"max_inflight_data_bytes": 64 * 1024})
        srv = await started(settings)
        try:
            client = await MilterClient.connect(address(srv))
            await client.negotiate()
            packets = await client.message(HEADERS, b"x" * 200_000 + b"\r\n", chunk=65535)
            assert packets == [(b"y", b"452 4.3.1 Insufficient system storage, try again later\x00")]
            assert srv.ctx is not None and srv.ctx.inflight_bytes == 0
            packets = await client.message(HEADERS, BODY)
            assert packets[-1] == (b"c", b"")
            await client.close()
        finally:
            await srv.stop(drain_timeout_s=1.0)

    run(body)


@pytest.mark.parametrize(
    ("garbage", "event"),
    [
        (struct.pack("!I", 0x7FFFFFFF) + b"B", "milter_protocol_error"),
        (pkt(b"Z", b"nonsense"), "milter_protocol_error"),
        (pkt(b"L", b"no-nul"), "milter_protocol_error"),
        (pkt(b"L", b"Subject\x00 hi\x00")[:-4], "milter_closed_mid_message"),  # then EOF
    ],
)
def test_bad_input_is_a_clean_close_and_one_log_line(run: Run[None], garbage: bytes, event: str) -> None:
    async def body() -> None:
        srv = await started(milter_settings())
        try:
            with structlog.testing.capture_logs() as logs:
                client = await MilterClient.connect(address(srv))
                await client.negotiate()
                client.writer.write(garbage)
                if event == "milter_closed_mid_message":
                    client.writer.write_eof()
                assert await client.closed()
                for _ in range(100):
                    if srv.milter is not None and not srv.milter.connections:
                        break
                    await asyncio.sleep(0.02)
            mine = [e for e in logs if e["event"].startswith("milter_") and e["log_level"] != "debug"
                    and e["event"] != "milter_listening"]
            assert [e["event"] for e in mine] == [event], logs
            # The server still serves.
            client = await MilterClient.connect(address(srv))
            await client.negotiate()
            assert (await client.message(HEADERS, BODY))[-1] == (b"c", b"")
            await client.close()
        finally:
            await srv.stop(drain_timeout_s=1.0)

    run(body)


def test_a_stalled_mta_is_closed_at_the_stage_deadline(run: Run[None]) -> None:
    async def body() -> None:
        srv = await started(milter_settings(server={"data_timeout_s": 0.3, "idle_timeout_s": 0.6}))
        try:
            with structlog.testing.capture_logs() as logs:
                client = await MilterClient.connect(address(srv))
                await client.negotiate()
                client.writer.write(pkt(b"M", z(b"<a@example.test>")) + pkt(b"L", z(b"Subject", b" hi"))[:-3])  # half a packet
                assert await client.closed(wait_s=10)
            assert [e["stage"] for e in logs if e["event"] == "milter_timeout"] == ["message"]
            with structlog.testing.capture_logs() as logs:
                client = await MilterClient.connect(address(srv))
                await client.negotiate()
                assert await client.closed(wait_s=10)  # idle between messages
            assert [e["stage"] for e in logs if e["event"] == "milter_timeout"] == ["idle"]
        finally:
            await srv.stop(drain_timeout_s=1.0)

    run(body)


def test_unix_socket_with_mode(run: Run[None]) -> None:
    path = Path(tempfile.mkdtemp(prefix="triaged-milter-")) / "triaged.sock"

    async def body() -> None:
        settings = milter_settings(f"unix:{path}")
        listener = msgspec.structs.replace(settings.server.listeners[0], socket_mode="0666")
        settings = msgspec.structs.replace(
            settings, server=msgspec.structs.replace(settings.server, listeners=[listener])
        )
        path.touch()  # a stale file from a crash is replaced
        srv = await started(settings)
        try:
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o666
            client = await MilterClient.connect(str(path))
            await client.negotiate()
            assert (await client.message(HEADERS, BODY))[-1] == (b"c", b"")
            await client.close()
        finally:
            await srv.stop(drain_timeout_s=1.0)
        assert not path.exists()

    run(body)


class SlowClassifier(RulesClassifier):
    def __init__(self) -> None:
        self.entered = asyncio.Event()

    async def classify(self, raw: bytes) -> Classification:
        self.entered.set()
        await asyncio.sleep(0.5)
        return self.classify_now(raw)


def test_drain_finishes_the_message_in_flight_and_closes_idle_connections(run: Run[None]) -> None:
    async def body() -> None:
        slow = SlowClassifier()
        srv = await started(milter_settings(), slow)
        idle = await MilterClient.connect(address(srv))
        await idle.negotiate()
        busy = await MilterClient.connect(address(srv))
        await busy.negotiate()
        answer = asyncio.create_task(busy.message(HEADERS, BODY))
        await slow.entered.wait()
        await srv.stop(drain_timeout_s=10.0)
        packets = await answer
        assert packets[-1] == (b"c", b"")
        assert await idle.closed() and await busy.closed()

    run(body)


@pytest.mark.parametrize(
    ("listener", "error"),
    [
        ('address = "unix:relative.sock"\nprotocol = "milter"', "absolute socket path"),
        ('address = "inet:127.0.0.1:1"\nprotocol = "smtp"', "for milter listeners"),
        ('address = "inet:127.0.0.1"\nprotocol = "milter"', "expected host:port"),
        ('address = "unix:/run/x.sock"\nprotocol = "milter"\nsocket_mode = "999"', "socket_mode"),
        ('address = "inet:127.0.0.1:1"\nprotocol = "milter"\nproxy_protocol = true', "not supported on milter"),
    ],
)
def test_milter_listener_config_errors_name_the_key(listener: str, error: str) -> None:
    from proxy.settings import ConfigError, decode_settings

    with pytest.raises(ConfigError, match=error):
        decode_settings(f"[[server.listeners]]\n{listener}\n")


def test_milter_listener_addresses_decode() -> None:
    from proxy.settings import decode_settings, listener_address

    s = decode_settings(
        '[[server.listeners]]\naddress = "inet:127.0.0.1:8891"\nprotocol = "milter"\n'
        '[[server.listeners]]\naddress = "unix:/run/triaged/milter"\nprotocol = "milter"\n'
        '[[server.listeners]]\naddress = "127.0.0.1:8892"\nprotocol = "milter"\n'
    )
    assert [listener_address(x) for x in s.server.listeners] == [
        ("127.0.0.1", 8891), "/run/triaged/milter", ("127.0.0.1", 8892)
    ]


def test_twenty_mta_connections_share_batches_of_the_onnx_model(run: Run[None]) -> None:
    """20 smtpd processes at once feed one micro-batcher (the default model,
    its inference process); a generous max_wait_ms makes sharing certain."""
    from classifier.config import BatcherSettings

    repo = Path(__file__).resolve().parent.parent

    async def body() -> None:
        settings = milter_settings()
        classifier = ClassifierSettings(
            kind="onnx", model_path=str(repo / "models" / "default.onnx"), timeout_ms=30_000,
            batcher=BatcherSettings(max_batch_size=64, max_wait_ms=300),
        )
        settings = msgspec.structs.replace(settings, classifier=classifier)
        sink = ListSink()
        srv = Server(settings, sinks=[sink])
        await srv.start()
        try:
            clients = [await MilterClient.connect(address(srv)) for _ in range(20)]
            for cl in clients:
                await cl.negotiate()
            answers = await asyncio.gather(*(
                cl.message(HEADERS, BODY, queue_id=b"Q%d" % i) for i, cl in enumerate(clients)
            ))
            for cl in clients:
                await cl.close()
        finally:
            await srv.stop(drain_timeout_s=1.0)
        assert all(a[-1] == (b"c", b"") for a in answers)
        assert len(sink.records) == 20 and all(r.model and r.category for r in sink.records)
        hist = srv.metrics.batcher.batch_size.collect()[0].samples
        count = next(s.value for s in hist if s.name.endswith("_count"))
        total = next(s.value for s in hist if s.name.endswith("_sum"))
        assert total == 20 and count < 20, (count, total)  # fewer model calls than messages

    run(body)


async def test_quarantine_in_smtp_proxy_mode_is_451_and_nothing_is_relayed(
    start_triaged: Any, capture: Any
) -> None:
    """The SMTP proxy has no hold queue: the message waits at the sender."""
    from conftest import SmtpTestClient

    srv = await start_triaged(policy={"category_actions": {"forums": "quarantine"}})
    host, port = srv.addresses[0]
    client = await SmtpTestClient.connect(host, port)
    await client.reply()
    await client.cmd("EHLO client.example.test")
    code, text = await client.send_message(
        "alice@example.test", ["bob@example.test"],
        b"From: a@example.test\r\nList-Id: <l.example.test>\r\nSubject: hi\r\n\r\nbody\r\n",
    )
    await client.close()
    assert (code, text) == (451, "4.7.1 Message held by policy, try again later")
    assert capture.messages == []


def test_garbage_right_after_a_message_still_gets_that_message_answered(run: Run[None]) -> None:
    sink = ListSink()

    async def body() -> None:
        srv = await started(milter_settings(), sinks=[sink])
        try:
            client = await MilterClient.connect(address(srv))
            await client.negotiate()
            w = client.writer
            w.write(pkt(b"M", z(b"<a@example.test>")) + pkt(b"L", z(b"Subject", b" x")))
            w.write(pkt(b"B", BODY) + pkt(b"E") + pkt(b"Z", b"garbage"))  # one read, most likely
            packets = []
            while True:
                code, _ = await client.read_packet()
                packets.append(code)
                if code == b"c":
                    break
            assert await client.closed()
        finally:
            await srv.stop(drain_timeout_s=1.0)
        assert len(sink.records) == 1 and sink.records[0].verdict == "accept"

    run(body)


def test_tcp_peers_outside_allowed_clients_are_closed(run: Run[None]) -> None:
    async def body() -> None:
        srv = await started(milter_settings(server={"allowed_clients": ["192.0.2.0/24"]}))
        try:
            with structlog.testing.capture_logs() as logs:
                client = await MilterClient.connect(address(srv))
                assert await client.closed()
            assert [e["event"] for e in logs if e["event"].startswith("milter_")] == ["milter_connection_denied"]
        finally:
            await srv.stop(drain_timeout_s=1.0)

    run(body)


def test_unknown_socket_owner_fails_the_start_with_one_clear_error(run: Run[None]) -> None:
    path = Path(tempfile.mkdtemp(prefix="triaged-milter-")) / "triaged.sock"

    async def body() -> None:
        settings = milter_settings(f"unix:{path}")
        listener = msgspec.structs.replace(settings.server.listeners[0], socket_owner="no-such-user-here")
        settings = msgspec.structs.replace(
            settings, server=msgspec.structs.replace(settings.server, listeners=[listener])
        )
        with pytest.raises(OSError, match="socket_owner 'no-such-user-here': no such user"):
            await started(settings)
        assert not path.exists()

    run(body)
