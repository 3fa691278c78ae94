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
from agents.bptt import BPTTConfig, ChunkInputs, StepRecord, default_config, train
from agents.common import ASSETS_DIR, evaluate, evaluate_gymnasium, numpy_policy
from agents.policy import Policy, load_policy_module
from diffgym.envs.cartpole import CartPoleState
from diffgym.envs.pendulum import PendulumState, PendulumTask
from diffgym.task import Task, inward_tanh


def _eval(env_id: str, policy: Policy, episodes: int, seed: int = 123) -> np.ndarray:
    return evaluate(env_id, policy, key=jax.random.key(seed), episodes=episodes)


# --------------------------------------------------------------------------------------------
# Learning
# --------------------------------------------------------------------------------------------
def test_cartpole_learns_to_balance_with_hard_actions():
    """50 updates of 20-step windows balance the pole >= 200 steps on fresh episodes."""
    config = dataclasses.replace(
        default_config("cartpole"), total_env_steps=1_000, eval_every=200, stop_at_return=None
    )
    progress, rendered = [], []
    result = train("cartpole", config, seed=0, progress_fn=progress.append, render_fn=rendered.append)

    policy = result.policy
    assert policy.kind == "bernoulli"
    obs = jnp.array([0.01, -0.2, 0.03, 0.1])
    assert int(policy(obs)) in (0, 1)  # hard 0/1 actions, as gymnasium takes
    returns = _eval("CartPole-v1", policy, episodes=20)
    assert returns.mean() >= 200, f"mean return {returns.mean():.1f} after {result.env_steps} steps"

    assert result.env_steps == 1_000  # 50 updates x 1 env x 20 steps, no early stop
    assert [p["env_steps"] for p in progress] == [200, 400, 600, 800, 1000]
    for point in progress:
        assert {"env_steps", "wall_seconds", "loss", "eval_return"} <= set(point)
        assert math.isfinite(point["loss"])
    assert len(rendered) == len(progress) and all(isinstance(p, Policy) for p in rendered)
    assert result.curve == progress
    assert 0 < result.compile_seconds < result.wall_seconds


def test_pendulum_swings_up_within_1000_env_steps():
    """The default config (one-step windows, replayed) cut to 1 000 simulated steps: the return on
    100 fresh random starts reaches -250 (the issue's goal is -200 in 4 000 steps) and gains
    >= 700 over the initial policy's (about -1 250). Measured on seeds 0-9: -139 to -228 after
    750 steps. Also checks the step accounting: replay adds updates, not env steps."""
    config = dataclasses.replace(default_config("pendulum"), total_env_steps=1_000)
    result = train("pendulum", config, seed=0)
    assert result.env_steps == 1_000 and result.extra["updates"] == 1_000
    assert [p["env_steps"] for p in result.curve] == [250, 500, 750, 1_000]

    initial_setup = bptt._setup("Pendulum-v1", config, seed=0)
    initial = initial_setup.policy(initial_setup.state.weights)
    before = _eval("Pendulum-v1", initial, episodes=100).mean()
    after = _eval("Pendulum-v1", result.policy, episodes=100).mean()
    assert after >= before + 700 and after >= -250, f"return {before:.0f} -> {after:.0f}"

    states = jax.random.normal(jax.random.key(0), (256, 3)) * jnp.array([1.0, 1.0, 8.0])
    torques = jax.vmap(result.policy)(states)
    assert torques.shape == (256, 1)
    assert bool(jnp.all(jnp.abs(torques) <= 2.0))


def test_acrobot_swings_up_within_100_env_steps():
    """The tuned config (one-step replay, energy gap, logit_penalty) cut to 100 simulated steps:
    the untrained policy scores about -500 (it hardly reaches the goal line); after training, better than
    -110 on 100 fresh episodes (measured on seeds 0-4: -82 to -87; the goal is -100). With the
    logits unpenalised the same budget learns nothing: the straight-through softmax saturates."""
    config = dataclasses.replace(default_config("acrobot"), total_env_steps=100)
    initial_setup = bptt._setup("Acrobot-v1", config, seed=0)
    initial = initial_setup.policy(initial_setup.state.weights)
    assert _eval("Acrobot-v1", initial, episodes=100).mean() < -450
    result = train("acrobot", config, seed=0)
    assert result.env_steps == 100 and result.policy.kind == "categorical"
    after = _eval("Acrobot-v1", result.policy, episodes=100).mean()
    assert after > -110, f"mean return {after:.1f} after 100 env steps"
    unpenalised = train("acrobot", dataclasses.replace(config, logit_penalty=0.0), seed=0)
    assert _eval("Acrobot-v1", unpenalised.policy, episodes=100).mean() < -450  # measured -500, seeds 0-2


