"""Feedback as events, with a real Kafka-protocol broker (Tansu): `triaged
feedback` ships a "feedback" event (features and hashes, never the message or
the user's name), spools it when Kafka is away and ships it later, and
`triaged feedback --from-kafka` on a learner host reads the topic into its
own store, where the items train and gate like local ones."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from kafka_broker import KAFKA_MARKS, KafkaBroker, free_port

from classifier.features import FEATURE_VERSION, extract
from classifier.learning.feature_items import ids_for
from classifier.learning.learn import unstamped
from classifier.learning.store import FeedbackStore, body_hash
from classifier.model import load_model
from proxy.events import decode_feedback_event

pytestmark = KAFKA_MARKS
ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models/default.onnx"


def msg(n: int) -> bytes:
    return (
        b"X-Triage-Category: promotions\r\nX-Triage-Spam: no\r\nX-Triage-Model: triaged-default/2\r\n"
        b"From: Carol Writer <carol.writer@friends.example>\r\nTo: alice@site.example\r\n"
        b"Subject: zebrafish meeting %d\r\nMessage-ID: <fb%d@friends.example>\r\n"
        b"\r\nHi Alice, the zebrafish lab meets on Thursday %d. Bring the slides. Carol\r\n"
    ) % (n, n, n)


def config(tmp: Path, bootstrap: str, store: str = "store", timeout_s: float = 2.0) -> Path:
    p = tmp / f"triaged-{bootstrap.rsplit(':', 1)[1]}-{store}.toml"
    p.write_text(
        f'[classifier]\nmodel_path = "{MODEL}"\n'
        f'[events]\nbootstrap_servers = ["{bootstrap}"]\n'
        f'[learning]\nstore_path = "{tmp / store}"\nship_events = true\n'
        f'event_spool_dir = "{tmp / "fb-spool"}"\nevent_timeout_s = {timeout_s}\n'
    )
    return p


def feedback(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "proxy", "feedback", *args], input=stdin,
                          capture_output=True, cwd=ROOT, env=env, timeout=120)  # fmt: skip


def test_feedback_events_through_kafka_to_a_learner_store(tmp_path: Path, broker: KafkaBroker) -> None:
    live = config(tmp_path, broker.bootstrap)
    r = feedback("--config", str(live), "--label", "primary", "--user", "alice@site.example", stdin=msg(1))
    assert r.returncode == 0, r.stderr
    [(_, value)] = asyncio.run(broker.consume(1))
    ev = decode_feedback_event(value)
    assert (ev.type, ev.label, ev.kind, ev.decided) == ("feedback", "primary", "correction", "promotions")
    assert ev.feature_version == FEATURE_VERSION and ev.struct_ids and ev.text_ids
    assert ev.body_hash == body_hash(msg(1)) and len(ev.message_id_hash) == 32
    # Convention 8: no message text, no address, no user name on the topic.
    for secret in (b"zebrafish", b"Carol", b"alice", b"friends.example", b"fb1@"):
        assert secret not in value, secret
    # The ids are the model's features of the message without our X-Triage-* fields.
    params = load_model(str(MODEL)).manifest.features
    want = extract(unstamped(msg(1)), params)
    assert ev.struct_ids == want[: params.struct_slots][want[: params.struct_slots] > 0].tolist()

    # Kafka away: the move still succeeds, within the timeout, and the event waits in the spool.
    dead = config(tmp_path, f"127.0.0.1:{free_port()}", timeout_s=1.0)
    for n in (2, 3):
        t0 = time.monotonic()
        r = feedback("--config", str(dead), "--label", "updates", "--user", "bob", stdin=msg(n))
        assert r.returncode == 0, r.stderr
        assert time.monotonic() - t0 < 60  # generous: a loaded machine; the point is no hang
    assert len(asyncio.run(broker.consume(1, quiet_s=0.5))) == 1
    r = feedback("--config", str(live), "--ship-events")
    assert r.returncode == 0 and b"shipped 2, still spooled 0" in r.stdout, (r.stdout, r.stderr)
    values = [v for _, v in asyncio.run(broker.consume(3))]
    assert sorted(decode_feedback_event(v).label for v in values) == ["primary", "updates", "updates"]

    # The learner host: its own store, filled from the topic; a second run adds nothing.
    learner = config(tmp_path, broker.bootstrap, store="learner")
    r = feedback("--config", str(learner), "--from-kafka", "--idle-s", "1")
    assert r.returncode == 0 and b"added 3" in r.stdout, (r.stdout, r.stderr)
    r = feedback("--config", str(learner), "--from-kafka", "--idle-s", "1")
    assert r.returncode == 0 and b"added 0" in r.stdout, (r.stdout, r.stderr)
    items = FeedbackStore(tmp_path / "learner").items()
    assert sorted((i.label, i.form) for i in items) == [("primary", "features"), ("updates", "features"),
                                                       ("updates", "features")]  # fmt: skip
    assert all(i.user and i.user not in ("bob", "alice@site.example") for i in items)
    # They featurise to exactly what the sending host's model saw.
    ids, usable = ids_for(items, params)
    assert all(usable)
    by_hash = {i.body_hash: a for i, a in zip(items, ids, strict=True)}
    for n in (1, 2, 3):
        assert np.array_equal(by_hash[body_hash(msg(n))], extract(unstamped(msg(n)), params))


def test_feedback_events_for_other_features_are_not_trained_on(tmp_path: Path) -> None:
    """A feature item hashed under other parameters (an older triaged on another host)
    is kept but left out of learning and gating."""
    import msgspec

    from classifier.learning.feature_items import FeatureIds

    store = FeedbackStore(tmp_path)
    params = load_model(str(MODEL)).manifest.features
    store.add_features(msgspec.msgpack.encode(FeatureIds("0123456789abcdef", [5, 6], [7])),
                       label="primary", user="u", kind="correction", decided="updates",
                       when=time.time(), message_id="sha:1", body_hash="b1")  # fmt: skip
    [item] = store.items()
    _, usable = ids_for([item], params)
    assert usable == [False]


@pytest.mark.parametrize("what", ["ship", "consume"])
def test_events_need_kafka_configured(tmp_path: Path, what: str) -> None:
    cfg = tmp_path / "t.toml"
    cfg.write_text(f'[learning]\nstore_path = "{tmp_path / "s"}"\n')
    r = feedback("--config", str(cfg), "--ship-events" if what == "ship" else "--from-kafka")
    assert r.returncode == 78 and b"bootstrap_servers" in r.stderr


def test_keep_features_stores_no_text_and_still_learns_the_same_ids(tmp_path: Path) -> None:
    """learning.keep = "features": the store holds the feature ids, not the message."""
    cfg = tmp_path / "t.toml"
    cfg.write_text(f'[classifier]\nmodel_path = "{MODEL}"\n'
                   f'[learning]\nstore_path = "{tmp_path / "s"}"\nkeep = "features"\n')  # fmt: skip
    r = feedback("--config", str(cfg), "--label", "primary", "--user", "alice", stdin=msg(7))
    assert r.returncode == 0, r.stderr
    r = feedback("--config", str(cfg), "--label", "primary", "--user", "alice", stdin=msg(7))
    assert r.returncode == 0 and b"already recorded" in r.stdout  # dedup as for messages
    log = (tmp_path / "s" / "feedback.log").read_bytes()
    for secret in (b"zebrafish", b"Carol", b"friends.example", b"Thursday"):
        assert secret not in log, secret
    [item] = FeedbackStore(tmp_path / "s").items()
    assert (item.form, item.label, item.kind, item.decided) == ("features", "primary", "correction", "promotions")
    params = load_model(str(MODEL)).manifest.features
    [ids], [ok] = ids_for([item], params)
    assert ok and np.array_equal(ids, extract(unstamped(msg(7)), params))
