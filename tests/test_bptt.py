"""BPTT trainer: real learning on small budgets, window carry-over, NaN guard, step accounting.

Fast tier: a few short trainings (each compiles one chunk, ~1-3 s on 2 cores). The full goals of
the issue (CartPole 500 in 5 000 steps, Pendulum swing-up) are ``slow`` tests.
"""

from __future__ import annotations

import dataclasses
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import diffgym
from agents import bptt
from agents.bptt import BPTTConfig, default_config, train
from agents.common import evaluate
from agents.policy import Policy


def _eval(env_id: str, policy: Policy, episodes: int, seed: int = 123) -> np.ndarray:
    return evaluate(env_id, policy, key=jax.random.key(seed), episodes=episodes)


# --------------------------------------------------------------------------------------------
# Learning
# --------------------------------------------------------------------------------------------
def test_cartpole_learns_to_balance_with_hard_actions():
    """A few hundred updates of 10-step windows balance the pole >= 200 steps on fresh episodes."""
    config = dataclasses.replace(default_config("cartpole"), total_env_steps=2_000, stop_at_return=None)
    progress, rendered = [], []
    result = train("cartpole", config, seed=0, progress_fn=progress.append, render_fn=rendered.append)

    policy = result.policy
    assert policy.kind == "bernoulli"
    obs = jnp.array([0.01, -0.2, 0.03, 0.1])
    assert int(policy(obs)) in (0, 1)  # hard 0/1 actions, as gymnasium takes
    returns = _eval("CartPole-v1", policy, episodes=20)
    assert returns.mean() >= 200, f"mean return {returns.mean():.1f} after {result.env_steps} steps"

    assert result.env_steps == 2_000  # 200 updates x 1 env x 10 steps, no early stop
    assert [p["env_steps"] for p in progress] == [500, 1000, 1500, 2000]
    for point in progress:
        assert {"env_steps", "wall_seconds", "loss", "eval_return"} <= set(point)
        assert math.isfinite(point["loss"])
    assert len(rendered) == len(progress) and all(isinstance(p, Policy) for p in rendered)
    assert result.curve == progress
    assert 0 < result.compile_seconds < result.wall_seconds


def test_pendulum_return_improves_within_500_updates():
    """Torque stays in ±2 and 500 updates of 8-step windows gain >= 300 of return over the
    initial policy on 100 fresh random starts (the initial policy scores about -1200)."""
    config = dataclasses.replace(default_config("pendulum"), total_env_steps=4_000, eval_every=4_000)
    result = train("pendulum", config, seed=1)

    skeleton = bptt._setup("Pendulum-v1", config, seed=1)
    initial = bptt._fold_obs_scale(
        eqx.combine(skeleton.carry[0], skeleton.static), skeleton.obs_scale
    )
    before = _eval("Pendulum-v1", initial, episodes=100).mean()
    after = _eval("Pendulum-v1", result.policy, episodes=100).mean()
    assert after >= before + 300, f"return {before:.0f} -> {after:.0f}"

    states = jax.random.normal(jax.random.key(0), (256, 3)) * jnp.array([1.0, 1.0, 8.0])
    torques = jax.vmap(result.policy)(states)
    assert torques.shape == (256, 1)
    assert bool(jnp.all(jnp.abs(torques) <= 2.0))


# --------------------------------------------------------------------------------------------
# Truncated windows, accounting, guards (the compiled chunk driven directly)
# --------------------------------------------------------------------------------------------
def _frozen_runner(env_id: str, config: BPTTConfig, seed: int = 0):
    """The training chunk with a zero learning rate: the weights stay, so rollouts are comparable."""
    return bptt._setup(env_id, config, seed, optimizer=optax.sgd(0.0))


def test_truncated_windows_carry_the_state_across_boundaries():
    """Three 5-step windows end where one uninterrupted 15-step rollout of the same policy ends."""
    config = BPTTConfig(total_env_steps=15, num_envs=2, window=5, episode_length=200, eval_every=10)
    setup = _frozen_runner("Pendulum-v1", config)
    start = setup.carry[2]
    uniforms = jnp.zeros((3, 2, 5, 2))  # would be used only at a reset; none happens in 15 steps
    carry, (losses, _) = setup.run_chunk(setup.carry, uniforms, jnp.int32(3))
    assert losses.shape == (3,) and bool(jnp.all(jnp.isfinite(losses)))
    # Windows 2 and 3 started where the previous one stopped: not from a fresh state.
    assert losses[0] != losses[1]
    end = carry[2]
    np.testing.assert_array_equal(np.asarray(end.time), [15, 15])

    env, params = diffgym.make("Pendulum-v1")
    policy = bptt._fold_obs_scale(eqx.combine(setup.carry[0], setup.static), setup.obs_scale)

    def rollout(state):
        def body(state, _):
            _, state, *_ = env.step_env(None, state, policy(env.get_obs(state)), params)
            return state, None

        return jax.lax.scan(body, state, None, length=15)[0]

    direct = jax.vmap(rollout)(start)
    np.testing.assert_allclose(np.asarray(end.theta), np.asarray(direct.theta), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(end.theta_dot), np.asarray(direct.theta_dot), rtol=1e-5, atol=1e-6)


