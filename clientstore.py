"""The chat client's files: the user's key pairs and the fingerprints it trusts.

Everything lives under ``$XDG_CONFIG_HOME/chatroom/`` (``~/.config/chatroom/``
when the variable is unset or not an absolute path, as the XDG base directory
specification says); directories are made mode 0700 and every file is
written mode 0600, atomically (``pg3lib.write_private_file``):

* ``keys/<server key>_<user>.pem``: the user's private key for that server
  and account, named by the server key's fingerprint (``SHA256_`` and its
  URL-safe base64), not by the address, so that ``localhost`` and
  ``127.0.0.1`` reaching one server are one identity (section 9). Files
  under the older name ``<host>_<port>_<user>`` are adopted (renamed) at the
  first login that sees the server's key. The key PKCS#8 encrypted under a passphrase derived from the user's
  password (scrypt with a random per-key salt). The passphrase is already a
  256-bit scrypt output, so the PKCS#8 layer uses a light PBKDF2 rather than
  pycryptodome's scrypt, which would add half a second to every login and
  nothing an attacker has to pay (older files, scrypt inside, still load);
* ``keys/<host>_<port>_<user>.json``: that salt and the scrypt parameters,
  plus the public key and its fingerprint, so ``--fingerprint`` needs no
  password;
* ``seen/<server key>_<user>``: the ids of the PMs received (``sender id
  time`` per line, section 4.5), to flag a replay across runs; ids older
  than ``SEEN_KEEP`` seconds are dropped;
* ``known_servers``: one ``host:port SHA256:...`` line per server, the key
  first seen there (trust on first use, docs/PROTOCOL.md section 9);
* ``known_contacts``: one ``<server key>/<user> contact SHA256:...`` line per
  contact of an account;
* ``contact_keys``: one ``<server key>/<user> contact key`` line per pinned
  contact, the key itself, so that CH can check the signatures of received PMs;
* ``previous_contact_keys``: the same lines for the keys a contact was trusted
  with before its current one (TRUST of a new key; the newest few), so that
  the PMs it signed then still check out in CH, marked as such;
* ``ignored``: one ``<server key>/<user> contact`` line per user whose messages
  that account hides (IGNORE).

The contacts, their keys and the ignore list belong to one account in one
room, not to one address of it: they are kept under the server key
(``server_id``) and the account (``contact_book``), like the key pairs, so
every node of a room, and ``localhost`` beside ``127.0.0.1``, share them,
while two accounts used from one configuration directory do not. Rows of the
older layouts (under ``host:port``, or under the server key alone) move to the
account that logs in first after the change (``adopt_server_rows``). ``known_servers`` alone is
by address, since it says which key an address must show. Servers are named
``host:port`` as the user gave them (host lower-cased); usernames are
lower-cased, as accounts are case-insensitive.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import time
from typing import NamedTuple

from Crypto.PublicKey import RSA

import pg3lib

APP_DIR = "chatroom"
KNOWN_SERVERS = "known_servers"
SEEN_DIR = "seen"
# PM ids are kept for twice the clock window plus a day: a live PM older than the
# window is flagged for its age anyway, and a stored (offline) one is delivered once.
SEEN_KEEP = 2 * 600 + 86400
SEEN_MAX = 5000  # ids kept per account, at most (the newest)
EXPORT_FORMAT = "chatroom-key-export"
KNOWN_CONTACTS = "known_contacts"
CONTACT_KEYS = "contact_keys"  # server-key/account contact key-form: the keys behind the pinned fingerprints
PREVIOUS_KEYS = "previous_contact_keys"  # the same, for the keys trusted before the current one
PREVIOUS_KEEP = 8  # previous keys kept per contact (the newest)
IGNORED = "ignored"
# The first line of each file kept per server key: what its fields are.
CONTACTS_TITLE = "contact key fingerprints (server-key/account contact fingerprint)"
CONTACT_KEYS_TITLE = "contact keys (server-key/account contact key)"
PREVIOUS_KEYS_TITLE = "keys contacts were trusted with before (server-key/account contact key), oldest first"
IGNORED_TITLE = "users whose messages are hidden (server-key/account contact)"
# scrypt cost for the key passphrase: about 60 ms and 32 MiB, once per login.
SCRYPT_N = 2 ** 15
SCRYPT_R = 8
SCRYPT_P = 1
SALT_BYTES = 16
_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9.-]")
_SPACE = re.compile(r"\s")


class KeyLocked(Exception):
    """A saved key pair exists but cannot be opened with this password (or is damaged)."""


class OwnKey(NamedTuple):
    """One of the user's own key pairs as listed by ``--fingerprint``."""

    server: str
    username: str
    fingerprint: str
    server_key: str = ""  # server_id of the server key it is kept for ("" in the older layout)


