"""The Dovecot recipe in config/dovecot/, run as shipped: a private Dovecot
(IMAP on a high port, its own config, Maildir under a temp dir) with
IMAPSieve, and imaplib moving stamped messages between folders. Each move
must reach the feedback store through the script service and
`triaged feedback`, with the label the folder means.

Needs root (a private `dovecot -c`) and Debian's dovecot-imapd and
dovecot-sieve (.ci/run installs them). The mail user is `nobody`; the script
service runs `triaged feedback` as root here (as the `triaged` user in the
recipe), because this machine's Python lives under /root.
"""

from __future__ import annotations

import imaplib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from classifier.learning.store import FeedbackStore

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "config" / "dovecot"
DOVECOT = shutil.which("dovecot") or "/usr/sbin/dovecot"
MAIL_USER = "nobody"


def _missing() -> str | None:
    if not Path(DOVECOT).exists():
        return "dovecot is not installed (.ci/run installs dovecot-imapd dovecot-sieve)"
    if not Path("/usr/lib/dovecot/modules/sieve/lib90_sieve_imapsieve_plugin.so").exists():
        return "dovecot-sieve is not installed"
    if os.geteuid() != 0:
        return "a private dovecot needs root"
    return None


pytestmark = pytest.mark.skipif(_missing() is not None, reason=str(_missing()))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


MAIN_CONF = """\
base_dir = {dir}/run
state_dir = {dir}/state
log_path = {dir}/log/dovecot.log
protocols = imap
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain
default_login_user = dovenull
default_internal_user = dovecot
mail_location = maildir:{dir}/mail/%u
passdb {{
  driver = static
  args = password=secret
}}
userdb {{
  driver = static
  args = uid={user} gid=nogroup home={dir}/mail/%u
}}
service imap-login {{
  inet_listener imap {{
    port = {port}
  }}
}}
service stats {{
  unix_listener stats-reader {{
    mode = 0666
  }}
  unix_listener stats-writer {{
    mode = 0666
  }}
}}
!include {dir}/90-triaged-imapsieve.conf
"""


class Dovecot:
    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="triaged-dovecot-"))
        self.dir.chmod(0o755)
        self.port = _free_port()
        self.store = self.dir / "store"
        for sub in ("run", "state", "log", "sieve", "bin"):
            (self.dir / sub).mkdir()
        (self.dir / "mail").mkdir()
        shutil.chown(self.dir / "mail", user=MAIL_USER, group="nogroup")
        # The recipe, with this instance's paths and users.
        conf = (RECIPE / "90-triaged-imapsieve.conf").read_text()
        conf = conf.replace("/etc/dovecot/sieve/", f"{self.dir}/sieve/")
        conf = conf.replace("/usr/local/lib/triaged/", f"{self.dir}/bin/")
        conf = conf.replace("user = triaged", "user = root").replace(
            "user = vmail", f"user = {MAIL_USER}"
        )
        (self.dir / "90-triaged-imapsieve.conf").write_text(conf)
        for name in ("triaged-feedback.sieve", "triaged-ham.sieve"):
            shutil.copy(RECIPE / name, self.dir / "sieve" / name)
        triaged_toml = self.dir / "triaged.toml"
        triaged_toml.write_text(
            f'[learning]\nstore_path = "{self.store}"\n'
            f'[classifier]\nmodel_path = "{ROOT / "models" / "default.onnx"}"\n'
        )
        script = (RECIPE / "triaged-feedback.sh").read_text()
        script = script.replace(
            "/usr/local/bin/triaged", f"env PYTHONPATH={ROOT} {sys.executable} -m proxy"
        ).replace("/etc/triaged/triaged.toml", str(triaged_toml))
        (self.dir / "bin" / "triaged-feedback.sh").write_text(script)
        (self.dir / "bin" / "triaged-feedback.sh").chmod(0o755)
        (self.dir / "dovecot.conf").write_text(
            MAIN_CONF.format(dir=self.dir, port=self.port, user=MAIL_USER)
        )

    def start(self) -> None:
        conf = str(self.dir / "dovecot.conf")
        for name in ("triaged-feedback.sieve", "triaged-ham.sieve"):
            # Compiled now: the mail user may not write the .svbin beside it.
            r = subprocess.run(
                ["sievec", "-c", conf, str(self.dir / "sieve" / name)],
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert r.returncode == 0, r.stderr
        subprocess.run([DOVECOT, "-c", conf], check=True, timeout=60)
        # Listening is not ready: until the auth process is up, the greeting
        # is "BYE Auth process broken". Ready is an OK greeting.
        deadline = time.monotonic() + 30
        while True:
            try:
                imaplib.IMAP4("127.0.0.1", self.port, timeout=5).logout()
                return
            except (OSError, imaplib.IMAP4.error):
                if time.monotonic() > deadline:
                    raise AssertionError(f"dovecot did not listen:\n{self.log()}") from None
                time.sleep(0.1)

    def log(self) -> str:
        p = self.dir / "log" / "dovecot.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def stop(self) -> None:
        pid_file = self.dir / "run" / "master.pid"
        if pid_file.exists():
            pid = int(pid_file.read_text().split()[0])
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.05)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def dovecot() -> Iterator[Dovecot]:
    d = Dovecot()
    try:
        d.start()
        yield d
    finally:
        d.stop()


