"""Issue 6, faults: SIGKILL, torn data files, corrupt accounts, failing history writes, logs.

Nothing the server acknowledged may be lost when it dies, every data file
survives a torn tail, a corrupt account record stops the server loudly, a
history write that fails is an error for its sender only, and the log never
carries a secret or a forged line.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import subprocess
import sys
import threading
import time

import pytest

import passwords
import pg3lib
import storage
from serverproc import SERVER, ServerProcess
from wire import WireClient, pm2_send

PASSWORD = "correct horse"


def log_in(port: int, keys, names, key_index: int = 0) -> list[WireClient]:
    clients = []
    for i, name in enumerate(names):
        c = WireClient(port)
        c.login(name, PASSWORD + name, keys(key_index + i))
        clients.append(c)
    for i, c in enumerate(clients):
        for other in names[i + 1:]:
            c.wait_data("PRESENCE", username=other, online=True)
    return clients


def sealed_pm(c: WireClient, target: str, text: str) -> tuple[dict, str, str]:
    """PM target; returns (SEND reply, ciphertext, self_copy)."""
    reply = c.request({"op": "PM"})
    assert reply["ok"], reply
    reply = c.request({"op": "TARGET", "username": target})
    assert reply["ok"], reply
    their_key = pg3lib.PublicKey.from_key_form(reply["public_key"])
    ciphertext = their_key.seal(text.encode()).decode("ascii")
    self_copy = c.keys.public.seal(text.encode()).decode("ascii")
    reply = c.request(pm2_send(c.keys, c.username, reply["username"], ciphertext, self_copy))
    return reply, ciphertext, self_copy


def history_on_disk(data_dir: str, name: str) -> list[dict]:
    """A user's history as the data directory holds it (room log and ``<name>.chat``), parsed."""
    return [json.loads(text) for text in storage.read_history(data_dir, name)]


# --- SIGKILL at random moments -------------------------------------------------------------------

def test_sigkill_at_random_moments_loses_nothing_acknowledged(make_server, keys):
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    print(f"\nSIGKILL test seed {seed}")
    server = make_server("--flood-rate", "0", "--bm-rate", "0", "--register-rate", "0")
    names = ["ann", "ben", "cat", "dan"]
    acked_bm: list[tuple[str, str]] = []              # (sender, text)
    acked_pm: list[tuple[str, str, str, str]] = []    # (sender, target, ciphertext, self_copy)
    registered: list[tuple[str, str]] = []            # (name, password)
    lock = threading.Lock()
    problems: list[str] = []

    for rnd in range(3):
        clients = log_in(server.port, keys, names)
        killed = threading.Event()

        def chat(i: int, c: WireClient, rnd: int = rnd, killed: threading.Event = killed) -> None:
            target = names[(i + 1) % len(names)]
            n = 0
            try:
                while True:
                    text = f"{c.username}-{rnd}-{n}"
                    reply = c.request({"op": "BM"})
                    if reply["ok"]:
                        reply = c.request({"op": "SEND", "text": text})
                        if reply["ok"]:
                            with lock:
                                acked_bm.append((c.username, text))
                            if reply["recipients"] != 3 and not killed.is_set():
                                problems.append(f"BM {text} reached {reply['recipients']}, not 3")
                    reply, ciphertext, self_copy = sealed_pm(c, target, text)
                    if reply["ok"]:
                        with lock:
                            acked_pm.append((c.username, target, ciphertext, self_copy))
                    n += 1
            except (EOFError, OSError, TimeoutError):
                pass
            except Exception as exc:  # anything else before the kill is a server fault
                if not killed.is_set():
                    problems.append(f"{c.username}: {exc!r}")

        def register(rnd: int = rnd) -> None:
            n = 0
            try:
                while n < 60:
                    c = WireClient(server.port)
                    name, password = f"new{rnd}x{n}", f"password {rnd} {n}"
                    c.login_start(name)
                    if c.password(password)["ok"]:
                        with lock:
                            registered.append((name, password))
                    c.close()
                    n += 1
                    time.sleep(0.005)
            except (EOFError, OSError, TimeoutError, AssertionError, KeyError):
                pass

        threads = [threading.Thread(target=chat, args=(i, c), daemon=True) for i, c in enumerate(clients)]
        threads.append(threading.Thread(target=register, daemon=True))
        for thread in threads:
            thread.start()
        time.sleep(rng.uniform(0.3, 1.2))
        killed.set()
        server.kill()
        for thread in threads:
            thread.join(15)
        for c in clients:
            c.close()
        assert not problems, problems
        server.start(server.port)

        # every acknowledged message is in the history files of its sender and receivers
        files = {name: history_on_disk(server.data_dir, name) for name in names}
        bms = {name: {(e["from"], e.get("text")) for e in entries if e["type"] == "BM"}
               for name, entries in files.items()}
        pms = {name: {(e["from"], e["to"], e.get("ciphertext")) for e in entries if e["type"] == "PM"}
               for name, entries in files.items()}
        for sender, text in acked_bm:
            for name in names:
                assert (sender, text) in bms[name], f"acknowledged BM {text!r} missing from {name}.chat"
        for sender, target, ciphertext, self_copy in acked_pm:
            assert (sender, target, self_copy) in pms[sender], f"acknowledged PM missing from {sender}.chat"
            assert (sender, target, ciphertext) in pms[target], f"acknowledged PM missing from {target}.chat"
        # every account that got PASSWORD ok logs in
        for name, password in registered:
            c = WireClient(server.port)
            assert c.login_start(name)["new_user"] is False, f"acknowledged account {name} lost"
            assert c.password(password)["ok"], name
            c.close()
    print(f"acknowledged: {len(acked_bm)} BMs, {len(acked_pm)} PMs, {len(registered)} accounts")
    assert len(acked_bm) > 30 and len(acked_pm) > 30 and registered