def config_root(environ: dict | None = None) -> str:
    """``$XDG_CONFIG_HOME/chatroom``, or ``~/.config/chatroom``."""
    env = os.environ if environ is None else environ
    base = env.get("XDG_CONFIG_HOME", "")
    if not os.path.isabs(base):
        base = os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, APP_DIR)


def server_address(host: str, port: int) -> str:
    """The name a server's files are kept under: ``host:port`` (IPv6 literals in brackets)."""
    host = host.lower()
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


def server_id(fingerprint: str) -> str:
    """The file-name form of a server key's fingerprint: ``SHA256_`` and URL-safe base64."""
    return fingerprint.replace(":", "_", 1).replace("+", "-").replace("/", "_")


def contact_book(server: str, username: str) -> str:
    """The first field of an account's contact and ignore rows: ``<server key>/<user>``."""
    return f"{server}/{username.lower()}"


def derive_passphrase(password: str, salt: bytes, n: int = SCRYPT_N, r: int = SCRYPT_R,
                      p: int = SCRYPT_P) -> str:
    """The private key's passphrase: hex of scrypt(password, salt); the same inputs give the same output."""
    digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, dklen=32,
                            maxmem=128 * r * (n + p + 2))
    return digest.hex()


def _read_lines(path: str) -> list[list[str]]:
    """The whitespace-split fields of each non-comment line; a missing file is empty."""
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return [line.split() for line in fh if line.strip() and not line.lstrip().startswith("#")]
    except FileNotFoundError:
        return []


def _encrypted_pem(key_pair: pg3lib.KeyPair, passphrase: str) -> bytes:
    """PKCS#8 PEM under passphrase (a scrypt output): PBKDF2-SHA256 and AES-256-CBC."""
    try:
        return RSA.import_key(key_pair.to_pem()).export_key(
            format="PEM", pkcs=8, passphrase=passphrase, protection="PBKDF2WithHMAC-SHA256AndAES256-CBC",
            prot_params={"iteration_count": 10000})
    except (TypeError, ValueError):  # pycryptodome before 3.20 has neither prot_params nor SHA-256 here
        return key_pair.to_pem(passphrase)


