"""Refreshing our own records: a stage record refreshed at the holders the last walk found
(node/record_store.py; four real DHT peers on loopback: refreshes skip the walk while every holder
answers, a holder that died makes the next refresh walk again, readers asking for the latest copy see
every refresh), and the run config kept alive by a few keepers, not by every node."""
import asyncio
import time

import pytest
from hivemind import DHT
from hivemind.utils import get_dht_time

from node.announce import is_config_keeper
from node.dht import NO_CACHE, visible_maddrs
from node.record_store import RecordRefresher

pytestmark = pytest.mark.swarm
KEY = "refresh.1"


def _peer(initial) -> DHT:
    return DHT(initial_peers=initial, host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True, **NO_CACHE)


async def _known(_dht, node) -> int:
    return len(node.protocol.routing_table.uid_to_peer_id)


def _latest(dht: DHT):
    found = dht.get(KEY, latest=True)
    return found.value[b"me"].value if found is not None else None


def test_refreshes_go_to_the_holders_until_one_is_gone():
    first = _peer([])
    peers = [first] + [_peer(visible_maddrs(first)) for _ in range(3)]
    try:
        deadline = time.monotonic() + 20
        while any(p.run_coroutine(_known) < 3 for p in peers) and time.monotonic() < deadline:
            time.sleep(0.2)
        owner, reader = peers[1], peers[2]
        refresher = RecordRefresher(owner, walk_every=3)
        store = lambda n: asyncio.run(refresher.store(KEY, b"me", n, get_dht_time() + 60))  # noqa: E731

        assert store(1) and refresher.since_walk[KEY] == 0  # the first store walks
        assert len(refresher.holders[KEY]) == 4              # 4 peers, 5 holders wanted: all of them
        assert store(2) and refresher.since_walk[KEY] == 1  # the holders are kept: no walk
        assert _latest(reader) == 2

        gone = next(p for p in peers if p not in (owner, reader))
        gone.shutdown()
        assert store(3)                                      # the other holders took it ...
        assert KEY not in refresher.holders                  # ... and the next refresh walks again
        assert store(4) and refresher.since_walk[KEY] == 0
        assert _latest(reader) == 4
        n = 4
        while len(refresher.holders.get(KEY, {})) != 3 and n < 8:  # a walk may still list the dead peer once
            n += 1
            assert store(n)
        assert len(refresher.holders[KEY]) == 3
        walks = []
        for n in range(n + 1, n + 9):
            assert store(n)
            walks.append(refresher.since_walk[KEY] == 0)
        assert walks == [False, False, False, True] * 2      # walk_every=3: three refreshes, then a walk
        assert _latest(reader) == n
    finally:
        for p in peers:
            p.shutdown()


def test_three_keepers_keep_the_config_and_a_dying_ones_place_is_taken():
    until = 100.0
    nobody = {}
    assert is_config_keeper(b"k5", nobody, until)                       # no copy: publish
    three = {b"k1": 500.0, b"k2": 500.0, b"k3": 500.0}
    assert not is_config_keeper(b"k5", three, until)                    # three will outlive the check: not needed
    assert all(is_config_keeper(k, three, until) for k in three)         # the keepers keep refreshing
    crowd = {**three, b"k0": 500.0, b"k4": 500.0}                       # five started together
    assert [is_config_keeper(k, crowd, until) for k in sorted(crowd)] == [True, True, True, False, False]
    dying = {**three, b"k2": 90.0}                                       # k2's copy expires before the next check
    assert is_config_keeper(b"k5", dying, until)                        # someone steps in ...
    assert is_config_keeper(b"k5", {**dying, b"k5": 500.0}, until)      # ... and stays a keeper
    assert not is_config_keeper(b"k5", {**three, b"k5": 500.0}, until)  # k2 was alive after all: k5 lets go
