"""A private, throw-away Exim 4 daemon for tests (`exim4 -C CONF -bd`).

Debian's exim4-daemon-light would replace Postfix as the system MTA, so
.ci/run unpacks its binary beside Postfix instead (../shared/TOOLING.md):
/usr/sbin/exim4 plus the compiled-in user Debian-exim. Exim re-executes
itself for deliveries and runs transports as that user, so the instance
directory is 0755 under /tmp and its spool and log belong to Debian-exim.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from waiting import wait_for_lines

EXIM = "/usr/sbin/exim4"
EXIM_USER = "Debian-exim"


def exim_missing() -> str | None:
    """Why Exim cannot run here (a skip reason), or None."""
    if not Path(EXIM).exists():
        return "exim4 is not installed (.ci/run unpacks exim4-daemon-light beside Postfix)"
    try:
        pwd.getpwnam(EXIM_USER)
    except KeyError:
        return f"user {EXIM_USER} missing (.ci/run creates it)"
    if os.geteuid() != 0:
        return "a private exim daemon with -C needs root"
    return None


class EximInstance:
    """`with EximInstance(config_text) as exim:`; the text's {dir} is the instance directory."""

    def __init__(self, config: str) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="triaged-exim-"))
        self.root.chmod(0o755)
        self.spool = self.root / "spool"
        self.log_dir = self.root / "log"
        for d in (self.spool, self.log_dir):
            d.mkdir(mode=0o750)
            shutil.chown(d, user=EXIM_USER, group=EXIM_USER)
        self.pid_file = self.root / "exim.pid"
        self.config_path = self.root / "exim.conf"
        self.config_path.write_text(config.replace("{dir}", str(self.root)))
        self.proc: subprocess.Popen[bytes] | None = None

    def exim(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [EXIM, "-C", str(self.config_path), *args],
            capture_output=True, text=True, timeout=60, check=check,
        )

    def start(self) -> EximInstance:
        check = self.exim("-bV", check=False)
        if check.returncode != 0:
            raise RuntimeError(f"exim config check failed:\n{check.stdout}{check.stderr}")
        # -bdf: daemon in the foreground (its PID is ours to stop); -q2s:
        # queue runs every 2 s pick up deferred mail promptly.
        self.proc = subprocess.Popen(
            [EXIM, "-C", str(self.config_path), "-bdf", "-q2s"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        return self

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> EximInstance:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def flush(self) -> None:
        """`exim -qff`: deliver everything queued now, retry times or not."""
        self.exim("-qff")

    def queue_count(self) -> int:
        return int(self.exim("-bpc").stdout.strip() or 0)

    def mainlog(self) -> str:
        try:
            return (self.log_dir / "mainlog").read_text(errors="replace")
        except OSError:
            return ""

    def wait_for_log(self, pattern: str, count: int = 1, timeout: float = 30.0) -> list[str]:
        """Wait until `count` mainlog lines match the regex; those lines."""
        return wait_for_lines(self.mainlog, pattern, count, timeout, name="mainlog")

    def wait_queue_empty(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while self.queue_count():
            if time.monotonic() > deadline:
                raise TimeoutError(f"exim queue not empty:\n{self.exim('-bp').stdout}")
            time.sleep(0.2)