def stamped(n: int, category: str, spam: bool = False) -> bytes:
    return (
        f"X-Triage-Category: {category}\r\nX-Triage-Score: 0.900\r\n"
        f"X-Triage-Spam: {'yes' if spam else 'no'}\r\nX-Triage-Model: default/1\r\n"
        f"From: Sender {n} <s{n}@example.org>\r\nTo: alice@example.org\r\n"
        f"Subject: message {n}\r\nMessage-ID: <dv{n}@example.org>\r\n\r\nbody {n}\r\n"
    ).encode()


def wait_labels(store: Path, want: dict[str, str], d: Dovecot) -> dict[str, str]:
    deadline = time.monotonic() + 60
    got: dict[str, str] = {}
    while time.monotonic() < deadline:
        if (store / "feedback.log").exists():
            got = {i.message_id: i.label for i in FeedbackStore(store).items()}
            if got == want:
                return got
        time.sleep(0.2)
    raise AssertionError(f"store has {got}, wanted {want}\n{d.log()[-3000:]}")


def test_moves_reach_the_store(dovecot: Dovecot) -> None:
    imap = imaplib.IMAP4("127.0.0.1", dovecot.port)
    imap.login("alice", "secret")
    for folder in ("Junk", "Promotions", "Updates", "Archive"):
        assert imap.create(folder)[0] == "OK"
    # Where triaged's stamps (and the user's filing rules) put them. APPEND
    # is not a move: the recipe listens to COPY/MOVE only.
    placed = [
        ("INBOX", stamped(1, "primary")),  # -> Promotions: correction
        ("Promotions", stamped(2, "promotions")),  # -> INBOX: correction to primary
        ("Junk", stamped(3, "primary", spam=True)),  # -> Archive: ham
        ("INBOX", stamped(4, "primary")),  # -> Junk: spam
        ("Junk", stamped(5, "updates", spam=True)),  # -> Updates: not ham, updates
    ]
    for folder, raw in placed:
        assert imap.append(folder, None, None, raw)[0] == "OK"
    time.sleep(0.5)
    assert not (dovecot.store / "feedback.log").exists()  # appends recorded nothing

    def move(src: str, subject: str, dst: str) -> None:
        imap.select(src)
        typ, data = imap.uid("SEARCH", "SUBJECT", f'"{subject}"')
        uids = data[0].split()
        assert typ == "OK" and len(uids) == 1, (src, subject, data)
        assert imap.uid("MOVE", uids[0].decode(), dst)[0] == "OK"

    move("INBOX", "message 1", "Promotions")
    move("Promotions", "message 2", "INBOX")
    move("Junk", "message 3", "Archive")
    move("INBOX", "message 4", "Junk")
    move("Junk", "message 5", "Updates")
    want = {
        "<dv1@example.org>": "promotions",
        "<dv2@example.org>": "primary",
        "<dv3@example.org>": "ham",
        "<dv4@example.org>": "spam",
        "<dv5@example.org>": "updates",
    }
    wait_labels(dovecot.store, want, dovecot)
    items = {i.message_id: i for i in FeedbackStore(dovecot.store).items()}
    assert {i.user for i in items.values()} == {"alice"}
    assert all(i.kind == "correction" for i in items.values())
    assert items["<dv3@example.org>"].decided == "spam"
    assert b"X-Triage-Category: primary" in items["<dv1@example.org>"].raw

    # The user changes their mind: message 1 back to INBOX replaces its label.
    move("Promotions", "message 1", "INBOX")
    want["<dv1@example.org>"] = "primary"
    wait_labels(dovecot.store, want, dovecot)
    items = {i.message_id: i for i in FeedbackStore(dovecot.store).items()}
    assert items["<dv1@example.org>"].kind == "confirmation"  # stamped primary, filed primary
    imap.logout()
    assert "Error" not in dovecot.log(), dovecot.log()[-3000:]
