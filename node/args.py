"""What the command line says about a run, shared by every subcommand.

The model, training and data flags are generated from the fields of swarm.config's ModelConfig,
TrainConfig and DataConfig (type, default, help and choices live there, once), so every field can be set and a
new field needs no flag written by hand. Nothing here imports torch or hivemind at module level:
`resbm-node --help` must answer fast.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import tomllib
from pathlib import Path

from node.settings import COMMAND_DEFAULTS, CONNECT, MONITORING, ConnectSettings, MonitoringSettings
from node.settings import positive_seconds  # noqa: F401 (the type of period flags: monitor, bench.scaling)
from swarm.config import DEFAULT_RUN_ID, SECTION_TYPES, ConfigError, RunConfig

ENV_PREFIX = "RESBM_"
TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")

SECTIONS = tuple(SECTION_TYPES.items())
TITLES = {"model": "model (must match across the swarm)", "train": "training (must match across the swarm)",
          "data": "data (must match across the swarm; the tokenizer sets --vocab-size)"}


# --- model and training flags, generated from the config dataclasses ----------------------------
def _flags(f: dataclasses.Field) -> list[str]:
    """The field's flag, then --field-name as an alias when the flag is a shorter, older name."""
    own = "--" + f.name.replace("_", "-")
    flag = f.metadata.get("flag") or own
    return [flag] if flag == own else [flag, own]


def _add_field(group, section: str, f: dataclasses.Field, default) -> None:
    meta = f.metadata
    kw = dict(dest=f"{section}.{f.name}", help=meta["help"].replace("%", "%%"), choices=meta.get("choices"),
              metavar=meta.get("metavar") or (None if meta.get("choices") else f.name.upper()))
    if isinstance(f.default, tuple):  # repeatable, and several values after one flag: --trainer A --trainer B
        kw.update(action="extend", nargs="+", type=meta["item"], default=list(default))
    else:
        kw.update(type=type(f.default), default=default)
        kw["help"] += " (default: %(default)r)" if isinstance(f.default, str) else " (default: %(default)s)"
    group.add_argument(*_flags(f), **kw)


def add_run_args(p: argparse.ArgumentParser, skip=(), command: str = "") -> None:
    """One flag per ModelConfig/TrainConfig/DataConfig field except `skip` and derived ones;
    node/settings.py's COMMAND_DEFAULTS[command] overrides a dataclass default for this subcommand
    (e.g. `local` trains 4 stages)."""
    defaults = COMMAND_DEFAULTS.get(command, {})
    for section, cls in SECTIONS:
        group = p.add_argument_group(TITLES[section])
        for f in dataclasses.fields(cls):
            if f.name not in skip and not f.metadata.get("derived"):
                _add_field(group, section, f, defaults.get(f.name, f.default))


def run_config_from_args(args, run_id: str | None = None) -> RunConfig:
    """The RunConfig the generated flags describe, its data resolved (swarm.data.resolve_data: hashes,
    vocabulary size); a bad combination exits with the config's message."""
    from swarm.data import resolve_data  # imports torch: not at module level (--help must stay fast)
    parts = {}
    for section, cls in SECTIONS:
        values = {f.name: getattr(args, f"{section}.{f.name}", f.default) for f in dataclasses.fields(cls)}
        parts[section] = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    try:
        return resolve_data(RunConfig(**{section: cls(**parts[section]) for section, cls in SECTIONS},
                                      run_id=run_id or getattr(args, "run_id", None) or DEFAULT_RUN_ID))
    except ConfigError as e:
        raise SystemExit(f"error: {e}")


def parse_run_config(argv: list[str], run_id: str = DEFAULT_RUN_ID) -> RunConfig:
    """A RunConfig from model/training/data flags, e.g. a benchmark's size table."""
    p = argparse.ArgumentParser(prog="run-config")
    add_run_args(p)
    return run_config_from_args(p.parse_args(argv), run_id)


# --- node settings flags, generated from node/settings.py -----------------------------------------
def add_settings_args(p: argparse.ArgumentParser, components, groups, command: str = "", skip=()) -> None:
    """One flag per field of the `components` (node/settings.py dataclasses) whose group is in `groups`,
    the groups shown in that order; COMMAND_DEFAULTS[command] overrides a field's default."""
    overrides = COMMAND_DEFAULTS.get(command, {})
    fields = [f for cls in components for f in dataclasses.fields(cls) if f.name not in skip]
    for title in groups:
        group = p.add_argument_group(title)
        for f in fields:
            if f.metadata["group"] == title:
                _add_setting(group, f, overrides.get(f.name, f.default))


def add_setting_flags(p: argparse.ArgumentParser, components, names, command: str = "") -> None:
    """The flags of the named fields of `components`, ungrouped (a command that borrows a few settings)."""
    overrides = COMMAND_DEFAULTS.get(command, {})
    fields = {f.name: f for cls in components for f in dataclasses.fields(cls)}
    for name in names:
        _add_setting(p, fields[name], overrides.get(name, fields[name].default))


def _add_setting(group, f: dataclasses.Field, default) -> None:
    meta = f.metadata
    names = [meta["flag"] or "--" + f.name.replace("_", "-")] + ([meta["short"]] if meta["short"] else [])
    help_ = argparse.SUPPRESS if meta["hidden"] else meta["help"].replace("%", "%%")
    kw = dict(dest=f.name, default=list(default) if isinstance(default, tuple) else default, help=help_)
    if isinstance(f.default, bool):
        group.add_argument(*names, action="store_true", **kw)
        return
    kw.update(type=meta["type"] or type(f.default), choices=meta["choices"], metavar=meta["metavar"],
              required=meta["required"])
    if meta["nargs"]:
        kw["nargs"] = meta["nargs"]
    if not meta["hidden"] and default is not None and not meta["required"]:
        kw["help"] += " (default: %(default)s)"
    group.add_argument(*names, **kw)