class ClientStore:
    """The files under one configuration directory."""

    def __init__(self, root: str) -> None:
        self.root = root

    # --- paths ---------------------------------------------------------------
    def _ensure_dir(self, path: str) -> None:
        """Make root (and path under it) mode 0700; makedirs applies the mode to the last one only."""
        for directory in dict.fromkeys((self.root, path)):
            os.makedirs(directory, mode=0o700, exist_ok=True)

    @property
    def keys_dir(self) -> str:
        return os.path.join(self.root, "keys")

    @property
    def known_servers_path(self) -> str:
        return os.path.join(self.root, KNOWN_SERVERS)

    @property
    def known_contacts_path(self) -> str:
        return os.path.join(self.root, KNOWN_CONTACTS)

    @property
    def ignored_path(self) -> str:
        return os.path.join(self.root, IGNORED)

    def key_files(self, server: str, username: str) -> tuple[str, str]:
        """Paths of the private key (.pem) and its metadata (.json) for this server and account."""
        stem = _UNSAFE_NAME.sub("_", server) + "_" + _UNSAFE_NAME.sub("_", username.lower())
        base = os.path.join(self.keys_dir, stem)
        return base + ".pem", base + ".json"

    # --- own key pairs -----------------------------------------------------------
    def load_key_pair(self, server: str, username: str, password: str) -> pg3lib.KeyPair | None:
        """The saved key pair, or None if there is none yet.

        Raises:
            KeyLocked: the files exist but the password does not open them, or they are damaged.
        """
        pem_path, meta_path = self.key_files(server, username)
        if not os.path.exists(pem_path) and not os.path.exists(meta_path):
            return None
        try:
            with open(meta_path, encoding="utf-8") as fh:
                meta = json.load(fh)
            salt = base64.b64decode(meta["salt"], validate=True)
            passphrase = derive_passphrase(password, salt, int(meta["n"]), int(meta["r"]), int(meta["p"]))
            return pg3lib.KeyPair.load(pem_path, passphrase)
        except (OSError, ValueError, KeyError, TypeError, pg3lib.CryptoError) as exc:
            raise KeyLocked(f"{pem_path}: {exc}") from None

    def save_key_pair(self, server: str, username: str, password: str, key_pair: pg3lib.KeyPair,
                      address: str | None = None) -> None:
        """Write the key pair, encrypted under a passphrase derived from password with a fresh salt
        (address: the ``host:port`` it was made at, for ``--fingerprint``; default server)."""
        self._ensure_dir(self.keys_dir)
        pem_path, meta_path = self.key_files(server, username)
        salt = os.urandom(SALT_BYTES)
        pg3lib.write_private_file(pem_path, _encrypted_pem(key_pair, derive_passphrase(password, salt)))
        meta = {"version": 1, "server": address or server, "username": username.lower(),
                "kdf": "scrypt", "salt": base64.b64encode(salt).decode("ascii"),
                "n": SCRYPT_N, "r": SCRYPT_R, "p": SCRYPT_P,
                "public_key": key_pair.public.key_form, "fingerprint": key_pair.fingerprint}
        pg3lib.write_private_file(meta_path, (json.dumps(meta, indent=1) + "\n").encode("utf-8"))

    def has_key_pair(self, server: str, username: str) -> bool:
        return any(os.path.exists(path) for path in self.key_files(server, username))

    def adopt_key_pair(self, old_server: str, server: str, username: str) -> bool:
        """Rename key files kept under old_server (a ``host:port``, the older layout) to server
        (``server_id``), unless files are there already; True if it did."""
        if self.has_key_pair(server, username) or not self.has_key_pair(old_server, username):
            return False
        for old, new in zip(self.key_files(old_server, username), self.key_files(server, username)):
            if os.path.exists(old):
                os.replace(old, new)
        return True

    def export_key_pair(self, path: str, key_pair: pg3lib.KeyPair, passphrase: str, username: str,
                        server_fingerprint: str) -> None:
        """Write key_pair to path, encrypted under passphrase (scrypt, then PKCS#8), mode 0600."""
        salt = os.urandom(SALT_BYTES)
        pem = _encrypted_pem(key_pair, derive_passphrase(passphrase, salt))
        data = {"format": EXPORT_FORMAT, "version": 1, "username": username.lower(),
                "server_key": server_fingerprint, "kdf": "scrypt", "salt": base64.b64encode(salt).decode("ascii"),
                "n": SCRYPT_N, "r": SCRYPT_R, "p": SCRYPT_P, "fingerprint": key_pair.fingerprint,
                "pem": pem.decode("ascii")}
        pg3lib.write_private_file(path, (json.dumps(data, indent=1) + "\n").encode("utf-8"))

    @staticmethod
    def read_export(path: str, passphrase: str) -> tuple[pg3lib.KeyPair, dict]:
        """The key pair of an export file, and its description.

        Raises:
            KeyLocked: not an export file, or the passphrase does not open it.
            OSError: it cannot be read.
        """
        with open(path, encoding="utf-8") as fh:
            try:
                data = json.load(fh)
            except ValueError:
                raise KeyLocked(f"{path} is not a key export file") from None
        if not isinstance(data, dict) or data.get("format") != EXPORT_FORMAT:
            raise KeyLocked(f"{path} is not a key export file")
        try:
            salt = base64.b64decode(data["salt"], validate=True)
            secret = derive_passphrase(passphrase, salt, int(data["n"]), int(data["r"]), int(data["p"]))
            return pg3lib.KeyPair.from_pem(str(data["pem"]).encode("ascii"), secret), data
        except (ValueError, KeyError, TypeError, pg3lib.CryptoError):
            raise KeyLocked(f"the passphrase does not open {path}") from None

    def seen_ids(self, server: str, username: str) -> SeenIds:
        return SeenIds(os.path.join(self.root, SEEN_DIR,
                                    _UNSAFE_NAME.sub("_", server) + "_" + _UNSAFE_NAME.sub("_", username.lower())),
                       self)

    def create_key_pair(self, server: str, username: str, password: str,
                        address: str | None = None) -> pg3lib.KeyPair:
        """Generate a key pair and save it."""
        key_pair = pg3lib.KeyPair.generate()
        self.save_key_pair(server, username, password, key_pair, address)
        return key_pair

    def retire_key_pair(self, server: str, username: str) -> str:
        """Rename the saved key files aside (``.old-<time>``); return the new name of the .pem."""
        suffix = time.strftime(".old-%Y%m%d-%H%M%S")
        moved = ""
        for path in self.key_files(server, username):
            if os.path.exists(path):
                os.replace(path, path + suffix)
                moved = moved or path + suffix
        return moved

    def own_keys(self) -> list[OwnKey]:
        """Every key pair saved here, sorted by server and username."""
        found = []
        try:
            names = sorted(os.listdir(self.keys_dir))
        except FileNotFoundError:
            return []
        for name in names:
            if not name.endswith(".json"):
                continue
            try:
                with open(os.path.join(self.keys_dir, name), encoding="utf-8") as fh:
                    meta = json.load(fh)
                stem = name[:-len(".json")]
                user = str(meta["username"])
                kept_for = stem[:-len(user) - 1] if stem.endswith("_" + user) and stem.startswith("SHA256_") else ""
                found.append(OwnKey(str(meta["server"]), user, str(meta["fingerprint"]), kept_for))
            except (OSError, ValueError, KeyError, TypeError):
                continue
        return sorted(found)

    # --- known servers -----------------------------------------------------------
    def server_fingerprint(self, server: str) -> str | None:
        """The fingerprint remembered for this server, if any."""
        for fields in _read_lines(self.known_servers_path):
            if len(fields) >= 2 and fields[0] == server:
                return fields[1]
        return None

    def remember_server(self, server: str, fingerprint: str) -> None:
        """Remember (or replace) the server's fingerprint."""
        rows = [f for f in _read_lines(self.known_servers_path) if f and f[0] != server]
        rows.append([server, fingerprint])
        self._write_rows(self.known_servers_path, "server fingerprints (host:port fingerprint)", rows)

    # --- known contacts ----------------------------------------------------------
    def contacts(self, server: str) -> dict[str, str]:
        """Username (lower case) -> remembered fingerprint, for one server."""
        return {f[1]: f[2] for f in _read_lines(self.known_contacts_path)
                if len(f) >= 3 and f[0] == server}

    def contact_fingerprint(self, server: str, username: str) -> str | None:
        return self.contacts(server).get(username.lower())

    def remember_contact(self, server: str, username: str, fingerprint: str) -> None:
        """Remember (or replace) a contact's key fingerprint."""
        name = username.lower()
        rows = [f for f in _read_lines(self.known_contacts_path)
                if len(f) >= 3 and not (f[0] == server and f[1] == name)]
        rows.append([server, name, fingerprint])
        self._write_rows(self.known_contacts_path,
                         CONTACTS_TITLE, rows)

    def contact_key(self, server: str, username: str) -> str | None:
        """The key form saved for a contact (to check signed PMs in CH), if any."""
        name = username.lower()
        for f in _read_lines(os.path.join(self.root, CONTACT_KEYS)):
            if len(f) >= 3 and f[0] == server and f[1] == name:
                return f[2]
        return None

    def remember_contact_key(self, server: str, username: str, key_form: str) -> None:
        """Save the contact's key; the one it replaces goes to its previous keys."""
        path = os.path.join(self.root, CONTACT_KEYS)
        name = username.lower()
        old = self.contact_key(server, name)
        rows = [f[:3] for f in _read_lines(path) if len(f) >= 3 and not (f[0] == server and f[1] == name)]
        rows.append([server, name, key_form])
        self._write_rows(path, CONTACT_KEYS_TITLE, rows)
        if old and old != key_form:
            previous = os.path.join(self.root, PREVIOUS_KEYS)
            rows = [f[:3] for f in _read_lines(previous)
                    if len(f) >= 3 and not (f[0] == server and f[1] == name and f[2] in (old, key_form))]
            mine = [f for f in rows if f[0] == server and f[1] == name][-(PREVIOUS_KEEP - 1):]
            rows = [f for f in rows if not (f[0] == server and f[1] == name)] + mine + [[server, name, old]]
            self._write_rows(previous, PREVIOUS_KEYS_TITLE, rows)

    def previous_contact_keys(self, server: str, username: str) -> list[str]:
        """The keys the contact was trusted with before its current one, newest first."""
        name = username.lower()
        return [f[2] for f in reversed(_read_lines(os.path.join(self.root, PREVIOUS_KEYS)))
                if len(f) >= 3 and f[0] == server and f[1] == name]

    def adopt_server_rows(self, old_server: str, server: str) -> int:
        """Move the contact, contact key and ignore rows kept under old_server (an older layout's
        ``host:port`` or server key) to server (a ``contact_book``); a row kept there already wins.
        Returns how many rows moved."""
        moved = 0
        for path, width, title in ((self.known_contacts_path, 3, CONTACTS_TITLE),
                                   (os.path.join(self.root, CONTACT_KEYS), 3, CONTACT_KEYS_TITLE),
                                   (self.ignored_path, 2, IGNORED_TITLE)):
            rows = [f[:width] for f in _read_lines(path) if len(f) >= width]
            if not any(f[0] == old_server for f in rows):
                continue
            there = {f[1] for f in rows if f[0] == server}
            kept = []
            for f in rows:
                if f[0] == old_server:
                    if f[1] in there:
                        continue
                    f = [server, *f[1:]]
                    moved += 1
                kept.append(f)
            self._write_rows(path, title, kept)
        return moved

    # --- ignored users -----------------------------------------------------------
    def ignored(self, server: str) -> set[str]:
        """The users (lower case) whose messages are hidden, for one server."""
        return {f[1] for f in _read_lines(self.ignored_path) if len(f) >= 2 and f[0] == server}

    def set_ignored(self, server: str, username: str, ignore: bool) -> bool:
        """Add username to the server's ignore list (or take it off); False if it already was (or was not).

        Raises:
            ValueError: a name that would break the line apart.
        """
        name = username.lower()
        rows = [f for f in _read_lines(self.ignored_path) if len(f) >= 2]
        present = any(f[0] == server and f[1] == name for f in rows)
        if present == ignore:
            return False
        rows = [f[:2] for f in rows if not (f[0] == server and f[1] == name)]
        if ignore:
            rows.append([server, name])
        self._write_rows(self.ignored_path, IGNORED_TITLE, rows)
        return True

    def _write_rows(self, path: str, title: str, rows: list[list[str]]) -> None:
        """Rewrite a file of space-separated fields.

        Raises:
            ValueError: a field that is empty or holds white space (it would break the line apart).
        """
        for row in rows:
            if any(not field or _SPACE.search(field) for field in row):
                raise ValueError(f"not a one-word field in {row!r}")
        self._ensure_dir(self.root)
        text = f"# chatroom {title}\n" + "".join(" ".join(row) + "\n" for row in rows)
        pg3lib.write_private_file(path, text.encode("utf-8"))