def test_cartpole_rollout_resets_at_termination():
    """A rollout that crosses the thresholds restarts from the supplied start draw (time 0)."""
    config = BPTTConfig(total_env_steps=400, num_envs=1, window=40, episode_length=500, eval_every=400)
    setup = _frozen_runner("CartPole-v1", config)
    # A policy pushing one way always: the pole falls within 40 steps from any small start.
    weights = jax.tree.map(jnp.zeros_like, setup.carry[0])
    weights = eqx.tree_at(lambda w: w.mlp.layers[-1].bias, weights, jnp.full((1,), 5.0))
    carry = (weights, *setup.carry[1:])
    uniforms = jnp.full((1, 1, 40, 4), 0.5)  # the reset state: all zeros
    carry, _ = setup.run_chunk(carry, uniforms, jnp.int32(1))
    state = carry[2]
    assert 0 < int(state.time[0]) < 40, "the rollout should have reset and restarted within the window"
    assert abs(float(state.theta[0])) < 0.21


@pytest.mark.parametrize("num_envs, window, budget", [(1, 10, 500), (3, 7, 1000)])
def test_env_step_accounting_is_exact(num_envs, window, budget):
    """env_steps = updates x num_envs x window, never over the budget; rollouts advanced that much."""
    config = BPTTConfig(
        total_env_steps=budget, num_envs=num_envs, window=window, episode_length=1_000, eval_every=budget
    )
    setup = _frozen_runner("Pendulum-v1", config)
    updates = budget // (num_envs * window)
    chunk = bptt._updates_per_chunk(config)
    assert chunk >= updates
    uniforms = jnp.zeros((chunk, num_envs, window, 2))
    carry, _ = setup.run_chunk(setup.carry, uniforms, jnp.int32(updates))
    # Each rollout's clock counts its simulated steps (no reset within 1000 steps): their sum is
    # exactly what train() reports, and the skipped updates of the chunk simulated nothing.
    assert int(jnp.sum(carry[2].time)) == updates * num_envs * window
    assert int(carry[3]) == updates


def test_train_reports_exact_env_steps_for_an_uneven_budget():
    config = BPTTConfig(total_env_steps=1_000, num_envs=3, window=7, episode_length=200, eval_every=500)
    result = train("Pendulum-v1", config, seed=0)
    assert result.env_steps == 47 * 21 == 987
    assert result.extra["updates"] == 47
    assert [p["env_steps"] for p in result.curve] == [24 * 21, 47 * 21]


def test_nan_guard_stops_with_a_clear_message():
    params = dataclasses.replace(diffgym.make("CartPole-v1")[1], tau=float("nan"))
    config = dataclasses.replace(default_config("CartPole-v1"), total_env_steps=500)
    with pytest.raises(FloatingPointError, match=r"update 0 \(env steps 0\.\.10\).*simulated state.*non-finite"):
        train("CartPole-v1", config, env_params=params)


def test_nan_guard_keeps_the_weights_from_before_the_bad_update():
    config = BPTTConfig(total_env_steps=100, num_envs=1, window=5, episode_length=200, eval_every=50)
    setup = bptt._setup("Pendulum-v1", config, 0)
    bad_states = dataclasses.replace(setup.carry[2], theta_dot=jnp.full((1,), jnp.nan))
    carry = (setup.carry[0], setup.carry[1], bad_states, *setup.carry[3:])
    carry, _ = setup.run_chunk(carry, jnp.zeros((10, 1, 5, 2)), jnp.int32(10))
    assert int(carry[4]) != 0 and int(carry[5]) == 0  # failed at the first update
    assert int(carry[3]) == 1  # and the nine after it were skipped
    for new, old in zip(jax.tree.leaves(carry[0]), jax.tree.leaves(setup.carry[0])):
        np.testing.assert_array_equal(np.asarray(new), np.asarray(old))


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------
def test_default_configs_and_bad_inputs():
    assert default_config("CartPole-v1").stop_at_return == 500.0
    assert default_config("diffgym/Pendulum-v1") == default_config("pendulum")
    with pytest.raises(ValueError, match="BPTT trains"):
        default_config("Trebuchet-v0")
    with pytest.raises(ValueError, match=r"window \(600\) is longer than episode_length \(500\)"):
        train("CartPole-v1", dataclasses.replace(default_config("CartPole-v1"), window=600))
    with pytest.raises(ValueError, match="num_envs must be a positive integer, got 0"):
        train("CartPole-v1", dataclasses.replace(default_config("CartPole-v1"), num_envs=0))
    with pytest.raises(ValueError, match="obs_scale needs 4 entries"):
        train("CartPole-v1", dataclasses.replace(default_config("CartPole-v1"), obs_scale=(1.0,)))


# --------------------------------------------------------------------------------------------
# The goals (slow)
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cartpole_goal_500_within_5000_steps(seed):
    result = train("CartPole-v1", default_config("CartPole-v1"), seed=seed)
    assert result.env_steps <= 5_000
    returns = _eval("CartPole-v1", result.policy, episodes=20, seed=1000 + seed)
    assert returns.mean() >= 475, f"seed {seed}: {returns.mean():.1f} after {result.env_steps} steps"


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pendulum_swing_up_default_config(seed):
    """The default budget (20 000 steps, not the issue's 4 000: see bench/results/bptt.md)."""
    result = train("Pendulum-v1", default_config("Pendulum-v1"), seed=seed)
    returns = _eval("Pendulum-v1", result.policy, episodes=100, seed=1000 + seed)
    assert returns.mean() >= -400, f"seed {seed}: {returns.mean():.1f}"
