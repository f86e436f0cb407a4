"""Config: the shipped triaged.toml, validation naming the key, and the CLI
(`check-config` exit 78, `serve` end to end with sd_notify and SIGTERM)."""

from __future__ import annotations

import json
import os
import signal
import smtplib
import socket
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import msgspec
import pytest

from proxy.settings import ConfigError, Settings, decode_settings, dump_toml

REPO = Path(__file__).resolve().parent.parent
TRIAGED = [sys.executable, "-m", "proxy"]


def _field_keys(struct: type[msgspec.Struct], prefix: str = "") -> set[str]:
    keys = set()
    for field in msgspec.structs.fields(struct):
        name = prefix + field.name
        keys.add(name)
        inner = field.type
        if isinstance(inner, type) and issubclass(inner, msgspec.Struct):
            keys |= _field_keys(inner, name + ".")
    return keys


def _file_keys(data: dict[str, Any], prefix: str = "") -> set[str]:
    keys = set()
    for key, value in data.items():
        keys.add(prefix + key)
        if isinstance(value, dict) and key != "category_actions":
            keys |= _file_keys(value, prefix + key + ".")
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            keys |= _file_keys(value[0], prefix + key + ".")
    return keys


def test_shipped_config_is_every_option_at_its_default() -> None:
    text = (REPO / "config" / "triaged.toml").read_text()
    assert decode_settings(text) == Settings()
    from proxy.settings import ListenerSettings

    expected = _field_keys(Settings) | {f"server.listeners.{k}" for k in _field_keys(ListenerSettings)}
    assert _file_keys(tomllib.loads(text)) == expected


def test_dump_toml_round_trips() -> None:
    settings = decode_settings(
        '[server]\nhostname = "mx1.example"\n[[server.listeners]]\naddress = "[::1]:0"\n'
        "proxy_protocol = true\n[[server.listeners]]\naddress = \"127.0.0.1:0\"\n"
        '[policy]\ncategory_actions = { spam = "reject", "odd key" = "tag" }\nsubject_tag = "[\\"{category}\\" ü]"\n'
    )
    assert decode_settings(dump_toml(settings)) == settings
    assert decode_settings(dump_toml(Settings())) == Settings()


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        ('[server]\nallowed_clients = ["10.0.0.0/33"]', "server.allowed_clients[0]"),
        ('[server]\nxforward_clients = ["nonsense"]', "server.xforward_clients[0]"),
        ('[[server.listeners]]\naddress = "localhost"', "server.listeners[0].address"),
        ('[upstream]\nurl = "http://x:25"', "upstream.url"),
        ('[upstream]\nurl = "smtp://host"', "upstream.url"),
        ('[upstream]\nurl = "maildir:"', "upstream.url"),
        ('[server]\ntls_cert_file = "/c.pem"', "server.tls_cert_file"),
        ('[metrics]\nlisten = "9100"', "metrics.listen"),
        ('[server]\nmax_connections = "many"', "server.max_connections"),
        ("[server]\nmax_connections = 0", "server.max_connections"),
        ('[server]\nbogus = 1', "server"),
        ('[upstream]\nstarttls = "maybe"', "upstream.starttls"),
        ('[stamping]\ncategory_header = "X Triage: Category"', "stamping.category_header"),
        ('[server]\nhostname = "mx example"', "server.hostname"),
    ],
)
def test_bad_config_names_the_key(toml: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        decode_settings(toml)
    assert str(info.value).startswith(key), str(info.value)


def test_check_config_exits_78_naming_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[upstream]\nurl = "smtp://"\n[server]\nallowed_clients = ["x"]\n')
    proc = subprocess.run([*TRIAGED, "check-config", str(bad)], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 78
    lines = proc.stderr.strip().splitlines()
    assert any("upstream.url" in line for line in lines)
    assert any("server.allowed_clients[0]" in line for line in lines)
    good = tmp_path / "good.toml"
    good.write_text('[server]\nhostname = "mx.test"\n')
    proc = subprocess.run([*TRIAGED, "check-config", str(good)], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0
    assert decode_settings(proc.stdout).server.hostname == "mx.test"
    missing = subprocess.run(
        [*TRIAGED, "check-config", str(tmp_path / "nope.toml")], capture_output=True, text=True, cwd=REPO
    )
    assert missing.returncode == 78


def test_serve_with_default_config_shape_delivers_to_maildir(tmp_path: Path) -> None:
    """`triaged serve` as `make run` does, with a temp Maildir and port 0."""
    text = (REPO / "config" / "triaged.toml").read_text()
    text = text.replace('address = "127.0.0.1:10025"', 'address = "127.0.0.1:0"')
    text = text.replace('"maildir:./var/maildir"', f'"maildir:{tmp_path / "maildir"}"')
    text = text.replace('kind = "onnx"', 'kind = "rules"')
    text = text.replace('format = "auto"', 'format = "json"')
    text = text.replace("./var/", f"{tmp_path}/var/")
    config = tmp_path / "triaged.toml"
    config.write_text(text)
    notify_path = str(tmp_path / "notify.sock")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(notify_path)
    notify.settimeout(20)
    env = {**os.environ, "NOTIFY_SOCKET": notify_path}
    proc = subprocess.Popen(
        [*TRIAGED, "serve", "--config", str(config)],
        cwd=REPO,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert notify.recv(64) == b"READY=1"
        assert proc.stderr is not None
        started: dict[str, Any] = {}
        while started.get("event") != "started":
            started = json.loads(proc.stderr.readline())
        host, _, port = started["listeners"][0].rpartition(":")
        with smtplib.SMTP(host, int(port), timeout=10) as client:
            refused = client.sendmail("a@example.org", ["b@example.net"], b"Subject: hi\r\n\r\nbody\r\n")
            assert refused == {}
        proc.send_signal(signal.SIGTERM)
        assert notify.recv(64) == b"STOPPING=1"
        assert proc.wait(timeout=20) == 0
        log_lines = [json.loads(line) for line in proc.stderr.read().splitlines() if line]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        notify.close()
    [delivered] = list((tmp_path / "maildir" / "new").iterdir())
    assert b"X-Triage-Category: primary\n" in delivered.read_bytes()
    [tx] = [e for e in log_lines if e.get("event") == "transaction"]
    assert tx["verdict"] == "accept" and tx["reply"] == 250
    assert "a@example.org" not in json.dumps(log_lines)  # never full addresses in logs
    # `serve` wires the configured event sink (JSON lines without Kafka).
    events = (tmp_path / "var" / "events" / "events.jsonl").read_text().splitlines()
    assert len(events) == 1


def test_serve_reports_a_busy_port_in_one_line(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = tmp_path / "t.toml"
        config.write_text(
            f'[[server.listeners]]\naddress = "127.0.0.1:{port}"\n[upstream]\nurl = "maildir:{tmp_path}/md"\n'
            f'[classifier]\nkind = "rules"\n[logging]\nformat = "json"\n'
            f'[events]\njsonl_path = "{tmp_path}/e.jsonl"\nspool_dir = "{tmp_path}/spool"\n'
        )
        proc = subprocess.run(
            [*TRIAGED, "serve", "--config", str(config)], capture_output=True, text=True, cwd=REPO, timeout=60
        )
    assert proc.returncode == 1
    [line] = proc.stderr.strip().splitlines()
    assert json.loads(line)["event"] == "start_failed"
