"""A private, throw-away Postfix instance for tests (`postfix -c DIR`).

It follows ../shared/TOOLING.md: its own config, queue and data directories in
a fresh directory, no chroot, no syslog (maillog_file written by postlogd),
listening on loopback only, relaying everything to one relayhost (the test's
sink). Callers add listeners and services as master.cf lines, exactly the lines
the README shows for the before-queue and after-queue set-ups.

Postfix drops privileges to the `postfix` user, so the instance directory must
be traversable by it: it lives in its own 0755 directory under /tmp, not under
pytest's 0700 tmp_path.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

from waiting import wait_for_lines

POSTFIX = shutil.which("postfix") or "/usr/sbin/postfix"
POSTQUEUE = shutil.which("postqueue") or "/usr/sbin/postqueue"
DAEMON_DIR = Path("/usr/lib/postfix/sbin")


def postfix_missing() -> str | None:
    """Why Postfix cannot run here (a skip reason), or None."""
    if not Path(POSTFIX).exists() or not (DAEMON_DIR / "smtpd").exists():
        return "postfix is not installed (.ci/run installs it from Debian)"
    if os.geteuid() != 0:
        return "a private postfix instance needs root (postfix -c DIR start)"
    return None


# The services Postfix itself needs, chroot column "n" everywhere (TOOLING.md),
# without Debian's port-25 listener and pipe transports.
BASE_MASTER_CF = """\
# service type  private unpriv  chroot  wakeup  maxproc command + args
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


class PostfixInstance:
    """`with PostfixInstance(relayhost_port=sink.port, master_cf=[...]) as pf:`."""

    def __init__(
        self,
        relayhost_port: int,
        *,
        master_cf: Iterable[str] = (),
        main_cf: Mapping[str, str] | None = None,
        hostname: str = "pf-test.localdomain",
    ) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="triaged-postfix-"))
        self.root.chmod(0o755)
        self.config_dir = self.root / "etc"
        self.queue_dir = self.root / "queue"
        self.data_dir = self.root / "data"
        self.maillog_path = self.root / "maillog"
        for d in (self.config_dir, self.queue_dir, self.data_dir):
            d.mkdir(mode=0o755)
        shutil.chown(self.data_dir, user="postfix")
        main = {
            "compatibility_level": "3.6",
            "config_directory": str(self.config_dir),
            "queue_directory": str(self.queue_dir),
            "data_directory": str(self.data_dir),
            "maillog_file": str(self.maillog_path),
            "maillog_file_prefixes": str(self.root),
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "myhostname": hostname,
            "mydestination": "",
            "local_recipient_maps": "",
            "local_transport": "error:no local delivery",
            "mynetworks": "127.0.0.0/8",
            "smtpd_relay_restrictions": "permit_mynetworks, reject",
            "relayhost": f"[127.0.0.1]:{relayhost_port}",
            "smtpd_peername_lookup": "no",
            "smtp_tls_security_level": "none",
            "smtpd_tls_security_level": "none",
            # The tests flush deferred mail themselves (postqueue -f); keep
            # Postfix from retrying on its own in the middle of a count.
            "queue_run_delay": "300s",
            "minimal_backoff_time": "300s",
            "maximal_backoff_time": "600s",
            "smtp_connect_timeout": "5s",
            "biff": "no",
            # Postmaster notices (e.g. "proxy filter unreachable") would land
            # in the sink and spoil exact message counts.
            "notify_classes": "",
            **(main_cf or {}),
        }
        (self.config_dir / "main.cf").write_text("".join(f"{k} = {v}\n" for k, v in main.items()))
        extra = "\n".join(master_cf)
        (self.config_dir / "master.cf").write_text(BASE_MASTER_CF + extra + "\n")
        self._started = False

    # -- life cycle ---------------------------------------------------------

    def _postfix(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [POSTFIX, "-c", str(self.config_dir), *args],
            capture_output=True, text=True, timeout=60, check=check,
        )

    def start(self) -> PostfixInstance:
        result = self._postfix("start", check=False)
        if result.returncode != 0:
            raise RuntimeError(f"postfix start failed:\n{result.stdout}{result.stderr}")
        self._started = True
        return self

    def master_pid(self) -> int | None:
        try:
            return int((self.queue_dir / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def stop(self) -> None:
        if not self._started:
            return
        pid = self.master_pid()
        self._postfix("stop", check=False)
        # `postfix stop` only signals the master; wait for it to be gone so the
        # next instance (or rmtree) does not race its children.
        deadline = time.monotonic() + 15
        while pid is not None and _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if pid is not None and _alive(pid):
            os.kill(pid, 9)
        self._started = False

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PostfixInstance:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- queue and log ------------------------------------------------------

    def queue(self) -> list[dict[str, object]]:
        """The queue as `postqueue -j` reports it (one dict per message)."""
        result = subprocess.run(
            [POSTQUEUE, "-c", str(self.config_dir), "-j"],
            capture_output=True, text=True, timeout=30, check=True,
        )
        return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]

    def flush(self) -> None:
        """`postqueue -f`: retry deferred mail now (and forget dead destinations)."""
        subprocess.run(
            [POSTQUEUE, "-c", str(self.config_dir), "-f"],
            capture_output=True, text=True, timeout=30, check=True,
        )

    def maillog(self) -> str:
        try:
            return self.maillog_path.read_text(errors="replace")
        except OSError:
            return ""

    def wait_for_log(self, pattern: str, count: int = 1, timeout: float = 30.0) -> list[str]:
        """Wait until `count` maillog lines match the regex; those lines."""
        return wait_for_lines(self.maillog, pattern, count, timeout, name="maillog")

    def wait_queue_empty(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while self.queue():
            if time.monotonic() > deadline:
                raise TimeoutError(f"queue not empty: {self.queue()}")
            time.sleep(0.1)


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for a reaper counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"