# --- torn tails ------------------------------------------------------------------------------------

def _account_lines(count: int) -> tuple[list[passwords.Account], list[bytes]]:
    accounts = [passwords.new_account(f"User{i}", f"password {i}".encode(), n=16) for i in range(count)]
    return accounts, [(a.to_json() + "\n").encode() for a in accounts]


def _complete_before(lines: list[bytes], cut: int) -> int:
    """How many of lines are whole within the first cut bytes."""
    end, whole = 0, 0
    for line in lines:
        end += len(line)
        if end <= cut:
            whole += 1
    return whole


def test_accounts_file_torn_at_every_offset_keeps_every_complete_line(tmp_path, caplog):
    accounts, lines = _account_lines(3)
    data = b"".join(lines)
    path = str(tmp_path / "accounts.jsonl")
    for cut in range(len(data) + 1):
        with open(path, "wb") as fh:
            fh.write(data[:cut])
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="chat.storage"):
            store = storage.AccountStore(path)
        whole = _complete_before(lines, cut)
        assert len(store) == whole, cut
        for i, account in enumerate(accounts):
            assert store.get(account.username.lower()) == (account if i < whole else None), cut
        torn = cut not in (0, *(sum(len(x) for x in lines[:k]) for k in range(1, 4)))
        assert any("torn" in r.getMessage() for r in caplog.records) == torn, cut
        store.close()


def test_accounts_file_torn_at_every_offset_stays_usable(tmp_path, monkeypatch, caplog):
    """After a torn tail is dropped, the store takes new accounts and loads again, torn
    fragment and all: a crash mid-registration must not make the next-but-one start fail."""
    monkeypatch.setattr(storage.os, "fsync", lambda fd: None)   # speed: 600 files, durability not tested here
    caplog.set_level(logging.ERROR, logger="chat.storage")      # 400 torn-line warnings are expected
    accounts, lines = _account_lines(3)
    data = b"".join(lines)
    late = passwords.new_account("Late", b"password late", n=16)
    path = str(tmp_path / "accounts.jsonl")
    failures = []
    for cut in range(len(data) + 1):
        with open(path, "wb") as fh:
            fh.write(data[:cut])
        whole = _complete_before(lines, cut)
        storage.AccountStore(path).close()        # one start that changes nothing
        try:
            store = storage.AccountStore(path)    # and another
            assert store.add(late)
            store.close()
            store = storage.AccountStore(path)
        except storage.StorageError as exc:
            failures.append(f"cut {cut}: a later load fails: {exc}")
            continue
        names = sorted([a.username for a in accounts[:whole]] + ["Late"])
        loaded = sorted(a.username for a in accounts + [late] if store.get(a.username.lower()) is not None)
        if loaded != names:
            failures.append(f"cut {cut}: first load had {whole} accounts, a later one {loaded} (torn line came back)")
        store.close()
    assert not failures, f"{len(failures)} of {len(data) + 1} cuts fail, e.g.\n" + "\n".join(
        failures[:1] + [f for f in failures if "came back" in f][:1])


