"""The comparison end to end on tiny budgets, its threshold arithmetic, and the SB3 skip path."""

import dataclasses
import json

import pytest

from agents import compare, sb3


def test_time_to_threshold_ignores_the_untrained_point():
    curve = [
        {"env_steps": 0, "wall_seconds": 1.0, "eval_return": 500.0},
        {"env_steps": 100, "wall_seconds": 2.0, "eval_return": 300.0},
        {"env_steps": 200, "wall_seconds": 3.0, "eval_return": 480.0},
        {"env_steps": 300, "wall_seconds": 4.0, "eval_return": 500.0},
    ]
    assert compare.time_to_threshold(curve, 475.0) == (200, 3.0)
    assert compare.time_to_threshold(curve, 501.0) == (None, None)


def test_summary_table_aggregates_over_seeds(tmp_path):
    def record(seed, steps, seconds, final):
        return compare.RunRecord(
            algo="ppo", label="PPO", seed=seed, env_steps=steps or 1000, wall_seconds=10.0,
            compile_seconds=4.0, steps_to_threshold=steps, seconds_to_threshold=seconds,
            final_return_mean=final, final_return_std=0.0,
            curve=[{"env_steps": 0.0, "wall_seconds": 1.0, "eval_return": 10.0},
                   {"env_steps": 1000.0, "wall_seconds": 9.0, "eval_return": final}],
        )

    records = [record(0, 100, 2.0, 500.0), record(1, 300, 4.0, 480.0), record(2, None, None, 200.0)]
    meta = {"env_id": "CartPole-v1", "threshold": 475.0, "seeds": [0, 1, 2], "final_eval_episodes": 20,
            "budgets": {}, "skipped": {}, "total_seconds": 1.0, "machine": "test"}
    table = compare._markdown(records, meta)
    # Reached by 2 of 3; steps 200 ± 100 and seconds 3.0 ± 1.0 over those two; final over all three.
    assert "| PPO | 2/3 | 200 ± 100 | 3.0 ± 1.0 | 4.0 ± 0.0 | 393.3 ± 137.0 |" in table
    compare._plot(records, meta, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 10_000


def _tiny_comparison(tmp_path, algos):
    budgets = {"bptt": 500, "bptt-reward": 300, "bptt-triples": 300, "ppo": 1024, "ppo-shaped": 1024, "sb3": 512}
    lines = []
    records = compare.run_comparison(
        "cartpole", seeds=1, out_dir=tmp_path, algos=algos,
        budgets=budgets, final_eval_episodes=2, log=lines.append,
    )
    assert [r.algo for r in records] == list(algos)
    for r in records:
        assert 0 < r.env_steps <= budgets[r.algo]
        assert r.curve and max(p["env_steps"] for p in r.curve) <= r.env_steps
        assert 0 < r.final_return_mean <= 500
    table = (tmp_path / "compare_cartpole.md").read_text()
    assert "Threshold: mean evaluation return ≥ 475" in table
    assert all(f"| {r.label} | " in table for r in records)
    assert (tmp_path / "compare_cartpole.png").stat().st_size > 10_000
    saved = json.loads((tmp_path / "compare_cartpole.json").read_text())
    assert len(saved["runs"]) == len(algos) and saved["threshold"] == 475.0
    assert len(lines) == len(algos) + 1
    return records


def test_tiny_comparison_writes_table_plot_and_json(tmp_path):
    """Every row through the one trainer interface (SB3 when installed): the two variant rows are
    the tuned trainers with one field changed, and the table says what each row is."""
    algos = compare.ALGORITHMS if sb3.available() else compare.ALGORITHMS[:-1]
    records = _tiny_comparison(tmp_path, algos)
    labels = {r.algo: r.label for r in records}
    assert labels["bptt-reward"] == "BPTT (diffgym), env reward only"
    assert labels["ppo-shaped"] == "PPO (diffgym, JAX), BPTT's shaped cost"
    assert labels["bptt-triples"] == "BPTT (diffgym), stochastic triples"
    table = (tmp_path / "compare_cartpole.md").read_text()
    assert "which PPO row it rests on" in table and "evaluated at its mode" in table


def test_variant_rows_change_one_setting_only():
    from agents import bptt, ppo

    tuned, reward_only = compare.comparison_row("bptt", "pendulum"), compare.comparison_row("bptt-reward", "pendulum")
    assert tuned.config.cost["energy"] > 0  # the surrogate the variants are about
    assert reward_only.config == dataclasses.replace(bptt.default_config("pendulum"), cost={"reward": 1.0})
    triples = compare.comparison_row("bptt-triples", "cartpole")
    assert triples.config == dataclasses.replace(bptt.default_config("cartpole"), estimator="triples")
    with pytest.raises(ValueError, match="bptt-triples row samples a discrete action.*Pendulum-v1 has a box action space"):
        compare.comparison_row("bptt-triples", "pendulum")
    assert "bptt-triples" not in compare.DEFAULT_ALGORITHMS
    shaped = compare.comparison_row("ppo-shaped", "pendulum")
    assert shaped.config == dataclasses.replace(ppo.default_config("pendulum"), shaped_cost=tuned.config.cost)
    # The trebuchet's gradient trainer is its aiming network: the variants follow it.
    assert compare.comparison_row("bptt-reward", "trebuchet").trainer == "aiming"
    assert compare.comparison_row("ppo-shaped", "trebuchet").config.shaped_cost == {"reward": 1.0}


def _tiny_trebuchet_comparison(tmp_path, algos, budgets):
    lines = []
    records = compare.run_comparison(
        "trebuchet", seeds=1, out_dir=tmp_path, algos=algos, budgets=budgets,
        final_eval_episodes=20, log=lines.append,
    )
    assert [r.algo for r in records] == list(algos) and len(lines) == len(algos) + 1
    for r in records:
        assert 0 < r.env_steps <= budgets[r.algo]
        assert max(p["env_steps"] for p in r.curve) <= r.env_steps
        # Returns are minus the miss in metres: negative, and finite for every run.
        assert -200 < r.final_return_mean < 0
    table = (tmp_path / "compare_trebuchet.md").read_text()
    assert "Threshold: mean evaluation return ≥ -1." in table and "one simulated shot" in table
    assert all(f"| {r.label} | " in table for r in records)
    assert (tmp_path / "compare_trebuchet.png").stat().st_size > 10_000
    saved = json.loads((tmp_path / "compare_trebuchet.json").read_text())
    assert saved["env_id"] == "Trebuchet-v0" and saved["threshold"] == -1.0
    return records


def test_tiny_trebuchet_comparison_ppo_learns(tmp_path):
    """Fast tier (the trebuchet's compile is most of its cost): PPO on 8192 shots (two evaluation
    chunks of 16 updates x 256 shots) end to end, and it learns: measured, the mean miss falls
    from ~30 m untrained to ~2.3 m after 8192 shots (seed 0)."""
    (record,) = _tiny_trebuchet_comparison(tmp_path, ("ppo",), {"ppo": 8192})
    assert record.env_steps == 8192 and [p["env_steps"] for p in record.curve] == [0, 4096, 8192]
    assert record.curve[0]["eval_return"] < -10
    assert record.curve[-1]["eval_return"] > -5, record.curve
    # The gymnasium shell agrees that the folded (raw-observation) policy aims: 20 shots.
    assert record.final_return_mean > -8


@pytest.mark.slow
def test_tiny_trebuchet_comparison_of_all_three(tmp_path):
    algos = ("bptt", "ppo", "sb3") if sb3.available() else ("bptt", "ppo")
    records = _tiny_trebuchet_comparison(tmp_path, algos, {"bptt": 640, "ppo": 1024, "sb3": 300})
    labels = {r.algo: r.label for r in records}
    assert labels["bptt"] == "BPTT aiming network (diffgym)"
    if sb3.available():
        assert labels["sb3"] == "SB3 SAC (RL-Zoo's Pendulum settings)"


def test_missing_baselines_extra_is_skipped_with_the_install_hint(tmp_path, monkeypatch):
    monkeypatch.setattr(sb3, "available", lambda: False)
    records = compare.run_comparison("pendulum", seeds=1, out_dir=tmp_path, algos=("sb3",), log=None)
    assert records == []
    assert "pip install 'diffgym[baselines]'" in (tmp_path / "compare_pendulum.md").read_text()
    with pytest.raises(ImportError, match=r"pip install 'diffgym\[baselines\]'"):
        sb3.train("pendulum", sb3.default_config("pendulum"))


def test_unknown_algorithm_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown algorithms \\['dqn'\\]"):
        compare.run_comparison("cartpole", seeds=1, out_dir=tmp_path, algos=("dqn",))


def test_keep_other_algos_reruns_only_the_named_ones(tmp_path, monkeypatch):
    def run(algo, final):
        return compare.RunRecord(
            algo=algo, label=algo.upper(), seed=0, env_steps=1000, wall_seconds=5.0, compile_seconds=1.0,
            steps_to_threshold=1000, seconds_to_threshold=5.0, final_return_mean=final, final_return_std=0.0,
            curve=[{"env_steps": 1000.0, "wall_seconds": 5.0, "eval_return": final}],
        )

    previous = {"load_average": [9.5, 8.5], "total_seconds": 60.0,
                "runs": [dataclasses.asdict(run("ppo", 490.0)), dataclasses.asdict(run("bptt", 500.0))]}
    (tmp_path / "compare_cartpole.json").write_text(json.dumps(previous))
    monkeypatch.setattr(sb3, "available", lambda: False)  # the re-run algorithm is skipped: nothing trains
    records = compare.run_comparison(
        "cartpole", seeds=1, out_dir=tmp_path, algos=("sb3",), keep_other_algos=True, log=None
    )
    assert [(r.algo, r.final_return_mean) for r in records] == [("bptt", 500.0), ("ppo", 490.0)]
    table = (tmp_path / "compare_cartpole.md").read_text()
    assert "The rows of bptt, ppo were kept from a previous run" in table and "9.5 and 8.5" in table
    assert len(json.loads((tmp_path / "compare_cartpole.json").read_text())["runs"]) == 2
