"""Start and stop the real chatserver.py in a subprocess on a free loopback port."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVER = os.path.join(ROOT, "chatserver.py")
_READY = re.compile(r"listening on [^ ]*:(\d+)")

# Tests register many accounts: a cheap scrypt cost keeps them fast. The
# production default (2**14) is exercised by its own tests.
TEST_SCRYPT_N = 1024

# CHAT_TEST_REDIS=1: the `server` and `make_server` fixtures of conftest.py run
# nodes in Redis mode (--redis, one redis-server per test module, emptied
# before each test); tests marked `filestore_only` are skipped then.
REDIS_ENV = "CHAT_TEST_REDIS"


def redis_mode() -> bool:
    """True when the fixtures' servers use the Redis store (CHAT_TEST_REDIS set, not 0)."""
    return os.environ.get(REDIS_ENV, "").strip() not in ("", "0")


class ServerProcess:
    """One chatserver.py process; ``port`` is known once ``start`` returns."""

    def __init__(self, data_dir: str, *extra: str, scrypt_n: int = TEST_SCRYPT_N) -> None:
        self.data_dir = data_dir
        self.extra = list(extra)
        self.scrypt_n = scrypt_n
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.log_path = ""
        self._runs = 0

    def command(self, port: int) -> list[str]:
        # Every test client comes from 127.0.0.1 (or a few others): the new-connection rate per
        # address is off unless a test sets it (test_limits.py tests it), as the last one given wins.
        return [sys.executable, SERVER, str(port), "--host", "127.0.0.1", "--data", self.data_dir,
                "--scrypt-n", str(self.scrypt_n), "--connect-rate", "0", *self.extra]

    def start(self, port: int = 0, timeout: float = 15.0) -> ServerProcess:
        """Start the server (port 0: a free one) and wait for its ready line."""
        self._runs += 1
        self.log_path = os.path.abspath(os.path.join(os.path.dirname(self.data_dir.rstrip("/")),
                                                     f"server-{id(self)}-{self._runs}.log"))
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.command(port), stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = _READY.search(self.log())
            if match:
                self.port = int(match.group(1))
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            time.sleep(0.02)
        self.kill()
        raise RuntimeError(f"server not ready after {timeout} s:\n{self.log()}")

    def log(self) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as fh:
                return fh.read()
        except FileNotFoundError:
            return ""

    def signal(self, sig: int) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM and wait; returns the exit status."""
        if self.proc is None:
            return 0
        self.signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def kill(self) -> None:
        """SIGKILL and reap."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def restart(self, same_port: bool = True) -> ServerProcess:
        """Stop (if running) with SIGKILL-free SIGTERM, then start on the same port."""
        if self.proc is not None and self.proc.poll() is None:
            self.stop()
        return self.start(self.port if same_port else 0)
