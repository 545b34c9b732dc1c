"""storage.FileStore as a store.Store: one typed result per request, in request order, no cluster."""

from __future__ import annotations

import json
import os

import passwords
import storage
import store


def account(name: str) -> passwords.Account:
    return passwords.new_account(name, b"password1", n=16)


def test_every_request_gets_its_typed_result_in_order(tmp_path):
    fs, keys = storage.open_store(str(tmp_path))
    try:
        alice = account("Alice")
        line = (json.dumps({"ts": "t", "type": "BM", "from": "Alice", "to": "*", "text": "hi"}) + "\n").encode()
        requests = [
            store.LoadAccount(1, "alice"),
            store.CreateAccount(2, alice),
            store.CreateAccount(3, account("ALICE")),
            store.LoadAccount(4, "alice"),
            store.AppendHistory(5, [(("Alice",), line)], "Alice", "BM"),
            store.ReadHistory(6, "Alice"),
            store.ClaimSession(7, "alice", "t"),
            store.GoOnline(8, "alice", "t", "{}"),
            store.Logout(0, "alice", "t"),
        ]
        for request in requests:
            fs.submit(request)
        assert fs.pending
        done = fs.flush()
        assert not fs.pending
        assert done == [
            (1, store.AccountLoaded(None)),
            (2, store.AccountCreated(True)),
            (3, store.AccountCreated(False)),
            (4, store.AccountLoaded(alice)),
            (5, store.Appended()),
            (6, store.HistoryRead([line[:-1].decode()])),
            (7, store.CLAIMED),
            (8, store.WentOnline(store.START)),
        ]
        assert os.path.exists(tmp_path / "Alice.chat")
        assert fs.node == "" and fs.events() == [] and fs.next_tick() is None
        assert keys.fingerprint == storage.load_server_keys(str(tmp_path)).fingerprint
    finally:
        fs.close()


def test_a_read_sees_the_appends_submitted_before_it(tmp_path):
    fs, _ = storage.open_store(str(tmp_path))
    try:
        first, second = b'{"n":1}\n', b'{"n":2}\n'
        fs.submit(store.AppendHistory(1, [(("bob",), first)], "bob", "BM"))
        fs.submit(store.ReadHistory(2, "bob"))
        fs.submit(store.AppendHistory(3, [(("bob",), second)], "bob", "BM"))
        assert fs.flush() == [(1, store.Appended()), (2, store.HistoryRead(['{"n":1}'])), (3, store.Appended())]
        fs.submit(store.ReadHistory(4, "bob", limit=1))
        [(cid, result)] = fs.flush()   # a store may read less than the whole history for a limit
        assert cid == 4 and result.lines[-1:] == ['{"n":2}']
    finally:
        fs.close()
