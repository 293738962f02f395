"""DHT keys and record schemas of a run.

    {run_id}_config   dictionary; subkey = owner public key of a bootstrap; value: RunRecord
    {run_id}_stages   dictionary; subkey = "<peer id>" + owner public key; value: StageRecord

Stage records carry the owner's public key in their subkey, so hivemind's RSASignatureValidator
only accepts values signed by that owner: no peer can overwrite another's record. The pydantic
schemas (hivemind SchemaValidator, pydantic v1 API) reject malformed values before they are stored.
"""
from __future__ import annotations

from typing import Dict

import pydantic.v1 as pydantic
from pydantic.v1 import StrictBool, StrictFloat, StrictInt, StrictStr

from protocol import PROTOCOL_VERSION


# A node's lifecycle (node/lifecycle.py); only "serving" nodes take requests.
NODE_STATES = ("joining", "loading", "serving", "draining", "moving", "stopped")


def config_key(run_id: str) -> str:
    return f"{run_id}_config"


def stages_key(run_id: str) -> str:
    return f"{run_id}_stages"


class StageRecord(pydantic.BaseModel):
    stage: pydantic.conint(strict=True, ge=0, le=4096)
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
        **{config_key(run_id): (Dict[bytes, RunRecord], None),
           stages_key(run_id): (Dict[bytes, StageRecord], None)},
    )


def stage_record(**fields) -> dict:
    """A validated StageRecord as a plain dict (what goes into the DHT)."""
    fields.setdefault("version", PROTOCOL_VERSION)
    return StageRecord(**fields).dict()
