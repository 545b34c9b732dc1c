"""clientstore.py: the key pair files and the known server / contact fingerprints, on a real directory."""

from __future__ import annotations

import base64
import json
import os
import stat
import time

import pytest

import clientstore
from clientstore import (ClientStore, KeyLocked, config_root, contact_book, derive_passphrase, server_address,
                         server_id)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_config_root_follows_xdg(tmp_path):
    assert config_root({"XDG_CONFIG_HOME": str(tmp_path)}) == str(tmp_path / "chatroom")
    home = os.path.expanduser("~")
    assert config_root({}) == os.path.join(home, ".config", "chatroom")
    assert config_root({"XDG_CONFIG_HOME": "relative/dir"}) == os.path.join(home, ".config", "chatroom")


def test_server_address():
    assert server_address("LocalHost", 41001) == "localhost:41001"
    assert server_address("::1", 41001) == "[::1]:41001"


def test_passphrase_is_deterministic_per_salt():
    salt = b"s" * 16
    assert derive_passphrase("pw", salt, n=1024) == derive_passphrase("pw", salt, n=1024)
    assert derive_passphrase("pw", salt, n=1024) != derive_passphrase("pw", b"t" * 16, n=1024)
    assert derive_passphrase("pw", salt, n=1024) != derive_passphrase("pW", salt, n=1024)


def test_key_pair_round_trip_encrypted_mode_0600(tmp_path, keys):
    store = ClientStore(str(tmp_path / "chatroom"))
    assert store.load_key_pair("h:1", "Alice", "password1") is None
    store.save_key_pair("h:1", "Alice", "password1", keys(0))
    pem_path, meta_path = store.key_files("h:1", "alice")
    for path in (pem_path, meta_path):
        assert mode(path) == 0o600
    assert mode(store.root) == 0o700 and mode(store.keys_dir) == 0o700
    with open(pem_path, "rb") as fh:
        pem = fh.read()
    assert b"BEGIN ENCRYPTED PRIVATE KEY" in pem
    with open(meta_path, "rb") as fh:
        assert b"password1" not in fh.read()
    loaded = store.load_key_pair("h:1", "ALICE", "password1")
    assert loaded is not None and loaded.fingerprint == keys(0).fingerprint
    with pytest.raises(KeyLocked):
        store.load_key_pair("h:1", "alice", "password2")
    assert [k[:3] for k in store.own_keys()] == [("h:1", "alice", keys(0).fingerprint)]


def test_retire_moves_the_key_aside(tmp_path, keys):
    store = ClientStore(str(tmp_path / "chatroom"))
    store.save_key_pair("h:1", "alice", "password1", keys(0))
    moved = store.retire_key_pair("h:1", "alice")
    assert os.path.exists(moved) and ".old-" in moved
    assert store.load_key_pair("h:1", "alice", "password1") is None
    assert store.own_keys() == []


def test_damaged_metadata_is_locked_not_a_crash(tmp_path, keys):
    store = ClientStore(str(tmp_path / "chatroom"))
    store.save_key_pair("h:1", "alice", "password1", keys(0))
    with open(store.key_files("h:1", "alice")[1], "w") as fh:
        fh.write("{not json")
    with pytest.raises(KeyLocked):
        store.load_key_pair("h:1", "alice", "password1")


def test_known_servers_and_contacts(tmp_path):
    store = ClientStore(str(tmp_path / "chatroom"))
    assert store.server_fingerprint("h:1") is None
    store.remember_server("h:1", "SHA256:one")
    store.remember_server("h:2", "SHA256:two")
    store.remember_server("h:1", "SHA256:uno")
    assert store.server_fingerprint("h:1") == "SHA256:uno"
    assert store.server_fingerprint("h:2") == "SHA256:two"
    assert mode(store.known_servers_path) == 0o600

    store.remember_contact("h:1", "Bob", "SHA256:b1")
    store.remember_contact("h:2", "bob", "SHA256:b2")
    store.remember_contact("h:1", "carol", "SHA256:c1")
    store.remember_contact("h:1", "BOB", "SHA256:b3")
    assert store.contact_fingerprint("h:1", "bob") == "SHA256:b3"
    assert store.contacts("h:1") == {"bob": "SHA256:b3", "carol": "SHA256:c1"}
    assert store.contacts("h:2") == {"bob": "SHA256:b2"}


