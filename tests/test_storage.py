"""storage.FileStore as a store.Store: one typed result per request, in request order, no cluster."""

from __future__ import annotations

import json
import os
import shutil
import time

import passwords
import pmguard
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
            store.MarkOnline(0, "Alice", True),
            store.AppendHistory(5, [(("Alice",), line)], "Alice", "BM"),
            store.ReadHistory(6, "Alice"),
            store.ClaimSession(7, "alice", "t"),
            store.GoOnline(8, "alice", "t", "{}"),
            store.Logout(0, "alice", "t"),
        ]
        for request in requests:
            fs.submit(request)
        assert fs.pending
        done = [(cid, read(result)) for cid, result in fs.flush()]
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
        fs.submit(store.MarkOnline(0, "bob", True))
        fs.submit(store.AppendHistory(1, [(("bob",), first)], "bob", "BM"))
        fs.submit(store.ReadHistory(2, "bob"))
        fs.submit(store.AppendHistory(3, [(("bob",), second)], "bob", "BM"))
        assert [(cid, read(r)) for cid, r in fs.flush()] == [
            (1, store.Appended()), (2, store.HistoryRead(['{"n":1}'])), (3, store.Appended())]
        fs.submit(store.ReadHistory(4, "bob", limit=1))
        [(cid, result)] = fs.flush()   # a store may read less than the whole history for a limit
        assert cid == 4 and result.lines[-1:] == ['{"n":2}']
    finally:
        fs.close()


# --- the room log and the users' files ------------------------------------------------------------

import resource  # noqa: E402
import signal  # noqa: E402

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

NAMES = ["ann", "Bob", "cat"]


def read(result) -> store.HistoryRead:
    """A HistoryRead with its lines taken (a lazily read one too, its pauses left out)."""
    return store.HistoryRead([line for line in result.lines if line is not store.PAUSE]) \
        if isinstance(result, store.HistoryRead) else result


def bm_line(sender: str, n: int) -> bytes:
    return (json.dumps({"ts": "t", "type": "BM", "from": sender, "to": "*", "text": f"bm {n}"},
                       separators=(",", ":")) + "\n").encode()


def pm_lines(sender: str, target: str, n: int) -> list:
    entry = {"ts": "t", "type": "PM", "from": sender, "to": target}
    return [((sender,), (json.dumps({**entry, "ciphertext": f"self {n}"}, separators=(",", ":")) + "\n").encode()),
            ((target,), (json.dumps({**entry, "ciphertext": f"for {n}"}, separators=(",", ":")) + "\n").encode())]


class Model:
    """The per-recipient layout: every entry appended to each owner's own list."""

    def __init__(self, legacy: dict) -> None:
        self.lines = {name: list(legacy.get(name, [])) for name in NAMES}
        self.online: list[str] = []

    def read(self, name: str, limit: int | None) -> list[str]:
        lines = self.lines[name]
        return lines[-limit:] if limit else list(lines)


OPS = st.lists(st.tuples(st.sampled_from(["on", "off", "bm", "pm", "read", "flush", "crash"]),
                         st.sampled_from(NAMES), st.sampled_from(NAMES), st.sampled_from([None, 1, 2, 5, 3, 40])),
               max_size=60)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS, legacy=st.dictionaries(st.sampled_from(NAMES), st.integers(0, 3)))
def test_history_is_the_per_recipient_history(tmp_path_factory, ops, legacy):
    """CH on the room log and users' files equals CH on a store that appends to every recipient,
    read back and held (a small limit) or read forward as it is taken (the whole history, or a
    limit past HELD_LIMIT: here 2, with a pause after every second entry)."""
    held, pause = storage.HELD_LIMIT, storage.PAUSE_EVERY
    storage.HELD_LIMIT, storage.PAUSE_EVERY = 2, 2
    try:
        _history_is_the_per_recipient_history(tmp_path_factory, ops, legacy)
    finally:
        storage.HELD_LIMIT, storage.PAUSE_EVERY = held, pause


