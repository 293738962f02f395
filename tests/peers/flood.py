"""A hostile peer for tests/test_flood.py: a burst of 100 concurrent `state` downloads and 200
concurrent forwards at one stage, then it stops reading (SIGSTOP of its own process group, its p2p
daemon included), so every reply still in flight is never read. Prints what came back."""
import asyncio
import json
import os
import signal
import sys

import torch

from node.client import StageClient
from protocol.errors import PeerUnavailable, RemoteError
from node.dht import start_dht
from protocol.codec import encode
from swarm.config import RunConfig


async def burst(client: StageClient, peer: str, run) -> dict:
    x = encode(torch.randn(2, run.model.seq_len, run.model.code_width), run.model.wire_codec)
    calls = [client.call(peer, 1, "state", offset=0, timeout=60) for _ in range(100)] + \
            [client.call(peer, 1, "forward", x=x, timeout=60) for _ in range(200)]
    outcomes: dict[str, int] = {}
    for result in await asyncio.gather(*calls, return_exceptions=True):
        key = "ok" if not isinstance(result, Exception) else \
            getattr(result, "reason", type(result).__name__) if isinstance(result, (RemoteError, PeerUnavailable)) \
            else type(result).__name__
        outcomes[key] = outcomes.get(key, 0) + 1
    return outcomes


async def main(peers, config_path, stage_peer):
    run = RunConfig.from_wire_dict(json.load(open(config_path)))
    dht = start_dht(run.run_id, peers)
    p2p = await dht.replicate_p2p()
    print(json.dumps(await burst(StageClient(p2p, run), stage_peer, run)), flush=True)
    # a second burst whose replies nobody reads: fire it, then freeze this whole process group
    client = StageClient(p2p, run)
    pending = [asyncio.ensure_future(burst(client, stage_peer, run))]
    await asyncio.sleep(0.5)
    os.killpg(os.getpgid(0), signal.SIGSTOP)
    await asyncio.gather(*pending, return_exceptions=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[3:], sys.argv[1], sys.argv[2]))
