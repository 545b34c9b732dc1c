"""Password checks for logins: scrypt hashing and the sealed-password login step.

Owns the account record (the stored spelling, scrypt parameters, salt and hash;
never a password) and the CPU-heavy work of a PASSWORD request: opening the
sealed password with the server key, checking the nonce, and hashing with
scrypt. That work runs in the server's worker pool, never on the event loop,
so everything here is a pure function of its arguments.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
from typing import NamedTuple

import pg3lib
from protocol import NONCE_BYTES, Error, password_problem

# OWASP's scrypt floor: N=2**14 (16 MiB with r=8), r=8, p=1.
DEFAULT_SCRYPT_N = 2 ** 14
SCRYPT_R = 8
SCRYPT_P = 1
SALT_BYTES = 16
HASH_BYTES = 32
MAX_SCRYPT_N = 2 ** 20


class Account(NamedTuple):
    """One stored account: the registered spelling and the password hash."""

    username: str
    n: int
    r: int
    p: int
    salt: bytes
    hash: bytes

    @property
    def key(self) -> str:
        return self.username.lower()

    def to_json(self) -> str:
        return json.dumps({"username": self.username,
                           "scrypt": {"n": self.n, "r": self.r, "p": self.p},
                           "salt": base64.b64encode(self.salt).decode("ascii"),
                           "hash": base64.b64encode(self.hash).decode("ascii")},
                          separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Account:
        """Parse one accounts-file line.

        Raises:
            ValueError: not a complete, well-formed account record.
        """
        try:
            obj = json.loads(text)
            params = obj["scrypt"]
            account = cls(obj["username"], int(params["n"]), int(params["r"]), int(params["p"]),
                          base64.b64decode(obj["salt"], validate=True),
                          base64.b64decode(obj["hash"], validate=True))
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise ValueError(f"not an account record ({exc})") from None
        if not isinstance(account.username, str) or not account.hash or account.n < 2:
            raise ValueError("not an account record")
        return account


def scrypt(password: bytes, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(password, salt=salt, n=n, r=r, p=p, dklen=HASH_BYTES,
                          maxmem=256 * r * n * p + (1 << 20))


def new_account(username: str, password: bytes, n: int = DEFAULT_SCRYPT_N) -> Account:
    """Hash a new password with a fresh random salt."""
    salt = os.urandom(SALT_BYTES)
    return Account(username, n, SCRYPT_R, SCRYPT_P, salt, scrypt(password, salt, n, SCRYPT_R, SCRYPT_P))


def verify(account: Account, password: bytes) -> bool:
    """True if password matches the account's stored hash (constant-time compare)."""
    if not (1 < account.n <= MAX_SCRYPT_N):
        return False
    digest = scrypt(password, account.salt, account.n, account.r, account.p)
    return hmac.compare_digest(digest, account.hash)


def weak_reason(password: bytes) -> str | None:
    """Why a new password (valid UTF-8) is refused, or None."""
    return password_problem(password.decode("utf-8"))


OK = "ok"


class LoginResult(NamedTuple):
    """The outcome of a PASSWORD request: ``OK`` or an error code (``wrong_password``,
    ``weak_password``, ``rate_limited``, ``bad_request``, ``internal``); a new account when one was made."""

    outcome: str
    message: str = ""
    account: Account | None = None


def open_password(server_keys: pg3lib.KeyPair, sealed: str, nonce: bytes) -> bytes | None:
    """The password inside a sealed ``nonce || password``, or None if it does not
    open or carries another nonce."""
    try:
        plain = server_keys.open(sealed)
    except pg3lib.CryptoError:
        return None
    if len(plain) < NONCE_BYTES or not hmac.compare_digest(plain[:NONCE_BYTES], nonce):
        return None
    password = plain[NONCE_BYTES:]
    try:
        password.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return password


def check_login(server_keys: pg3lib.KeyPair, sealed: str, nonce: bytes, username: str,
                account: Account | None, scrypt_n: int = DEFAULT_SCRYPT_N, may_register: bool = True) -> LoginResult:
    """Do the work of one PASSWORD request (runs in a worker thread).

    For a new user (account None) the result carries the new account record,
    unless the address may not register now (``rate_limited``, checked after
    ``weak_password``); for an existing one, whether the password matches.
    """
    password = open_password(server_keys, sealed, nonce)
    if password is None:
        return LoginResult(Error.BAD_REQUEST, "the password could not be decrypted with this "
                                          "connection's nonce and the server key")
    if account is None:
        reason = weak_reason(password)
        if reason:
            return LoginResult(Error.WEAK_PASSWORD, reason)
        if not may_register:
            return LoginResult(Error.RATE_LIMITED, "too many new accounts from this address for now; try later")
        return LoginResult(OK, account=new_account(username, password, scrypt_n))
    if verify(account, password):
        return LoginResult(OK, account=account)
    return LoginResult(Error.WRONG_PASSWORD, "wrong password")


# --- in a worker process (hashpool.py) ------------------------------------------------

_worker_keys: pg3lib.KeyPair | None = None
_worker_scrypt_n = DEFAULT_SCRYPT_N


def init_worker(server_pem: bytes, scrypt_n: int) -> None:
    """Set up a password worker process: the server key and the scrypt cost for new accounts."""
    global _worker_keys, _worker_scrypt_n
    _worker_keys = pg3lib.KeyPair.from_pem(server_pem)
    _worker_scrypt_n = scrypt_n


def run_job(job: tuple) -> tuple:
    """One PASSWORD check: job is a state.CheckPassword as a tuple; returns ``(cid, LoginResult)``.

    Never raises: the session waiting for it must get an answer.
    """
    cid, sealed, nonce, username, account, may_register = job[:6]   # then the address: the pool's business
    try:
        if _worker_keys is None:
            raise RuntimeError("init_worker was not called")
        result = check_login(_worker_keys, sealed, nonce, username, account, _worker_scrypt_n, may_register)
    except Exception as exc:
        result = LoginResult(Error.INTERNAL, f"the password could not be checked ({type(exc).__name__})")
    return cid, result