def test_mountaincar_learns_to_rock_within_400_env_steps():
    """The tuned config (one-step replay of the task's speed and position terms, logit_penalty)
    cut to 400 simulated steps: from -200 (the untrained policy never reaches the flag) to better
    than -125 on 100 fresh episodes (measured on seeds 0-4: -108 to -118; pushing along the
    velocity scores -120 to -130, the goal is -110)."""
    config = dataclasses.replace(default_config("mountaincar"), total_env_steps=400)
    initial_setup = bptt._setup("MountainCar-v0", config, seed=0)
    initial = initial_setup.policy(initial_setup.state.weights)
    assert _eval("MountainCar-v0", initial, episodes=100).mean() == -200.0
    result = train("mountaincar", config, seed=0)
    after = _eval("MountainCar-v0", result.policy, episodes=100).mean()
    assert after > -125, f"mean return {after:.1f} after 400 env steps"


def test_mountaincarcontinuous_reaches_the_flag_within_1000_env_steps():
    """The tuned config (one-step replay of the env's cost plus the energy shortfall) cut to 1 000
    simulated steps: its best evaluation reaches the goal of 90 (measured on seeds 0-2 of the
    comparison: after 1 000, 250 and 250 steps; the untrained policy scores about 0) and the
    returned policy holds it on 20 other episodes."""
    config = dataclasses.replace(default_config("mountaincarcontinuous"), total_env_steps=1_000)
    result = train("mountaincarcontinuous", config, seed=0)
    assert result.extra["returned_eval_return"] >= 90, result.curve
    assert _eval("MountainCarContinuous-v0", result.policy, episodes=20).mean() >= 90


def test_logit_penalty_adds_the_mean_square_of_the_raw_output():
    """With frozen weights a window's loss grows by exactly ``logit_penalty`` times the mean square
    of the logits along it (the penalty changes no action, so the rollout is the same); its
    gradient alone shrinks the logits; a negative weight is refused."""
    base = BPTTConfig(
        total_env_steps=50, num_envs=1, window=5, eval_every=50, cost={"reward": 1.0}, output_scale=1.0
    )
    losses, starts = {}, None
    for penalty in (0.0, 0.5):
        config = dataclasses.replace(base, logit_penalty=penalty)
        setup = bptt._setup("Acrobot-v1", config, 0, optimizer=optax.sgd(0.0))
        inputs = setup.draw_inputs(1)
        losses[penalty] = float(setup.run_chunk(setup.state, inputs, jnp.int32(1))[1][0][0])
        starts = setup.state.env_states
    env, params = diffgym.make("Acrobot-v1")
    policy = setup.policy(setup.state.weights)
    state, squares = jax.tree.map(lambda leaf: leaf[0], starts), []
    for _ in range(5):
        obs = env.get_obs(state)
        squares.append(float(jnp.mean(policy.raw(obs) ** 2)))
        state = env.step_env(None, state, policy(obs), params)[1]
    assert losses[0.0] == pytest.approx(1.0)  # -reward: no step reaches the goal
    assert losses[0.5] - losses[0.0] == pytest.approx(0.5 * np.mean(squares), rel=1e-4)

    shrink = dataclasses.replace(base, cost={"reward": 0.0}, logit_penalty=1.0, learning_rate=1e-2)
    setup = bptt._setup("Acrobot-v1", shrink, 0)
    state, _ = setup.run_chunk(setup.state, setup.draw_inputs(10), jnp.int32(10))
    obs = jax.random.normal(jax.random.key(0), (64, 6))

    def size(weights):
        return float(jnp.mean(jax.vmap(setup.policy(weights).raw)(obs) ** 2))

    assert size(state.weights) < 0.8 * size(setup.state.weights)  # measured 0.62
    with pytest.raises(ValueError, match="logit_penalty must be >= 0, got -0.1"):
        train("Acrobot-v1", dataclasses.replace(base, logit_penalty=-0.1))


# --------------------------------------------------------------------------------------------
# Training-time gradients: the inward squash and the straight-through speed clip
# --------------------------------------------------------------------------------------------
def test_inward_tanh_is_tanh_forward_with_an_undamped_way_back():
    x = jnp.array([-6.0, -0.5, 0.0, 0.7, 6.0])
    np.testing.assert_array_equal(np.asarray(inward_tanh(x)), np.asarray(jnp.tanh(x)))
    slope = 1.0 - np.tanh(np.asarray(x)) ** 2
    for sign in (1.0, -1.0):
        # The loss's gradient w.r.t. the output is `sign` everywhere: a step moves x by -sign.
        grads = np.asarray(jax.grad(lambda x: jnp.sum(sign * inward_tanh(x)))(x))
        towards_zero = sign * np.tanh(np.asarray(x)) > 0
        np.testing.assert_allclose(grads, sign * np.where(towards_zero, 1.0, slope), rtol=1e-6, atol=1e-6)
    # Saturated at +1 (x = 6), a loss that wants it lower gets slope 1, one that wants it higher ~0.
    assert float(jax.grad(lambda x: inward_tanh(x))(6.0)) == 1.0
    assert abs(float(jax.grad(lambda x: -inward_tanh(x))(6.0))) < 1e-4


