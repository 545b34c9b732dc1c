"""The processes under test: chatserver.py, alone or as N nodes on one redis-server.

Owns starting them on free 127.0.0.1 ports, each with its own data directory in
one temporary directory (``StartedRoom``), waiting until they accept connections,
noticing one that died, and stopping them: SIGTERM to the nodes, SIGKILL after a
bounded wait, then Redis the same way. Every process started here also dies with
the load generator (PR_SET_PDEATHSIG), so a killed run leaves nothing behind.
The server is only ever run as a program, never imported.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pg3lib
import redislink
from loadgen_errors import BenchError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVER = os.path.join(ROOT, "chatserver.py")
DEFAULT_SEND_QUEUE = 16 << 20   # --send-queue of a started server with the limits off


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:
    """preexec_fn of every process started here: SIGKILL when the load generator dies
    (PR_SET_PDEATHSIG), so a load generator killed by a timeout leaves nothing running."""
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGKILL)   # 1 = PR_SET_PDEATHSIG


try:   # looked up in the parent: the forked child only calls it
    _PRCTL = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None
except (OSError, AttributeError):
    _PRCTL = None


class StartedServer:
    """chatserver.py in a subprocess on 127.0.0.1 with its own data directory (under ``directory``);
    with ``redis_url`` a node of a multi-node room (``--redis``)."""

    def __init__(self, args: argparse.Namespace, scrypt_n: int, directory: str, redis_url: str | None = None,
                 name: str = "server") -> None:
        self.args = args
        self.scrypt_n = scrypt_n
        self.name = name
        self.redis_url = redis_url
        self.data = os.path.join(directory, name)
        os.mkdir(self.data)
        self.room_key = os.path.join(directory, "room_server_key.pem")   # one key file for all nodes of a room
        self.log_path = os.path.join(directory, name + ".log")
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.command: list = []
        self.killed = False     # SIGKILLed on purpose (failover): its death is not an error
        # The limits off (load runs from one address), or the server's own (abuse: --limits production)
        self.limits_off = getattr(args, "limits", "off") == "off"
        self.extra: list = []   # arguments after --server-arg (a scenario's setup run)

    @property
    def label(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def _command(self) -> list:
        """The command line: loopback, WARNING log, the per-address, flood, registration-rate and
        login-time limits off (unless ``limits_off`` is False: then the server's own limits and send
        queue, unless --send-queue is given), the run's scrypt cost, then any --server-arg."""
        a = self.args
        if self.limits_off:
            queue = DEFAULT_SEND_QUEUE if a.send_queue is None else a.send_queue
            limits = ["--max-per-ip", "0", "--connect-rate", "0", "--flood-rate", "0", "--register-rate", "0",
                      "--bm-rate", "0", "--checks-per-ip", "0", "--login-timeout", "0", "--send-queue", str(queue)]
        else:
            limits = [] if a.send_queue is None else ["--send-queue", str(a.send_queue)]
        return [a.server_python, SERVER, str(self.port), "--host", "127.0.0.1", "--data", self.data,
                "--log-level", "WARNING", *limits, "--scrypt-n", str(self.scrypt_n),
                *(["--redis", self.redis_url, "--server-key", self.room_key] if self.redis_url else []),
                *a.server_arg, *self.extra]

    def start(self) -> None:
        """Start the process; ``wait_ready`` says when it accepts connections."""
        if self.redis_url and not os.path.exists(self.room_key):
            # Made here, once: nodes starting together would each make their own.
            pg3lib.KeyPair.generate().save(self.room_key)
        self.port = free_port()
        self.command = self._command()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         preexec_fn=_die_with_parent)

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        attempts = 1
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                if "cannot listen" in self.log_tail() and attempts < 3:
                    attempts += 1   # another process took the port between our probe and its bind
                    self.start()
                    continue
                raise BenchError(f"{self.name}: chatserver.py exited with status {self.proc.returncode}:\n"
                                 f"{self.log_tail()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise BenchError(f"{self.name}: chatserver.py did not accept connections within {timeout:.0f} s:\n"
                         f"{self.log_tail()}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL on purpose (failover); reaped by ``stop``."""
        self.killed = True
        if self.alive():
            assert self.proc is not None
            self.proc.kill()

    def log_tail(self, lines: int = 20) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as fh:
                return "".join(fh.readlines()[-lines:])
        except OSError:
            return ""

    def log_lines(self) -> list:
        """The server's WARNING/ERROR lines."""
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as fh:
                text = fh.read().splitlines()
        except OSError:
            return []
        return [line for line in text if " WARNING " in line or " ERROR " in line or "Traceback" in line]

    def terminate(self) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGTERM)

    def reap(self, until: float) -> int | None:
        """Wait for the exit until the monotonic time ``until``, then SIGKILL; the exit status."""
        if self.proc is None:
            return None
        try:
            self.proc.wait(max(0.0, until - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return self.proc.returncode




class StartedRedis:
    """redis-server on a free 127.0.0.1 port: AOF with fsync at every write (``always``: an
    acknowledged message survives a Redis crash), no RDB snapshots, in a temporary directory."""

    def __init__(self, executable: str, directory: str, fsync: str = "always") -> None:
        self.executable = executable
        self.fsync = fsync
        self.dir = os.path.join(directory, "redis")
        os.mkdir(self.dir)
        self.log_path = os.path.join(self.dir, "redis.log")
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.version = ""

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 10.0) -> None:
        try:
            out = subprocess.run([self.executable, "--version"], capture_output=True, text=True, timeout=10).stdout
            self.version = next((w[2:] for w in out.split() if w.startswith("v=")), out.strip())
        except (OSError, subprocess.TimeoutExpired):
            pass
        for _ in range(5):   # another process may take the free port before redis-server binds it
            self.port = free_port()
            self.proc = subprocess.Popen(
                [self.executable, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
                 "--appendonly", "yes", "--appendfsync", self.fsync, "--dir", self.dir, "--daemonize", "no",
                 "--logfile", self.log_path],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self.proc.poll() is None:
                if redislink.ping(self.port) == b"+PONG":
                    return
                time.sleep(0.02)
            self.reap(time.monotonic())
        raise BenchError(f"redis-server did not start:\n{self.log_tail()}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def reap(self, until: float) -> int | None:
        """SIGTERM, wait until the monotonic time ``until``, then SIGKILL; the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(max(0.0, until - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def log_tail(self, lines: int = 20) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as fh:
                return "".join(fh.readlines()[-lines:])
        except OSError:
            return ""


class StartedRoom:
    """What the load generator starts: one chatserver.py on its data directory (``nodes`` 0),
    or a redis-server and ``nodes`` chatserver.py nodes on it; all in one temporary directory."""

    def __init__(self, args: argparse.Namespace, scrypt_n: int, nodes: int) -> None:
        self.args = args
        executable = None
        if nodes:
            executable = shutil.which(args.redis_server) or (args.redis_server if os.path.isfile(args.redis_server)
                                                              else None)
            if executable is None:
                raise BenchError(f"{args.redis_server} not found: --nodes needs a redis-server "
                                 "(Debian: apt-get install -y redis-server)")
        self.dir = tempfile.mkdtemp(prefix="loadgen-", dir=args.tmpdir)
        self.redis: StartedRedis | None = None
        self.servers: list = []
        if executable:
            self.redis = StartedRedis(executable, self.dir, args.redis_fsync)
            self.servers = [StartedServer(args, scrypt_n, self.dir, None, f"node{i}") for i in range(nodes)]
        else:
            self.servers = [StartedServer(args, scrypt_n, self.dir)]

    def start(self) -> None:
        """Start Redis (waiting for PONG), then every server; ``wait_ready`` waits for them."""
        if self.redis is not None:
            self.redis.start()
            for s in self.servers:
                s.redis_url = self.redis.url
        for s in self.servers:
            s.start()

    def wait_ready(self) -> None:
        for s in self.servers:
            s.wait_ready()

    @property
    def pids(self) -> list:
        return [s.pid for s in self.servers]

    def describe(self) -> str:
        if self.redis is None:
            s = self.servers[0]
            return f"started chatserver.py on {s.label} (pid {s.pid}, scrypt N={s.scrypt_n})"
        nodes = ", ".join(f"{s.label} (pid {s.pid})" for s in self.servers)
        return (f"started {len(self.servers)} chatserver.py node(s) {nodes}, scrypt N={self.servers[0].scrypt_n}, "
                f"on redis-server {self.redis.version} 127.0.0.1:{self.redis.port} (pid {self.redis.pid}, "
                f"AOF {self.redis.fsync})")

    def info(self) -> dict:
        info = {"description": self.describe(), "pids": self.pids, "command": self.servers[0].command[1:]}
        if self.redis is not None:
            info.update({"nodes": [s.label for s in self.servers], "redis_pid": self.redis.pid,
                         "redis_version": self.redis.version, "redis_url": self.redis.url,
                         "redis_config": f"--save '' --appendonly yes --appendfsync {self.redis.fsync}"})
        return info

    def check(self) -> str | None:
        """What died that should not have (None: all well)."""
        for s in self.servers:
            if not s.killed and not s.alive():
                return f"{s.name} (chatserver.py) exited:\n{s.log_tail()}"
        if self.redis is not None and not self.redis.alive():
            return f"redis-server exited:\n{self.redis.log_tail()}"
        return None

    def log_summary(self) -> dict:
        """Counts of the servers' WARNING/ERROR lines and the first few of them."""
        bad: list = []
        for s in self.servers:
            prefix = f"{s.name}: " if len(self.servers) > 1 else ""
            bad += [prefix + line for line in s.log_lines()]
        return {"warning_lines": len(bad), "first": bad[:5]}

    def stop(self, timeout: float = 15.0) -> list:
        """SIGTERM every server at once, SIGKILL what is left after ``timeout``, then Redis
        (another 10 s at most). The servers' exit statuses (a killed one's is -9)."""
        for s in self.servers:
            s.terminate()
        until = time.monotonic() + timeout
        codes = [s.reap(until) for s in self.servers]
        if self.redis is not None:
            self.redis.reap(time.monotonic() + 10.0)
        return codes

    def cleanup(self) -> None:
        if self.args.keep_data:
            print(f"loadgen: server data and logs kept in {self.dir}", file=sys.stderr)
        else:
            shutil.rmtree(self.dir, ignore_errors=True)