def _history_is_the_per_recipient_history(tmp_path_factory, ops, legacy):
    directory = str(tmp_path_factory.mktemp("d"))
    old = {name: [json.dumps({"ts": "t", "type": "BM", "from": "x", "to": "*", "text": f"old {i}"})
                  for i in range(count)] for name, count in legacy.items()}
    for name, lines in old.items():    # a data directory of the per-recipient layout
        with open(os.path.join(directory, name + ".chat"), "w") as fh:
            fh.write("".join(line + "\n" for line in lines))
    model = Model(old)
    fs = storage.FileStore(directory)
    cid = 0
    try:
        for op, a, b, limit in ops:
            cid += 1
            if op == "on" and a not in model.online:
                model.online.append(a)
                fs.submit(store.MarkOnline(0, a, True))
            elif op == "off" and a in model.online:
                model.online.remove(a)
                fs.submit(store.MarkOnline(0, a, False))
            elif op == "bm" and a in model.online:
                line = bm_line(a, cid)
                owners = tuple(model.online)
                fs.submit(store.AppendHistory(cid, [(owners, line)], a, "BM"))
                for name in owners:
                    model.lines[name].append(line[:-1].decode())
            elif op == "pm" and a in model.online and b in model.online and a != b:
                entries = pm_lines(a, b, cid)
                fs.submit(store.AppendHistory(cid, entries, a, "PM", target=b.lower()))
                for (owner,), line in entries:
                    model.lines[owner].append(line[:-1].decode())
            elif op == "read":
                fs.submit(store.ReadHistory(cid, a, limit))
                done = dict(fs.flush())
                assert read(done[cid]) == store.HistoryRead(model.read(a, limit)), (a, limit)
            elif op == "flush":
                assert all(isinstance(r, store.Appended) and not r.failed for _, r in fs.flush()
                           if not isinstance(r, store.HistoryRead))
            elif op == "crash":   # no offline marks: the next run knows where this one ended
                fs.flush()
                fs.close()
                fs = storage.FileStore(directory)
                model.online = []
        fs.flush()
        for name in NAMES:
            assert storage.read_history(directory, name) == model.read(name, None), name
    finally:
        fs.close()


def _bm_store(directory: str, texts: list) -> None:
    """ann online sends the texts, then the process 'dies' (no offline mark)."""
    fs = storage.FileStore(directory)
    fs.submit(store.MarkOnline(0, "ann", True))
    for i, text in enumerate(texts):
        line = (json.dumps({"ts": "t", "type": "BM", "from": "ann", "to": "*", "text": text}) + "\n").encode()
        fs.submit(store.AppendHistory(i + 1, [(("ann",), line)], "ann", "BM"))
        fs.flush()
    fs.close()


def test_room_log_torn_at_every_offset(tmp_path):
    seed = str(tmp_path / "seed")
    texts = ["one", "två ☃", "three"]
    _bm_store(seed, texts)
    [segment] = [n for n in os.listdir(seed) if n.startswith("room.") and n.endswith(".log")]
    data = open(os.path.join(seed, segment), "rb").read()
    ends = [i + 1 for i, byte in enumerate(data) if byte == 0x0A]
    for cut in range(len(data) + 1):
        directory = str(tmp_path / f"c{cut}")
        shutil.copytree(seed, directory)
        with open(os.path.join(directory, segment), "r+b") as fh:
            fh.truncate(cut)
        whole = texts[:sum(1 for end in ends if end <= cut)]
        fs = storage.FileStore(directory)
        try:
            fs.submit(store.ReadHistory(1, "ann"))
            assert [json.loads(t)["text"] for t in read(fs.flush()[0][1]).lines] == whole, cut
            fs.submit(store.MarkOnline(0, "ann", True))
            fs.submit(store.MarkOnline(0, "bob", True))
            line = (json.dumps({"ts": "t", "type": "BM", "from": "bob", "to": "*", "text": "after"}) + "\n").encode()
            fs.submit(store.AppendHistory(2, [(("ann", "bob"), line)], "bob", "BM"))
            fs.flush()
        finally:
            fs.close()
        for name, expected in (("ann", whole + ["after"]), ("bob", ["after"])):
            assert [json.loads(t)["text"] for t in storage.read_history(directory, name)] == expected, (cut, name)


