"""``train-controller``: an end-to-end run on a small budget, its outputs, and its error messages."""

import dataclasses
import json
import subprocess
import sys

import jax
import numpy as np
import pytest

import agents
import diffgym
from agents.cli import main, to_jsonable
from agents.bptt import default_config
from agents.common import evaluate_gymnasium
from agents.policy import load_policy_module

SMALL_CARTPOLE_RUN = [
    "--env", "cartpole", "--algo", "bptt", "--seed", "0",
    "--config.total-env-steps", "600", "--config.eval-every", "300",
    "--eval-episodes", "3", "--no-progress",
]  # fmt: skip


@pytest.fixture(scope="module")
def cartpole_run(tmp_path_factory):
    """One small BPTT CartPole run through the CLI, shared by the tests that read its outputs."""
    out = tmp_path_factory.mktemp("cartpole-run")
    assert main([*SMALL_CARTPOLE_RUN, "--out", str(out)]) == 0
    return out, json.loads((out / "metrics.json").read_text())


def test_train_writes_metrics_with_the_requested_budget(cartpole_run):
    out, metrics = cartpole_run
    assert metrics["env"] == "CartPole-v1" and metrics["algo"] == "bptt" and metrics["seed"] == 0
    # The --config.* flags reached the trainer: 600 steps, a curve point every 300.
    assert metrics["config"]["total_env_steps"] == 600
    assert metrics["env_steps"] == 600
    assert [point["env_steps"] for point in metrics["curve"]] == [300, 600]
    assert 0 <= metrics["compile_seconds"] <= metrics["wall_seconds"]
    assert metrics["eval_episodes"] == 3 and len(metrics["eval_returns"]) == 3
    assert metrics["eval_return_mean"] == pytest.approx(np.mean(metrics["eval_returns"]))
    assert metrics["eval_return_std"] == pytest.approx(np.std(metrics["eval_returns"]))
    # A uniformly random CartPole policy lasts ~22 steps; 600 steps of BPTT already do far better.
    assert metrics["eval_return_mean"] > 60
    assert not any(p.name.endswith(".tmp") for p in out.iterdir()), "a temporary file was left behind"


