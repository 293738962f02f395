"""hivemind's averaging group keys, with the DHT reads of matchmaking paced.

While a replica waits for the others of its group (they reach their rounds at different moments),
hivemind 1.1.12's matchmaking reads the group key again as soon as the last read answered: its
leader queue is empty, so `pop_next_leader` triggers another update at once. On loopback that was
~400 DHT walks a second, 5 MB per round while one replica waited 10 s for the other, against 160 kB
for the round itself; on a shaped link those walks take the link from the codes. A newcomer's first
read is not delayed, and it is the newcomer that finds the waiting leader and joins it, so pacing
the waiting replica's reads costs the group no time."""
from __future__ import annotations

import asyncio
import math
import time

from hivemind.averaging.key_manager import GroupKeyManager
from hivemind.p2p import PeerID

from node.dht import HOLDERS_WALK, subkey_items


class PacedGroupKeys(GroupKeyManager):
    """`base`'s keys, read at most every `poll_s`; reads and declarations walk to the key's holders."""

    def __init__(self, base: GroupKeyManager, poll_s: float):
        super().__init__(base.dht, base.prefix, base.group_bits, base.target_group_size)
        self.poll_s = poll_s
        self.last_read = -float("inf")

    async def declare_averager(self, group_key: str, peer_id: PeerID, expiration_time: float,
                               looking_for_group: bool = True) -> bool:
        if not looking_for_group:  # hivemind's rule: a withdrawal must outlive the declaration it replaces
            expiration_time = math.nextafter(expiration_time, math.inf)
        return await self.dht.store(key=group_key, subkey=peer_id.to_bytes(), value=looking_for_group,
                                    expiration_time=expiration_time, return_future=True, **HOLDERS_WALK)

    async def get_averagers(self, group_key: str, only_active: bool) -> list[tuple[PeerID, float]]:
        await asyncio.sleep(max(0.0, self.last_read + self.poll_s - time.monotonic()))
        self.last_read = time.monotonic()
        found = await self.dht.get(group_key, latest=True, return_future=True, **HOLDERS_WALK)
        out = []
        for key, item in subkey_items(found).items():
            if only_active and not item.value:
                continue
            try:
                out.append((PeerID(key), item.expiration_time))
            except TypeError:  # a subkey of another type from some peer: not an averager
                continue
        return out