def test_history_limit_rotates_and_keeps_the_newest(tmp_path):
    limit = 20_000
    fs = storage.FileStore(str(tmp_path), history_limit=limit)
    try:
        fs.submit(store.MarkOnline(0, "ann", True))
        fs.submit(store.MarkOnline(0, "Bob", True))
        for n in range(1, 2001):
            if n % 3:
                fs.submit(store.AppendHistory(n, [(("ann", "Bob"), bm_line("ann", n))], "ann", "BM"))
            else:
                fs.submit(store.AppendHistory(n, pm_lines("ann", "Bob", n), "ann", "PM", target="bob"))
            fs.flush()
        fs.submit(store.ReadHistory(1, "Bob", 50))
        newest = read(fs.flush()[0][1]).lines
        expected = [json.loads(line)for n in range(1951, 2001)
                    for line in ([bm_line("ann", n)[:-1]] if n % 3 else [pm_lines("ann", "Bob", n)[1][1][:-1]])]
        assert [json.loads(t) for t in newest] == expected
        sizes = {name: os.path.getsize(tmp_path / name) for name in os.listdir(tmp_path)}
        room = sum(size for name, size in sizes.items() if name.startswith("room.") and name.endswith(".log"))
        assert limit <= room <= limit + limit // 4, sizes   # the newest limit bytes, in segments of limit/8
        for user in ("ann", "Bob"):
            assert sizes[user + ".chat"] + sizes.get(user + ".chat.1", 0) <= limit + 200, sizes
        fs.submit(store.ReadHistory(2, "ann"))
        whole = read(fs.flush()[0][1]).lines
        assert [json.loads(t) for t in whole[-50:]][-1] == expected[-1] and len(whole) > 100
    finally:
        fs.close()


def test_a_failed_write_leaves_the_file_as_it_was(tmp_path):
    fs = storage.FileStore(str(tmp_path))
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    try:
        fs.submit(store.MarkOnline(0, "ann", True))
        fs.submit(store.AppendHistory(1, [(("ann",), bm_line("ann", 1))], "ann", "BM"))
        assert fs.flush() == [(1, store.Appended())]
        [segment] = [tmp_path / n for n in os.listdir(tmp_path) if n.startswith("room.") and n.endswith(".log")]
        before = segment.read_bytes()
        resource.setrlimit(resource.RLIMIT_FSIZE, (len(before) + 100, hard))
        big = (json.dumps({"ts": "t", "type": "BM", "from": "ann", "to": "*", "text": "x" * 500}) + "\n").encode()
        fs.submit(store.AppendHistory(2, [(("ann",), big)], "ann", "BM"))
        assert fs.flush() == [(2, store.FAILED)]
        assert segment.read_bytes() == before     # cut back: sending it again cannot duplicate it
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        fs.submit(store.AppendHistory(3, [(("ann",), big)], "ann", "BM"))
        fs.submit(store.ReadHistory(4, "ann"))
        assert [json.loads(t)["text"] for t in read(fs.flush()[1][1]).lines] == ["bm 1", "x" * 500]
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old)
        fs.close()


def test_messages_are_refused_below_the_free_space_watermark(tmp_path, caplog):
    fs = storage.FileStore(str(tmp_path), min_free=1 << 62)
    try:
        fs.submit(store.MarkOnline(0, "ann", True))
        fs.submit(store.MarkOnline(0, "Bob", True))
        fs.submit(store.AppendHistory(1, [(("ann", "Bob"), bm_line("ann", 1))], "ann", "BM"))
        fs.submit(store.AppendHistory(2, pm_lines("ann", "Bob", 2), "ann", "PM", target="bob"))
        assert fs.flush() == [(1, store.FAILED), (2, store.FAILED)]
        assert "free" in caplog.text
        fs.min_free = 0
        fs.submit(store.AppendHistory(3, [(("ann", "Bob"), bm_line("ann", 3))], "ann", "BM"))
        fs.submit(store.ReadHistory(4, "Bob"))
        assert [json.loads(t)["text"] for t in read(fs.flush()[1][1]).lines] == ["bm 3"]   # the marks were kept
    finally:
        fs.close()