def test_pendulum_speed_clip_is_straight_through_in_training_only():
    """Where the new speed clips at 8 rad/s, the task's training step is the env's exactly, and its
    gradient w.r.t. the torque is the unclipped step's (3 dt / (m l^2) on the speed) instead of 0."""
    env, params = diffgym.make("Pendulum-v1")
    state = PendulumState(theta=jnp.float32(0.3), theta_dot=jnp.float32(7.9), last_u=jnp.float32(0.0), time=jnp.int32(0))
    task, plain = PendulumTask(), Task()  # the base task differentiates the env's step as it is

    def speed(u, task, state=state):
        return task.transition(env, None, state, u, params)[0].theta_dot

    exact = env.step_env(None, state, jnp.float32(1.5), params)[1]
    trained = task.transition(env, None, state, jnp.float32(1.5), params)[0]
    assert float(exact.theta_dot) == 8.0
    for field in ("theta", "theta_dot", "last_u", "time"):
        assert float(getattr(trained, field)) == float(getattr(exact, field)), field
    expected = 3.0 * params.dt / (params.m * params.l**2)
    assert float(jax.grad(speed)(jnp.float32(1.5), task)) == pytest.approx(expected, rel=1e-6)
    assert float(jax.grad(speed)(jnp.float32(1.5), plain)) == 0.0  # the env's own gradient
    # Below the clip both are the env's gradient.
    slow = dataclasses.replace(state, theta_dot=jnp.float32(1.0))
    for each in (task, plain):
        assert float(jax.grad(speed)(jnp.float32(1.5), each, slow)) == pytest.approx(expected, rel=1e-6)


# --------------------------------------------------------------------------------------------
# Truncated windows, accounting, guards (the compiled chunk driven directly)
# --------------------------------------------------------------------------------------------
#: 3 rollouts, 7-step windows, episodes longer than any test here (no reset).
_WINDOWED = BPTTConfig(total_env_steps=1_000, num_envs=3, window=7, episode_length=1_000, eval_every=1_000)


@pytest.fixture(scope="module")
def frozen_pendulum():
    """The training chunk with a zero learning rate (weights stay put), compiled once."""
    return bptt._setup("Pendulum-v1", _WINDOWED, seed=0, optimizer=optax.sgd(0.0))


def _inputs(setup) -> ChunkInputs:
    """Inputs of a whole chunk; the reset states are used only at a reset, and none happens within
    1 000 steps here."""
    return setup.draw_inputs(bptt._updates_per_chunk(setup.config))


def test_truncated_windows_carry_the_state_across_boundaries(frozen_pendulum):
    """Three 7-step windows end where one uninterrupted 21-step rollout of the same policy ends."""
    setup = frozen_pendulum
    state, (losses, _) = setup.run_chunk(setup.state, _inputs(setup), jnp.int32(3))
    losses = np.asarray(losses)[:3]
    assert np.all(np.isfinite(losses))
    # Each window started where the last stopped, not from the same (or a fresh) state.
    assert len(set(losses.tolist())) == 3
    end = state.env_states
    np.testing.assert_array_equal(np.asarray(end.time), [21, 21, 21])

    env, params = diffgym.make("Pendulum-v1")
    policy = setup.policy(setup.state.weights)

    def rollout(state):
        def body(state, _):
            _, state, *_ = env.step_env(None, state, policy(env.get_obs(state)), params)
            return state, None

        return jax.lax.scan(body, state, None, length=21)[0]

    direct = jax.vmap(rollout)(setup.state.env_states)
    np.testing.assert_allclose(np.asarray(end.theta), np.asarray(direct.theta), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(end.theta_dot), np.asarray(direct.theta_dot), rtol=1e-5, atol=1e-6)


def test_env_step_accounting_is_exact(frozen_pendulum):
    """A chunk asked for 47 updates simulates exactly 47 x 3 rollouts x 7 steps, nothing more.

    Each rollout's clock counts its simulated steps (no reset here), so their sum is what the
    trainer reports; the surplus updates of the compiled chunk are skipped, not simulated.
    """
    setup = frozen_pendulum
    updates = _WINDOWED.total_env_steps // (_WINDOWED.num_envs * _WINDOWED.window)
    assert updates == 47 and bptt._updates_per_chunk(_WINDOWED) > updates
    state, (losses, _) = setup.run_chunk(setup.state, _inputs(setup), jnp.int32(updates))
    assert int(jnp.sum(state.env_states.time)) == 47 * 3 * 7 == 987
    assert int(state.update) == 47
    assert np.all(np.isnan(np.asarray(losses)[47:]))  # the skipped updates report no loss


def test_nan_guard_keeps_the_weights_from_before_the_bad_update():
    """Healthy updates change the weights; a NaN state stops them, keeping the last good ones."""
    config = BPTTConfig(total_env_steps=100, num_envs=1, window=5, episode_length=200, eval_every=50)
    setup = bptt._setup("Pendulum-v1", config, 0)
    inputs = setup.draw_inputs(10)
    healthy, _ = setup.run_chunk(setup.state, inputs, jnp.int32(3))
    assert int(healthy.failure.code) == 0 and int(healthy.update) == 3
    pairs = zip(jax.tree.leaves(healthy.weights), jax.tree.leaves(setup.state.weights))
    assert any(not np.array_equal(new, old) for new, old in pairs)

    bad_states = dataclasses.replace(healthy.env_states, theta_dot=jnp.full((1,), jnp.nan))
    state, _ = setup.run_chunk(healthy._replace(env_states=bad_states), inputs, jnp.int32(10))
    assert int(state.failure.code) != 0 and int(state.failure.update) == 3  # the first update after the NaN
    assert int(state.update) == 4  # and the nine after it were skipped
    for new, old in zip(jax.tree.leaves(state.weights), jax.tree.leaves(healthy.weights)):
        np.testing.assert_array_equal(np.asarray(new), np.asarray(old))
    with pytest.raises(FloatingPointError, match=r"update 3 \(env steps 15\.\.20\), first at step 0"):
        bptt._raise_nonfinite("Pendulum-v1", config, jax.tree.map(int, state.failure))


