"""node/group_keys.py: matchmaking's reads of the group key are paced, and both its reads and its
declarations walk only to the key's holders (no network: a fake DHT and a fake clock)."""
import asyncio
import types

from hivemind.p2p import PeerID

from node.dht import RECORD_REPLICAS
from node.group_keys import PacedGroupKeys

A, B = (PeerID.from_base58(s) for s in ("QmXDiW9e4MFobWgyRjPn4b1Cf8eRie3bfYzjRjNwhkv2YJ",
                                        "QmdM7eqpcc9JNuaXNU8nNQTEak36zJUsHkKoYwcRNYRwS3"))


class FakeDHT:
    peer_id = A

    def __init__(self, value):
        self.value, self.calls = value, []

    async def get(self, key, **kwargs):
        self.calls.append(("get", key, kwargs))
        return types.SimpleNamespace(value=self.value) if self.value is not None else None

    async def store(self, **kwargs):
        self.calls.append(("store", kwargs["key"], kwargs))
        return True


def item(value, expiration):
    return types.SimpleNamespace(value=value, expiration_time=expiration)


def paced(dht, poll_s=2.0):
    base = types.SimpleNamespace(dht=dht, prefix="run_avg_v6_stage1", group_bits="", target_group_size=None)
    return PacedGroupKeys(base, poll_s)


def test_reads_of_the_group_key_come_at_most_every_poll_interval(monkeypatch):
    clock = [100.0]
    waits = []

    async def fake_sleep(s):
        waits.append(round(s, 6))
        clock[0] += s
    monkeypatch.setattr("node.group_keys.time.monotonic", lambda: clock[0])
    monkeypatch.setattr(asyncio, "sleep", fake_sleep)
    dht = FakeDHT({A.to_bytes(): item(True, 5.0), B.to_bytes(): item(False, 6.0), 17: item(True, 7.0)})
    keys = paced(dht)

    async def reads():
        first = await keys.get_averagers("run_avg_v6_stage1.0b", only_active=True)
        await keys.get_averagers("run_avg_v6_stage1.0b", only_active=False)   # at once: waits the interval
        clock[0] += 5.0                                                          # long after: no wait
        await keys.get_averagers("run_avg_v6_stage1.0b", only_active=True)
        return first
    first = asyncio.run(reads())
    assert waits == [0.0, 2.0, 0.0]
    assert first == [(A, 5.0)]                  # only the active averager; a subkey of the wrong type is skipped
    assert [c[0] for c in dht.calls] == ["get"] * 3
    assert all(c[2] == {"latest": True, "return_future": True, "beam_size": RECORD_REPLICAS} for c in dht.calls)


def test_declarations_walk_to_the_holders_and_a_withdrawal_outlives_its_declaration():
    dht = FakeDHT(None)
    keys = paced(dht)
    assert asyncio.run(keys.get_averagers("run_avg_v6_stage1.0b", only_active=True)) == []  # nobody yet
    asyncio.run(keys.declare_averager("run_avg_v6_stage1.0b", A, 10.0))
    asyncio.run(keys.declare_averager("run_avg_v6_stage1.0b", A, 10.0, looking_for_group=False))
    (_, _, on), (_, _, off) = dht.calls[1:]
    assert on["value"] is True and on["expiration_time"] == 10.0 and on["beam_size"] == RECORD_REPLICAS
    assert off["value"] is False and off["expiration_time"] > 10.0 and on["subkey"] == off["subkey"] == A.to_bytes()
