"""Event schema and privacy rules (pure: TransactionRecord in, JSON out)."""

from __future__ import annotations

import hashlib
import hmac
import json

import msgspec
import pytest

from proxy.events import (
    SCHEMA_VERSION,
    Event,
    EventBuilder,
    config_problems,
    decode_event,
    event_key,
)
from proxy.settings import EventsSettings, decode_settings
from proxy.transaction import TransactionRecord


def record(**kw: object) -> TransactionRecord:
    base: dict[str, object] = {
        "time": 1_764_000_000.25,
        "front_end": "smtp",
        "queue_id": "4dQ7Zk1xyz",
        "message_id": "<CAF+abc123@mail.alice-example.org>",
        "client_address": "192.0.2.7",
        "sender": "Alice.Secret@Example.ORG",
        "recipients": ("bob.private@example.net", "carol.hidden@example.com"),
        "size_bytes": 4321,
        "category": "forums",
        "score": 0.93,
        "spam": False,
        "spam_score": 0.02,
        "model": "triage/3",
        "classifier_latency_ms": 1.5,
        "total_latency_ms": 12.25,
        "verdict": "accept",
        "reply_code": 250,
    }
    base.update(kw)
    return msgspec.convert(base, TransactionRecord)


def test_event_carries_the_facts_and_round_trips() -> None:
    r = record()
    data = EventBuilder("host-a:1", "").encode(r)
    ev = decode_event(data)
    assert ev.schema == SCHEMA_VERSION
    assert (ev.time, ev.instance, ev.front_end, ev.queue_id) == (r.time, "host-a:1", "smtp", r.queue_id)
    assert ev.client_address == "192.0.2.7"
    assert ev.sender_domain == "example.org"
    assert ev.recipient_count == 2
    assert (ev.size_bytes, ev.category, ev.score, ev.spam, ev.spam_score) == (4321, "forums", 0.93, False, 0.02)
    assert (ev.model, ev.classifier_latency_ms, ev.total_latency_ms) == ("triage/3", 1.5, 12.25)
    assert (ev.verdict, ev.reply_code) == ("accept", 250)
    assert ev.message_id_hash == hashlib.sha256(r.message_id.encode()).hexdigest()[:32]
    b = EventBuilder("host-a:1", "")
    ids = {decode_event(b.encode(r)).id for _ in range(100)}
    assert len(ids) == 100 and ev.id not in ids  # unique per event and per process


def test_no_local_parts_or_message_id_in_the_event_by_default() -> None:
    r = record()
    text = EventBuilder("i", "").encode(r).decode().lower()
    for secret in ("alice", "secret", "bob", "private", "carol", "hidden", "caf+abc123"):
        assert secret not in text
    obj = json.loads(text)
    assert "sender_pseudonym" not in obj and "recipient_pseudonyms" not in obj


def test_pseudonyms_are_keyed_hmacs_of_the_address() -> None:
    key = "k3y-for-tests"
    ev = decode_event(EventBuilder("i", key).encode(record()))

    def mac(addr: str) -> str:
        return hmac.new(key.encode(), addr.lower().encode(), hashlib.sha256).hexdigest()[:32]

    assert ev.sender_pseudonym == mac("Alice.Secret@Example.ORG")
    assert ev.recipient_pseudonyms == [mac("bob.private@example.net"), mac("carol.hidden@example.com")]
    other = decode_event(EventBuilder("i", "another key").encode(record()))
    assert other.sender_pseudonym != ev.sender_pseudonym  # without the key, no linking


def test_null_sender_and_unclassified_message() -> None:
    r = record(sender="", recipients=("x@y.example",), category=None, score=None, spam=None,
               spam_score=None, model=None, verdict="error", reply_code=451, message_id="")
    ev = decode_event(EventBuilder("i", "s").encode(r))
    assert ev.sender_domain == "" and ev.sender_pseudonym == ""
    assert ev.category is None and ev.model is None and ev.message_id_hash == ""
    assert (ev.verdict, ev.reply_code) == ("error", 451)


def test_kafka_key_is_stable_per_message() -> None:
    a = record(queue_id="Q1")
    b = record(queue_id="Q2", time=5.0)  # same Message-ID, another hop / time
    assert event_key(a) == event_key(b)
    assert event_key(record(message_id="")) == event_key(record(message_id="", time=9.0))
    assert event_key(record(message_id="", queue_id="A")) != event_key(record(message_id="", queue_id="B"))
    for r in (a, record(message_id="", queue_id="A")):
        key, value = EventBuilder("i", "").encode_keyed(r)
        assert key == event_key(r)
        assert decode_event(value).queue_id == r.queue_id


def test_undecodable_bytes_from_the_wire_do_not_lose_the_event() -> None:
    r = record(queue_id=b"Q\xff1".decode("utf-8", "surrogateescape"), client_address="\udc80")
    ev = decode_event(EventBuilder("i", "").encode(r))
    assert ev.queue_id == "Q?1" and ev.client_address == "?"


def test_schema_rejects_a_wrong_type() -> None:
    good = json.loads(EventBuilder("i", "").encode(record()))
    good["recipient_count"] = "two"
    with pytest.raises(msgspec.ValidationError):
        decode_event(json.dumps(good).encode())
    assert isinstance(decode_event(json.dumps({**good, "recipient_count": 2, "new_field": 1}).encode()), Event)


def test_config_problems_name_the_key() -> None:
    ok = msgspec.convert({"bootstrap_servers": ["127.0.0.1:9092"]}, EventsSettings)
    assert config_problems(ok) == []
    from aiokafka import codec

    have = {"snappy": codec.has_snappy(), "lz4": codec.has_lz4(), "zstd": codec.has_zstd()}
    missing = [name for name, ok in have.items() if not ok]
    bad = msgspec.convert(
        {"bootstrap_servers": ["kafka"], "compression": missing[0] if missing else "gzip",
         "queue_size": 10, "high_water": 20, "spool_max_bytes": 8192, "spool_segment_bytes": 16384},
        EventsSettings,
    )
    keys = sorted(p.split(":")[0] for p in config_problems(bad))
    expected = ["events.bootstrap_servers[0]", "events.high_water", "events.spool_segment_bytes"]
    if missing:  # a codec whose library is absent here
        expected.insert(1, "events.compression")
    assert keys == expected


def test_settings_have_the_close_timeout() -> None:
    s = decode_settings(b'[events]\nclose_timeout_s = 2.5\nbootstrap_servers = ["127.0.0.1:9"]\n').events
    assert isinstance(s, EventsSettings) and s.close_timeout_s == 2.5