def test_nan_guard_stops_train_with_a_clear_message():
    params = dataclasses.replace(diffgym.make("CartPole-v1")[1], tau=float("nan"))
    config = dataclasses.replace(default_config("CartPole-v1"), total_env_steps=500)
    expected = r"update 0 \(env steps 0\.\.20\).*simulated state.*non-finite"
    with pytest.raises(FloatingPointError, match=expected):
        train("CartPole-v1", config, env_params=params)


def test_cartpole_rollout_resets_at_termination():
    """A rollout that crosses the thresholds restarts from the supplied reset state (time 0)."""
    config = BPTTConfig(total_env_steps=400, num_envs=1, window=40, episode_length=500, eval_every=400)
    setup = bptt._setup("CartPole-v1", config, 0, optimizer=optax.sgd(0.0))
    # Zero weights and a large output bias: always push right, so the pole falls within 40 steps.
    weights = jax.tree.map(jnp.zeros_like, setup.state.weights)
    weights = eqx.tree_at(lambda w: w.mlp.layers[-1].bias, weights, jnp.full((1,), 5.0))
    inputs = setup.draw_inputs(1)
    zero = jnp.zeros((1, 1, 40))
    upright = CartPoleState(x=zero, x_dot=zero, theta=zero, theta_dot=zero, time=zero.astype(jnp.int32))
    state, _ = setup.run_chunk(setup.state._replace(weights=weights), inputs._replace(starts=upright), jnp.int32(1))
    after = state.env_states
    assert 0 < int(after.time[0]) < 40, "the rollout should have reset and restarted within the window"
    assert abs(float(after.theta[0])) < 0.21


def test_a_random_transition_gets_a_fresh_key_every_step():
    """On a noisy env, every simulated step's noise is the one drawn from that step's own key of
    the chunk's inputs (all distinct), and every restart is the reset drawn from a key of its own:
    the frozen chunk reproduces a step-by-step loop over those keys."""
    from noisy_env import NoisyDrift

    env = NoisyDrift()
    config = BPTTConfig(total_env_steps=60, num_envs=2, window=5, eval_every=30, cost={"reward": 1.0})
    setup = bptt._setup(env, config, seed=0, optimizer=optax.sgd(0.0))
    inputs = setup.draw_inputs(bptt._updates_per_chunk(setup.config))
    data = np.asarray(jax.random.key_data(inputs.keys)).reshape(-1, 2)
    assert len({tuple(row) for row in data}) == len(data)
    starts = np.asarray(inputs.starts.position).reshape(-1, 2)
    assert len({tuple(row) for row in starts}) == len(starts)  # every reset state drawn apart

    state, _ = setup.run_chunk(setup.state, inputs, jnp.int32(3))
    policy = setup.policy(setup.state.weights)
    params = dataclasses.replace(env.default_params, max_steps_in_episode=setup.config.episode_length)
    for rollout in range(2):
        current = jax.tree.map(lambda leaf: leaf[rollout], setup.state.env_states)
        for update in range(3):
            for step in range(5):
                key = inputs.keys[update, rollout, step]
                _, current, _, terminated, info = env.step_env(key, current, policy(env.get_obs(current)), params)
                np.testing.assert_allclose(info["noise"], env.noise(key, params), rtol=1e-6, atol=1e-7)
                if bool(terminated) or int(current.time) >= params.max_steps_in_episode:
                    current = jax.tree.map(lambda leaf: leaf[update, rollout, step], inputs.starts)
        np.testing.assert_allclose(
            np.asarray(state.env_states.position[rollout]), np.asarray(current.position), rtol=1e-4, atol=1e-5
        )


