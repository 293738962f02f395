"""A relayed replica (behind NAT, reached through a relay) is penalised: direct replicas win ties."""
import random

from protocol.records import StageRecord, stage_record
from swarm.routing import RELAY_PENALTY, Router


def record(peer: str, relayed: bool | None = None, throughput: float = 2.0) -> dict:
    extra = {} if relayed is None else {"relayed": relayed}
    return stage_record(stage=1, peer_id=peer, throughput=throughput, queue=0, fingerprint="f", step=0,
                        serving=True, started=1.0, updated=2.0, **extra)


def picks(router, n: int = 600) -> dict:
    out = {}
    for _ in range(n):
        peer = router.choose(1).peer_id
        out[peer] = out.get(peer, 0) + 1
    return out


def test_direct_replica_preferred_over_relayed_of_equal_speed():
    router = Router(3, rng=random.Random(0))
    router.update(1, [record("home", relayed=True), record("direct")])
    got = picks(router)  # weights 1 / expected time: the relayed one takes twice as long
    assert 0.6 < got["direct"] / 600 < 0.73 and got["home"] > 0, got


def test_penalty_scales_expected_time_observed_or_advertised():
    router = Router(3)
    router.update(1, [record("home", relayed=True), record("direct")])
    home, direct = router.stages[1]["home"], router.stages[1]["direct"]
    assert home.expected_seconds() == RELAY_PENALTY * direct.expected_seconds() == RELAY_PENALTY * 0.5
    router.succeeded(home, 0.1)
    assert home.expected_seconds() == 0.1 * RELAY_PENALTY


def test_relayed_replica_used_when_direct_one_is_busy_or_banned():
    router = Router(3, rng=random.Random(0))
    router.update(1, [record("home", relayed=True), record("direct")])
    direct = router.stages[1]["direct"]
    direct.inflight = int(RELAY_PENALTY)  # (inflight + 1) * 0.5 > 1 * 0.5 * penalty: home now takes more
    got = picks(router)
    assert got["home"] > got["direct"] > 0, got
    direct.inflight = 0
    router.failed(direct)
    assert router.choose(1).peer_id == "home"


def test_records_carry_relayed_and_survive_the_dht_schema_round_trip():
    direct = record("direct")
    # hivemind's SchemaValidator stores a value only if parsing it changes nothing (no default filled in)
    for rec in (direct, record("home", relayed=True)):
        assert StageRecord(**rec).dict() == rec
    assert direct["relayed"] is False
    assert record("home", relayed=True)["relayed"] is True
    router = Router(3)
    router.update(1, [direct])
    assert router.stages[1]["direct"].relayed is False
