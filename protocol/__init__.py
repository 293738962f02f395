"""The wire contract of a ResBM swarm: what crosses the network and what is stored in the DHT.

Nothing here knows about models or event loops; node/ moves these bytes, swarm/ computes them.
"""

PROTOCOL_VERSION = 4  # 3: no step barrier (prepare, step and ledger calls are gone); 4: records carry `distance`

# Wire codecs of boundary codes (protocol/codec.py implements them); here so that configs and
# `--help` can name them without importing torch.
CODECS = ("fp32", "bf16", "fp16", "fp8", "int8", "int8ch", "int4ch")
