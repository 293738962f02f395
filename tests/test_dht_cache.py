"""A periodic (not-latest) read of a stage key sees every replica's record, not a cached copy of an
earlier answer (node/dht.py NO_CACHE): three real DHT peers on loopback, one holder per key."""
import asyncio
import time

import pytest
from hivemind import DHT
from hivemind.dht.routing import DHTID
from hivemind.utils import get_dht_time

from node.announce import stage_items
from node.dht import NO_CACHE, visible_maddrs
from protocol.records import stage_key

pytestmark = pytest.mark.swarm
RUN = "cache"


def _peer(initial, caches: dict) -> DHT:
    return DHT(initial_peers=initial, host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True, num_replicas=1, **caches)


async def _known(_dht, node) -> int:
    return len(node.protocol.routing_table.uid_to_peer_id)


async def _node_id(_dht, node) -> int:
    return int(node.node_id)


def _subkeys_a_non_holder_reads(caches: dict) -> set:
    """A peer that does not hold the key stores its record and reads the key; another peer stores its
    own (a replica joins). What does the first one's next periodic read return?"""
    first = _peer([], caches)
    peers = [first]
    try:
        peers.append(_peer(visible_maddrs(first), caches))
        peers.append(_peer(visible_maddrs(first) + visible_maddrs(peers[1]), caches))
        deadline = time.monotonic() + 20
        while any(p.run_coroutine(_known) < 2 for p in peers) and time.monotonic() < deadline:
            time.sleep(0.2)  # every peer knows both others: a store reaches the key's one holder
        key = stage_key(RUN, 0)
        target = int(DHTID.generate(source=key))
        holder = min(peers, key=lambda p: p.run_coroutine(_node_id) ^ target)
        storer, other = [p for p in peers if p is not holder]
        assert storer.store(key, "ours", get_dht_time() + 60, subkey=b"storer")
        first = asyncio.run(stage_items(storer, RUN, [0], fresh=False))
        assert {sub for _, sub, _ in first} == {b"storer"}
        assert other.store(key, "theirs", get_dht_time() + 60, subkey=b"other")  # a replica joins
        return {sub for _, sub, _ in asyncio.run(stage_items(storer, RUN, [0], fresh=False))}
    finally:
        for p in peers:
            p.shutdown()


def test_a_periodic_read_sees_every_record_with_the_caches_off():
    # hivemind's defaults: the first read's answer is cached (and our own stores update that copy), and
    # that copy answers every read until it expires: the joiner is missed
    assert _subkeys_a_non_holder_reads({}) == {b"storer"}
    assert _subkeys_a_non_holder_reads(NO_CACHE) == {b"storer", b"other"}