# --------------------------------------------------------------------------------------------
# Replay: stored steps re-acted through their action Jacobians
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("env_id", ["Pendulum-v1", "CartPole-v1"])
def test_linearised_replay_of_a_stored_step_is_the_simulated_step(env_id):
    """A stored step moved to another action by its Jacobians lands where the simulator lands with
    that action (both steps are affine in the action inside their clips), with the simulated
    step's gradient; the stored reward moves by its own Jacobian (exact for CartPole's constant)."""
    env, params = diffgym.make(env_id)
    task = diffgym.make_task(env_id, **default_config(env_id).cost)
    rng = np.random.default_rng(0)
    for _ in range(20):
        _, state = env.reset(jax.random.key(int(rng.integers(1 << 30))), params)
        if env_id == "Pendulum-v1":
            state = dataclasses.replace(state, theta_dot=jnp.float32(rng.uniform(-6, 6)))
            stored, new = (jnp.float32(v) for v in rng.uniform(-2, 2, 2))
        else:
            stored, new = jnp.float32(rng.integers(2)), jnp.float32(rng.uniform(0, 1))
        (next_state, reward, _), jacobians = bptt.transition_with_jacobian(task, env, None, state, stored, params)
        record = StepRecord(state, env.get_obs(state), stored, next_state, reward, *jacobians)

        def replayed(action):
            return bptt.linearised_step(record, action - stored)[0]

        def simulated(action):
            return task.transition(env, None, state, action, params)[0]

        for got, want in zip(jax.tree.leaves(replayed(new)), jax.tree.leaves(simulated(new))):
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
        first = lambda f: jax.grad(lambda a: jax.tree.leaves(f(a))[1])(new)  # noqa: E731
        np.testing.assert_allclose(float(first(replayed)), float(first(simulated)), rtol=1e-5)
        if env_id == "CartPole-v1":
            assert float(bptt.linearised_step(record, new - stored)[1]) == float(reward)


def test_replay_counts_simulated_steps_only_and_stores_each_once():
    """With replay, a chunk of 30 updates simulates 30 windows (2 rollouts x 3 steps): the clocks,
    the store's count and its rows say 180 steps, whatever the replay updates did; the weights
    moved; the stored next states are the simulator's for the stored states and actions."""
    config = BPTTConfig(
        total_env_steps=600, num_envs=2, window=3, episode_length=1_000, eval_every=180,
        cost={"reward": 0.0, "next_state_cost": 1.0, "energy": 30.0}, replay_updates=3, replay_batch=16,
    )  # fmt: skip
    setup = bptt._setup("Pendulum-v1", config, seed=0)
    assert int(setup.state.replay.count) == 0 and setup.state.replay.steps.obs.shape == (600, 3)  # the whole budget
    state, (losses, grad_norms) = setup.run_chunk(setup.state, setup.draw_inputs(30), jnp.int32(30))
    assert int(state.failure.code) == 0 and np.all(np.isfinite(np.asarray(losses)))
    assert int(jnp.sum(state.env_states.time)) == 180 and int(state.replay.count) == 180
    stored = state.replay.steps
    assert np.all(np.asarray(stored.next_state.time[:180]) > 0) and np.all(np.asarray(stored.next_state.time[180:]) == 0)
    pairs = zip(jax.tree.leaves(state.weights), jax.tree.leaves(setup.state.weights))
    assert any(not np.array_equal(new, old) for new, old in pairs)

    env, params = diffgym.make("Pendulum-v1")
    states = jax.tree.map(lambda leaf: leaf[:180], stored.state)
    simulated = jax.vmap(lambda s, a: env.step_env(None, s, a, params)[1])(states, stored.action[:180])
    np.testing.assert_allclose(np.asarray(simulated.theta_dot), np.asarray(stored.next_state.theta_dot[:180]), atol=1e-5)
    np.testing.assert_allclose(np.asarray(simulated.theta), np.asarray(stored.next_state.theta[:180]), atol=1e-5)


def test_replay_nan_guard_drops_the_bad_update():
    config = BPTTConfig(
        total_env_steps=100, num_envs=1, window=1, episode_length=200, eval_every=10, replay_updates=2
    )
    setup = bptt._setup("Pendulum-v1", config, 0)
    inputs = setup.draw_inputs(10)
    healthy, _ = setup.run_chunk(setup.state, inputs, jnp.int32(3))
    assert int(healthy.failure.code) == 0 and int(healthy.replay.count) == 3
    bad_states = dataclasses.replace(healthy.env_states, theta_dot=jnp.full((1,), jnp.nan))
    state, _ = setup.run_chunk(healthy._replace(env_states=bad_states), inputs, jnp.int32(10))
    assert int(state.failure.code) != 0 and int(state.failure.update) == 3 and int(state.replay.count) == 3
    for new, old in zip(jax.tree.leaves(state.weights), jax.tree.leaves(healthy.weights)):
        np.testing.assert_array_equal(np.asarray(new), np.asarray(old))


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------
def test_default_configs_and_bad_inputs():
    assert default_config("CartPole-v1").stop_at_return == 500.0
    assert default_config("diffgym/Pendulum-v1") == default_config("pendulum")
    # No tuned BPTT settings for the trebuchet (its gradient trainer is the aiming network):
    # the generic defaults, whose window fits its one-step episodes and stop is the spec's.
    generic = default_config("Trebuchet-v0")
    assert generic.window == 1 and generic.stop_at_return == -1.0 and generic.cost == {}
    with pytest.raises(ValueError, match=r"window \(600\) is longer than episode_length \(500\)"):
        train("CartPole-v1", dataclasses.replace(default_config("CartPole-v1"), window=600))
    with pytest.raises(ValueError, match="num_envs must be a positive integer, got 0"):
        train("CartPole-v1", dataclasses.replace(default_config("CartPole-v1"), num_envs=0))
    with pytest.raises(ValueError, match="obs_scale needs 4 entries"):
        train("CartPole-v1", dataclasses.replace(default_config("CartPole-v1"), obs_scale=(1.0,)))
    with pytest.raises(ValueError, match="replay_updates must be a non-negative integer, got -1"):
        train("Pendulum-v1", dataclasses.replace(default_config("Pendulum-v1"), replay_updates=-1))
    with pytest.raises(ValueError, match="replay_batch must be a positive integer, got 0"):
        train("Pendulum-v1", dataclasses.replace(default_config("Pendulum-v1"), replay_batch=0))
    expected = r"BPTTConfig.cost names \['enrgy'\], which PendulumTask .* Did you mean 'energy'\?"
    with pytest.raises(ValueError, match=expected):
        train("Pendulum-v1", dataclasses.replace(default_config("Pendulum-v1"), cost={"enrgy": 1.0}))