def test_ch_with_a_limit_reads_from_the_end_of_a_big_history(tmp_path):
    """limit=50 on a 100 MiB room log and a user file of 10 MiB of PMs: milliseconds, not a whole-file read."""
    line = (json.dumps({"ts": "t", "type": "BM", "from": "ann", "to": "*", "text": "bm 0", "pad": " " * 150},
                       separators=(",", ":")) + "\n").encode()
    count = (100 << 20) // len(line)
    with open(tmp_path / f"room.{0:015d}.log", "wb") as fh:
        fh.write(line * count)
    pms = [pm_lines("ann", "Bob", n)[1][1][:-1] for n in range(3)]
    with open(tmp_path / "Bob.chat", "wb") as fh:
        fh.write(storage.mark_line(True, 0, 0))
        fh.write(b"".join(storage.pm_line(0, pms[n % 3]) for n in range((10 << 20) // 200)))
    fs = storage.FileStore(str(tmp_path), history_limit=0)
    try:
        fs._open["Bob"] = 0   # as if Bob had been online all along in this run (its span is known)
        fs.submit(store.ReadHistory(1, "Bob", 50))
        started = time.perf_counter()
        [(_, result)] = fs.flush()
        seconds = time.perf_counter() - started
        assert len(result.lines) == 50 and json.loads(result.lines[-1])["text"] == "bm 0"
        assert seconds < 0.05, f"{seconds * 1000:.1f} ms for 50 entries"
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


# --- offline PMs: last keys and kept PMs (docs/PROTOCOL.md sections 4.5 and 5) --------------------

def _kept_pm(cid: int, n: int, limit: int = 3, sender: str = "alice", share: int = 0) -> store.StoreOfflinePM:
    entry = {"ts": "t", "type": "PM", "from": sender, "to": "Bob", "ciphertext": f"c{n}"}
    lines = [((sender,), (json.dumps(entry) + "\n").encode()), (("Bob",), (json.dumps(entry) + "\n").encode())]
    body = json.dumps({"op": "PM", "from": sender, "to": "Bob", "n": n, "offline": True},
                      separators=(",", ":")).encode()
    return store.StoreOfflinePM(cid, lines, sender, "Bob", b"D\0\0\0\0{}", b"D" + len(body).to_bytes(4, "big") + body,
                                limit, sender_limit=share)


def test_kept_pms_are_counted_by_sender_within_one_pass_and_after_a_restart(tmp_path):
    """The sender's share holds within one pass, and after a restart (counted from the file again,
    by the 'from' of each line: the spelling does not matter)."""
    for restart in (False, True):
        directory = str(tmp_path / str(restart))
        fs, _ = storage.open_store(directory)
        for n in range(3):
            fs.submit(_kept_pm(n, n, limit=10, sender="alice" if n < 2 else "Alice", share=2))
        fs.submit(_kept_pm(3, 3, limit=10, sender="carol", share=2))
        results = [result for _, result in fs.flush()]
        assert results == [store.Appended(), store.Appended(), store.Appended(full=True, sender_full=True),
                           store.Appended()]
        if restart:
            fs.close()
            fs, _ = storage.open_store(directory)
        try:
            fs.submit(_kept_pm(4, 4, limit=10, sender="ALICE", share=2))
            fs.submit(_kept_pm(5, 5, limit=10, sender="carol", share=2))
            fs.submit(store.TakeOffline(6, "Bob"))
            fs.submit(_kept_pm(7, 7, limit=10, sender="alice", share=2))
            refused, kept, taken, again = (result for _, result in fs.flush())
            assert (refused, kept, again) == (store.Appended(full=True, sender_full=True), store.Appended(),
                                              store.Appended())   # taken: alice's count starts again
            assert len(taken.frames) == 4
        finally:
            fs.close()


def test_last_key_and_kept_pms_in_order_bounded_taken_once_and_across_a_restart(tmp_path):
    fs, _ = storage.open_store(str(tmp_path))
    try:
        for cid, name in ((1, "alice"), (2, "Bob")):
            fs.submit(store.CreateAccount(cid, account(name)))
        fs.submit(store.LoadLastKey(3, "bob"))
        fs.submit(store.SaveKey(4, "bob", "Bob", "KEYFORM1"))
        fs.submit(store.SaveKey(5, "bob", "Bob", "KEYFORM2"))
        fs.submit(store.LoadLastKey(6, "BOB".lower()))
        fs.submit(store.LoadLastKey(7, "nobody"))
        for n in range(4):   # one pass: the bound holds within it
            fs.submit(_kept_pm(10 + n, n))
        assert fs.flush()[2:] == [
            (3, store.LastKey("Bob", None)), (4, store.KEY_SAVED), (5, store.KEY_SAVED),
            (6, store.LastKey("Bob", "KEYFORM2")), (7, store.LastKey(None, None)),
            (10, store.Appended()), (11, store.Appended()), (12, store.Appended()), (13, store.Appended(full=True))]
        assert [json.loads(e)["ciphertext"] for e in storage.read_history(str(tmp_path), "Bob")] == ["c0", "c1", "c2"]
        with open(tmp_path / "Bob.offline", "ab") as fh:
            fh.write(b'{"op":"PM","torn')   # a crash in the middle of a write
    finally:
        fs.close()
    fs, _ = storage.open_store(str(tmp_path))
    try:
        fs.submit(store.LoadLastKey(1, "bob"))
        fs.submit(_kept_pm(2, 9))        # still at the bound after the restart
        fs.submit(store.TakeOffline(3, "Bob"))
        fs.submit(store.TakeOffline(4, "Bob"))
        fs.submit(_kept_pm(5, 5))        # room again
        done = fs.flush()
        assert done[:2] == [(1, store.LastKey("Bob", "KEYFORM2")), (2, store.Appended(full=True))]
        (cid, taken) = done[2]
        assert cid == 3 and [json.loads(f[5:])["n"] for f in taken.frames] == [0, 1, 2]
        assert all(f[:1] == b"D" and int.from_bytes(f[1:5], "big") == len(f) - 5 for f in taken.frames)
        assert done[3:] == [(4, store.OfflineTaken([])), (5, store.Appended())]
    finally:
        fs.close()


def test_recent_since_reads_past_bms_stored_out_of_ts_order(tmp_path):
    """A BM stamped a little earlier than one stored before it (a clock set back) is still among
    those at or after ``since``; reading stops only TS_ORDER_SLACK before it."""
    stamps = ["2026-12-03T10:00:00.000Z", "2026-12-03T10:00:20.000Z", "2026-12-03T10:00:30.000Z",
              "2026-12-03T10:00:25.000Z", "2026-12-03T10:00:31.000Z", "2026-12-03T10:00:29.000Z",
              "2026-12-03T10:00:40.000Z"]
    fs = storage.FileStore(str(tmp_path))
    try:
        fs.submit(store.MarkOnline(0, "ann", True))
        for i, ts in enumerate(stamps):
            line = (json.dumps({"ts": ts, "type": "BM", "from": "ann", "to": "*", "text": f"bm {i}"},
                               separators=(",", ":")) + "\n").encode()
            fs.submit(store.AppendHistory(i + 1, [(("ann",), line)], "ann", "BM"))
        fs.flush()
        fs.submit(store.TakeOffline(20, "bob", recent=10, since="2026-12-03T10:00:30.000Z"))
        fs.submit(store.TakeOffline(21, "bob", recent=10, since="2026-12-03T10:00:35.000Z"))
        fs.submit(store.TakeOffline(22, "bob", recent=2, since="2026-12-03T10:00:30.000Z"))
        fs.submit(store.TakeOffline(23, "bob", recent=3))
        texts = {cid: [json.loads(t)["text"] for t in result.recent] for cid, result in fs.flush()}
    finally:
        fs.close()
    # 10:00:29 was stored after 10:00:31: it is before `since`, so not sent, and reading goes on past it.
    assert texts[20] == ["bm 2", "bm 4", "bm 6"]
    assert texts[21] == ["bm 6"]
    assert texts[22] == ["bm 6"]   # those of the newest two (as in Redis: the reading is bounded)
    assert texts[23] == ["bm 4", "bm 5", "bm 6"]


def test_pm_ids_are_refused_again_after_a_restart_and_old_spans_are_deleted(tmp_path):
    """The file store checks PM2 ids (store.PmId) and keeps those of the last minutes on disk,
    so a restart (or a SIGKILL: no close) forgets none a replay could still use."""
    now = time.time()
    live = [(("alice",), pm_lines("alice", "Bob", 1)[0][1]), (("Bob",), pm_lines("alice", "Bob", 1)[1][1])]

    def pm(cid: int, n: int, at: float = now) -> store.AppendHistory:
        return store.AppendHistory(cid, live, "alice", "PM", pm_id=store.PmId("alice", f"id{n}", at, at))

    stale = storage.PM_IDS_PREFIX + f"{int(now // storage.PM_IDS_SPAN) - 2}.log"
    with open(tmp_path / stale, "w") as fh:
        fh.write(f"alice id7 {now - 1500:.3f}\n")
    fs = storage.FileStore(str(tmp_path))
    assert not os.path.exists(tmp_path / stale)
    fs.submit(pm(1, 1))
    fs.submit(pm(2, 1))                                  # the same pass: refused too
    fs.submit(_kept_pm(3, 0, limit=0)._replace(pm_id=store.PmId("alice", "id2", now, now)))   # full
    fs.submit(pm(4, 7))
    assert [result for _, result in fs.flush()] == [
        store.Appended(), store.IdRefused(pmguard.USED), store.Appended(full=True), store.Appended()]
    # No close: as after a SIGKILL, what the pass wrote is all there is.
    fs2 = storage.FileStore(str(tmp_path))
    try:
        fs2.submit(pm(1, 1, now + 5))
        fs2.submit(pm(2, 2, now + 5))                    # unused: the full box did not use it
        fs2.submit(pm(3, 7, now + 5))
        assert [result for _, result in fs2.flush()] == [
            store.IdRefused(pmguard.USED), store.Appended(), store.IdRefused(pmguard.USED)]
    finally:
        fs2.close()
        fs.close()
    ids = storage.PmIdLog(str(tmp_path), now + storage.PM_IDS_SPAN * 2)   # ids from two spans ago: none matter
    assert len(ids.ids) == 0 and [n for n in os.listdir(tmp_path) if n.startswith(storage.PM_IDS_PREFIX)] == [
        storage.PM_IDS_PREFIX + f"{int((now + storage.PM_IDS_SPAN * 2) // storage.PM_IDS_SPAN)}.log"]
    ids.close()


def test_the_newest_of_a_lazy_history_pause_while_they_are_counted():
    """A limit past HELD_LIMIT: counted in a first reading, then read again; both give the loop
    back at their pauses (the counting used to read the whole history at once)."""
    def entries():
        for n in range(6):
            yield f"e{n}"
            if n % 2:
                yield store.PAUSE

    got = list(storage._newest(entries, 2))
    assert [e for e in got if e is not store.PAUSE] == ["e4", "e5"]
    assert got.index(store.PAUSE) < got.index("e4") and got[:3] == [store.PAUSE] * 3   # the counting's


# --- lazy CH reads at once (store.ReadSlots) ---------------------------------------------------

def test_read_slots_let_reads_in_oldest_first_and_a_dropped_wait_costs_nothing():
    slots = store.ReadSlots(2)
    started: list = []
    first, second = slots.enter(lambda: started.append(1)), slots.enter(lambda: started.append(2))
    third, fourth = slots.enter(lambda: started.append(3)), slots.enter(lambda: started.append(4))
    assert started == [1, 2] and (first[0], third[0], fourth[0]) == (True, False, False) and slots.waiting == 2
    slots.leave(third)   # gave up while waiting: no slot was its
    assert slots.waiting == 1 and slots.reading == 2 and not slots.woken
    slots.leave(second)
    assert started == [1, 2, 4] and fourth[0] is True and slots.woken and slots.reading == 2
    slots.leave(second)   # twice: nothing more
    slots.leave(first)
    slots.leave(fourth)
    assert slots.reading == 0 and slots.enter()[0] is True


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_lazy_reads_past_the_slots_wait_their_turn_holding_no_files(tmp_path):
    """Three whole-history reads with two slots: the third is WAIT (no file opened) until one of
    the first two ends or is dropped, then reads everything; the store asks for a pass then."""
    fs = storage.FileStore(str(tmp_path), readers=2)
    try:
        names = ["ann", "bob", "cat"]
        for name in names:
            fs.submit(store.MarkOnline(0, name, True))
        for n in range(300):
            fs.submit(store.AppendHistory(n + 1, [(("ann",), bm_line("ann", n))], "ann", "BM"))
        fs.flush()
        before = _open_fds()
        for cid, name in enumerate(names, 1):
            fs.submit(store.ReadHistory(cid, name, None))
        reads = [result.lines for _, result in fs.flush()]
        held = _open_fds() - before
        assert 0 < held <= 2 * storage.READER_FDS
        assert next(reads[2]) is store.WAIT and _open_fds() - before == held and fs.next_tick() is None
        first = [line for line in reads[0] if line is not store.PAUSE]   # to its end: its slot is free
        assert len(first) == 300 and fs.next_tick() is not None
        fs.tick(time.monotonic())
        assert fs.next_tick() is None
        third = [line for line in reads[2] if line is not store.PAUSE]
        assert third == first
        fs.submit(store.ReadHistory(4, "ann", None))
        fs.submit(store.ReadHistory(5, "cat", None))
        (_, fourth), (_, fifth) = fs.flush()
        waiting = fifth.lines
        assert next(waiting) is store.WAIT   # bob's read and the fourth hold the slots
        del reads   # bob's connection went away before taking its pages: the slot is given back
        assert next(waiting) is not store.WAIT
        del waiting, fourth, fifth
        assert fs.read_slots.reading == 0 and _open_fds() == before
    finally:
        fs.close()