def test_known_files_tolerate_junk_lines(tmp_path):
    store = ClientStore(str(tmp_path / "chatroom"))
    os.makedirs(store.root)
    with open(store.known_servers_path, "w") as fh:
        fh.write("# comment\n\njunk\nh:1 SHA256:x extra\n")
    assert store.server_fingerprint("h:1") == "SHA256:x"


def test_names_that_would_break_a_line_are_refused(tmp_path):
    store = ClientStore(str(tmp_path / "chatroom"))
    store.remember_contact("h:1", "bob", "SHA256:b1")
    for name in ("bob\nh:1 carol SHA256:evil", "a b", "", "tab\tname"):
        with pytest.raises(ValueError):
            store.remember_contact("h:1", name, "SHA256:x")
    with pytest.raises(ValueError):
        store.remember_server("h:1", "SHA256:x\nh:2 SHA256:y")
    assert store.contacts("h:1") == {"bob": "SHA256:b1"}
    assert store.server_fingerprint("h:2") is None


def test_key_files_of_the_earlier_format_still_open(tmp_path, keys):
    """Before, the PEM itself was scrypt-protected by pg3lib (half a second per login) under n=2**14."""
    store = ClientStore(str(tmp_path / "chatroom"))
    store.save_key_pair("h:1", "alice", "password1", keys(1))  # makes the directory and the metadata
    pem_path, meta_path = store.key_files("h:1", "alice")
    with open(meta_path, encoding="utf-8") as fh:
        meta = json.load(fh)
    salt = base64.b64decode(meta["salt"])
    keys(0).save(pem_path, derive_passphrase("password1", salt, n=2 ** 14))
    meta.update(n=2 ** 14, public_key=keys(0).public.key_form, fingerprint=keys(0).fingerprint)
    with open(meta_path, "w", encoding="utf-8") as fh:
        json.dump(meta, fh)
    assert store.load_key_pair("h:1", "alice", "password1").fingerprint == keys(0).fingerprint


def test_contacts_and_ignore_rows_under_an_address_are_adopted_for_the_server_key(tmp_path):
    store = ClientStore(str(tmp_path / "chatroom"))
    store.remember_contact("h:1", "bob", "SHA256:b-old")
    store.remember_contact("h:1", "carol", "SHA256:c")
    store.remember_contact("other:1", "dave", "SHA256:d")
    store.remember_contact("SHA256_room", "bob", "SHA256:b-room")   # pinned under the key already: it wins
    store.remember_contact_key("h:1", "carol", "carol-key")
    store.set_ignored("h:1", "eve", True)
    assert store.adopt_server_rows("h:1", "SHA256_room") == 3
    assert store.contacts("SHA256_room") == {"bob": "SHA256:b-room", "carol": "SHA256:c"}
    assert store.contacts("h:1") == {} and store.contacts("other:1") == {"dave": "SHA256:d"}
    assert store.contact_key("SHA256_room", "carol") == "carol-key" and store.contact_key("h:1", "carol") is None
    assert store.ignored("SHA256_room") == {"eve"} and store.ignored("h:1") == set()
    assert store.adopt_server_rows("h:1", "SHA256_room") == 0   # once
    assert store.adopt_server_rows("nowhere:1", "SHA256_room") == 0


def test_each_account_keeps_its_own_contacts_and_the_rooms_older_rows_go_to_the_first(tmp_path):
    store = ClientStore(str(tmp_path / "chatroom"))
    alice, carol = contact_book("SHA256_room", "Alice"), contact_book("SHA256_room", "carol")
    assert alice == "SHA256_room/alice"
    store.remember_contact("SHA256_room", "bob", "SHA256:b")    # the layout of one book per room
    store.set_ignored("SHA256_room", "eve", True)
    store.remember_contact(carol, "dave", "SHA256:d")
    assert store.adopt_server_rows("SHA256_room", alice) == 2
    assert store.contacts(alice) == {"bob": "SHA256:b"} and store.ignored(alice) == {"eve"}
    assert store.adopt_server_rows("SHA256_room", carol) == 0   # moved once, to the first account
    assert store.contacts(carol) == {"dave": "SHA256:d"} and store.ignored(carol) == set()