def test_config_from_json_lists_is_a_cache_key():
    """A list (as JSON gives) is stored as a tuple: the config keys the compiled-chunk cache."""
    config = dataclasses.replace(default_config("Pendulum-v1"), obs_scale=[1, 1, 4])
    assert config.obs_scale == (1.0, 1.0, 4.0)
    hash(tuple((f.name, repr(getattr(config, f.name))) for f in dataclasses.fields(config)))


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
def test_acrobot_goal_minus_100_within_500_steps(seed):
    """-100 on 100 gymnasium episodes with the tuned 500-step budget (measured -82 to -92 on seeds
    0-9)."""
    result = train("Acrobot-v1", default_config("Acrobot-v1"), seed=seed)
    assert result.env_steps <= 500
    policy = numpy_policy(result.policy)
    returns = evaluate_gymnasium(policy, "Acrobot-v1", episodes=100, seed=10_000 + seed)
    assert returns.mean() >= -100, f"seed {seed}: {returns.mean():.1f}"


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mountaincar_goal_minus_110_within_1000_steps(seed):
    """-110 on 100 gymnasium episodes with the tuned 1 000-step budget (measured -104.7 to -108.4
    on seeds 0-9)."""
    result = train("MountainCar-v0", default_config("MountainCar-v0"), seed=seed)
    assert result.env_steps <= 1_000
    policy = numpy_policy(result.policy)
    returns = evaluate_gymnasium(policy, "MountainCar-v0", episodes=100, seed=10_000 + seed)
    assert returns.mean() >= -110, f"seed {seed}: {returns.mean():.1f}"


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mountaincarcontinuous_goal_90_within_3000_steps(seed):
    """90 on 100 gymnasium episodes with the tuned 3 000-step budget (measured 95.1-95.4)."""
    result = train("MountainCarContinuous-v0", default_config("MountainCarContinuous-v0"), seed=seed)
    assert result.env_steps <= 3_000
    returns = evaluate_gymnasium(numpy_policy(result.policy), "MountainCarContinuous-v0", episodes=100, seed=10_000 + seed)
    assert returns.mean() >= 90, f"seed {seed}: {returns.mean():.1f}"


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pendulum_goal_minus_200_within_4000_steps(seed):
    """-200 on 100 fresh random starts with the default config's 4 000-step budget (the goal)."""
    result = train("Pendulum-v1", default_config("Pendulum-v1"), seed=seed)
    assert result.env_steps <= 4_000
    returns = _eval("Pendulum-v1", result.policy, episodes=100, seed=1000 + seed)
    assert returns.mean() >= -200, f"seed {seed}: {returns.mean():.1f}"


# --------------------------------------------------------------------------------------------
# Starting from a checkpoint (init_policy)
# --------------------------------------------------------------------------------------------
def test_init_policy_starts_from_the_checkpoints_network():
    """A checkpoint acts on raw observations (its standardisation folded into the first layer);
    the trainer's network sees ``(obs - mean) / scale``, so the standardisation is taken out again:
    the starting network gives the checkpoint's outputs (MountainCar's spec has a mean and a
    scale). Every other draw of the seed is a fresh run's, and one compiled chunk serves both."""
    checkpoint_dir = ASSETS_DIR / "mountaincar"
    checkpoint, header = load_policy_module(checkpoint_dir)
    sizes = {k: header["spec"][k] for k in ("width", "depth", "activation")}
    config = dataclasses.replace(default_config("mountaincar"), **sizes)
    fresh = bptt._setup("MountainCar-v0", config, seed=3)
    started = bptt._setup("MountainCar-v0", dataclasses.replace(config, init_policy=checkpoint_dir), seed=3)
    obs = np.random.default_rng(0).uniform([-1.2, -0.07], [0.6, 0.07], (256, 2)).astype(np.float32)
    raw = lambda policy: np.asarray(jax.vmap(policy.raw)(obs))  # noqa: E731
    np.testing.assert_allclose(raw(started.policy(started.state.weights)), raw(checkpoint), rtol=1e-5, atol=1e-5)
    assert not np.allclose(raw(fresh.policy(fresh.state.weights)), raw(checkpoint), atol=1e-2)
    for a, b in zip(jax.tree.leaves(fresh.state.env_states), jax.tree.leaves(started.state.env_states)):
        np.testing.assert_array_equal(a, b)
    assert fresh.rng.integers(2**31) == started.rng.integers(2**31)
    assert fresh.cache_key == started.cache_key


