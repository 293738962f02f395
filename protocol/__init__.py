"""The wire contract of a ResBM swarm: what crosses the network and what is stored in the DHT.

Nothing here knows about models or event loops; node/ moves these bytes, swarm/ computes them.
"""

PROTOCOL_VERSION = 1
