"""The password worker pool: a few child processes that do PASSWORD checks.

A password check (RSA decryption of the sealed password, then scrypt) costs
tens of milliseconds of CPU; the event loop must not do it. Each worker is a
child process (``python3 hashpool.py FD``) joined to the server by a
socketpair, which the pool registers in the server's own selector: a job goes
down the socket, and its result coming back is what wakes the loop. The pool
is a selector source like any other (``HashWorker.on_ready``); answers
collect in ``HashPool.done`` for the server to hand to the sessions.

The pool keeps the queue: a job goes to a worker only when that worker is
free, so a job whose connection has closed meanwhile can still be dropped
(``cancel``) instead of costing a worker its RSA and scrypt time. Waiting
jobs are taken in turn by address (``FairQueue``): a storm of checks from a
few addresses delays a login from another by at most one check per storming
address, not by their whole queue. No threads in
the server, so no GIL for the loop to wait on; the workers run at a lower
priority, so a storm of logins does not slow the people already chatting.

Messages both ways: a 4-byte big-endian length, then a pickle (the channel
joins a process to its own child; nothing from the network is unpickled).
The first message to a worker is its set-up: the server key and scrypt cost.
"""

from __future__ import annotations

import collections
import logging
import selectors
import os
import pickle
import signal
import socket
import struct
import subprocess
import sys

import passwords
from protocol import Error

log = logging.getLogger("chat.hashpool")

_LENGTH = struct.Struct(">I")


def _message(obj) -> bytes:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return _LENGTH.pack(len(data)) + data


class HashWorker:
    """The server's end of one worker process."""

    __slots__ = ("proc", "sock", "out", "inbuf", "jobs", "pool")

    def __init__(self, setup: bytes, niceness: int, pool: HashPool) -> None:
        self.pool = pool
        parent, child = socket.socketpair()
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), str(child.fileno()), str(niceness)],
            pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL)
        child.close()
        parent.setblocking(False)
        self.sock = parent
        self.out = bytearray(setup)
        self.inbuf = bytearray()
        self.jobs: collections.deque = collections.deque()   # cids, in the order sent

    def fileno(self) -> int:
        return self.sock.fileno()

    def on_ready(self, mask: int) -> None:
        """Its socket is ready: send queued jobs, read answers (or find it dead)."""
        if mask & selectors.EVENT_WRITE and not self.flush():
            self.pool.selector.modify(self.sock, selectors.EVENT_READ, self)
        if mask & selectors.EVENT_READ:
            results = self.read()
            if results is None:
                results = self.pool.replace(self)
            self.pool.done.extend(results)
            self.pool.dispatch()

    def send(self, job) -> None:
        self.jobs.append(job.cid)
        self.out += _message(tuple(job))

    def flush(self) -> bool:
        """Send what is queued; True if some is left (wait for EVENT_WRITE)."""
        try:
            sent = self.sock.send(self.out)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            return False   # the read side will see the worker is gone
        del self.out[:sent]
        return bool(self.out)

    def read(self) -> list | None:
        """Results that arrived as (cid, LoginResult); None if the worker is gone."""
        try:
            data = self.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return []
        except OSError:
            data = b""
        if not data:
            return None
        buf = self.inbuf
        buf += data
        results = []
        while len(buf) >= 4:
            (length,) = _LENGTH.unpack_from(buf)
            if len(buf) < 4 + length:
                break
            cid, result = pickle.loads(bytes(buf[4:4 + length]))
            del buf[:4 + length]
            if self.jobs and self.jobs[0] == cid:
                self.jobs.popleft()
            results.append((cid, result))
        return results

    def close(self) -> None:
        self.sock.close()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class FairQueue:
    """Jobs waiting for a worker, by address: ``popleft`` takes the oldest job of the address
    whose turn it is, then that address goes to the back of the turns (round robin); a new
    address joins at the back. Each address's jobs keep their order."""

    def __init__(self) -> None:
        self._turns: collections.OrderedDict[str, collections.deque] = collections.OrderedDict()
        self._count = 0

    def append(self, job) -> None:
        waiting = self._turns.get(job.address)
        if waiting is None:
            waiting = self._turns[job.address] = collections.deque()
        waiting.append(job)
        self._count += 1

    def popleft(self):
        """The next job (IndexError if there is none)."""
        if not self._turns:
            raise IndexError("no job is waiting")
        address, waiting = self._turns.popitem(last=False)
        job = waiting.popleft()
        if waiting:
            self._turns[address] = waiting   # back of the turns
        self._count -= 1
        return job

    def remove(self, cid: int) -> bool:
        """Drop the waiting job of connection cid; True if there was one."""
        for address, waiting in self._turns.items():
            for job in waiting:
                if job.cid == cid:
                    waiting.remove(job)
                    if not waiting:
                        del self._turns[address]
                    self._count -= 1
                    return True
        return False

    def __len__(self) -> int:
        return self._count