def test_a_checkpoint_training_cannot_beat_is_returned():
    """The start is evaluated at 0 env steps; with keep_best it is returned when no later
    evaluation beats it (the bundled CartPole controller already balances for 500 steps)."""
    checkpoint_dir = ASSETS_DIR / "cartpole"
    config = dataclasses.replace(
        default_config("cartpole"), total_env_steps=100, eval_every=100, init_policy=str(checkpoint_dir)
    )
    result = train("cartpole", config, seed=0)
    assert [(p["env_steps"], p["eval_return"]) for p in result.curve[:1]] == [(0, 500.0)]
    assert result.curve[-1]["env_steps"] == result.env_steps == 100
    checkpoint, _ = load_policy_module(checkpoint_dir)
    obs = np.random.default_rng(1).uniform(-0.2, 0.2, (256, 4)).astype(np.float32)
    np.testing.assert_allclose(jax.vmap(result.policy.raw)(obs), jax.vmap(checkpoint.raw)(obs), rtol=1e-5, atol=1e-5)
    assert result.extra["config"]["init_policy"] == str(checkpoint_dir)


def test_init_policy_of_another_network_is_refused(tmp_path):
    config = dataclasses.replace(default_config("cartpole"), width=8, init_policy=ASSETS_DIR / "cartpole")
    with pytest.raises(ValueError, match=r"has kind 'bernoulli', .* width 32, depth 1.*ask for .*width 8, depth 1"):
        bptt._setup("CartPole-v1", config, 0)
    with pytest.raises(ValueError, match="BPTTConfig.init_policy: no policy checkpoint in"):
        bptt._setup("CartPole-v1", dataclasses.replace(config, init_policy=tmp_path), 0)


# --------------------------------------------------------------------------------------------
# A stochastic policy: the stochastic-triple estimator (estimator="triples")
# --------------------------------------------------------------------------------------------
def _gradient_recorder() -> optax.GradientTransformation:
    """An "optimizer" that leaves the weights alone and sums the gradients it is given and their
    squares (its state), so a frozen chunk reports every update's gradient estimate."""

    def init(params):
        zeros = jax.tree.map(jnp.zeros_like, params)
        return (zeros, zeros, jnp.int32(0))

    def update(grads, state, params=None):
        total, squares, count = state
        total = jax.tree.map(jnp.add, total, grads)
        squares = jax.tree.map(lambda s, g: s + g**2, squares, grads)
        return jax.tree.map(jnp.zeros_like, grads), (total, squares, count + 1)

    return optax.GradientTransformation(init, update)