@pytest.fixture
def registered_data(tmp_path, keys):
    """A data directory with three accounts (alice, bob, carol) and some history, server stopped."""
    data = tmp_path / "seed"
    data.mkdir()
    server = ServerProcess(str(data), "--flood-rate", "0", "--bm-rate", "0").start()
    try:
        clients = log_in(server.port, keys, ["alice", "bob", "carol"])
        for text in ("one", "två ☃", "three"):
            assert clients[0].bm(text)["ok"]
        for c in clients:
            c.exit()
        assert server.stop() == 0
    finally:
        server.kill()
    return str(data)


def _start_on_copy(seed: str, target: str, *args: str) -> ServerProcess:
    shutil.copytree(seed, target)
    return ServerProcess(target, "--flood-rate", "0", "--bm-rate", "0", *args)


def test_server_starts_on_a_torn_accounts_file(registered_data, tmp_path):
    path = os.path.join(registered_data, "accounts.jsonl")
    data = open(path, "rb").read()
    lines = data.splitlines(keepends=True)
    assert len(lines) == 3
    ends = [sum(len(x) for x in lines[:k]) for k in range(1, 4)]
    rng = random.Random(6)
    cuts = sorted({0, 1, ends[0], ends[0] + 1, ends[1] - 1, rng.randrange(ends[1] + 1, ends[2] - 1), ends[2] - 1})
    for cut in cuts:
        target = str(tmp_path / f"cut{cut}")
        server = _start_on_copy(registered_data, target)
        with open(os.path.join(target, "accounts.jsonl"), "r+b") as fh:
            fh.truncate(cut)
        try:
            server.start()
            whole = _complete_before(lines, cut)
            if cut not in (0, *ends):
                assert "torn" in server.log(), cut
            for i, name in enumerate(["alice", "bob", "carol"]):
                c = WireClient(server.port)
                reply = c.login_start(name)
                assert reply["new_user"] is (i >= whole), (cut, name)
                if i < whole:
                    assert c.password(PASSWORD + name)["ok"]
                c.close()
            c = WireClient(server.port)
            c.login_start("latecomer")
            assert c.password(PASSWORD)["ok"]
            c.close()
            assert server.stop() == 0
            server.start()       # a second start on the repaired file
            for name in ["alice", "bob", "carol"][:whole] + ["latecomer"]:
                c = WireClient(server.port)
                assert c.login_start(name)["new_user"] is False, (cut, name)
                c.close()
        except RuntimeError as exc:
            pytest.fail(f"accounts file cut at byte {cut} of {len(data)}: the server did not start: "
                        f"{str(exc).splitlines()[-1]}")
        finally:
            server.kill()


def _room_segment(data_dir: str) -> str:
    return os.path.join(data_dir, max(n for n in os.listdir(data_dir) if n.startswith("room.") and n.endswith(".log")))


def test_room_log_and_history_torn_by_a_sigkill(make_server, keys):
    """A crash that tears the last line of the room log and of a user's file: CH skips both, new
    messages go after them, and the torn lines never come back (the room log torn at every offset is
    tests/test_storage.py)."""
    server = make_server("--flood-rate", "0", "--bm-rate", "0")
    ann, bob = log_in(server.port, keys, ["ann", "bob"])
    assert ann.bm("one")["ok"] and bob.bm("two")["ok"]
    reply, _, self_copy = sealed_pm(ann, "bob", "private")
    assert reply["ok"]
    server.kill()
    with open(_room_segment(server.data_dir), "ab") as fh:
        fh.write(b'{"ts":"2026-11-24T15:04:05.123Z","type":"BM","from":"ann","to":"*","te')
    with open(os.path.join(server.data_dir, "bob.chat"), "ab") as fh:
        fh.write(b'{"kind":"pm","at":12,"entry":{"ts":"2026')
    server.start(server.port)
    ann, bob = log_in(server.port, keys, ["ann", "bob"])
    assert "torn" in server.log()
    assert [e.get("text") or e["ciphertext"] for e in ann.history()] == ["one", "two", self_copy]
    assert [e["type"] for e in bob.history()] == ["BM", "BM", "PM"]
    assert ann.bm("after the tear")["recipients"] == 1
    for _ in range(2):
        assert [e.get("text") for e in bob.history()] == ["one", "two", None, "after the tear"]
        assert [e.get("text") for e in ann.history()] == ["one", "two", None, "after the tear"]
        server.restart()
        ann, bob = log_in(server.port, keys, ["ann", "bob"])