def add_connect_args(p, command: str = "") -> None:
    add_settings_args(p, [ConnectSettings], [CONNECT], command)
    g = next(g for g in p._action_groups if g.title == CONNECT)
    g.add_argument("--public", dest="reachability", action="store_const", const="public",
                   help="same as --reachability public (kept for old scripts)")


def add_monitoring_args(p, command: str = "") -> None:
    add_settings_args(p, [MonitoringSettings], [MONITORING], command)


# --- RESBM_* environment variables and --config-file, for every flag ------------------------------
def env_name(action: argparse.Action) -> str | None:
    """RESBM_<FLAG> of an option (its first long name: --initial-peers -> RESBM_INITIAL_PEERS)."""
    long = [o for o in action.option_strings if o.startswith("--")]
    if not long or action.dest == "help" or isinstance(action, (argparse._StoreConstAction,
                                                                argparse._HelpAction)) \
            and not isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        return None
    return ENV_PREFIX + long[0][2:].replace("-", "_").upper()


def _convert(p: argparse.ArgumentParser, action: argparse.Action, value, source: str):
    """`value` (text from the environment, or a TOML value) as the flag would parse it."""
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if isinstance(value, bool):
            return value if isinstance(action, argparse._StoreTrueAction) else not value
        text = str(value).strip().lower()
        if text not in TRUE + FALSE:
            p.error(f"{source}: expected one of {', '.join(TRUE + FALSE)}, got {value!r}")
        return (text in TRUE) == isinstance(action, argparse._StoreTrueAction)
    many = action.nargs in ("+", "*") or isinstance(action, argparse._ExtendAction)
    items = (value if isinstance(value, list) else str(value).split()) if many else [value]
    out = []
    for item in items:
        try:
            item = action.type(item if action.type is not str else str(item)) if action.type else item
        except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
            p.error(f"{source}: {e}")
        if action.choices is not None and item not in action.choices:
            p.error(f"{source}: invalid choice {item!r} (choose from {', '.join(map(str, action.choices))})")
        out.append(item)
    return out if many else out[0]


def _set_default(action: argparse.Action, value) -> None:
    action.default = value
    action.required = False


def apply_environment(p: argparse.ArgumentParser, environ) -> None:
    """Every flag of `p` (and of its subcommands) takes its default from RESBM_<FLAG> when set."""
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in set(action.choices.values()):
                apply_environment(sub, environ)
            continue
        name = env_name(action)
        if name and environ.get(name, "") != "":
            _set_default(action, _convert(p, action, environ[name], f"${name}"))


def apply_config_file(p: argparse.ArgumentParser, path: str, environ) -> None:
    """A node settings file (TOML, JSON, or YAML with PyYAML installed): flag names as keys (--host,
    host and initial_peers alike), in tables or not. Its values are defaults: flags and RESBM_*
    variables win. A key that is no flag of the command is refused by name."""
    data = read_settings_file(p, path)
    actions = {}
    for action in p._actions:
        for o in action.option_strings:
            if o.startswith("--"):
                actions[o[2:].replace("-", "_")] = action
        actions.setdefault(action.dest, action)
    for key, value in data.items():
        action = actions.get(key.lstrip("-").replace("-", "_"))
        if action is None or action.dest in ("help", "config_file") or env_name(action) is None:
            p.error(f"{path}: {key!r} is not a setting of `{p.prog}` (see --help)")
        name = env_name(action)
        if environ.get(name, "") == "":  # the environment wins over the file
            _set_default(action, _convert(p, action, value, f"{path}: {key}"))


def read_settings_file(p: argparse.ArgumentParser, path: str) -> dict:
    try:
        text = Path(path).read_text()
        if path.endswith((".yaml", ".yml")):
            import yaml  # optional: only for a YAML settings file
            data = yaml.safe_load(text) or {}
        elif path.endswith(".json"):
            data = json.loads(text)
        else:
            data = tomllib.loads(text)
    except (OSError, ValueError, ImportError) as e:  # (TOMLDecodeError, JSONDecodeError, YAMLError: ValueError)
        p.error(f"cannot read the settings file {path}: {e}")
    if not isinstance(data, dict):
        p.error(f"{path}: expected a table of settings")
    flat = {}
    for key, value in data.items():  # [connect] host = ... and host = ... alike
        flat.update(value if isinstance(value, dict) else {key: value})
    return flat


def add_config_file_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config-file", default=None, metavar="FILE",
                   help="node settings (TOML; .json or .yaml also read): any of this command's flags by name, e.g. "
                        "host = \"0.0.0.0\"; flags and RESBM_* environment variables override it")


def parse_command_line(p: argparse.ArgumentParser, argv, environ) -> argparse.Namespace:
    """Parse `argv` with RESBM_* variables and the command's --config-file (or $RESBM_CONFIG_FILE) as
    defaults under the flags."""
    apply_environment(p, environ)
    sub = _subcommand(p, argv)
    if sub is not None and any(a.dest == "config_file" for a in sub._actions):
        pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
        pre.add_argument("--config-file", default=environ.get(ENV_PREFIX + "CONFIG_FILE") or None)
        path = pre.parse_known_args(argv)[0].config_file
        if path:
            apply_config_file(sub, path, environ)
    return p.parse_args(argv)


def _subcommand(p: argparse.ArgumentParser, argv) -> argparse.ArgumentParser | None:
    subs = next((a for a in p._actions if isinstance(a, argparse._SubParsersAction)), None)
    first = next((a for a in argv if not a.startswith("-")), None)
    return subs.choices.get(first) if subs is not None and first else None