def test_triple_window_gradient_is_the_expected_cost_gradient():
    """The trainer's triple gradient of one 5-step CartPole window, from a fixed start near the
    angle threshold, against the exact gradient of the expected window cost (a termination
    absorbing: every later step costs what the terminating one did) by enumeration of the 2^5
    action sequences of the stochastic (Bernoulli) policy. 64 updates of 512 rollouts each, every
    one from the start (a chunk of one update, called 64 times): the mean is within 4 standard errors
    of the exact gradient in every weight, and the straight-through gradient of the deterministic
    policy is not that."""
    window, rollouts, updates = 5, 512, 64
    cost = {"reward": 0.0, "angle": 1.0, "position": 0.1}
    config = BPTTConfig(
        total_env_steps=updates * rollouts * window, num_envs=rollouts, window=window, episode_length=500,
        eval_every=rollouts * window, depth=0, output_scale=1.0, cost=cost, estimator="triples",
    )  # fmt: skip
    env, params = diffgym.make("CartPole-v1")
    task = diffgym.make_task("CartPole-v1", **cost)
    # Leaning right and falling: some action sequences pass 12 degrees within the window.
    start = CartPoleState(x=jnp.float32(0.3), x_dot=jnp.float32(-0.2), theta=jnp.float32(0.16),
                          theta_dot=jnp.float32(0.4), time=jnp.int32(0))  # fmt: skip
    linear = {"weight": jnp.array([[0.3, -0.5, 2.0, 0.8]]), "bias": jnp.array([0.2])}

    def frozen(config):
        setup = bptt._setup("CartPole-v1", config, seed=0, optimizer=_gradient_recorder())
        weights = eqx.tree_at(lambda w: (w.mlp.layers[0].weight, w.mlp.layers[0].bias), setup.state.weights,
                              (linear["weight"], linear["bias"]))  # fmt: skip
        at_start = lambda shape: jax.tree.map(lambda leaf: jnp.broadcast_to(leaf, shape), start)  # noqa: E731
        state = setup.state._replace(weights=weights)
        for _ in range(updates):  # every window from the start (after a fall, the reset is the start too)
            inputs = setup.draw_inputs(1)._replace(starts=at_start((1, rollouts, window)))
            state, _ = setup.run_chunk(state._replace(env_states=at_start((rollouts,))), inputs, jnp.int32(1))
        assert int(state.failure.code) == 0 and int(state.update) == updates
        return setup, weights, state.opt_state

    setup, weights, (total, squares, count) = frozen(config)
    assert int(count) == updates

    def flat(tree):
        layer = tree.mlp.layers[0]
        return np.concatenate([np.ravel(layer.weight), np.ravel(layer.bias)]).astype(np.float64)

    mean = flat(total) / updates
    # Each update's estimate is a mean over `rollouts`; its spread across updates gives the error.
    se = np.sqrt(np.maximum(flat(squares) / updates - mean**2, 0.0) / (updates - 1))

    scale = jnp.asarray(setup.obs_scale)

    def expected_window_cost(weights):
        policy = eqx.combine(weights, setup.static)
        sequences = ((jnp.arange(2**window)[:, None] >> jnp.arange(window)) & 1).astype(jnp.float32)

        def one(actions):
            def step(state, action):
                prob = jax.nn.sigmoid(policy.raw(env.get_obs(state) / scale)[0])
                _, next_state, reward, terminated, _ = env.step_env(None, state, action, params)
                log_p = jnp.where(action > 0, jnp.log(prob), jnp.log1p(-prob))
                return next_state, (task.cost(params, state, action, next_state, reward), log_p, terminated)

            _, (costs, log_probs, terminated) = jax.lax.scan(step, start, actions)

            def absorb(carry, xs):  # after a termination, the terminating step's cost
                dead, held = carry
                cost, terminated = xs
                cost = jnp.where(dead, held, cost)
                return (dead | terminated, cost), cost

            _, costs = jax.lax.scan(absorb, (jnp.array(False), jnp.float32(0.0)), (costs, terminated))
            return jnp.exp(jnp.sum(log_probs)) * jnp.mean(costs), jnp.any(terminated)

        weighted, terminated = jax.vmap(one)(sequences)
        return jnp.sum(weighted), terminated

    exact, terminated = jax.grad(expected_window_cost, has_aux=True)(weights)
    assert 0 < float(jnp.mean(terminated)) < 1  # some sequences fall within the window, some do not
    exact = flat(exact)
    z = np.abs(mean - exact) / se
    print(f"\ntriple window gradient {np.round(mean, 5)} ± {np.round(se, 5)}; exact {np.round(exact, 5)}; max |z| {z.max():.1f}")
    assert np.all(z <= 4), (mean, se, exact)
    assert np.linalg.norm(mean - exact) < 0.1 * np.linalg.norm(exact)

    # The deterministic policy's straight-through gradient of the same window is another quantity.
    _, _, (st_total, _, _) = frozen(dataclasses.replace(config, estimator="straight_through"))
    straight_through = flat(st_total) / updates
    assert np.max(np.abs(straight_through - exact) / se) > 10


def test_absorbing_costs_hold_the_terminating_steps_cost():
    costs = jnp.array([[1.0, 2.0, 3.0, 4.0, 5.0], [1.0, 2.0, 3.0, 4.0, 5.0], [1.0, 2.0, 3.0, 4.0, 5.0]])
    terminated = jnp.array([[0, 1, 0, 1, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 1]], bool)
    np.testing.assert_array_equal(
        bptt.absorbing_costs(costs, terminated), [[1, 2, 2, 2, 2], [1, 2, 3, 4, 5], [1, 2, 3, 4, 5]]
    )


def test_cartpole_learns_with_the_triple_estimator():
    """The tuned CartPole settings with estimator="triples" (a sampled Bernoulli policy) cut to
    2 000 env steps: the hard (mode) policy balances >= 400 steps on fresh episodes. Measured on
    seeds 0-4: 500.0 on each (172-500 after 1 000 steps)."""
    config = dataclasses.replace(
        default_config("cartpole"), total_env_steps=2_000, eval_every=500, stop_at_return=None, estimator="triples"
    )
    result = train("cartpole", config, seed=0)
    assert result.policy.kind == "bernoulli" and result.env_steps == 2_000
    assert int(result.policy(jnp.array([0.01, -0.2, 0.03, 0.1]))) in (0, 1)
    returns = _eval("CartPole-v1", result.policy, episodes=20)
    assert returns.mean() >= 400, f"mean return {returns.mean():.1f} after {result.env_steps} steps"


def test_triple_estimator_refusals():
    with pytest.raises(ValueError, match=r"estimator must be one of \('straight_through', 'triples'\), got 'tripels'.*Did you mean 'triples'"):
        train("CartPole-v1", dataclasses.replace(default_config("CartPole-v1"), estimator="tripels"))
    with pytest.raises(ValueError, match=r"'triples' cannot be combined with replay \(replay_updates = 4\)"):
        train("Pendulum-v1", dataclasses.replace(default_config("Pendulum-v1"), estimator="triples"))
    with pytest.raises(ValueError, match=r"'triples' samples a discrete action.*Pendulum-v1 has the continuous action space"):
        bptt._setup("Pendulum-v1", dataclasses.replace(default_config("Pendulum-v1"), replay_updates=0, estimator="triples"), 0)
    assert default_config("CartPole-v1").estimator == "straight_through"
