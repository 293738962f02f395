"""One source of truth for the run config: the CLI flags are generated from ModelConfig/TrainConfig/DataConfig,
every field can be set (old flag names still work), `--help` needs neither torch nor hivemind, and
`local` hands its nodes the run config file instead of a command line rebuilt from it."""
import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from node.args import parse_run_config
from node.local_swarm import Swarm
from swarm.config import DEFAULT_RUN_ID, ModelConfig, RunConfig, TrainConfig
from swarm.data import resolve_data

ROOT = Path(__file__).resolve().parent.parent
SUBCOMMANDS = ("train-local", "bootstrap", "join", "local", "status", "monitor", "export", "generate", "identity")

# Every field away from its default (checked below), so a field without a working flag cannot pass.
TARGET = RunConfig(
    model=ModelConfig(vocab_size=300, d_model=96, n_layers=3, n_heads=3, kv_heads=1, ffn_hidden=128, seq_len=64,
                      n_stages=3, layers_per_stage=(1, 1, 1), boundary="bottleneck", ratio=8, codec="fp16",
                      codec_bwd="int8",
                      boundary_hidden=48, rope_theta=500.0, norm_eps=1e-6, init_std=0.01, seed=3),
    train=TrainConfig(optimizer="muon", lr=1e-3, weight_decay=0.1, warmup_steps=5, lr_schedule="cosine", min_lr=1e-4,
                      decay_steps=6, grad_clip=0.5, batch_size=12, microbatches=3, average_every=4,
                      trainers=("QmA", "QmB"), steps=7),
    run_id="target")


def _argv_by_field_names(run: RunConfig) -> list[str]:
    argv = []
    for part in (run.model, run.train, run.data):
        for f in dataclasses.fields(part):
            if f.metadata["derived"]:
                continue
            value = getattr(part, f.name)
            argv += ["--" + f.name.replace("_", "-"), *map(str, value if isinstance(value, tuple) else [value])]
    return argv


def test_every_config_field_is_a_flag_and_round_trips():
    for part in (TARGET.model, TARGET.train):
        for f in dataclasses.fields(part):
            assert getattr(part, f.name) != f.default, f"TARGET leaves {f.name} at its default"
    # (the data flags are at their defaults here, tests/test_data.py sets them; the run is resolved: hashes)
    assert parse_run_config(_argv_by_field_names(TARGET), run_id="target") == resolve_data(TARGET)


def test_the_flag_names_users_rely_on_still_work():
    argv = ["--d-model", "96", "--layers", "3", "--heads", "3", "--stages", "3", "--ratio", "8", "--codec", "fp16",
            "--codec-bwd", "int8", "--warmup", "5", "--trainer", "QmA", "--trainer", "QmB", "--seq-len", "64"]
    run = parse_run_config(argv)
    m, t = run.model, run.train
    assert (m.d_model, m.n_layers, m.n_heads, m.n_stages, m.ratio, m.codec, m.codec_bwd) == (96, 3, 3, 3, 8, "fp16",
                                                                                             "int8")
    assert t.warmup_steps == 5 and t.trainers == ("QmA", "QmB") and run.run_id == DEFAULT_RUN_ID


def test_bad_values_exit_with_the_config_message():
    with pytest.raises(SystemExit, match="microbatches=3 must divide batch_size=16"):
        parse_run_config(["--microbatches", "3"])
    with pytest.raises(SystemExit):  # argparse refuses a codec it does not know
        parse_run_config(["--codec", "int3"])


def test_help_imports_neither_torch_nor_hivemind():
    script = ("import contextlib, io, sys\n"
              "from node.cli import build_parser\n"
              "p = build_parser()\n"
              f"for cmd in ([],) + tuple([c] for c in {SUBCOMMANDS!r}):\n"
              "    with contextlib.redirect_stdout(io.StringIO()) as out:\n"
              "        try:\n"
              "            p.parse_args(cmd + ['--help'])\n"
              "        except SystemExit:\n"
              "            pass\n"
              "    assert 'usage:' in out.getvalue(), cmd\n"
              "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'hivemind', 'numpy')))\n")
    res = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "[]", res.stdout[:500]