def test_a_data_directory_of_the_per_recipient_layout_keeps_working(make_server, keys):
    """Histories written by the per-recipient layout (every BM in every recipient's file) are read as
    they are, before what is stored from then on; nothing is rewritten or lost."""
    server = make_server("--flood-rate", "0", "--bm-rate", "0")
    for c in log_in(server.port, keys, ["ann", "bob"]):
        c.exit()
    assert server.stop() == 0
    for name in os.listdir(server.data_dir):     # as an older version left it: no room log
        if name.startswith("room."):
            os.unlink(os.path.join(server.data_dir, name))
    old = [{"ts": "2026-11-20T10:00:00.000Z", "type": "BM", "from": "ann", "to": "*", "text": f"old {i}"}
           for i in range(3)]
    old_pm = {"ts": "2026-11-20T10:01:00.000Z", "type": "PM", "from": "bob", "to": "ann", "ciphertext": "c"}
    for name, entries in (("ann", old + [old_pm]), ("bob", old)):
        with open(os.path.join(server.data_dir, name + ".chat"), "w") as fh:
            fh.write("".join(json.dumps(e, separators=(",", ":")) + "\n" for e in entries))
    before = open(os.path.join(server.data_dir, "ann.chat"), "rb").read()
    server.start(server.port)
    assert "per-recipient layout" in server.log()
    ann, bob = log_in(server.port, keys, ["ann", "bob"])
    assert ann.history() == old + [old_pm]
    assert ann.history(limit=2) == [old[2], old_pm]
    assert bob.bm("new")["ok"]
    assert [e.get("text") for e in ann.history()] == ["old 0", "old 1", "old 2", None, "new"]
    assert [e.get("text") for e in bob.history(limit=2)] == ["old 2", "new"]
    assert open(os.path.join(server.data_dir, "ann.chat"), "rb").read().startswith(before)
    server.restart()
    assert "per-recipient layout" not in server.log().split("listening")[-1]
    ann = log_in(server.port, keys, ["ann"])[0]
    assert [e.get("text") for e in ann.history()] == ["old 0", "old 1", "old 2", None, "new"]


# --- a corrupt accounts file ---------------------------------------------------------------------

@pytest.mark.parametrize("bad,where", [
    (b"not json at all\n", 2), (b"{}\n", 2), (b'{"username":"mallory"}\n', 2), (b"\xff\xfe\xfd\n", 2),
    (b'["a","list"]\n', 2), (b'{"username":"x","scrypt":{"n":"many"},"salt":"","hash":""}\n', 2),
    (b"garbage, then the last line\n", 3)])
