"""DHT keys and record schemas of a run.

    {run_id}_config     dictionary; subkey = owner public key of a bootstrap; value: RunRecord
    {run_id}.{stage}    dictionary; subkey = "<peer id>" + owner public key; value: StageRecord

The stage key is also the stage's hivemind expert uid: a hivemind client lists a stage's replicas
with one `dht.get("<run_id>.<stage>")` (with Ed25519RecordValidator, protocol/signing.py, among its
record validators, to check and strip the owners' signatures), one subkey per replica, as Petals
keys its module records.

Stage records carry the owner's Ed25519 public key in their subkey ("[ed25519:...]"), so
Ed25519RecordValidator only accepts values signed by that owner: no peer can overwrite another's
record. The pydantic schemas (hivemind SchemaValidator, pydantic v1 API) reject malformed values
before they are stored.
"""
from __future__ import annotations

from typing import Dict, Optional

import pydantic.v1 as pydantic
from pydantic.v1 import StrictBool, StrictFloat, StrictInt, StrictStr

from protocol import MAX_STAGES, NODE_STATES, PROTOCOL_VERSION


def config_key(run_id: str) -> str:
    return f"{run_id}_config"


def stage_key(run_id: str, stage: int) -> str:
    return f"{run_id}.{stage}"


class StageRecord(pydantic.BaseModel):
    stage: pydantic.conint(strict=True, ge=0, lt=MAX_STAGES)
    peer_id: StrictStr
    throughput: pydantic.confloat(strict=True, ge=0.0)   # microbatches per second this replica sustains
    queue: pydantic.conint(strict=True, ge=0)            # requests waiting for compute
    version: StrictInt                                   # protocol version
    fingerprint: StrictStr                               # run config fingerprint
    step: pydantic.conint(strict=True, ge=-1)            # last optimizer step applied
    serving: StrictBool                                  # False while loading state / leaving
    state: pydantic.constr(strict=True, regex="^(" + "|".join(NODE_STATES) + ")$") = "serving"  # NODE_STATES
    started: StrictFloat                                 # DHT time the node started
    updated: StrictFloat                                 # DHT time of this record
    relayed: StrictBool = False                          # reachable only through a relay (behind NAT)
    # relative L2 distance of its parameters from its averaging group's mean at its last round (None: none yet)
    distance: Optional[pydantic.confloat(strict=True, ge=0.0)] = None

    class Config:
        extra = "forbid"


class RunRecord(pydantic.BaseModel):
    version: StrictInt
    fingerprint: StrictStr
    config: Dict[StrictStr, object]
    updated: StrictFloat

    class Config:
        extra = "forbid"


def make_schema(run_id: str):
    """A pydantic model whose fields are the run's DHT keys (what SchemaValidator expects)."""
    return pydantic.create_model(
        f"ResBMSchema_{run_id}",
        **{config_key(run_id): (Dict[bytes, RunRecord], None)},
        **{stage_key(run_id, k): (Dict[bytes, StageRecord], None) for k in range(MAX_STAGES)},
    )


def stage_record(**fields) -> dict:
    """A validated StageRecord as a plain dict (what goes into the DHT)."""
    fields.setdefault("version", PROTOCOL_VERSION)
    # every field, defaults included: hivemind's SchemaValidator refuses a value that parsing would change
    return StageRecord(**fields).dict()
