"""bench.churn --quick: a real local swarm (2 trainers, 2 replicas of each later stage) loses nodes to
kill -9 of their main pid and keeps training; every scenario's pause ends, no helper is orphaned."""
import json

from bench import churn


def test_quick_churn_benchmark(tmp_path, capsys):
    json_out, png_out = tmp_path / "churn.json", tmp_path / "churn.png"
    assert churn.main(["--quick", "--keep", str(tmp_path / "runs"), "--json-out", str(json_out),
                       "--png-out", str(png_out)]) == 0
    printed = capsys.readouterr().out
    res = json.loads(json_out.read_text())
    kills, churned = res["kills"], res["runs"]["churn"]

    assert {"trainer", "bootstrap"} <= {k["role"] for k in kills}
    assert {k["phase"] for k in kills} == set(churn.SCENARIOS)
    for k in kills:
        assert k["orphans"] == [] and k["helpers"] > 0, k   # p2pd and helpers died with the main pid
        assert k["pause_s"] is not None, f"training never moved again after killing {k['node']}"
    # the last replica of the tail stage: the trainers said they had none (routes failing there, or paused)
    ev = churned["evidence"]
    assert ev["paused_for_last_stage"] + ev["no_replica_of_last_stage"] > 0
    # a killed trainer came back with a live trainer's stage 0 (or its checkpoint), not from 0
    assert any(s > 0 for s in churned["evidence"]["trainers_resumed_from_steps"])
    assert churned["evidence"]["rejoined_without_bootstrap"]
    assert "lost in flight" in printed and isinstance(churned["counted"]["skipped"], int)
    # the replicas averaged through the churn, and their rounds are counted by kind
    rounds = [churned["counted"][k] for k in ("anchored_rounds", "full_rounds", "partial_rounds")]
    assert sum(rounds) > 0 and "averaging anchored / full / partial" in printed, rounds
    # per kill, the microbatches in flight (from the metrics scraped just before it) and what became of them
    for k in kills:
        assert k["in_flight"] >= k["lost"] >= 0 and k["skipped"] >= 0 and k["fate_s"] >= 0, k
    trainer_kill = next(k for k in kills if k["role"] == "trainer" and k["phase"] == "random")
    assert trainer_kill["lost"] > 0 and trainer_kill["in_flight"] > trainer_kill["lost"], trainer_kill
    assert "| in flight" in printed
    curve = [loss for _, loss in churn.loss_by_step(churned["samples"])]
    assert curve[-1] < curve[0]
    assert churned["exits"] == [], "a node exited without being killed:\n" + "\n".join(
        f"{e['node']} (code {e['code']}):\n{e['tail']}" for e in churned["exits"])
    assert "| churn" in printed and "| last-trainer" in printed
    assert png_out.read_bytes()[:4] == b"\x89PNG"
