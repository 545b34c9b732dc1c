"""Tests for hashpool.FairQueue: the password checks waiting for a worker, taken in turn by address.

A hypothesis model says what "in turn" means: the addresses form a round of
turns in the order they first had a job waiting; each pop serves the address
at the front and sends it to the back if it has more. (The pool with real
workers is tested through the server, in test_abuse.py.)
"""

from __future__ import annotations

from typing import NamedTuple

from hypothesis import given
from hypothesis import strategies as st

from hashpool import FairQueue


class Job(NamedTuple):
    cid: int
    address: str


def test_one_address_is_first_in_first_out_and_others_cut_in_by_turns():
    q = FairQueue()
    for cid, address in ((1, "a"), (2, "a"), (3, "a"), (4, "b"), (5, "a"), (6, "c")):
        q.append(Job(cid, address))
    assert len(q) == 6
    assert [q.popleft().cid for _ in range(6)] == [1, 4, 6, 2, 3, 5]
    assert len(q) == 0


def test_remove_drops_one_job_and_an_emptied_address_leaves_the_turns():
    q = FairQueue()
    for cid, address in ((1, "a"), (2, "b"), (3, "a")):
        q.append(Job(cid, address))
    assert q.remove(2) and not q.remove(2) and not q.remove(99)
    assert [q.popleft().cid for _ in range(2)] == [1, 3]
    try:
        q.popleft()
    except IndexError:
        pass
    else:
        raise AssertionError("an empty queue gave a job")


ops = st.lists(st.one_of(st.tuples(st.just("add"), st.sampled_from("abcd")),
                         st.tuples(st.just("pop"), st.none()),
                         st.tuples(st.just("cancel"), st.integers(0, 40))), max_size=60)


@given(ops)
def test_fair_queue_matches_the_model_of_turns(steps):
    q = FairQueue()
    turns: list[str] = []                 # the model: addresses in turn order
    waiting: dict[str, list[int]] = {}     # address -> its cids, oldest first
    cid = 0
    for op, arg in steps:
        if op == "add":
            cid += 1
            q.append(Job(cid, arg))
            if arg not in waiting:
                waiting[arg] = []
                turns.append(arg)
            waiting[arg].append(cid)
        elif op == "pop":
            if not turns:
                continue
            address = turns.pop(0)
            expected = waiting[address].pop(0)
            if waiting[address]:
                turns.append(address)
            else:
                del waiting[address]
            assert q.popleft() == Job(expected, address)
        else:
            owner = next((a for a, cids in waiting.items() if arg in cids), None)
            assert q.remove(arg) is (owner is not None)
            if owner is not None:
                waiting[owner].remove(arg)
                if not waiting[owner]:
                    del waiting[owner]
                    turns.remove(owner)
        assert len(q) == sum(len(cids) for cids in waiting.values())
