"""Run the real `triaged serve` as a black box (a child process) for tests and benches.

The tests in this family (Postfix, DKIM, corpus) drive triaged exactly as an
operator does: a TOML file and the console script. Nothing is imported from
`proxy`, so they test what ships.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TRIAGED = REPO / ".venv" / "bin" / "triaged"


def free_port() -> int:
    """A port the kernel just handed out on loopback (bind port 0, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_for_banner(port: int, timeout: float = 20.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Wait until something on `port` greets with 220 (SMTP ready)."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                s.settimeout(5)
                banner = s.recv(512)
                if banner.startswith(b"220"):
                    s.sendall(b"QUIT\r\n")
                    return
                last = RuntimeError(f"banner {banner!r}")
        except OSError as exc:
            last = exc
        time.sleep(0.05)
    raise TimeoutError(f"nothing greeted on 127.0.0.1:{port}: {last}")


def triaged_toml(
    port: int,
    upstream_url: str,
    workdir: Path,
    *,
    hostname: str = "triaged.test",
    log_level: str = "info",
    extra: str = "",
    sections: dict[str, str] | None = None,
) -> str:
    """A minimal config: one listener, the rules classifier, events to a file in workdir.

    `sections` adds lines inside a table: "server", "listener" (the first
    listener; a further `[[server.listeners]]` table may follow), "upstream",
    "classifier" (replaces `kind = "rules"`), "events".
    """
    s = sections or {}
    return f"""\
[server]
hostname = "{hostname}"
{s.get("server", "")}

[[server.listeners]]
address = "127.0.0.1:{port}"
{s.get("listener", "")}

[upstream]
url = "{upstream_url}"
{s.get("upstream", "")}

[classifier]
{s.get("classifier", 'kind = "rules"')}

[events]
jsonl_path = "{workdir / "events.jsonl"}"
spool_dir = "{workdir / "spool"}"
{s.get("events", "")}

[logging]
format = "json"
level = "{log_level}"
{extra}"""


class TriagedProcess:
    """`with TriagedProcess(upstream_url) as t:` ... `t.port`; restartable on the same port."""

    def __init__(
        self,
        upstream_url: str,
        *,
        port: int | None = None,
        workdir: Path | None = None,
        log_level: str = "info",
        extra_toml: str = "",
        python_args: tuple[str, ...] = (),
        sections: dict[str, str] | None = None,
    ) -> None:
        self.port = port or free_port()
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="triaged-run-")
        self.workdir = workdir or Path(self._tmp.name)  # type: ignore[union-attr]
        self.config_path = self.workdir / "triaged.toml"
        self.config_path.write_text(
            triaged_toml(
                self.port, upstream_url, self.workdir, log_level=log_level, extra=extra_toml, sections=sections
            )
        )
        self.log_path = self.workdir / "triaged.log"
        self._python_args = python_args
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        if self._python_args:
            # e.g. ("-m", "cProfile", "-o", FILE, "-m", "proxy"): same server, profiled.
            return [sys.executable, *self._python_args, "serve", "--config", str(self.config_path)]
        return [str(TRIAGED), "serve", "--config", str(self.config_path)]

    def start(self, timeout: float = 30.0) -> TriagedProcess:
        if not TRIAGED.exists():
            raise RuntimeError(f"{TRIAGED} missing: run `make test` (it creates .venv)")
        log = self.log_path.open("ab")
        try:
            self.proc = subprocess.Popen(
                self.command(), cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        finally:
            log.close()
        try:
            wait_for_banner(self.port, timeout, self.proc)
        except Exception:
            self.stop()
            raise RuntimeError(f"triaged did not start; log:\n{self.log_tail()}") from None
        return self

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (graceful drain), SIGKILL if it does not exit in time; the exit status."""
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return proc.returncode

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not running"
        return self.proc.pid

    def children(self) -> list[int]:
        """Child processes (the inference process when classifier.runner = "process")."""
        pids: list[int] = []
        try:
            for tid in os.listdir(f"/proc/{self.pid}/task"):
                with open(f"/proc/{self.pid}/task/{tid}/children") as f:
                    pids.extend(int(p) for p in f.read().split())
        except OSError:
            pass
        return pids

    def signal(self, sig: int) -> None:
        assert self.proc is not None, "not running"
        self.proc.send_signal(sig)

    def log_tail(self, limit: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-limit:]
        except OSError:
            return ""

    def close(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> TriagedProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def serve_toml(port: int, upstream: str, workdir: Path, model: Path) -> str:
    """Config for a `triaged serve` child with an ONNX model (the SIGHUP swap
    tests). One process: they follow one model swap in one log; the swap in
    every worker is tests/test_workers.py's."""
    return f"""\
[server]
hostname = "triaged.test"
workers = 1

[[server.listeners]]
address = "127.0.0.1:{port}"

[upstream]
url = "{upstream}"

[classifier]
kind = "onnx"
model_path = "{model}"
provider = "cpu"

[events]
jsonl_path = "{workdir / "events.jsonl"}"
spool_dir = "{workdir / "spool"}"

[logging]
format = "json"
level = "info"
"""
