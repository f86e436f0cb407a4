"""SIGHUP: re-read the config file (and the model) into a running server.

The file is decoded by the same loader as at start (proxy.settings); a
broken file is one log line naming the problem, and everything keeps
running as it was. What changed is sorted by key:

- restart-only (`RESTART_ONLY`): the listening sockets, the worker count,
  the metrics listener and logging (structlog caches its configuration in
  every logger on first use, so a new level would reach only some of them).
  Logged as `config_reload_needs_restart` with the keys and not applied: the
  server keeps running on the old values of exactly those keys.
- live: everything else, applied between transactions. A transaction
  decides (classify, policy, stamping) with one Pipeline, the one current
  when its message was complete; new transactions use the new one.
  [upstream] or server.hostname: a new next-hop pool, the old one closed
  once its last lease is back (proxy/smtp/upstream_switch.py). [classifier]:
  only model_path -> the model is swapped between batches (as before);
  anything else -> a new classifier service, the old one closed after its
  pending requests (a transaction holding the old pipeline is handed the
  new classifier). [events]: the old sink is flushed and closed (its spool
  lock and file freed), then the new one starts; records in between are held
  and handed over. server.* limits, allowed_clients and TLS files apply to
  new connections.

The new parts are built and started before anything is switched, so a part
that fails to start (a model that does not load, a certificate that does
not parse) leaves the whole server on the old config. Events are the one
exception (the new sink can only start once the old let go of its spool):
if the new one fails to start, a sink with the old settings takes over.

One entry point, `await reload_from_file(server, path)`, for the single
process and for each worker of a supervisor.
"""

from __future__ import annotations

import asyncio
import ssl
import weakref
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import structlog

from classifier.addresses import Networks
from classifier.types import Classifier, ClassifierError
from proxy.pipeline import Pipeline
from proxy.settings import ConfigError, Settings, load_settings
from proxy.smtp.upstream import build_upstream
from proxy.smtp.upstream_switch import SwitchableUpstream
from proxy.transaction import TransactionRecord, TransactionSink

if TYPE_CHECKING:
    from proxy.events import EventSink
    from proxy.server import Server

log = structlog.get_logger("triaged.reload")

# "section.key", or "section" for every key in it.
RESTART_ONLY = ("server.listeners", "server.workers", "metrics.listen", "logging")

_locks: weakref.WeakKeyDictionary[Server, asyncio.Lock] = weakref.WeakKeyDictionary()


class ReloadResult(msgspec.Struct):
    ok: bool  # False: nothing was changed (broken file, or a part failed to start)
    error: str = ""
    applied: list[str] = msgspec.field(default_factory=list)  # live keys now in effect
    needs_restart: list[str] = msgspec.field(default_factory=list)
    model_reloaded: bool = False


def changed_keys(old: Settings, new: Settings) -> list[str]:
    """Dotted "section.key" names whose values differ."""
    a, b = msgspec.to_builtins(old), msgspec.to_builtins(new)
    out = []
    for section in a.keys() | b.keys():
        sa, sb = a.get(section, {}), b.get(section, {})
        out += [f"{section}.{k}" for k in sa.keys() | sb.keys() if sa.get(k) != sb.get(k)]
    return sorted(out)


def _restart_only(key: str) -> bool:
    return any(key == r or key.startswith(r + ".") for r in RESTART_ONLY)


def keep_old(old: Settings, new: Settings, keys: Iterable[str]) -> Settings:
    """`new` with the given dotted keys set back to their values in `old`."""
    for key in keys:
        section, _, name = key.partition(".")
        new_section = getattr(new, section)
        value = getattr(getattr(old, section), name)
        new = msgspec.structs.replace(new, **{section: msgspec.structs.replace(new_section, **{name: value})})
    return new


async def reload_from_file(
    server: Server, path: str | Path, *, adapt: Callable[[Settings], Settings] | None = None
) -> ReloadResult:
    """Re-read `path` and apply what may change live (see the module doc).
    `adapt`: what a worker process does to every config it serves (its own
    event spool slot, ...), applied to the new one before comparing."""
    lock = _locks.setdefault(server, asyncio.Lock())
    async with lock:  # two SIGHUPs in a row: one after the other
        try:
            new = await asyncio.to_thread(load_settings, path)
        except ConfigError as exc:
            problem = str(exc).replace("\n", "; ")
            log.error("config_reload_failed", path=str(path), error=problem, kept="old config")
            return ReloadResult(ok=False, error=problem)
        if adapt is not None:
            new = adapt(new)
        return await apply_settings(server, new)


