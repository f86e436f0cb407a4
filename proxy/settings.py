"""The whole TOML config as frozen msgspec Structs, decoded once at start.

Units are in the names (`_s`, `_ms`, `_bytes`). Unknown keys are errors, so a
typo never silently falls back to a default. Nothing reads the environment later.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from classifier.addresses import (
    split_host_port as split_host_port,  # re-exported: server, supervisor
)
from classifier.config import ClassifierSettings

Seconds = Annotated[float, Meta(gt=0, le=86_400)]
Port = Annotated[int, Meta(ge=0, le=65_535)]


class _Section(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    pass


class ListenerSettings(_Section, frozen=True):
    # "host:port"; port 0 picks a free port (tests). A milter listener also
    # takes Postfix's notation: "inet:host:port" or "unix:/path/to/socket".
    address: str = "127.0.0.1:10025"
    protocol: Literal["smtp", "milter"] = "smtp"
    # Expect a PROXY v1/v2 header first (behind HAProxy `send-proxy-v2`).
    proxy_protocol: bool = False
    # unix: sockets only: permissions and owner, so that Postfix's smtpd (the
    # postfix user, maybe chrooted) can connect. Owner "" keeps ours.
    socket_mode: Annotated[str, Meta(pattern="^0?[0-7]{3}$")] = "0660"
    socket_owner: str = ""  # "user" or "user:group"


class ServerSettings(_Section, frozen=True):
    hostname: str = "triaged.localdomain"
    listeners: list[ListenerSettings] = msgspec.field(default_factory=lambda: [ListenerSettings()])
    # Past this many open client connections new ones get 421 4.7.0 at once.
    max_connections: Annotated[int, Meta(ge=1, le=1_000_000)] = 1000
    idle_timeout_s: Seconds = 300.0  # RFC 5321 4.5.3.2.7: server timeout >= 5 min
    data_timeout_s: Seconds = 600.0
    max_message_bytes: Annotated[int, Meta(ge=1024)] = 50 * 1024 * 1024
    max_recipients: Annotated[int, Meta(ge=1, le=100_000)] = 1000
    # Bound on message bytes held in memory across all connections (aiosmtpd
    # buffers whole messages). Over it a transaction gets 452 4.3.1.
    max_inflight_data_bytes: Annotated[int, Meta(ge=1024)] = 512 * 1024 * 1024
    # Clients allowed to connect (CIDR); others get 554 5.7.1.
    allowed_clients: list[str] = msgspec.field(default_factory=lambda: ["127.0.0.0/8", "::1/128"])
    # Clients whose XFORWARD is honoured (Postfix content_filter), CIDR.
    xforward_clients: list[str] = msgspec.field(default_factory=lambda: ["127.0.0.0/8", "::1/128"])
    # STARTTLS is offered when both are set.
    tls_cert_file: str = ""
    tls_key_file: str = ""
    # Graceful stop: how long open transactions may finish.
    drain_timeout_s: Seconds = 30.0
    # A bare CR or LF in message data (RFC 5321 2.3.8; the SMTP smuggling
    # class): "reject" answers 550 5.5.2 after the data; "normalize" turns each
    # into CRLF before the message goes on. Only CRLF.CRLF ends DATA either way.
    bare_lf: Literal["reject", "normalize"] = "reject"
    # Front-end processes sharing the listeners (proxy/supervisor.py);
    # 0: one per usable core (affinity and cgroup quota, proxy/cpus.py), but
    # 1 on hosts of 2 cores or fewer with the ONNX model (its inference
    # process takes the other core: proxy/server.py effective_workers);
    # 1: a single process, no supervisor.
    workers: Annotated[int, Meta(ge=0, le=1024)] = 0
    # A worker whose event loop has not answered the supervisor this long is
    # killed and replaced (its open transactions fail; clients retry). Keep
    # it well below the unit's WatchdogSec=: the watchdog is withheld while
    # a worker is silent.
    worker_hang_timeout_s: Seconds = 10.0


class UpstreamSettings(_Section, frozen=True):
    # "smtp://host:port" (the next hop) or "maildir:PATH" (embedded default).
    url: str = "maildir:./var/maildir"
    starttls: Literal["none", "opportunistic", "require"] = "none"
    pool_size: Annotated[int, Meta(ge=1, le=10_000)] = 64
    connect_timeout_s: Seconds = 10.0
    command_timeout_s: Seconds = 60.0  # MAIL/RCPT/RSET/NOOP replies
    data_timeout_s: Seconds = 120.0  # the final reply after the message
    # A pooled connection idle longer than this is closed, not reused.
    max_idle_s: Seconds = 30.0
    # A client idle this long inside a transaction (between commands, or while
    # sending the body) gives its next-hop connection back to the pool (RSET);
    # its next command replays MAIL and the accepted RCPTs on a connection from
    # the pool. A full pool takes back the longest-idle one first; with every
    # connection busy on a command it answers 451 4.3.2 at once.
    hold_idle_s: Seconds = 5.0
    # Use one upstream connection for at most this many transactions.
    max_transactions_per_connection: Annotated[int, Meta(ge=1)] = 1000
    # Forward XFORWARD attributes when the next hop offers it.
    xforward: bool = True


class StampingSettings(_Section, frozen=True):
    category_header: str = "X-Triage-Category"
    score_header: str = "X-Triage-Score"
    spam_header: str = "X-Triage-Spam"
    spam_score_header: str = "X-Triage-Spam-Score"
    model_header: str = "X-Triage-Model"


# "quarantine": milter mode puts the message in the MTA's hold queue
# (SMFIR_QUARANTINE); SMTP proxy mode has no hold queue and answers 451 4.7.1,
# so the message waits, deferred, at the sending MTA.
Action = Literal["accept", "tag", "quarantine", "reject", "tempfail"]


class PolicySettings(_Section, frozen=True):
    # What to do with a category (missing categories: accept).
    # "tag" prefixes the Subject with subject_tag; "reject" is 550 5.7.1;
    # "tempfail" is 451 4.7.1; "quarantine": see Action above.
    category_actions: dict[str, Action] = msgspec.field(default_factory=dict)
    spam_action: Action = "accept"
    subject_tag: str = "[{category}]"
    spam_subject_tag: str = "[SPAM]"
    # No verdict at all: pass unstamped ("accept") or 451 ("tempfail"). An ONNX
    # model that misses its deadline or is down gets the header rules' verdict
    # instead (classifier/service.py); this applies when even that cannot answer.
    on_classifier_error: Literal["accept", "tempfail"] = "accept"


class EventsSettings(_Section, frozen=True):
    # Empty: events go to the JSON-lines file below (no Kafka needed).
    bootstrap_servers: list[str] = msgspec.field(default_factory=list)
    topic: str = "triaged.events"
    client_id: str = "triaged"
    acks: Literal["all", "1", "0"] = "all"
    compression: Literal["none", "gzip", "snappy", "lz4", "zstd"] = "gzip"
    # How long a round collects events before one produce request (or file
    # write). Each round costs about 1 ms of CPU in aiokafka: at 20 ms that was
    # 5% of a core at 700 msg/s, at 100 ms about 1% (bench/results/events_bench.md).
    linger_ms: Annotated[float, Meta(ge=0, le=60_000)] = 100.0
    request_timeout_s: Seconds = 10.0
    # Bounded in-memory queue between the mail path and the shipper.
    queue_size: Annotated[int, Meta(ge=1)] = 100_000
    # Past this queue depth (or with Kafka unreachable) events go to the spool.
    high_water: Annotated[int, Meta(ge=1)] = 50_000
    spool_dir: str = "./var/spool/events"
    spool_max_bytes: Annotated[int, Meta(ge=4096)] = 1024 * 1024 * 1024
    spool_segment_bytes: Annotated[int, Meta(ge=4096)] = 16 * 1024 * 1024
    fsync: Literal["always", "interval", "never"] = "interval"
    fsync_interval_s: Seconds = 1.0
    jsonl_path: str = "./var/events/events.jsonl"
    jsonl_max_bytes: Annotated[int, Meta(ge=4096)] = 64 * 1024 * 1024
    jsonl_keep: Annotated[int, Meta(ge=1, le=1000)] = 5
    # HMAC key for pseudonymised addresses; empty: addresses are not shipped.
    pseudonymize_secret: str = ""
    # Graceful stop: time to flush queued events to Kafka; the rest is spooled.
    close_timeout_s: Seconds = 5.0


class LoggingSettings(_Section, frozen=True):
    format: Literal["auto", "json", "console"] = "auto"  # auto: console on a TTY
    level: Literal["debug", "info", "warning", "error"] = "info"


class MetricsSettings(_Section, frozen=True):
    # Prometheus exposition "host:port"; empty: off.
    listen: str = ""


class LearningSettings(_Section, frozen=True):
    # The nightly learn/gate/swap runs only when enabled; `triaged feedback`
    # records into the store either way (it is called explicitly).
    enabled: bool = False
    # false: learn gates its candidate (MODEL.candidate) but never promotes it;
    # a postmaster runs it in shadow mode (classifier.shadow_model_path =
    # MODEL.candidate) and promotes with `triaged promote`. README "Shadow mode".
    auto_promote: bool = True
    store_path: str = "./var/feedback"  # a directory: feedback.log + lock
    # Oldest feedback is dropped past this many items or this age.
    max_items: Annotated[int, Meta(ge=1, le=10_000_000)] = 50_000
    retention_days: Annotated[float, Meta(gt=0, le=36_500)] = 365.0
    # What the store keeps: "messages" (with our X-Triage-* headers), so a
    # model with new features can be retrained from them; or "features" (the
    # model's hashed feature ids only: no text on disk, but feedback is lost
    # for a model with another feature version). README "Learning from users".
    keep: Literal["messages", "features"] = "messages"
    # The replay sample `triaged learn` rehearses so that the site's feedback does
    # not make the model forget the rest (classifier/learning/replay.py). "":
    # MODEL.replay.npz beside classifier.model_path, else the bundled
    # models/default.replay.npz. One built for other features is refused.
    replay_path: str = ""
    # Ship each feedback as a "feedback" event to events.topic (needs
    # events.bootstrap_servers), for a learner host that consumes them
    # (`triaged feedback --from-kafka`). Off: the events carry hashed feature
    # ids of the message, which a dictionary attack can partly read back.
    ship_events: bool = False
    # The user in a feedback event: "hash" (HMAC with events.pseudonymize_secret
    # when set, else sha256) or "plain" (the name, e.g. for per-user caps you audit).
    event_user: Literal["hash", "plain"] = "hash"
    # `triaged feedback` spools its events here (its own spool, apart from the
    # server's) and ships them within event_timeout_s; what Kafka did not take
    # goes out with the next feedback or `triaged feedback --ship-events`.
    event_spool_dir: str = "./var/spool/feedback-events"
    event_timeout_s: Seconds = 2.0


class Settings(_Section, frozen=True):
    server: ServerSettings = ServerSettings()
    upstream: UpstreamSettings = UpstreamSettings()
    stamping: StampingSettings = StampingSettings()
    policy: PolicySettings = PolicySettings()
    classifier: ClassifierSettings = ClassifierSettings()
    events: EventsSettings = EventsSettings()
    logging: LoggingSettings = LoggingSettings()
    metrics: MetricsSettings = MetricsSettings()
    learning: LearningSettings = LearningSettings()


# Exit status of a command whose config is unusable (sysexits.h EX_CONFIG).
EX_CONFIG = 78


class ConfigError(Exception):
    """A bad config: the message names the key and the problem (exit 78)."""


def decode_settings(toml_text: str | bytes) -> Settings:
    try:
        settings = msgspec.toml.decode(toml_text, type=Settings)
    except msgspec.ValidationError as exc:
        # msgspec says e.g. "Expected `int`, got `str` - at `$.server.max_connections`".
        raise ConfigError(_name_the_key(str(exc))) from None
    except msgspec.DecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}") from None
    errors = validate(settings)
    if errors:
        raise ConfigError("\n".join(errors))
    return settings


def listener_address(listener: ListenerSettings) -> tuple[str, int] | str:
    """(host, port) for TCP, or the socket path of a milter "unix:" listener."""
    address = listener.address
    if listener.protocol == "milter":
        if address.startswith("unix:"):
            path = address.removeprefix("unix:")
            if not path.startswith("/"):
                raise ValueError("unix: needs an absolute socket path")
            return path
        address = address.removeprefix("inet:")
    elif address.startswith(("inet:", "unix:")):
        raise ValueError("inet:/unix: addresses are for milter listeners")
    return split_host_port(address)


def validate(s: Settings) -> list[str]:
    """Checks msgspec types cannot express; one "key: problem" per error."""
    import ipaddress
    from urllib.parse import urlsplit

    errors: list[str] = []
    if not s.server.listeners:
        errors.append("server.listeners: at least one listener is needed")
    for i, listener in enumerate(s.server.listeners):
        try:
            listener_address(listener)
        except ValueError as exc:
            errors.append(f"server.listeners[{i}].address: {exc}, got {listener.address!r}")
        if listener.protocol == "milter" and listener.proxy_protocol:
            errors.append(f"server.listeners[{i}].proxy_protocol: not supported on milter listeners")
    for key in ("allowed_clients", "xforward_clients"):
        for i, cidr in enumerate(getattr(s.server, key)):
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                errors.append(f"server.{key}[{i}]: not a CIDR network: {cidr!r}")
    if bool(s.server.tls_cert_file) != bool(s.server.tls_key_file):
        errors.append("server.tls_cert_file: tls_cert_file and tls_key_file go together")
    url = s.upstream.url
    if url.startswith("maildir:"):
        if not url.removeprefix("maildir:"):
            errors.append("upstream.url: maildir: needs a path")
    else:
        try:
            parts = urlsplit(url)
            ok = parts.scheme == "smtp" and bool(parts.hostname) and parts.port is not None
        except ValueError:
            ok = False
        if not ok:
            errors.append(f"upstream.url: expected smtp://host:port or maildir:PATH, got {url!r}")
    import re

    if not re.fullmatch(r"[A-Za-z0-9.-]+", s.server.hostname):
        errors.append(f"server.hostname: not a host name: {s.server.hostname!r}")
    for field in msgspec.structs.fields(StampingSettings):
        name = getattr(s.stamping, field.name)
        # RFC 5322 2.2: printable US-ASCII except colon.
        if not re.fullmatch(r"[!-9;-~]+", name):
            errors.append(f"stamping.{field.name}: not a header field name: {name!r}")
    if s.metrics.listen:
        try:
            split_host_port(s.metrics.listen)
        except ValueError as exc:
            errors.append(f"metrics.listen: {exc}, got {s.metrics.listen!r}")
    from proxy.events import config_problems  # here: proxy.events imports this module

    errors += config_problems(s.events)
    from classifier.config import config_problems as classifier_problems

    errors += classifier_problems(s.classifier)
    return errors


def load_settings(path: str | Path | None) -> Settings:
    """Defaults when `path` is None (the embedded `make run` configuration)."""
    if path is None:
        return Settings()
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    return decode_settings(data)


def _name_the_key(message: str) -> str:
    head, sep, where = message.rpartition(" - at `$.")
    if not sep:
        return message
    return f"{where.rstrip('`')}: {head}"


def dump_toml(settings: Settings) -> str:
    """The effective config as TOML (`triaged check-config`).

    Hand-rolled because msgspec's TOML encoder needs tomli_w, an extra
    dependency for one command; our config has only scalars, lists of
    scalars, string maps and the list of listener tables.
    """
    import json

    def value(v: object) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v, ensure_ascii=False)  # a valid TOML basic string
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{json.dumps(k)} = {value(x)}" for k, x in v.items()) + "}"
        raise TypeError(type(v))

    out: list[str] = []

    def table(name: str, data: dict[str, object], header: str) -> None:
        out.append(header)
        subtables: list[tuple[str, Any]] = []
        for key, v in data.items():
            if isinstance(v, dict) and key != "category_actions":
                subtables.append((key, v))
            elif isinstance(v, list) and v and isinstance(v[0], dict):
                subtables.append((key, v))
            else:
                out.append(f"{key} = {value(v)}")
        out.append("")
        for key, v in subtables:
            if isinstance(v, list):
                for item in v:
                    table(f"{name}.{key}", item, f"[[{name}.{key}]]")
            else:
                table(f"{name}.{key}", v, f"[{name}.{key}]")

    for section, data in msgspec.to_builtins(settings).items():
        table(section, data, f"[{section}]")
    return "\n".join(out)