def test_checkpoint_reproduces_actions_and_reported_returns(cartpole_run):
    out, metrics = cartpole_run
    policy = agents.load_policy(out)
    assert policy.env_id == "CartPole-v1"
    module, header = load_policy_module(out)
    assert header["algo"] == "bptt" and header["seed"] == 0
    observations = np.asarray(jax.random.uniform(jax.random.key(1), (64, 4), minval=-0.3, maxval=0.3))
    loaded_actions = [policy(obs) for obs in observations]
    assert all(isinstance(a, int) and a in (0, 1) for a in loaded_actions)
    assert loaded_actions == [int(module(obs)) for obs in observations]
    assert 0 < sum(loaded_actions) < len(loaded_actions), "the controller should push both ways"
    # The reported evaluation is exactly what a user gets from the checkpoint on gymnasium.
    returns = evaluate_gymnasium(policy, "CartPole-v1", episodes=3, seed=metrics["eval_seed"])
    assert returns.tolist() == metrics["eval_returns"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--env", "cartpol"], "Did you mean 'cartpole'?"),
        (["--env", "cartpole", "--algo", "sac"], "unknown --algo 'sac'; choose one of: bptt, ppo, aiming"),
        (["--env", "cartpole", "--seed", "-1"], "--seed must be a non-negative integer, got -1"),
        (["--env", "cartpole", "--eval-episodes", "0"], "--eval-episodes must be at least 1, got 0"),
        (["--algo", "bptt"], "--env is required"),
        (["play", "--env", "cartpole", "--record", "out.avi"], "extension '.avi' is not supported"),
        (["play", "--env", "cartpole", "--episodes", "0"], "--episodes must be at least 1"),
        (["play", "--record", "out.gif"], "play needs --env (to use the bundled controller) or --policy DIR"),
        (["play", "--env", "pendulm"], "Did you mean 'pendulum'?"),
        (["compare", "--env", "cartpole", "--seeds", "0"], "--seeds must be at least 1, got 0"),
    ],
)
def test_bad_flags_exit_nonzero_saying_what_is_wrong(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.startswith("train-controller: error:")


def test_policy_folder_without_a_checkpoint_is_refused(tmp_path, capsys):
    assert main(["play", "--env", "cartpole", "--policy", str(tmp_path)]) == 2
    assert f"no policy checkpoint in {str(tmp_path)!r}" in capsys.readouterr().err


def test_mistyped_config_value_is_refused(capsys):
    assert main(["--env", "cartpole", "--config.learning-rate", "fast"]) == 2
    assert "fast" in capsys.readouterr().err


def test_config_validation_errors_reach_the_user(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # keep tyro's boxed message on one line
    # PPOConfig checks its own fields; tyro reports the ValueError with the field's name.
    assert main(["--env", "cartpole", "--algo", "ppo", "--config.num-minibatches", "3"]) == 2
    assert "num_minibatches=3 must divide the batch" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--help"], ["--env", "--algo", "--seed", "--out", "--render", "--config.learning-rate", "play"]),
        (["--env", "pendulum", "--algo", "ppo", "--help"], ["--config.gae-lambda", "--config.clip-eps"]),
        (["--env", "trebuchet", "--algo", "ppo", "--help"], ["--config.standardise-obs", "--config.reward-scale"]),
        (["--env", "trebuchet", "--help"], ["--config.replay-capacity", "--config.eval-shots"]),
        (["--help"], [f"{spec.short_name} ({spec.id})" for spec in map(diffgym.spec, diffgym.registered_envs())]),
        (["play", "--help"], ["--policy", "--record", "--episodes", "bundled"]),
        (["compare", "--help"], ["--seeds", "--out"]),
    ],
)
def test_help_documents_every_level(argv, expected, capsys):
    assert main(argv) == 0
    text = capsys.readouterr().out
    for option in expected:
        assert option in text


def test_help_shows_the_defaults_of_the_chosen_env():
    # tyro prints the default of each --config field: the per-env tuned values, not CartPole's.
    pendulum, cartpole = default_config("pendulum"), default_config("cartpole")
    tuned = [
        field.name
        for field in dataclasses.fields(pendulum)
        if type(getattr(pendulum, field.name)) is int
        and getattr(pendulum, field.name) != getattr(cartpole, field.name)
    ]
    assert tuned, "BPTT's Pendulum defaults should differ from CartPole's somewhere"
    text = subprocess.run(
        [sys.executable, "-m", "agents.cli", "--env", "pendulum", "--help"],
        capture_output=True, text=True, check=True, env={**_clean_env(), "COLUMNS": "120"},
    ).stdout  # fmt: skip
    for name in tuned:
        option_help = text.split(f"--config.{name.replace('_', '-')} ", 1)[1].split("--config.", 1)[0]
        assert f"(default: {getattr(pendulum, name)})" in option_help, name


def test_eval_episode_counts_follow_the_env_spec(tmp_path):
    """Without --eval-episodes the final evaluation has the spec's number of episodes."""
    from agents.cli import run_training

    config = dataclasses.replace(default_config("cartpole"), total_env_steps=100, eval_every=100)
    metrics = run_training("cartpole", "bptt", out=tmp_path, config=config, progress=False)
    assert metrics["eval_episodes"] == diffgym.spec("cartpole").eval_episodes == 20


def test_to_jsonable_makes_strict_json():
    value = {"a": np.float32(1.5), "b": (1, 2), "c": float("nan"), "d": np.arange(3), "e": jax.numpy.ones(2)}
    assert json.loads(json.dumps(to_jsonable(value), allow_nan=False)) == {
        "a": 1.5, "b": [1, 2], "c": None, "d": [0, 1, 2], "e": [1.0, 1.0],
    }  # fmt: skip


def _clean_env():
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}


def test_interrupted_training_leaves_no_partial_output(tmp_path, monkeypatch, capsys):
    import agents.bptt

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(agents.bptt, "train", interrupted)
    out = tmp_path / "run"
    assert main(["--env", "cartpole", "--out", str(out), "--no-progress"]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())


