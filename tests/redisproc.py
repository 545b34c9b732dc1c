"""A real redis-server for tests: started on a free loopback port, AOF ``always``, in a tmp dir.

``RedisProcess(directory).start()`` runs ``redis-server --bind 127.0.0.1 --port P
--save '' --appendonly yes --appendfsync always --dir <directory>`` and returns
once ``PING`` answers ``PONG`` (not ``LOADING``). ``kill()`` (SIGKILL),
``stop()`` (SIGTERM), ``pause()``/``resume()`` (SIGSTOP/SIGCONT) and
``restart()`` (same port, same directory: the AOF is read back) act on it.

Fixtures (import them into a test module: ``from redisproc import redis_server``):
``redis_server`` (one per test), ``shared_redis`` (one per module, emptied
with FLUSHALL before each use) and ``make_redis`` (a factory). A missing
``redis-server`` fails the test with the command that installs it: the Redis
tests must run in CI, never be skipped silently.

TLS: ``RedisProcess(directory, tls=files)`` also listens on ``tls_port``
(``--tls-port``, with ``files.cert``/``files.key``, clients need no
certificate unless ``tls_auth_clients`` says so); the plain port stays, on
loopback, for readiness checks and FLUSHALL. ``password=`` adds
``--requirepass``. ``make_tls_files(directory)`` makes a throwaway CA and a
server certificate for 127.0.0.1 and localhost with ``openssl`` (fixtures:
``tls_files``, one set per module, and ``tls_redis``, a TLS redis-server of
the test's own); ``rediss_url()`` is the URL that trusts that CA.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from typing import NamedTuple
from urllib.parse import quote

import pytest

import redislink

REDIS_SERVER = "redis-server"
INSTALL_HINT = ("redis-server is not on PATH: install it (Debian: apt-get install -y redis-server; "
                ".ci/run does this) - the Redis tests must not be skipped")


def require_redis_server() -> str:
    """The redis-server executable; fails the calling test if there is none."""
    path = shutil.which(REDIS_SERVER)
    if path is None:
        pytest.fail(INSTALL_HINT, pytrace=False)
    return path


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


ping = redislink.ping


class TLSFiles(NamedTuple):
    """A throwaway CA and a certificate it signed (PEM files)."""

    ca: str        # the CA certificate
    cert: str      # a certificate for 127.0.0.1 and localhost, signed by ca
    key: str       # its private key


def _openssl(*args: str, cwd: str) -> None:
    path = shutil.which("openssl")
    if path is None:
        pytest.fail("openssl is not on PATH: install it (Debian: apt-get install -y openssl) - "
                    "the rediss:// tests need it to make a throwaway CA", pytrace=False)
    subprocess.run([path, *args], cwd=cwd, check=True, timeout=30,
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def make_tls_files(directory: str, name: str = "test",
                   names: str = "IP:127.0.0.1,DNS:localhost") -> TLSFiles:
    """A new CA (``<name>-ca.pem``) and a server/client certificate it signed for names
    (a subjectAltName value), in directory."""
    os.makedirs(directory, exist_ok=True)
    ca, ca_key = f"{name}-ca.pem", f"{name}-ca.key"
    cert, key, csr, ext = f"{name}-server.pem", f"{name}-server.key", f"{name}-server.csr", f"{name}-ext.cnf"
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl("req", "-x509", *ec, "-keyout", ca_key, "-out", ca, "-days", "2", "-subj", f"/CN={name} test CA",
             cwd=directory)
    _openssl("req", "-new", *ec, "-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1", cwd=directory)
    with open(os.path.join(directory, ext), "w", encoding="ascii") as fh:
        fh.write(f"subjectAltName={names}\nbasicConstraints=CA:FALSE\n"
                 "extendedKeyUsage=serverAuth,clientAuth\n")
    _openssl("x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-out", cert,
             "-days", "2", "-extfile", ext, cwd=directory)
    return TLSFiles(*(os.path.join(directory, f) for f in (ca, cert, key)))


class RedisProcess:
    """One redis-server process; ``port`` and ``url`` are known once ``start`` returns."""

    def __init__(self, directory: str, port: int = 0, *, tls: TLSFiles | None = None,
                 password: str | None = None, tls_auth_clients: str = "no") -> None:
        self.directory = directory
        self.port = port
        self.tls = tls
        self.tls_port = 0
        self.password = password
        self.tls_auth_clients = tls_auth_clients
        self.proc: subprocess.Popen | None = None
        self.log_path = os.path.join(directory, "redis.log")
        self.paused = False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def rediss_url(self, db: int | None = None, password: str | None = None, ca: str | None = None,
                   host: str = "127.0.0.1", **options: str) -> str:
        """The rediss:// URL of the TLS port, trusting ``ca`` (default: this server's CA)."""
        assert self.tls is not None and self.tls_port
        auth = f":{quote(password, safe='')}@" if password is not None else ""
        query = "&".join(f"{name}={quote(value, safe='/')}"
                         for name, value in {"ca": ca or self.tls.ca, **options}.items())
        return f"rediss://{auth}{host}:{self.tls_port}/{'' if db is None else db}?{query}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def command(self) -> list[str]:
        return [require_redis_server(), "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
                "--appendonly", "yes", "--appendfsync", "always", "--dir", self.directory,
                "--daemonize", "no", "--logfile", self.log_path, *self._extra()]

    def _extra(self) -> list[str]:
        extra = []
        if self.password is not None:
            extra += ["--requirepass", self.password]
        if self.tls is not None:
            extra += ["--tls-port", str(self.tls_port), "--tls-cert-file", self.tls.cert,
                      "--tls-key-file", self.tls.key, "--tls-ca-cert-file", self.tls.ca,
                      "--tls-auth-clients", self.tls_auth_clients]
        return extra

    def start(self, timeout: float = 10.0) -> RedisProcess:
        """Start (a free port unless one is set) and wait until PING answers PONG."""
        os.makedirs(self.directory, exist_ok=True)
        fixed = bool(self.port)
        for _ in range(1 if fixed else 5):
            if not fixed:
                self.port = free_port()
            if self.tls is not None and not (fixed and self.tls_port):
                self.tls_port = free_port()
            if self._launch(timeout):
                return self
        raise RuntimeError(f"redis-server did not start on port {self.port}:\n{self.log()}")

    def _launch(self, timeout: float) -> bool:
        self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.STDOUT)
        self.paused = False
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False     # e.g. the port was taken between free_port() and now
            answer = ping(self.port)
            if answer == b"+PONG" or (self.password is not None and answer.startswith(b"-NOAUTH")):
                return True
            time.sleep(0.01)
        self.kill()
        return False

    def restart(self, timeout: float = 10.0) -> RedisProcess:
        """Start again on the same port and directory (after kill or stop): the AOF is replayed."""
        if self.proc is not None and self.proc.poll() is None:
            self.kill()
        if not self._launch(timeout):
            raise RuntimeError(f"redis-server did not restart on port {self.port}:\n{self.log()}")
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(sig)

    def pause(self) -> None:
        """SIGSTOP: Redis keeps its connections but answers nothing."""
        self.signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        """SIGCONT after ``pause``."""
        self.signal(signal.SIGCONT)
        self.paused = False

    def kill(self) -> None:
        """SIGKILL and reap (works on a paused process too)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self.paused = False

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM (continuing a paused process first) and wait; returns the exit status."""
        if self.proc is None:
            return 0
        if self.paused:
            self.resume()
        self.signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def log(self) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as fh:
                return fh.read()[-4000:]
        except FileNotFoundError:
            return ""


