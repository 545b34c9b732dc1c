"""Shared fixtures: RSA key pairs (made once per run) and a real server process."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pg3lib  # noqa: E402
from serverproc import ServerProcess  # noqa: E402
from wire import WireClient  # noqa: E402

_KEY_POOL: list[pg3lib.KeyPair] = []


def key_pair(index: int) -> pg3lib.KeyPair:
    """The index-th test key pair; generated on first use, shared by the whole run."""
    while len(_KEY_POOL) <= index:
        _KEY_POOL.append(pg3lib.KeyPair.generate())
    return _KEY_POOL[index]


@pytest.fixture
def keys():
    """keys(i) -> the i-th shared test key pair."""
    return key_pair


@pytest.fixture
def server(tmp_path):
    """A started server on a free loopback port with an empty data directory."""
    data = tmp_path / "data"
    data.mkdir()
    proc = ServerProcess(str(data)).start()
    yield proc
    proc.kill()


@pytest.fixture
def make_server(tmp_path):
    """make_server(*extra_args, data=None) -> a started ServerProcess; all are killed after."""
    started: list[ServerProcess] = []

    def make(*extra: str, data: str | None = None, scrypt_n: int | None = None) -> ServerProcess:
        if data is None:
            data = str(tmp_path / f"data{len(started)}")
            os.makedirs(data, exist_ok=True)
        kwargs = {} if scrypt_n is None else {"scrypt_n": scrypt_n}
        proc = ServerProcess(data, *extra, **kwargs).start()
        started.append(proc)
        return proc

    yield make
    for proc in started:
        proc.kill()


@pytest.fixture
def connect(server):
    """connect() -> a WireClient to the `server` fixture; all are closed after."""
    clients: list[WireClient] = []

    def make(port: int | None = None) -> WireClient:
        client = WireClient(server.port if port is None else port)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()