def test_render_flag_shows_training_snapshots_in_a_window(tmp_path, monkeypatch):
    """--render hands the trainer a render_fn that plays the snapshot with the latest progress."""
    import pygame

    import agents.bptt
    import agents.play
    from agents.common import TrainResult
    from agents.policy import Policy

    spec = dict(obs_size=4, action_size=1, kind="bernoulli", width=8, depth=1)
    shown, captions = [], []

    def train_one_snapshot(env_id, config, *, seed, progress_fn=None, render_fn=None):
        # Exercises the CLI's hooks only; the trainer itself is tested in test_bptt.py.
        policy = Policy(**spec, key=jax.random.key(seed))
        progress_fn({"env_steps": 10, "loss": 0.25, "eval_return": 9.0})
        render_fn(policy)
        shown.append(policy)
        return TrainResult(policy, spec, env_steps=10, wall_seconds=0.1, compile_seconds=0.0, curve=[])

    class ShortViewer(agents.play.TrainingViewer):
        def __init__(self, env_id):
            super().__init__(env_id, max_steps=3)

    original_caption = pygame.display.set_caption

    def set_caption(text, *args):
        captions.append(text)
        return original_caption(text, *args)

    monkeypatch.setattr(pygame.display, "set_caption", set_caption)
    monkeypatch.setattr(agents.bptt, "train", train_one_snapshot)
    monkeypatch.setattr(agents.play, "TrainingViewer", ShortViewer)
    out = tmp_path / "run"
    argv = ["--env", "cartpole", "--out", str(out), "--render", "--no-progress", "--eval-episodes", "1"]
    assert main(argv) == 0
    assert len(shown) == 1
    assert any(c.startswith("training CartPole-v1") and "eval_return 9" in c for c in captions)
    assert any("step 3" in c for c in captions)
    assert json.loads((out / "metrics.json").read_text())["env_steps"] == 10


def test_compare_passes_its_options_to_run_comparison(tmp_path, monkeypatch):
    # The comparison itself is tested in test_compare.py; here, that every flag reaches it.
    import agents.compare

    calls = []
    monkeypatch.setattr(agents.compare, "run_comparison", lambda env_id, **kw: calls.append((env_id, kw)))
    argv = ["compare", "--env", "pendulum", "--seeds", "2", "--out", str(tmp_path), "--algos", "bptt", "ppo",
            "--budgets", "ppo", "20000", "--eval-episodes", "5"]  # fmt: skip
    assert main(argv) == 0
    expected = dict(
        seeds=2, out_dir=tmp_path, algos=("bptt", "ppo"), budgets={"ppo": 20000}, final_eval_episodes=5
    )
    assert calls == [("Pendulum-v1", expected)]


def test_a_crash_after_training_never_leaves_an_old_runs_metrics_beside_new_weights(tmp_path, monkeypatch):
    import agents.bptt
    import agents.common
    from agents.common import TrainResult
    from agents.policy import Policy

    spec = dict(obs_size=4, action_size=1, kind="bernoulli", width=8, depth=1)

    def untrained(env_id, config, *, seed, progress_fn=None, render_fn=None):
        policy = Policy(**spec, key=jax.random.key(seed))
        return TrainResult(policy, spec, env_steps=1, wall_seconds=0.0, compile_seconds=0.0, curve=[])

    monkeypatch.setattr(agents.bptt, "train", untrained)
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.json").write_text('{"seed": 7}')  # an earlier, complete run

    def crash(*args, **kwargs):
        raise RuntimeError("evaluation crashed")

    monkeypatch.setattr(agents.common, "evaluate_gymnasium", crash)
    with pytest.raises(RuntimeError, match="evaluation crashed"):
        main(["--env", "cartpole", "--out", str(out), "--no-progress"])
    assert not (out / "metrics.json").exists()
    assert agents.load_policy(out).env_id == "CartPole-v1"  # the new checkpoint is complete
