"""`triaged feedback`: one message on stdin (an IMAPSieve or MTA pipe), or a
harvest of a Maildir++ tree, into the feedback store.

Exit statuses follow sysexits.h, because the callers read them: Dovecot's
`pipe` and an MTA pipe retry a temporary failure (75) and give up on bad
data (65), so a full disk never loses a user's move and a non-message is
not retried forever.

Lives in `proxy` because it reads the whole config (`[learning]` and the
classifier's model path); the store itself is `classifier.learning.store`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from classifier import headers
from proxy.settings import EX_CONFIG

EX_OK = 0
EX_DATAERR = 65  # not a message, unknown label
EX_NOINPUT = 66  # a Maildir or folder that is not there
EX_TEMPFAIL = 75  # the store failed (disk): the caller retries

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# "spam": into Junk. "ham": out of Junk, into no particular category.
EXTRA_LABELS = ("spam", "ham")


class _Fail(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def add_subcommands(sub: Any) -> None:
    p = sub.add_parser(
        "feedback",
        help="record a user's label for a message (stdin) or harvest a Maildir++ tree",
        description="Record one message from stdin under --label (a category of the model, "
        "'spam' or 'ham'), or with --from-maildir every message of the folders named by "
        "--map FOLDER=LABEL. Exit 65: not a message / unknown label; 75: store failure (retry).",
    )
    p.add_argument("--label", help="the user's label for the message on stdin")
    p.add_argument("--user", default="", help="who gave the label (per-user caps in learn)")
    p.add_argument("--store", help="feedback store directory (default: learning.store_path)")
    p.add_argument("--config", help="triaged TOML config (store, limits, model path)")
    p.add_argument(
        "--model", help="model whose categories are the labels (default: classifier.model_path)"
    )
    p.add_argument("--from-maildir", metavar="PATH", help="a Maildir++ root to harvest")
    p.add_argument(
        "--map", action="append", default=[], metavar="FOLDER=LABEL",
        help="with --from-maildir: folder (INBOX, Junk, Work.Invoices) to label; repeatable",
    )  # fmt: skip
    p.add_argument("--ship-events", action="store_true",
                   help="only ship the feedback events spooled while Kafka was away")
    p.add_argument("--from-kafka", action="store_true",
                   help="learner host: read feedback events from events.topic into the store")
    p.add_argument("--idle-s", type=float, default=2.0,
                   help="with --from-kafka: stop once the topic was quiet this long")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except _Fail as exc:
        print(f"triaged feedback: {exc}", file=sys.stderr)
        return exc.status


def _run(args: argparse.Namespace) -> int:
    from classifier.learning.store import FeedbackStore, StoreError

    settings = _settings(args.config)
    store_path = args.store or settings.learning.store_path
    model_path = args.model or settings.classifier.model_path
    store = FeedbackStore(
        Path(store_path),
        max_items=settings.learning.max_items,
        retention_days=settings.learning.retention_days,
    )
    if args.ship_events or args.from_kafka:
        return _events_only(args, settings, store)
    manifest = _manifest(model_path)
    labels = [*manifest.labels, *(x for x in EXTRA_LABELS if x not in manifest.labels)]
    ship = _Shipper(settings, manifest.features)
    if args.from_maildir:
        if args.label:
            raise _Fail(EX_DATAERR, "--label goes with a message on stdin, not --from-maildir")
        keep = (settings.learning.keep, manifest.features)
        status = _harvest(store, Path(args.from_maildir), args.map, labels, args.user, ship, keep)
        ship.flush()
        return status
    if not args.label:
        raise _Fail(EX_DATAERR, "--label LABEL is required (or --from-maildir PATH --map F=L)")
    _check_label(args.label, labels)
    raw = _read_stdin(MAX_MESSAGE_BYTES)
    problem = not_mail(raw)
    if problem:
        raise _Fail(EX_DATAERR, f"not a mail message: {problem}")
    try:
        item = _record(store, raw, args.label, args.user, settings.learning.keep, manifest.features)
    except StoreError as exc:
        raise _Fail(EX_TEMPFAIL, f"store: {exc}") from None
    if item is None:
        # stdout: Dovecot logs a script's stderr as an Error, and a repeat is not one.
        print(f"already recorded as {args.label}")
    else:
        ship.add(item)
        ship.flush()
    return EX_OK


def _record(store: Any, raw: bytes, label: str, user: str, keep: str, params: Any) -> Any:
    """Into the store as learning.keep says: the message, or its feature ids only
    (computed here, without our X-Triage-* fields, as learn would)."""
    if keep == "messages":
        return store.add(raw, label, user)
    import time

    from classifier.features import extract
    from classifier.learning import feature_items
    from classifier.learning.learn import unstamped
    from classifier.learning.store import body_hash, decided, kind_of, message_id
    from proxy.feedback_events import message_id_key

    stamped = decided(raw)
    struct, text = feature_items.split_ids(extract(unstamped(raw), params), params)
    return store.add_features(
        feature_items.encode(struct, text, params), label=label, user=user,
        kind=kind_of(label, stamped), decided=stamped, when=time.time(),
        message_id=message_id_key(message_id(raw)), body_hash=body_hash(raw),
    )  # fmt: skip


class _Shipper:
    """Feedback events of the items recorded in this run (learning.ship_events).
    The store has the feedback whatever happens here: a failure is a warning."""

    def __init__(self, settings: Any, params: Any) -> None:
        self._settings = settings
        self._params = params
        self._on = settings.learning.ship_events and bool(settings.events.bootstrap_servers)
        self._events: list[Any] = []

    def add(self, item: Any) -> None:
        if not self._on:
            return
        from classifier.learning.feature_items import ids_for
        from proxy.feedback_events import build_event

        [ids], _ = ids_for([item], self._params)  # a message or (keep = "features") its ids
        self._events.append(build_event(item, ids, self._params, self._settings))

    def flush(self) -> None:
        if not self._events:
            return
        from proxy.feedback_events import spool_and_ship

        try:
            spool_and_ship(self._events, self._settings)
        except OSError as exc:
            print(f"triaged feedback: recorded, but the event was not spooled: {exc}", file=sys.stderr)
        self._events = []


def _events_only(args: argparse.Namespace, settings: Any, store: Any) -> int:
    """--ship-events (the CLI's event spool to Kafka) or --from-kafka (topic -> store)."""
    import asyncio

    from classifier.learning.store import StoreError
    from proxy.feedback_events import consume, spool_and_ship

    if not settings.events.bootstrap_servers:
        raise _Fail(EX_CONFIG, "events.bootstrap_servers is empty: no Kafka to ship to or read from")
    if args.ship_events:
        try:
            out = spool_and_ship([], settings, force=True)
        except OSError as exc:
            raise _Fail(EX_TEMPFAIL, f"event spool: {exc}") from None
        print(f"shipped {out['sent']}, still spooled {out['pending']}")
        return EX_OK if out["pending"] == 0 else EX_TEMPFAIL
    try:
        counts = asyncio.run(consume(store, settings, idle_s=args.idle_s))
    except StoreError as exc:
        raise _Fail(EX_TEMPFAIL, f"store: {exc}") from None
    except (OSError, RuntimeError, TimeoutError) as exc:
        raise _Fail(EX_TEMPFAIL, f"kafka: {exc or type(exc).__name__}") from None
    print("feedback events: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return EX_OK


def _read_stdin(limit: int) -> bytes:
    """stdin up to `limit` bytes, in chunks: one read(limit) would reserve the
    whole limit up front, past the address-space cap of a Dovecot service."""
    chunks: list[bytes] = []
    n = 0
    fd = sys.stdin.buffer.fileno()
    while chunk := os.read(fd, 1 << 16):
        n += len(chunk)
        if n > limit:
            raise _Fail(EX_DATAERR, f"message larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def not_mail(raw: bytes) -> str:
    """Why `raw` is not a mail message ("" if it is one): it needs a header
    block with at least a From field (RFC 5322 3.6)."""
    if not raw.strip():
        return "empty input"
    end, _ = headers.split(raw)
    block = raw[:end]
    if headers.FIELD.match(block) is None:
        return "no header block"
    if headers.field(block, b"from") is None:
        return "no From header field"
    return ""


def _settings(path: str | None) -> Any:
    from proxy.settings import ConfigError, load_settings

    try:
        return load_settings(path)
    except ConfigError as exc:
        raise _Fail(EX_CONFIG, f"config: {exc}") from None


def _manifest(model_path: str) -> Any:
    from classifier.model import ModelError, load_model

    try:
        return load_model(model_path).manifest
    except ModelError as exc:
        raise _Fail(EX_CONFIG, f"model: {exc}") from None


def _check_label(label: str, labels: list[str]) -> None:
    if label not in labels:
        raise _Fail(EX_DATAERR, f"unknown label {label!r}; known: {', '.join(labels)}")


def _folder_dir(root: Path, folder: str) -> Path:
    """Maildir++: INBOX is the root, other folders are `.Name` (`.A.B` nested)."""
    if folder.upper() == "INBOX":
        return root
    return root / ("." + folder.replace("/", "."))


def _messages(folder: Path) -> Iterator[Path]:
    for sub in ("cur", "new"):
        d = folder / sub
        if d.is_dir():
            yield from sorted(p for p in d.iterdir() if p.is_file())


def _harvest(
    store: Any, root: Path, mapping: list[str], labels: list[str], user: str, ship: _Shipper,
    keep: tuple[str, Any],
) -> int:
    from classifier.learning.store import StoreError

    if not mapping:
        raise _Fail(EX_DATAERR, "--from-maildir needs at least one --map FOLDER=LABEL")
    pairs: list[tuple[str, str]] = []
    for m in mapping:
        folder, sep, label = m.partition("=")
        if not sep or not folder or not label:
            raise _Fail(EX_DATAERR, f"--map wants FOLDER=LABEL, got {m!r}")
        _check_label(label, labels)
        pairs.append((folder, label))
    if not (root / "cur").is_dir():
        raise _Fail(EX_NOINPUT, f"{root}: not a Maildir (no cur/)")
    added = dup = bad = 0
    for folder, label in pairs:
        d = _folder_dir(root, folder)
        if not (d / "cur").is_dir():
            raise _Fail(EX_NOINPUT, f"{d}: no such Maildir++ folder {folder!r}")
        for path in _messages(d):
            try:
                raw = path.read_bytes()
            except OSError as exc:
                print(f"triaged feedback: {path}: {exc.strerror}", file=sys.stderr)
                bad += 1
                continue
            if not_mail(raw) or len(raw) > MAX_MESSAGE_BYTES:
                bad += 1
                continue
            try:
                item = _record(store, raw, label, user, *keep)
            except StoreError as exc:
                raise _Fail(EX_TEMPFAIL, f"store: {exc}") from None
            if item is None:
                dup += 1
            else:
                added += 1
                ship.add(item)
    print(f"recorded {added}, already there {dup}, not mail {bad}")
    return EX_OK


__all__ = ["add_subcommands", "not_mail", "run"]
