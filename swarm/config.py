"""One config object describes a run. Its `wire_dict()` is what every peer must agree on."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from protocol import CODECS, PROTOCOL_VERSION
from protocol.fingerprint import fingerprint

BOUNDARIES = ("resbm", "none", "bottleneck", "subspace", "int8")
OPTIMIZERS = ("adamw", "muon")
LR_SCHEDULES = ("constant", "cosine", "linear")


DEFAULT_RUN_ID = "resbm"          # bootstrap/join/status when --run-id is not given
LOCAL_RUN_ID = "resbm-local"      # `resbm-node local`, so a local swarm never mixes with a real one


def opt(default, help: str, *, flag: str | None = None, choices=None, item=None, metavar=None, derived=False):
    """A config field that is also a command-line flag (node/args.py generates the flags from these):
    `flag` defaults to --field-name (which always works too), `item` is the element type of a tuple.
    A `derived` field has no flag: it is computed from the others when the run is made (a hash)."""
    return field(default=default, metadata={"help": help, "flag": flag, "choices": choices, "item": item,
                                            "metavar": metavar, "derived": derived})


class ConfigError(ValueError):
    """A run configuration that cannot work; the message says which field and why."""


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = opt(256, "vocabulary size (256: byte-level)")
    d_model: int = opt(256, "hidden width d")
    n_layers: int = opt(4, "transformer layers in total", flag="--layers")
    n_heads: int = opt(4, "attention heads", flag="--heads")
    kv_heads: int = opt(0, "key/value heads: fewer than --heads is grouped-query attention (0: as --heads)")
    ffn_hidden: int = opt(0, "SwiGLU hidden width (0: ~8/3 d rounded up to 64)")
    seq_len: int = opt(128, "tokens per sequence")
    n_stages: int = opt(2, "pipeline stages S", flag="--stages")
    layers_per_stage: tuple = opt((), "layers of each stage, e.g. 3 2 2 (default: as even as possible)", item=int)
    boundary: str = opt("resbm", "what crosses a stage boundary", choices=BOUNDARIES)
    ratio: int = opt(128, "compression ratio: code width b = d / ratio")
    codec: str = opt("bf16", "wire codec for codes (forward)", choices=CODECS)
    codec_bwd: str = opt("", "wire codec for their gradients (backward); '': as --codec", choices=("",) + CODECS)
    boundary_hidden: int = opt(0, "hidden width m of the boundary's Enc/Dec MLPs (0: max(4b, 64))")
    rope_theta: float = opt(10000.0, "rotary embedding base")
    norm_eps: float = opt(1e-5, "RMSNorm epsilon")
    init_std: float = opt(0.02, "std of the normal initialisation")
    seed: int = opt(0, "initialisation seed (also seeds the fixed subspace basis)")

    def __post_init__(self):
        self.validate()

    # --- derived sizes -------------------------------------------------------------------------
    @property
    def code_width(self) -> int:
        """Numbers per token that cross a boundary."""
        if self.boundary in ("none", "int8"):
            return self.d_model
        return self.d_model // self.ratio

    @property
    def wire_codec(self) -> str:
        return "int8" if self.boundary == "int8" else self.codec

    @property
    def wire_codec_bwd(self) -> str:
        """Codec of the gradients that cross a boundary backward (their range differs from the codes')."""
        return "int8" if self.boundary == "int8" else (self.codec_bwd or self.codec)

    @property
    def n_kv_heads(self) -> int:
        return self.kv_heads or self.n_heads

    @property
    def ffn_dim(self) -> int:
        return self.ffn_hidden or 64 * -(-(8 * self.d_model // 3) // 64)

    @property
    def enc_hidden(self) -> int:
        return self.boundary_hidden or max(4 * self.code_width, 64)

    @property
    def stage_layers(self) -> tuple:
        if self.layers_per_stage:
            return tuple(self.layers_per_stage)
        base, extra = divmod(self.n_layers, self.n_stages)
        return tuple(base + (1 if i < extra else 0) for i in range(self.n_stages))

    def validate(self) -> None:
        def bad(msg):
            raise ConfigError(msg)

        if self.d_model < 1 or self.n_layers < 1 or self.vocab_size < 2:
            bad(f"d_model, n_layers must be >= 1 and vocab_size >= 2 (got {self.d_model}, "
                f"{self.n_layers}, {self.vocab_size})")
        if self.n_heads < 1 or self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            bad(f"n_heads={self.n_heads} must divide d_model={self.d_model} into an even head size")
        if self.kv_heads < 0 or self.n_heads % self.n_kv_heads:
            bad(f"kv_heads={self.kv_heads} must divide n_heads={self.n_heads} (each key/value head serves a "
                f"group of query heads; 0: one per query head)")
        if self.n_stages < 1:
            bad(f"n_stages must be >= 1, got {self.n_stages}")
        if self.n_stages > self.n_layers:
            bad(f"n_stages={self.n_stages} exceeds n_layers={self.n_layers}: every stage needs a layer")
        if self.layers_per_stage and (len(self.layers_per_stage) != self.n_stages
                                      or sum(self.layers_per_stage) != self.n_layers
                                      or min(self.layers_per_stage) < 1):
            bad(f"layers_per_stage={self.layers_per_stage} must have n_stages={self.n_stages} entries "
                f">= 1 summing to n_layers={self.n_layers}")
        if self.boundary not in BOUNDARIES:
            bad(f"boundary={self.boundary!r}; choose one of {', '.join(BOUNDARIES)}")
        if self.codec not in CODECS:
            bad(f"codec={self.codec!r}; choose one of {', '.join(CODECS)}")
        if self.codec_bwd and self.codec_bwd not in CODECS:
            bad(f"codec_bwd={self.codec_bwd!r}; choose one of {', '.join(CODECS)} (or '' for the forward codec)")
        if self.wire_codec_bwd == "fp8":
            bad("codec_bwd=fp8: gradients of codes are often ~1e-6, far below fp8's range (they would be "
                "zeroed); set codec_bwd to bf16 (or int8ch) when codec is fp8")
        if self.boundary in ("resbm", "bottleneck", "subspace"):
            if self.ratio < 1 or self.d_model % self.ratio:
                bad(f"ratio={self.ratio} must divide d_model={self.d_model} "
                    f"(code width b = d_model / ratio must be a whole number)")
            if self.d_model // self.ratio < 1:
                bad(f"ratio={self.ratio} leaves code width b < 1 at d_model={self.d_model}")
        if self.seq_len < 2:
            bad(f"seq_len must be >= 2, got {self.seq_len}")

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)


@dataclass(frozen=True)
class TrainConfig:
    optimizer: str = opt("adamw", "optimizer (muon: Muon for hidden matrices, AdamW for the rest)", choices=OPTIMIZERS)
    lr: float = opt(3e-3, "peak learning rate")
    weight_decay: float = opt(0.01, "decoupled weight decay")
    warmup_steps: int = opt(20, "linear warm-up steps", flag="--warmup")
    lr_schedule: str = opt("constant", "learning rate after warm-up: constant, or a cosine/linear decay to --min-lr",
                           choices=LR_SCHEDULES)
    min_lr: float = opt(0.0, "learning rate at the end of the decay")
    decay_steps: int = opt(0, "step at which the decay reaches --min-lr (0: --steps of the command that makes the "
                              "run; then fixed in the run config)")
    grad_clip: float = opt(1.0, "clip each stage's gradient norm to this")
    batch_size: int = opt(16, "sequences per optimizer step")
    microbatches: int = opt(4, "pieces a step is cut into (pipelined in the swarm)")
    average_every: int = opt(10, "replicas of a stage average parameters every N steps")
    trainers: tuple = opt((), "peer ids of the trainers (stage 0 replicas) allowed to feed microbatches and "
                              "close steps (see `resbm-node identity`). Without it any peer may: fine on a "
                              "private network only", flag="--trainer", item=str, metavar="PEER_ID")
    steps: int = opt(200, "optimizer steps to train (a local choice, not part of the fingerprint)")

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer={self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if self.batch_size < 1 or self.microbatches < 1 or self.batch_size % self.microbatches:
            raise ConfigError(f"microbatches={self.microbatches} must divide batch_size={self.batch_size}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"lr_schedule={self.lr_schedule!r}; choose one of {', '.join(LR_SCHEDULES)}")
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"min_lr={self.min_lr} must be between 0 and lr={self.lr}")
        if self.decay_steps < 0:
            raise ConfigError(f"decay_steps must be >= 0, got {self.decay_steps}")
        if self.lr_schedule != "constant" and not self.decay_steps:
            # The horizon must be in the fingerprint, and `steps` (a local choice) is not: fix it here.
            object.__setattr__(self, "decay_steps", self.steps)
        if self.lr_schedule != "constant" and self.decay_steps <= self.warmup_steps:
            raise ConfigError(f"decay_steps={self.decay_steps} must exceed warmup_steps={self.warmup_steps}: "
                              f"the decay starts after the warm-up")

    @property
    def microbatch_size(self) -> int:
        return self.batch_size // self.microbatches


@dataclass(frozen=True)
class DataConfig:
    """What a run trains on. swarm/data.py resolves it when the run is made: `stdlib` becomes
    `stdlib:<python version>` and the hashes are filled in, so a trainer with other data is refused."""
    data: str = opt("stdlib", "text to train on: a file or folder (.txt and other text, .jsonl, .parquet), "
                              "hf:<dataset>[:<config>] (streamed; pip install datasets), or stdlib: this Python's "
                              "standard library sources")
    data_column: str = opt("text", "column (.parquet, hf:) or field (.jsonl) that holds the text")
    data_max_bytes: int = opt(0, "read at most this many bytes of text from the source (0: all of it)")
    tokenizer: str = opt("bytes", "bytes (256 ids), a tokenizers JSON file (e.g. a trained BPE), or hf:<model> "
                                  "(its tokenizer.json from the Hugging Face hub); sets the vocabulary size")
    data_hash: str = opt("", "what the data is: its files' names and sizes (or the dataset's name)", derived=True)
    tokenizer_hash: str = opt("", "hash of the tokenizer's content", derived=True)

    def __post_init__(self):
        if self.data_max_bytes < 0:
            raise ConfigError(f"data_max_bytes must be >= 0 (0: no limit), got {self.data_max_bytes}")
        if not self.data or not self.data_column or not self.tokenizer:
            raise ConfigError("data, data_column and tokenizer must not be empty")


SECTION_TYPES = {"model": ModelConfig, "train": TrainConfig, "data": DataConfig}


@dataclass(frozen=True)
class RunConfig:
    """Everything a peer must agree on, the data and tokenizer included. `steps` is a local choice, not part of it
    (a trainer may also read the run's data from another path: the data hash checks it is the same)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    run_id: str = DEFAULT_RUN_ID

    def wire_dict(self) -> dict:
        train = dataclasses.asdict(self.train)
        train.pop("steps")
        train["trainers"] = list(self.train.trainers)
        model = dataclasses.asdict(self.model)
        model["layers_per_stage"] = list(self.model.stage_layers)
        data = dataclasses.asdict(self.data)
        return {"protocol": PROTOCOL_VERSION, "run_id": self.run_id, **{f"model.{k}": v for k, v in model.items()},
                **{f"train.{k}": v for k, v in train.items()}, **{f"data.{k}": v for k, v in data.items()}}

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.wire_dict())

    @classmethod
    def from_wire_dict(cls, d: dict) -> "RunConfig":
        try:
            model = {k[6:]: v for k, v in d.items() if k.startswith("model.")}
            train = {k[6:]: v for k, v in d.items() if k.startswith("train.")}
            data = {k[5:]: v for k, v in d.items() if k.startswith("data.")}
            model["layers_per_stage"] = tuple(model.get("layers_per_stage", ()))
            train["trainers"] = tuple(train.get("trainers", ()))
            return cls(model=ModelConfig(**model), train=TrainConfig(**train), data=DataConfig(**data),
                       run_id=d["run_id"])
        except (TypeError, KeyError) as e:
            raise ConfigError(f"run config is malformed: {e}") from e