@pytest.fixture
def make_redis(tmp_path):
    """make_redis(name="redis") -> a started RedisProcess in tmp_path/name; all are killed after the test."""
    started: list[RedisProcess] = []
    require_redis_server()

    def make(name: str = "redis") -> RedisProcess:
        proc = RedisProcess(str(tmp_path / f"{name}{len(started)}"))
        started.append(proc)
        return proc.start()

    yield make
    for proc in started:
        proc.kill()


@pytest.fixture
def redis_server(make_redis) -> RedisProcess:
    """A started redis-server of this test's own."""
    return make_redis()


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory) -> TLSFiles:
    """A throwaway CA and a server certificate for 127.0.0.1/localhost, shared by the module."""
    return make_tls_files(str(tmp_path_factory.mktemp("tls")))


@pytest.fixture
def tls_redis(tmp_path, tls_files) -> RedisProcess:
    """A redis-server of this test's own with a TLS port (``tls_port``, ``rediss_url()``)."""
    require_redis_server()
    proc = RedisProcess(str(tmp_path / "tls-redis"), tls=tls_files)
    try:
        yield proc.start()
    finally:
        proc.kill()


@pytest.fixture(scope="module")
def _module_redis(tmp_path_factory):
    require_redis_server()
    proc = RedisProcess(str(tmp_path_factory.mktemp("redis"))).start()
    yield proc
    proc.kill()


@pytest.fixture
def shared_redis(_module_redis) -> RedisProcess:
    """One redis-server for the whole module, emptied (FLUSHALL, SCRIPT FLUSH) before each test."""
    if not _module_redis.alive():
        _module_redis.restart()
    flushall(_module_redis.port)
    return _module_redis


def flushall(port: int) -> None:
    """FLUSHALL and SCRIPT FLUSH on a fresh connection; asserts both answer +OK."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"*1\r\n$8\r\nFLUSHALL\r\n*2\r\n$6\r\nSCRIPT\r\n$5\r\nFLUSH\r\n")
        data = b""
        while data.count(b"\r\n") < 2:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    assert data == b"+OK\r\n+OK\r\n", data