def test_corrupt_accounts_line_stops_the_server_naming_file_and_line(tmp_path, bad, where):
    _, lines = _account_lines(2)
    data = lines[0] + bad + lines[1] if where == 2 else lines[0] + lines[1] + bad
    d = tmp_path / "d"
    d.mkdir()
    accounts = d / "accounts.jsonl"
    accounts.write_bytes(data)
    result = subprocess.run([sys.executable, SERVER, "0", "--host", "127.0.0.1", "--data", str(d)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "listening" not in result.stderr
    assert "accounts.jsonl" in result.stderr and re.search(rf"\bline {where}\b", result.stderr), result.stderr
    assert accounts.read_bytes() == data      # nothing dropped or rewritten


# --- history writes failing at run time ----------------------------------------------------------

@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_failing_room_log_write_is_internal_and_delivers_nothing(make_server, keys):
    server = make_server("--flood-rate", "0", "--bm-rate", "0")
    for c in log_in(server.port, keys, ["Alice", "bob", "carol"]):
        c.exit()
    assert server.stop() == 0
    for name in os.listdir(server.data_dir):
        if name.startswith("room.") and name.endswith(".log"):
            os.unlink(os.path.join(server.data_dir, name))
    os.symlink("/dev/full", os.path.join(server.data_dir, f"room.{10**9:015d}.log"))   # every write: ENOSPC
    server.start(server.port)
    alice, bob, carol = log_in(server.port, keys, ["Alice", "bob", "carol"])
    reply = alice.bm("never stored")
    assert reply["ok"] is False and reply["error"] == "internal", reply
    assert alice.request({"op": "BM"})["ok"]                 # READY again
    alice.request({"op": "CANCEL"})
    for c in (bob, carol):
        with pytest.raises(TimeoutError):
            c.wait_data("BM", timeout=0.3)
    assert sealed_pm(alice, "bob", "PMs are not in the room log")[0]["ok"]
    assert [e["type"] for e in bob.history()] == ["PM"]
    assert "room log" in server.log() and server.proc.poll() is None


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_failing_history_write_is_internal_for_the_sender_and_skips_a_recipient(make_server, keys):
    server = make_server("--flood-rate", "0", "--bm-rate", "0")
    for c in log_in(server.port, keys, ["Alice", "bob", "carol"]):
        c.exit()
    assert server.stop() == 0
    path = os.path.join(server.data_dir, "Alice.chat")
    os.unlink(path)
    os.symlink("/dev/full", path)        # every write: ENOSPC
    server.start(server.port)
    alice, bob, carol = log_in(server.port, keys, ["Alice", "bob", "carol"])

    # the sender's own copy fails: internal, nothing delivered or stored, back in READY
    reply, _, _ = sealed_pm(alice, "bob", "never stored")
    assert reply["ok"] is False and reply["error"] == "internal", reply
    assert alice.request({"op": "BM"})["ok"]                 # READY again
    alice.request({"op": "CANCEL"})
    assert not [d for d in bob.data if d["op"] == "PM"]
    assert [e for e in bob.history() if e["type"] == "PM"] == []

    # a recipient whose copy fails is skipped (and logged); the sender gets ok
    reply, _, _ = sealed_pm(bob, "Alice", "for alice")
    assert reply["ok"] is True and reply["recipients"] == 0, reply
    with pytest.raises(TimeoutError):
        alice.wait_data("PM", timeout=0.3)
    assert "Alice" in server.log() and re.search(r"(?i)history.*Alice|Alice.*history", server.log())

    # BMs are one write to the room log: everyone still gets them, and the server is still up
    assert carol.bm("still here")["recipients"] == 2
    assert bob.wait_data("BM")["text"] == "still here"
    assert "still here" in [e.get("text") for e in carol.history()]
    assert server.proc.poll() is None


# --- logs -------------------------------------------------------------------------------------------

FORGED = "1999-12-31 23:59:59,999 INFO chat.server: 'admin' is online (connection 1)"


def test_logs_hold_no_secrets_and_no_forged_lines(make_server, keys):
    server = make_server()          # the default log level
    secret_password = "pw-SECRET-7f3a9c"
    wrong_password = "WRONG-SECRET-91be"
    bm_text = "BM-SECRET-TEXT-55aa"
    pm_text = "PM-SECRET-TEXT-66bb"
    alice = WireClient(server.port)
    alice.login("alice", secret_password, keys(0))
    bob = WireClient(server.port)
    bob.login("bob", PASSWORD, keys(1))
    alice.wait_data("PRESENCE", username="bob")
    guesser = WireClient(server.port)
    guesser.login_start("alice")
    assert guesser.password(wrong_password)["error"] == "wrong_password"
    weak = WireClient(server.port)
    weak.login_start("newbie")
    assert weak.password("WEAK-1")["error"] == "weak_password"
    assert alice.bm(bm_text)["ok"]
    assert alice.bm(bm_text + "\n" + FORGED)["ok"]
    assert sealed_pm(alice, "bob", pm_text)[0]["ok"]
    # newlines in every other place a client controls
    evil = WireClient(server.port)
    assert evil.request({"op": "LOGIN", "username": "x\n" + FORGED})["error"] == "invalid_username"
    assert evil.request({"op": "BM\n" + FORGED})["error"] == "unexpected"
    broken = b'{"op":"LOGIN","username":"evil\n' + FORGED.encode() + b'"}'    # a raw newline: not JSON
    for raw in (b"C" + len(broken).to_bytes(4, "big") + broken, b"\n" + FORGED.encode()):
        c = WireClient(server.port)
        c.send_raw(raw)
        frames = c.recv_until_closed()
        assert frames[-1].body["error"] == "bad_frame"
    assert server.stop() == 0
    log = server.log()

    assert "'alice' is online" in log
    for secret in (secret_password, wrong_password, "WEAK-1", bm_text, pm_text):
        assert secret not in log, secret
    key_pem = open(os.path.join(server.data_dir, "server_key.pem")).read()
    for pem in (key_pem, keys(0).to_pem().decode(), keys(1).to_pem().decode()):
        body = [line for line in pem.splitlines() if line and not line.startswith("-----")]
        assert body and not any(line in log for line in body), "a private key is in the log"
    for line in log.splitlines():
        assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ ", line), f"not a log line: {line!r}"
        assert not line.startswith("1999-12-31"), f"forged log line: {line!r}"
