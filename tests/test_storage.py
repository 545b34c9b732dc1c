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


# --- moderation.jsonl (docs/PROTOCOL.md section 10) ------------------------------------------

def test_moderation_requests_in_order_and_kept_across_a_restart(tmp_path):
    ban = store.ModRecord("ban", "Bob", "alice", None, "spam", 100.0)
    mute = store.ModRecord("mute", "Carol", "alice", 200.0, "", 100.0)
    fs, _ = storage.open_store(str(tmp_path))
    for request in (store.Moderate(1, ban), store.Moderate(2, mute), store.LoadSanctions(3, "bob"),
                    store.Moderate(4, store.ModRecord("unmute", "Carol", "alice", None, "", 300.0)),  # expired
                    store.Moderate(5, store.ModRecord("kick", "Dave", "alice", None, "", 300.0)),
                    store.ListSanctions(6)):
        fs.submit(request)
    done = fs.flush()
    assert done[:5] == [(1, store.ModerationStored(True)), (2, store.ModerationStored(True)),
                        (3, store.SanctionsLoaded(ban, None)), (4, store.ModerationStored(False)),
                        (5, store.ModerationStored(True))]
    assert sorted(done[5][1].records) == sorted([ban, mute])
    fs.close()
    with open(tmp_path / storage.MODERATION_FILE, "rb") as fh:
        assert [json.loads(line)["action"] for line in fh] == ["ban", "mute", "kick"]   # nothing for the no-op
    fs, _ = storage.open_store(str(tmp_path))
    fs.submit(store.Moderate(1, store.ModRecord("unban", "bob", "zed", None, "", 400.0)))
    fs.submit(store.LoadSanctions(2, "bob"))
    fs.submit(store.LoadSanctions(3, "carol"))
    assert fs.flush() == [(1, store.ModerationStored(True)), (2, store.SanctionsLoaded(None, None)),
                          (3, store.SanctionsLoaded(None, mute))]
    fs.close()


def test_moderation_file_torn_tail_is_cut_and_a_corrupt_line_stops_the_start(tmp_path):
    path = tmp_path / storage.MODERATION_FILE
    ban = store.ModRecord("ban", "Bob", "alice", None, "", 1.0)
    path.write_bytes((ban.to_json() + "\n").encode() + b'{"action":"ba')
    fs, _ = storage.open_store(str(tmp_path))
    fs.submit(store.LoadSanctions(1, "bob"))
    assert fs.flush() == [(1, store.SanctionsLoaded(ban, None))]
    fs.submit(store.Moderate(2, store.ModRecord("mute", "Bob", "alice", None, "", 2.0)))
    fs.flush()
    fs.close()
    assert len(path.read_bytes().splitlines()) == 2 and path.read_bytes().endswith(b"\n")
    path.write_bytes(b"garbage\n" + path.read_bytes())
    try:
        storage.open_store(str(tmp_path))
    except storage.StorageError as exc:
        assert "moderation.jsonl, line 1" in str(exc)
    else:
        raise AssertionError("a corrupt moderation line must stop the start")