def test_ignored_users_per_server(tmp_path):
    store = ClientStore(str(tmp_path / "chatroom"))
    assert store.ignored("h:1") == set()
    assert store.set_ignored("h:1", "Bob", True) is True
    assert store.set_ignored("h:1", "BOB", True) is False  # already
    assert store.set_ignored("h:2", "carol", True) is True
    assert store.set_ignored("h:1", "dave", True) is True
    assert mode(store.ignored_path) == 0o600
    again = ClientStore(str(tmp_path / "chatroom"))  # a later run
    assert again.ignored("h:1") == {"bob", "dave"} and again.ignored("h:2") == {"carol"}
    assert again.set_ignored("h:1", "bob", False) is True
    assert again.set_ignored("h:1", "bob", False) is False
    assert again.ignored("h:1") == {"dave"} and again.ignored("h:2") == {"carol"}
    with pytest.raises(ValueError):
        again.set_ignored("h:1", "a b\nh:2 x", True)
    assert again.ignored("h:1") == {"dave"}


# --- issue 13: identity per server key, export files, PM ids seen ---------------------------------

def test_key_pairs_are_named_by_the_server_key_and_old_names_are_adopted(tmp_path, keys):
    store = ClientStore(str(tmp_path))
    stem = server_id(keys(2).fingerprint)
    assert stem.startswith("SHA256_") and "/" not in stem and "+" not in stem and ":" not in stem
    store.save_key_pair("127.0.0.1:41001", "Alice", "password1", keys(0))  # the older layout
    assert store.adopt_key_pair("127.0.0.1:41001", stem, "alice")
    assert not store.has_key_pair("127.0.0.1:41001", "alice")
    assert store.load_key_pair(stem, "alice", "password1").fingerprint == keys(0).fingerprint
    store.save_key_pair("localhost:41001", "alice", "password1", keys(1))
    assert not store.adopt_key_pair("localhost:41001", stem, "alice")  # never over an identity there already
    assert store.load_key_pair(stem, "alice", "password1").fingerprint == keys(0).fingerprint


def test_an_export_file_opens_only_with_its_passphrase(tmp_path, keys):
    store = ClientStore(str(tmp_path))
    path = str(tmp_path / "alice.key")
    store.export_key_pair(path, keys(0), "a long passphrase", "Alice", keys(2).fingerprint)
    assert mode(path) == 0o600
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    assert "ENCRYPTED PRIVATE KEY" in text and json.loads(text)["username"] == "alice"
    pair, data = ClientStore.read_export(path, "a long passphrase")
    assert pair.fingerprint == keys(0).fingerprint and data["server_key"] == keys(2).fingerprint
    with pytest.raises(KeyLocked):
        ClientStore.read_export(path, "wrong")
    (tmp_path / "junk").write_text("not json")
    with pytest.raises(KeyLocked):
        ClientStore.read_export(str(tmp_path / "junk"), "x")


def test_seen_pm_ids_persist_and_old_ones_are_dropped(tmp_path, monkeypatch):
    store = ClientStore(str(tmp_path))
    seen = store.seen_ids("SHA256_x", "alice")
    seen.add("Bob", "id+/1==")
    assert ("bob", "id+/1==") in store.seen_ids("SHA256_x", "Alice")
    assert ("bob", "id+/1==") not in store.seen_ids("SHA256_y", "alice")  # per server and account
    later = time.time() + clientstore.SEEN_KEEP + 10
    monkeypatch.setattr(time, "time", lambda: later)
    assert ("bob", "id+/1==") not in store.seen_ids("SHA256_x", "alice")
