"""Shared fixtures: RSA key pairs (made once per run) and a real server process.

With CHAT_TEST_REDIS=1 the `server` and `make_server` fixtures start nodes in
Redis mode (``--redis``) on one redis-server per test module, emptied before
each test, and tests marked ``filestore_only`` are skipped.
"""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pg3lib  # noqa: E402
from serverproc import ServerProcess, redis_mode  # noqa: E402
from wire import WireClient  # noqa: E402

pytest_plugins = ("redisproc",)   # real redis-server fixtures, for every test module

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


def pytest_collection_modifyitems(config, items):
    if not redis_mode():
        return
    skip = pytest.mark.skip(reason="about the file store only (CHAT_TEST_REDIS=1 runs the Redis store)")
    for item in items:
        if item.get_closest_marker("filestore_only"):
            item.add_marker(skip)


@pytest.fixture(scope="module")
def _store_redis(tmp_path_factory):
    """Redis mode only: one redis-server (AOF always) for the module's servers."""
    from redisproc import RedisProcess

    proc = RedisProcess(str(tmp_path_factory.mktemp("store-redis"))).start()
    yield proc
    proc.kill()


@pytest.fixture
def store_args(request) -> tuple[str, ...]:
    """The server arguments that pick the store: none (the data directory), or with
    CHAT_TEST_REDIS=1 ``--redis URL`` of the module's Redis, emptied once per test."""
    if not redis_mode():
        return ()
    redis = request.getfixturevalue("_store_redis")
    if not redis.alive():
        redis.restart()
    from redisproc import flushall
    flushall(redis.port)
    # The nodes of a room share one key file: Redis holds only its public key.
    return ("--redis", redis.url + "/0", "--server-key", os.path.join(redis.directory, "room_server_key.pem"))


@pytest.fixture
def server(tmp_path, store_args):
    """A started server on a free loopback port with an empty data directory (and an empty
    Redis in Redis mode)."""
    data = tmp_path / "data"
    data.mkdir()
    proc = ServerProcess(str(data), *store_args).start()
    yield proc
    proc.kill()


@pytest.fixture
def make_server(tmp_path, store_args):
    """make_server(*extra_args, data=None) -> a started ServerProcess; all are killed after.
    In Redis mode all of a test's servers share one (emptied) Redis."""
    started: list[ServerProcess] = []

    def make(*extra: str, data: str | None = None, scrypt_n: int | None = None) -> ServerProcess:
        if data is None:
            data = str(tmp_path / f"data{len(started)}")
            os.makedirs(data, exist_ok=True)
        kwargs = {} if scrypt_n is None else {"scrypt_n": scrypt_n}
        proc = ServerProcess(data, *store_args, *extra, **kwargs).start()
        started.append(proc)
        return proc

    yield make
    for proc in started:
        proc.kill()


@pytest.fixture
def connect(server):
    """connect() -> a WireClient to the `server` fixture; all are closed after."""
    clients: list[WireClient] = []

    def make(port: int | None = None, **options) -> WireClient:
        client = WireClient(server.port if port is None else port, **options)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()