class SeenIds:
    """The (sender, id) pairs of the PMs received, kept across runs (docs/PROTOCOL.md section 4.5)."""

    def __init__(self, path: str, store: ClientStore) -> None:
        self.path = path
        self.store = store
        now = time.time()
        self.ids: dict[tuple[str, str], float] = {}
        for fields in _read_lines(path):
            if len(fields) >= 3:
                try:
                    when = float(fields[2])
                except ValueError:
                    continue
                if now - SEEN_KEEP <= when <= now + SEEN_KEEP:
                    self.ids[(fields[0], fields[1])] = when

    def __contains__(self, item: tuple[str, str]) -> bool:
        return (item[0].lower(), item[1]) in self.ids

    def add(self, sender: str, pm_id: str) -> None:
        """Remember it, and write the file (old ids dropped)."""
        now = time.time()
        self.ids[(sender.lower(), pm_id)] = now
        kept = sorted(((w, k) for k, w in self.ids.items() if w >= now - SEEN_KEEP), reverse=True)[:SEEN_MAX]
        self.ids = {k: w for w, k in kept}
        rows = [[k[0], k[1], f"{w:.0f}"] for w, k in reversed(kept)]
        try:
            self.store._ensure_dir(os.path.dirname(self.path))
            self.store._write_rows(self.path, "PM ids seen (sender id time)", rows)
        except (OSError, ValueError):
            pass  # the check still holds for this run