async def apply_settings(server: Server, new: Settings) -> ReloadResult:
    old = server.settings
    changed = changed_keys(old, new)
    restart = [k for k in changed if _restart_only(k)]
    if restart:
        log.warning("config_reload_needs_restart", keys=restart)
    effective = keep_old(old, new, restart)
    live = [k for k in changed if not _restart_only(k)]
    classifier_keys = [k for k in live if k.startswith("classifier.")]

    # 1. Build and start the new parts; nothing is switched yet.
    tls: ssl.SSLContext | bool | None = False  # False: unchanged
    new_classifier: Classifier | None = None
    new_upstream = None
    try:
        if any(k in ("server.tls_cert_file", "server.tls_key_file") for k in live):
            from proxy.server import _server_tls

            tls = _server_tls(effective)
        if classifier_keys and classifier_keys != ["classifier.model_path"]:
            from proxy.server import build_classifier

            new_classifier = build_classifier(effective, server.metrics)
            await new_classifier.start()
        if any(k.startswith("upstream.") or k == "server.hostname" for k in live):
            new_upstream = build_upstream(effective.upstream, effective.server.hostname)
            await new_upstream.start()
    except (OSError, ValueError, ssl.SSLError, ClassifierError, RuntimeError) as exc:
        problem = f"{type(exc).__name__}: {exc}"
        log.error("config_reload_failed", error=problem, kept="old config")
        if new_classifier is not None:
            await new_classifier.close()
        if new_upstream is not None:
            await new_upstream.close()
        return ReloadResult(ok=False, error=problem, needs_restart=restart)

    # 2. A model file swap when only the path changed, or the same file
    # re-read when the classifier section did not change (the SIGHUP of old:
    # `triaged learn` promotes a new model file and sends SIGHUP).
    model_reloaded = False
    if new_classifier is None:
        from proxy.server import reload_classifier

        path = effective.classifier.model_path if classifier_keys else None
        model_reloaded = await reload_classifier(server.classifier, server.metrics, path)
        if classifier_keys and not model_reloaded and hasattr(server.classifier, "reload"):
            # The new model file did not load: keep the old path on record.
            effective = keep_old(old, effective, classifier_keys)
            live = [k for k in live if k not in classifier_keys]

    # 3. Switch, with no await in between: every new transaction from here on
    # sees only new objects.
    old_classifier = server.classifier
    if new_classifier is not None:
        server.classifier = new_classifier
        model_reloaded = True
    if new_upstream is not None:
        upstream = server.upstream
        assert isinstance(upstream, SwitchableUpstream)
        upstream.switch(new_upstream)
    old_pipeline = server.pipeline
    pipeline = Pipeline(effective, server.classifier)
    pipeline.sinks = old_pipeline.sinks  # one list: an events swap reaches both
    # A transaction that took the old pipeline but has not classified yet
    # gets the new classifier: the old one is about to close.
    old_pipeline.classifier = server.classifier
    server.pipeline = pipeline
    server.settings = effective
    ctx = server.ctx
    if ctx is not None:
        ctx.settings = effective
        ctx.pipeline = pipeline
        ctx.allowed = Networks(effective.server.allowed_clients)
        ctx.xforward_clients = Networks(effective.server.xforward_clients)
        if tls is not False:
            ctx.tls_context = tls if isinstance(tls, ssl.SSLContext) else None
    if server.milter is not None:
        server.milter.settings = effective
        server.milter.pipeline = pipeline
        server.milter.allowed = Networks(effective.server.allowed_clients)

    # 4. Retire what was replaced.
    if new_classifier is not None:
        await old_classifier.close()  # answers what it already queued, then stops
    if any(k.startswith("events.") for k in live) and server.events is not None:
        if not await _switch_events(server, old, effective):
            server.settings = keep_old(old, server.settings, [k for k in live if k.startswith("events.")])
            live = [k for k in live if not k.startswith("events.")]
    if live or model_reloaded:
        log.info("config_reloaded", changed=live, model=getattr(server.classifier, "model_name", None))
    return ReloadResult(ok=True, applied=live, needs_restart=restart, model_reloaded=model_reloaded)


class _Holding:
    """Records arriving while one event sink hands over to the next."""

    def __init__(self) -> None:
        self.records: list[TransactionRecord] = []

    def record(self, record: TransactionRecord) -> None:
        self.records.append(record)


def _replace_sink(sinks: list[TransactionSink], old: object, new: TransactionSink) -> None:
    for i, sink in enumerate(sinks):
        if sink is old:
            sinks[i] = new


async def _switch_events(server: Server, old_settings: Settings, new_settings: Settings) -> bool:
    from proxy.events import make_event_sink

    old = server.events
    assert old is not None
    sinks = server.pipeline.sinks  # shared by the old pipeline too
    holding = _Holding()
    _replace_sink(sinks, old, holding)
    await old.close()  # flushes its queue; frees the spool lock and the file
    registry: Any = server.metrics.registry
    _unregister(registry, old)
    new: EventSink = make_event_sink(new_settings.events)
    ok = True
    try:
        await new.start()
    except (OSError, ConfigError) as exc:
        log.error("config_reload_failed", component="events", error=str(exc), kept="old events config")
        ok = False
        new = make_event_sink(old_settings.events)
        await new.start()  # it ran a moment ago; if it cannot now, that is a crash worth seeing
    for record in holding.records:
        new.record(record)
    _replace_sink(sinks, holding, new)
    server.events = new
    own = getattr(new, "registry", None)
    if own is not None:
        registry.register(own)
    return ok


def _unregister(registry: Any, sink: object) -> None:
    own = getattr(sink, "registry", None)
    if own is not None:
        try:
            registry.unregister(own)
        except KeyError:
            pass