class HashPool:
    """A fixed number of workers and the queue of jobs waiting for one of them."""

    def __init__(self, size: int, server_pem: bytes, scrypt_n: int, selector: selectors.BaseSelector,
                 niceness: int = 10) -> None:
        self._setup = _message((server_pem, scrypt_n))
        self._niceness = niceness
        self.selector = selector
        self.done: collections.deque = collections.deque()   # (cid, LoginResult) answered, not yet taken
        self.queue = FairQueue()   # CheckPassword jobs no worker has yet
        self.workers = [self._start() for _ in range(max(1, size))]

    def _start(self) -> HashWorker:
        worker = HashWorker(self._setup, self._niceness, self)
        self.selector.register(worker.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, worker)
        return worker

    def submit(self, job) -> None:
        """Queue one CheckPassword job; it goes to a worker as soon as one is free."""
        self.queue.append(job)
        self.dispatch()

    def dispatch(self) -> None:
        """Give each free worker the next queued job (in turn by address)."""
        for worker in self.workers:
            if not self.queue:
                return
            if not worker.jobs:
                worker.send(self.queue.popleft())
                if worker.flush():
                    self.selector.modify(worker.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, worker)

    def cancel(self, cid: int) -> bool:
        """Drop the queued job of a connection that closed; True if one was still queued."""
        return self.queue.remove(cid)

    def replace(self, worker: HashWorker) -> list:
        """A worker died: start another; its unanswered jobs are answered ``internal``."""
        log.error("a password worker (pid %d) exited with %s; starting another",
                  worker.proc.pid, worker.proc.poll())
        lost = [(cid, passwords.LoginResult(Error.INTERNAL, "the password check failed; please try again"))
                for cid in worker.jobs]
        worker.jobs.clear()
        self.selector.unregister(worker.sock)
        worker.sock.close()
        self.workers[self.workers.index(worker)] = self._start()
        return lost   # the caller hands these over, then dispatches

    def close(self) -> None:
        for worker in self.workers:
            self.selector.unregister(worker.sock)
            worker.close()


# --- the worker process -------------------------------------------------------------

def _read_exactly(sock: socket.socket, size: int) -> bytes | None:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            return None
        data += chunk
    return bytes(data)


def _read_message(sock: socket.socket):
    header = _read_exactly(sock, 4)
    if header is None:
        return None
    body = _read_exactly(sock, _LENGTH.unpack(header)[0])
    return None if body is None else pickle.loads(body)


def worker_main(fd: int, niceness: int) -> int:
    """Answer jobs until the server closes the socket."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # the server decides when we stop: it closes the socket
    try:
        os.nice(niceness)
    except OSError:
        pass
    sock = socket.socket(fileno=fd)
    try:
        return _serve(sock)
    except OSError:   # the server is gone
        return 0


def _serve(sock: socket.socket) -> int:
    setup = _read_message(sock)
    if setup is None:
        return 0
    server_pem, scrypt_n = setup
    passwords.init_worker(server_pem, scrypt_n)
    while True:
        job = _read_message(sock)
        if job is None:
            return 0
        sock.sendall(_message(passwords.run_job(job)))


if __name__ == "__main__":
    sys.exit(worker_main(int(sys.argv[1]), int(sys.argv[2])))
