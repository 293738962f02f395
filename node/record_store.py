"""Refreshing a record we own at its key's holders, without a DHT walk each time.

hivemind's `store` walks to the key's nearest nodes before it stores, and every node the walk asks
answers with the key's whole value: at a stage key, every replica's record. In the scaling lab (2
replicas per stage, 0.5 Mbit/s links, under load) those walks were the largest DHT item: each node
asked 0.4-0.6 finds a second for its own stage key and received 400-630 B/s of answers, and answered
as much, on links the codes keep full. A record refreshed every period needs the walk only when its
holders may have changed, so a refresh goes straight to the holders the last walk found (one small
request each) and walks again when one of them did not answer, when this node has come to know a
node nearer to the key than one of them (a joiner), or after WALK_EVERY refreshes. The store itself
is hivemind 1.1.12's `DHTNode.store_many` for one record (serialize, sign, `call_store` each holder,
our own storage if we are one), on the same DHTNode attributes it uses."""
from __future__ import annotations

import asyncio
import dataclasses
import functools

from hivemind import DHT
from hivemind.dht.crypto import DHTRecord
from hivemind.dht.routing import DHTID

from node.dht import RECORD_REPLICAS

WALK_EVERY = 4  # refreshes between walks while every holder answers and none nearer is known


class RecordRefresher:
    """Stores (key, subkey) -> value for one owner, remembering the key's holders between stores."""

    def __init__(self, dht: DHT, walk_every: int = WALK_EVERY):
        self.dht, self.walk_every = dht, walk_every
        self.holders: dict = {}   # key -> {DHTID: PeerID} the last walk found (ours included)
        self.since_walk: dict = {}

    async def store(self, key: str, subkey, value, expiration: float) -> bool:
        """True if some holder took the record (hivemind's store says the same of its last answer)."""
        due = self.since_walk.get(key, 0) >= self.walk_every
        ok, holders, walked = await self.dht.run_coroutine(functools.partial(
            _store_at_holders, key=key, subkey=subkey, value=value, expiration=expiration,
            holders=None if due else self.holders.get(key)), return_future=True)
        self.since_walk[key] = 0 if walked else self.since_walk.get(key, 0) + 1
        if holders is None:
            self.holders.pop(key, None)
        else:
            self.holders[key] = holders
        return ok


async def _store_at_holders(_dht, node, key: str, subkey, value, expiration: float, holders: dict | None):
    """(stored anywhere, the holders to use next time or None if one did not answer, whether it walked).
    Runs in the DHT's process."""
    key_id = DHTID.generate(source=key)
    walked = holders is None or not are_nearest_known(node, key_id, holders)
    if walked:
        holders = (await node.find_nearest_nodes([key_id], k_nearest=RECORD_REPLICAS,
                                                 beam_size=RECORD_REPLICAS))[key_id]
    proto = node.protocol
    record = DHTRecord(key_id.to_bytes(), proto.serializer.dumps(subkey), proto.serializer.dumps(value), expiration)
    if proto.record_validator is not None:  # signed as hivemind's own store signs it
        record = dataclasses.replace(record, value=proto.record_validator.sign_value(record))

    async def one(node_id, peer_id) -> bool | None:
        if node_id == node.node_id:
            valid = proto.record_validator is None or proto.record_validator.validate(record)
            return valid and proto.storage.store(key_id, record.value, expiration, subkey=subkey)
        answer = await proto.call_store(peer_id, keys=[key_id], values=[record.value], expiration_time=[expiration],
                                        subkeys=[subkey])
        return None if answer is None else bool(answer[0])

    results = await asyncio.gather(*(one(n, p) for n, p in holders.items()))
    return any(results), (holders if all(r is not None for r in results) else None), walked


def are_nearest_known(node, key_id: DHTID, holders: dict) -> bool:
    """Whether `holders` are still the RECORD_REPLICAS nodes nearest to the key among those this node
    knows (its routing table and itself): a node that joined since the walk would be asked by readers."""
    known = {n for n, _ in node.protocol.routing_table.get_nearest_neighbors(key_id, RECORD_REPLICAS,
                                                                             exclude=node.node_id)}
    nearest = sorted(known | {node.node_id} | set(holders), key=key_id.xor_distance)[:RECORD_REPLICAS]
    return set(nearest) == set(holders)