def test_join_help_is_grouped_for_a_volunteer():
    res = subprocess.run([sys.executable, "-m", "node.cli", "join", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    groups = re.findall(r"^(\S[^:\n]*):$", res.stdout, flags=re.M)
    assert groups == ["options", "where to connect", "what to serve", "device", "monitoring", "advanced",
                      "trainers only (--stage 0)"], groups


def test_local_hands_its_nodes_the_config_file(tmp_path):
    swarm = Swarm(tmp_path, 1, TARGET)
    assert json.loads(swarm.config_file.read_text()) == TARGET.wire_dict()
    argv = swarm.join_argv("n", 1, ["/ip4/127.0.0.1/tcp/1/p2p/QmX"])
    assert argv[argv.index("--config") + 1] == str(swarm.config_file)
    assert not {"--d-model", "--layers", "--stages", "--ratio", "--run-id"} & set(argv)


def test_default_run_ids_are_defined_once():
    run_id = re.compile(r"""(RUN_ID|run_id|run-id).*["']resbm["']|["']resbm-local["']""")  # "resbm" is a boundary too
    found = [f"{p.relative_to(ROOT)}:{line.split('=')[0].strip()}" for d in ("node", "swarm", "bench")
             for p in (ROOT / d).glob("*.py") for line in p.read_text().splitlines() if run_id.search(line)]
    assert found == ["swarm/config.py:DEFAULT_RUN_ID", "swarm/config.py:LOCAL_RUN_ID"], found


def test_the_record_period_defaults_to_5_s_and_takes_a_longer_one():
    from node.cli import build_parser
    p = build_parser()
    assert p.parse_args(["join", "--stage", "1"]).announce_period == 15.0
    assert p.parse_args(["join", "--stage", "1", "--announce-period", "5"]).announce_period == 5.0


@pytest.mark.parametrize("period", ["0", "-5", "inf", "nan", "soon"])
def test_a_record_period_that_could_never_refresh_is_refused_by_name(period):
    res = subprocess.run([sys.executable, "-m", "node.cli", "join", "--stage", "1", "--announce-period", period],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "--announce-period" in res.stderr and "positive" in res.stderr, res.stderr


# --- node settings: generated flags, RESBM_* variables, --config-file, join's defaults ---------------
PEER = "/ip4/127.0.0.1/tcp/1/p2p/QmX"


def test_every_node_setting_is_a_flag_an_environment_variable_and_a_file_key(tmp_path):
    from node.cli import parse_args
    from node.settings import JOIN_COMPONENTS, JoinSettings
    default = parse_args(["join", "--stage", "1"], environ={})
    names = [f.name for cls in JOIN_COMPONENTS for f in dataclasses.fields(cls)]
    assert all(hasattr(default, n) for n in names), [n for n in names if not hasattr(default, n)]
    env = {"RESBM_STAGE": "2", "RESBM_INITIAL_PEERS": f"{PEER} {PEER}", "RESBM_ANNOUNCE_PERIOD": "7",
           "RESBM_SYNC": "1", "RESBM_STALL_TIMEOUT": "60", "RESBM_PATIENCE_S": "1.5"}
    s = JoinSettings.from_args(parse_args(["join"], environ=env))
    assert (s.serve.stage, s.connect.initial_peers, s.records.announce_period, s.trainer.sync,
            s.trainer.stall_timeout_s, s.route.patience_s) == (2, (PEER, PEER), 7.0, True, 60.0, 1.5)
    assert s.records.ttl_s == 21.0 and s.records.read_s == 7.0  # derived from the record period
    toml = tmp_path / "node.toml"
    toml.write_text(f'stage = "auto"\nhost = "127.0.0.1"\nwindow = 3\n[connect]\ninitial-peers = ["{PEER}"]\n')
    s = JoinSettings.from_args(parse_args(["join", "--config-file", str(toml)], environ={}))
    assert (s.serve.stage, s.connect.host, s.trainer.window, s.connect.initial_peers) == ("auto", "127.0.0.1", 3,
                                                                                          (PEER,))
    # a flag beats the environment, which beats the file
    s = JoinSettings.from_args(parse_args(["join", "--config-file", str(toml), "--window", "5"],
                                          environ={"RESBM_WINDOW": "4", "RESBM_HOST": "10.0.0.1"}))
    assert (s.trainer.window, s.connect.host) == (5, "10.0.0.1")


def test_bad_settings_are_refused_by_name(tmp_path, capsys):
    from node.cli import parse_args
    with pytest.raises(SystemExit):
        parse_args(["join", "--stage", "1"], environ={"RESBM_ANNOUNCE_PERIOD": "0"})
    assert "RESBM_ANNOUNCE_PERIOD" in capsys.readouterr().err
    bad = tmp_path / "node.toml"
    bad.write_text("stage = 1\nno_such_setting = 3\n")
    with pytest.raises(SystemExit):
        parse_args(["join", "--config-file", str(bad)], environ={})
    assert "no_such_setting" in capsys.readouterr().err


def test_join_listens_everywhere_needs_initial_peers_and_keeps_an_identity(tmp_path, monkeypatch):
    from node.cli import parse_args
    from node.join import settings_from_args
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    args = parse_args(["join", "--stage", "1"], environ={})
    assert args.host == "0.0.0.0" and parse_args(["join", "--stage", "1", "--host", "127.0.0.1"],
                                                  environ={}).host == "127.0.0.1"
    with pytest.raises(SystemExit, match="join needs --initial-peers"):
        settings_from_args(args)
    s = settings_from_args(parse_args(["join", "--stage", "1", "--initial-peers", PEER], environ={}))
    assert s.connect.identity == str(tmp_path / "resbm-swarm" / "identities" / f"{DEFAULT_RUN_ID}-stage1.id")
    mine = settings_from_args(parse_args(["join", "--stage", "1", "--initial-peers", PEER, "--identity", "x.id"],
                                         environ={}))
    assert mine.connect.identity == "x.id"
    assert parse_args(["bootstrap"], environ={}).initial_peers == []  # a bootstrap still starts alone
    res = subprocess.run([sys.executable, "-m", "node.cli", "join", "--stage", "1"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60, env={k: v for k, v in os.environ.items() if not k.startswith("RESBM_")})
    assert res.returncode == 1 and res.stderr.strip().count("\n") == 0 and "--initial-peers" in res.stderr, res.stderr
