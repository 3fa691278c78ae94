"""Pendulum-v1 against gymnasium's numpy Pendulum, transition by transition.

gymnasium plays whole episodes (random torques beyond the ±2 N m clip, and a swing-up controller
that saturates the torque and reaches the ±8 rad/s speed clip) and some single steps from set
states outside the speed clip; diffgym takes each recorded state and torque and must return the
same observation, reward and truncation flag: to 1e-4 in float32 and to 1e-9 with x64 against
gymnasium's float64 internal state.

The torques given to gymnasium are float64 (values rounded to float32 first, so float32 diffgym
sees the same numbers): with a float32 torque, numpy computes ``3.0 * u`` in float32, an error of
~1e-8 that the 1e-9 comparison would (rightly) flag as not gymnasium's physics.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gymnasium.envs.classic_control.pendulum import PendulumEnv
from gymnasium.wrappers import TimeLimit

import diffgym
from diffgym.envs.pendulum import Pendulum, PendulumParams, PendulumState

ENV, DEFAULT_PARAMS = diffgym.make("Pendulum-v1")
MAX_STEPS = 200


def gymnasium_pendulum(**physics) -> TimeLimit:
    env = PendulumEnv()
    for name, value in physics.items():
        assert hasattr(env, name), name
        setattr(env, name, value)
    return TimeLimit(env, max_episode_steps=MAX_STEPS)


def swing_up_torque(theta: float, theta_dot: float) -> float:
    """Pump energy far from the top (full torque along the motion), PD-balance near it."""
    upright_error = (theta + np.pi) % (2 * np.pi) - np.pi
    if abs(upright_error) < 0.6:
        return -(12.0 * upright_error + 3.0 * theta_dot)
    return 3.0 * np.sign(theta_dot) if theta_dot != 0 else 3.0


def record(seeds, policy: str, **physics) -> dict[str, np.ndarray]:
    """One full gymnasium episode (200 steps, truncated) per seed; every transition as a row.

    ``policy``: ``"random"`` (uniform torques in [-3, 3], beyond the clip) or ``"swing_up"``.
    """
    rows: dict[str, list] = {k: [] for k in "state time action obs next_state reward truncated".split()}
    env = gymnasium_pendulum(**physics)
    raw = env.unwrapped
    for seed in seeds:
        rng = np.random.default_rng(seed)
        env.reset(seed=int(seed))
        for time in range(MAX_STEPS):
            state = raw.state.copy()
            u = rng.uniform(-3.0, 3.0) if policy == "random" else swing_up_torque(*state)
            u = float(np.float32(u))
            obs, reward, terminated, truncated, _ = env.step(np.array([u]))
            assert not terminated
            for name, value in zip(rows, (state, time, u, obs, raw.state.copy(), reward, truncated)):
                rows[name].append(value)
    return {name: np.asarray(values) for name, values in rows.items()}


def record_set_states(count: int, seed: int) -> dict[str, np.ndarray]:
    """Single steps from states gymnasium never resets to: any angle, speeds beyond ±8 rad/s."""
    rng = np.random.default_rng(seed)
    env = gymnasium_pendulum()
    raw = env.unwrapped
    env.reset(seed=seed)
    rows: dict[str, list] = {k: [] for k in "state time action obs next_state reward truncated".split()}
    for _ in range(count):
        state = np.array([rng.uniform(-3 * np.pi, 3 * np.pi), rng.uniform(-12.0, 12.0)])
        u = float(np.float32(rng.uniform(-4.0, 4.0)))
        raw.state = state.copy()
        obs, reward, _, _, _ = raw.step(np.array([u]))
        for name, value in zip(rows, (state, 0, u, obs, raw.state.copy(), reward, False)):
            rows[name].append(value)
    return {name: np.asarray(values) for name, values in rows.items()}


def concat(*recordings):
    return {name: np.concatenate([r[name] for r in recordings]) for name in recordings[0]}


def states_from(rows, dtype) -> PendulumState:
    s = jnp.asarray(rows["state"], dtype)
    return PendulumState(
        theta=s[:, 0],
        theta_dot=s[:, 1],
        last_u=jnp.zeros_like(s[:, 0]),
        time=jnp.asarray(rows["time"], jnp.int32),
    )


@jax.jit
def step_batch(states, actions, params):
    return jax.vmap(ENV.step, in_axes=(None, 0, 0, None))(jax.random.key(0), states, actions, params)


@pytest.fixture(scope="module")
def transitions():
    return concat(
        record(range(12), "random"),
        record(range(100, 112), "swing_up"),
        record_set_states(1000, seed=7),
    )


def _clipped(rows):
    torque_clipped = np.abs(rows["action"]) > DEFAULT_PARAMS.max_torque
    speed_clipped = np.abs(rows["next_state"][:, 1]) == DEFAULT_PARAMS.max_speed
    return torque_clipped, speed_clipped


def test_recorded_transitions_exercise_both_clips_and_truncation(transitions):
    torque_clipped, speed_clipped = _clipped(transitions)
    assert torque_clipped.sum() > 1000
    assert speed_clipped.sum() > 300
    # The swing-up episodes themselves reach the speed clip, not only the set states.
    assert speed_clipped[: 24 * MAX_STEPS].sum() > 20
    assert transitions["truncated"].sum() == 24


@pytest.mark.parametrize("action_shape", [(), (1,)], ids=["scalar", "vector"])
def test_step_matches_gymnasium_float32(transitions, action_shape):
    states = states_from(transitions, jnp.float32)
    actions = jnp.asarray(transitions["action"], jnp.float32).reshape(-1, *action_shape)
    obs, next_states, reward, terminated, truncated, info = step_batch(states, actions, DEFAULT_PARAMS)
    assert info["final_observation"].dtype == jnp.float32
    np.testing.assert_allclose(info["final_observation"], transitions["obs"], rtol=0, atol=1e-4)
    np.testing.assert_allclose(reward, transitions["reward"], rtol=0, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(truncated), transitions["truncated"])
    assert not np.any(terminated)
    done = transitions["truncated"]
    np.testing.assert_array_equal(np.asarray(obs)[~done], np.asarray(info["final_observation"])[~done])
    np.testing.assert_array_equal(np.asarray(next_states.time), np.where(done, 0, transitions["time"] + 1))
    clipped_torque = np.clip(transitions["action"], -2, 2).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(next_states.last_u)[~done], clipped_torque[~done])


def test_step_env_matches_gymnasium_float64_state(transitions):
    with jax.enable_x64(True):
        states = states_from(transitions, jnp.float64)
        step_env = jax.jit(jax.vmap(ENV.step_env, in_axes=(None, 0, 0, None)))
        obs, next_states, reward, _, _ = step_env(
            jax.random.key(0), states, jnp.asarray(transitions["action"]), DEFAULT_PARAMS
        )
        assert next_states.theta.dtype == jnp.float64
        next_state = np.stack([next_states.theta, next_states.theta_dot], -1)
        np.testing.assert_allclose(next_state, transitions["next_state"], rtol=0, atol=1e-9)
        np.testing.assert_allclose(reward, transitions["reward"], rtol=0, atol=1e-9)
        torque_clipped, speed_clipped = _clipped(transitions)
        # Exactly at the clip values where gymnasium clipped.
        np.testing.assert_array_equal(np.abs(np.asarray(next_states.last_u))[torque_clipped], 2.0)
        np.testing.assert_array_equal(np.abs(np.asarray(next_states.theta_dot))[speed_clipped], 8.0)
    assert not jax.config.jax_enable_x64
    assert jnp.zeros(()).dtype == jnp.float32


PHYSICS_CHANGES = [{"g": 9.81}, {"m": 2.0, "l": 0.7}, {"dt": 0.02, "max_speed": 5.0, "max_torque": 1.0}]


@pytest.mark.parametrize("change", PHYSICS_CHANGES, ids=lambda c: ",".join(c))
def test_changed_params_change_the_dynamics_as_in_gymnasium(change):
    rows = concat(record(range(3), "random", **change), record(range(3), "swing_up", **change))
    params = dataclasses.replace(DEFAULT_PARAMS, **change)
    states, actions = states_from(rows, jnp.float32), jnp.asarray(rows["action"], jnp.float32)
    _, _, reward, _, _, info = step_batch(states, actions, params)
    np.testing.assert_allclose(info["final_observation"], rows["obs"], rtol=0, atol=1e-4)
    np.testing.assert_allclose(reward, rows["reward"], rtol=0, atol=1e-4)
    _, _, default_reward, _, _, default_info = step_batch(states, actions, DEFAULT_PARAMS)
    obs_gap = np.max(np.abs(np.asarray(default_info["final_observation"]) - rows["obs"]))
    reward_gap = np.max(np.abs(np.asarray(default_reward) - rows["reward"]))
    assert max(obs_gap, reward_gap) > 1e-3  # the change is not ignored


def test_vmap_over_params_gives_each_env_its_own_gravity():
    gravities = np.array([1.62, 3.71, 9.81, 24.79])
    params = jax.tree.map(lambda v: jnp.full(len(gravities), v), DEFAULT_PARAMS)
    params = dataclasses.replace(params, g=jnp.asarray(gravities))
    state = PendulumState(
        theta=jnp.float32(1.0), theta_dot=jnp.float32(0.5), last_u=jnp.float32(0.0), time=jnp.int32(0)
    )
    obs = jax.jit(jax.vmap(ENV.step_env, in_axes=(None, None, None, 0)))(None, state, 0.3, params)[0]
    for i, g in enumerate(gravities):
        gym = PendulumEnv(g=g)
        gym.reset(seed=0)
        gym.state = np.array([1.0, 0.5])
        np.testing.assert_allclose(obs[i], gym.step(np.array([0.3]))[0], rtol=0, atol=1e-6)


def test_reset_distribution_is_uniform_in_the_documented_box():
    keys = jax.random.split(jax.random.key(99), 4096)
    obs, states = jax.jit(jax.vmap(ENV.reset, in_axes=(0, None)))(keys, DEFAULT_PARAMS)
    theta, theta_dot = np.asarray(states.theta), np.asarray(states.theta_dot)
    expected_obs = np.stack([np.cos(theta), np.sin(theta), theta_dot], -1)
    np.testing.assert_allclose(obs, expected_obs, rtol=0, atol=1e-7)
    np.testing.assert_array_equal(np.asarray(states.time), 0)
    np.testing.assert_array_equal(np.asarray(states.last_u), 0.0)
    assert np.all(np.abs(theta) <= np.pi) and np.all(np.abs(theta_dot) <= 1.0)
    # Kolmogorov-Smirnov distance to the uniform CDFs (1% critical value at n=4096: 0.025).
    for values, high in ((theta, np.pi), (theta_dot, 1.0)):
        cdf = (np.sort(values) + high) / (2 * high)
        assert np.max(np.abs(np.arange(1, len(values) + 1) / len(values) - cdf)) < 0.025
    assert abs(np.corrcoef(theta, theta_dot)[0, 1]) < 0.06


def test_spaces_match_gymnasium():
    gym = PendulumEnv()
    action_space, observation_space = ENV.action_space(DEFAULT_PARAMS), ENV.observation_space(DEFAULT_PARAMS)
    for mine, theirs in ((action_space, gym.action_space), (observation_space, gym.observation_space)):
        assert mine.shape == theirs.shape
        np.testing.assert_array_equal(np.asarray(mine.low), theirs.low)
        np.testing.assert_array_equal(np.asarray(mine.high), theirs.high)
    assert ENV.num_actions == 1
    # The action space follows the params (a weaker motor has a smaller box).
    weak = ENV.action_space(dataclasses.replace(DEFAULT_PARAMS, max_torque=0.5))
    np.testing.assert_array_equal(np.asarray(weak.high), [0.5])


def test_params_are_gymnasiums_constants():
    gym = PendulumEnv()
    names = {f.name for f in dataclasses.fields(PendulumParams)}
    assert names == {"max_speed", "max_torque", "dt", "g", "m", "l", "max_steps_in_episode"}
    for name in names - {"max_steps_in_episode"}:
        assert getattr(DEFAULT_PARAMS, name) == getattr(gym, name), name
    assert DEFAULT_PARAMS.max_steps_in_episode == 200
    assert {f.name for f in dataclasses.fields(PendulumState)} == {"theta", "theta_dot", "last_u", "time"}
    assert isinstance(ENV, Pendulum)
