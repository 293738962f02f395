"""The wire contract of a ResBM swarm: what crosses the network and what is stored in the DHT.

Nothing here knows about models or event loops; node/ moves these bytes, swarm/ computes them.
(This module is light: `--help` imports it. Record schemas: protocol/records.py.)
"""
import enum

PROTOCOL_VERSION = 6  # 3: no step barrier (prepare, step and ledger calls are gone); 4: records carry `distance`;
#                       5: records signed with Ed25519 (protocol/signing.py) instead of RSA;
#                       6: anchored averaging rounds carry 2-bit changes (protocol/averaging_codec.py), and
#                          averaging groups are keyed by this version, so replicas of two versions never mix

# Wire codecs of boundary codes (protocol/codec.py implements them); here so that configs and
# `--help` can name them without importing torch.
CODECS = ("fp32", "bf16", "fp16", "fp8", "int8", "int8ch", "int4", "int4ch")

MAX_STAGES = 64  # stage keys the schema validator knows (a run may have fewer stages)


class NodeState(str, enum.Enum):
    """A node's lifecycle (node/lifecycle.py), published in its stage record; only "serving" nodes
    take requests."""
    JOINING = "joining"
    LOADING = "loading"
    SERVING = "serving"
    DRAINING = "draining"
    MOVING = "moving"
    STOPPED = "stopped"


NODE_STATES = tuple(s.value for s in NodeState)
LEFT = (NodeState.DRAINING.value, NodeState.STOPPED.value)      # records of nodes that no longer count
ARRIVING = (NodeState.JOINING.value, NodeState.LOADING.value)   # nodes that are about to serve a stage


def stage_role(k: int, n_stages: int) -> str:
    """What a stage's replicas do, as status tables and run summaries name it."""
    return "trainer" if k == 0 else ("tail" if k == n_stages - 1 else "middle")
