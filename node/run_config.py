"""The run config file a node is given (`--config`, `bootstrap --save-config`) and its run id.
(Resolving the config a swarm publishes in the DHT is node/announce.py's resolve_run_config.)
No torch or hivemind here: the commands import it while building --help."""
from __future__ import annotations

import json
from pathlib import Path

from swarm.config import DEFAULT_RUN_ID, ConfigError, RunConfig


def load_config_file(path: str) -> RunConfig:
    try:
        return RunConfig.from_wire_dict(json.loads(Path(path).read_text()))
    except (OSError, json.JSONDecodeError, ConfigError) as e:
        raise SystemExit(f"error: cannot use config file {path}: {e}")


def save_config_file(run: RunConfig, path: str | Path) -> Path:
    """The run config JSON that `join --config` and `bootstrap --config` read (written atomically)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(run.wire_dict(), indent=1))
    tmp.replace(path)
    return path


def chosen_run_id(requested: str | None, config: RunConfig | None) -> str:
    """--run-id, else the run id inside --config, else the default; the two must not disagree."""
    if config is not None:
        if requested and requested != config.run_id:
            raise SystemExit(f"error: --run-id {requested} but the --config file is for run {config.run_id}")
        return config.run_id
    return requested or DEFAULT_RUN_ID
