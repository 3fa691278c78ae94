"""CartPole-v1 against gymnasium's numpy CartPole, transition by transition.

Open-loop CartPole is unstable (a 1e-7 difference grows ~e^5 per second), so whole trajectories
cannot be compared. Instead gymnasium plays whole episodes and records every transition (its
float64 internal state before the step, the action, what it returned); diffgym then takes each
recorded state, the same action, and must return the same next observation, reward and flags:
to 1e-4 in float32, and to 1e-9 with x64 against gymnasium's float64 internal state.
"""

from __future__ import annotations

import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gymnasium.envs.classic_control.cartpole import CartPoleEnv
from gymnasium.wrappers import TimeLimit

import diffgym
from diffgym.envs.cartpole import CartPole, CartPoleParams, CartPoleState

ENV, DEFAULT_PARAMS = diffgym.make("CartPole-v1")
MAX_STEPS = 500
# A linear balancing rule: push toward the side the pole is falling to. Alone it reaches the
# 500-step limit from every start tried; mixed with random actions it fails at varied times.
BALANCING_GAINS = np.array([0.05, 0.2, 1.0, 0.3])
# Steps taken after a termination without resetting ("reward after termination").
STEPS_AFTER_TERMINATION = 8


def gymnasium_cartpole(**physics) -> TimeLimit:
    """gymnasium's numpy CartPole with ``physics`` overrides, derived constants kept consistent.

    gymnasium stores ``total_mass`` and ``polemass_length`` next to the constants they derive
    from, so changing ``masspole`` there means recomputing them, exactly as its ``__init__`` does.
    The ``TimeLimit`` wrapper is gymnasium's own truncation rule (the raw env never truncates).
    """
    env = CartPoleEnv()
    for name, value in physics.items():
        assert hasattr(env, name), name
        setattr(env, name, value)
    env.total_mass = env.masspole + env.masscart
    env.polemass_length = env.masspole * env.length
    return TimeLimit(env, max_episode_steps=MAX_STEPS)


def record_episodes(seeds, random_action_probability: float, **physics) -> dict[str, np.ndarray]:
    """Play one gymnasium episode per seed; return every transition as arrays (one row each).

    Actions mix the balancing rule with uniformly random ones. After a termination the episode
    goes on for ``STEPS_AFTER_TERMINATION`` more steps without a reset (gymnasium warns there;
    the warning is expected). Columns: ``state`` (float64, before the step), ``time`` (steps
    taken before it), ``action``, ``obs`` (float32, returned), ``next_state`` (float64 internal),
    ``reward``, ``terminated``, ``truncated``, ``terminated_before`` (gymnasium had already
    reported a termination in this episode).
    """
    rows: dict[str, list] = {
        k: []
        for k in (
            "state time action obs next_state reward terminated truncated terminated_before".split()
        )
    }
    env = gymnasium_cartpole(**physics)
    raw = env.unwrapped
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*already returned terminated", category=UserWarning)
        for seed in seeds:
            rng = np.random.default_rng(seed)
            env.reset(seed=int(seed))
            steps_after_termination = 0
            for time in range(MAX_STEPS):
                state = raw.state.copy()
                terminated_before = raw.steps_beyond_terminated is not None
                if rng.random() < random_action_probability:
                    action = int(rng.integers(2))
                else:
                    action = int(BALANCING_GAINS @ state > 0)
                obs, reward, terminated, truncated, _ = env.step(action)
                for name, value in zip(
                    rows,
                    (state, time, action, obs, raw.state.copy(), reward, terminated, truncated,
                     terminated_before),
                ):
                    rows[name].append(value)
                if terminated or terminated_before:
                    steps_after_termination += 1
                if truncated or steps_after_termination > STEPS_AFTER_TERMINATION:
                    break
    return {name: np.asarray(values) for name, values in rows.items()}


def concat(*recordings):
    return {name: np.concatenate([r[name] for r in recordings]) for name in recordings[0]}


def states_from(rows, dtype) -> CartPoleState:
    s = jnp.asarray(rows["state"], dtype)
    return CartPoleState(
        x=s[:, 0], x_dot=s[:, 1], theta=s[:, 2], theta_dot=s[:, 3], time=jnp.asarray(rows["time"], jnp.int32)
    )


@jax.jit
def step_batch(states, actions, params):
    """``env.step`` on every recorded transition at once (same key: CartPole's step ignores it)."""
    return jax.vmap(ENV.step, in_axes=(None, 0, 0, None))(jax.random.key(0), states, actions, params)


@pytest.fixture(scope="module")
def episodes():
    """~12k transitions: random play (short episodes, terminations), noisy balancing (terminations
    at varied times) and clean balancing (truncation at 500 steps)."""
    return concat(
        record_episodes(range(150), random_action_probability=1.0),
        record_episodes(range(1000, 1020), random_action_probability=0.4),
        record_episodes(range(2000, 2004), random_action_probability=0.0),
    )


def test_recorded_episodes_cover_termination_truncation_and_steps_after_termination(episodes):
    # Guards the parity tests below against silently testing only the easy regime.
    assert episodes["terminated"].sum() > 150 * 3  # random episodes, then several steps past it
    assert episodes["truncated"].sum() >= 4  # the clean balancing episodes all reach 500 steps
    came_back = episodes["terminated_before"] & ~episodes["terminated"]
    stayed_out = episodes["terminated_before"] & episodes["terminated"]
    assert stayed_out.sum() > 500 and came_back.sum() > 0
    assert set(np.unique(episodes["reward"])) == {0.0, 1.0}


def _comparable(episodes):
    """All recorded transitions but the one documented divergence: gymnasium pays 0 when a pole that
    already fell once and came back falls again (it remembers the first fall; diffgym's state does
    not). Returns the mask; the divergence must stay rare."""
    x, theta = episodes["state"][:, 0], episodes["state"][:, 2]
    state_terminated = (np.abs(x) > DEFAULT_PARAMS.x_threshold) | (
        np.abs(theta) > DEFAULT_PARAMS.theta_threshold_radians
    )
    fell_again = episodes["terminated_before"] & ~state_terminated & episodes["terminated"]
    assert fell_again.sum() <= 0.001 * len(fell_again)
    return ~fell_again


def cartpole_state(x, x_dot, theta, theta_dot, time=0) -> CartPoleState:
    return CartPoleState(
        x=jnp.float32(x), x_dot=jnp.float32(x_dot), theta=jnp.float32(theta),
        theta_dot=jnp.float32(theta_dot), time=jnp.int32(time),
    )


@pytest.mark.parametrize("action_dtype", [jnp.int32, jnp.float32], ids=["int", "float"])
def test_step_matches_gymnasium_float32(episodes, action_dtype):
    keep = _comparable(episodes)
    states = states_from(episodes, jnp.float32)
    obs, next_states, reward, terminated, truncated, info = step_batch(
        states, jnp.asarray(episodes["action"], action_dtype), DEFAULT_PARAMS
    )
    assert info["final_observation"].dtype == jnp.float32
    np.testing.assert_allclose(info["final_observation"], episodes["obs"], rtol=0, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(terminated), episodes["terminated"])
    np.testing.assert_array_equal(np.asarray(truncated), episodes["truncated"])
    np.testing.assert_array_equal(np.asarray(reward)[keep], episodes["reward"][keep])
    # Auto-reset: where the episode ended the returned state is a fresh one, elsewhere the step's.
    done = episodes["terminated"] | episodes["truncated"]
    np.testing.assert_array_equal(np.asarray(obs)[~done], np.asarray(info["final_observation"])[~done])
    assert np.all(np.abs(np.asarray(obs)[done]) <= 0.05)
    np.testing.assert_array_equal(np.asarray(next_states.time), np.where(done, 0, episodes["time"] + 1))


def test_int_and_float_actions_give_bitwise_identical_transitions(episodes):
    states = states_from(episodes, jnp.float32)
    as_int = step_batch(states, jnp.asarray(episodes["action"], jnp.int32), DEFAULT_PARAMS)
    as_float = step_batch(states, jnp.asarray(episodes["action"], jnp.float32), DEFAULT_PARAMS)
    for a, b in zip(jax.tree.leaves(as_int), jax.tree.leaves(as_float)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize(
    "action", [1, 1.0, np.int64(1), np.float32(1.0), True, jnp.array([1]), jnp.array(1.0)]
)
def test_every_spelling_of_push_right_is_the_same_action(action):
    state = cartpole_state(0.01, -0.02, 0.03, 0.04)
    reference = ENV.step_env(None, state, jnp.int32(1), DEFAULT_PARAMS)[1]
    got = ENV.step_env(None, state, action, DEFAULT_PARAMS)[1]
    assert jax.tree.map(lambda a, b: bool(a == b), got, reference) == jax.tree.map(lambda a: True, got)
    left = ENV.step_env(None, state, 0, DEFAULT_PARAMS)[1]
    assert float(left.x_dot) < float(got.x_dot)  # 1 pushes right, 0 left


def test_step_env_matches_gymnasium_float64_state(episodes):
    keep = _comparable(episodes)
    with jax.enable_x64(True):
        states = states_from(episodes, jnp.float64)
        assert states.x.dtype == jnp.float64
        step_env = jax.jit(jax.vmap(ENV.step_env, in_axes=(None, 0, 0, None)))
        obs, next_states, reward, terminated, _ = step_env(
            jax.random.key(0), states, jnp.asarray(episodes["action"]), DEFAULT_PARAMS
        )
        assert obs.dtype == jnp.float64
        next_state = np.stack(
            [next_states.x, next_states.x_dot, next_states.theta, next_states.theta_dot], -1
        )
        np.testing.assert_allclose(next_state, episodes["next_state"], rtol=0, atol=1e-9)
        np.testing.assert_array_equal(np.asarray(terminated), episodes["terminated"])
        np.testing.assert_array_equal(np.asarray(reward)[keep], episodes["reward"][keep])
    # The context manager must not leak x64 into the rest of the session.
    assert not jax.config.jax_enable_x64
    assert jnp.zeros(()).dtype == jnp.float32


def test_reward_after_termination_follows_gymnasium_edge_cases():
    """Steps without a reset from set states: fall (1), stay fallen (0), come back (1)."""
    gym = gymnasium_cartpole()
    raw = gym.unwrapped
    gym.reset(seed=0)
    just_inside_moving_out = np.array([2.39, 1.0, 0.0, 0.0])  # next x = 2.41 > 2.4
    outside_moving_out = np.array([2.45, 1.0, 0.0, 0.0])
    outside_moving_in = np.array([2.41, -1.0, 0.0, 0.0])  # next x = 2.39
    expected_rewards = []
    got_rewards = []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*already returned terminated", category=UserWarning)
        for start in (just_inside_moving_out, outside_moving_out, outside_moving_in):
            raw.state = start.copy()
            _, reward, terminated, _, _ = gym.step(1)
            expected_rewards.append(reward)
            state = cartpole_state(*start, time=1)
            _, _, got, got_terminated, _ = ENV.step_env(None, state, 1, DEFAULT_PARAMS)
            got_rewards.append(float(got))
            assert bool(got_terminated) == terminated
    assert expected_rewards == [1.0, 0.0, 1.0]
    assert got_rewards == expected_rewards


# Each changes the physics or the thresholds; diffgym must follow gymnasium with the same change.
PHYSICS_CHANGES = [
    {"masspole": 0.5},
    {"length": 0.9},
    {"masscart": 2.5, "gravity": 3.7, "force_mag": 14.0, "tau": 0.01},
    {"x_threshold": 1.0, "theta_threshold_radians": 0.1},
]


CHANGED_PARAMS_ROWS = 600


@pytest.mark.parametrize("change", PHYSICS_CHANGES, ids=lambda c: ",".join(c))
def test_changed_params_change_the_dynamics_as_in_gymnasium(change):
    rows = concat(
        record_episodes(range(30), random_action_probability=1.0, **change),
        record_episodes(range(30, 34), random_action_probability=0.2, **change),
    )
    # A fixed number of rows, so the jitted batch step compiles once for every change.
    assert len(rows["action"]) >= CHANGED_PARAMS_ROWS
    rows = {name: column[:CHANGED_PARAMS_ROWS] for name, column in rows.items()}
    params = dataclasses.replace(DEFAULT_PARAMS, **change)
    states = states_from(rows, jnp.float32)
    actions = jnp.asarray(rows["action"])
    _, _, _, terminated, _, info = step_batch(states, actions, params)
    np.testing.assert_allclose(info["final_observation"], rows["obs"], rtol=0, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(terminated), rows["terminated"])
    # And the default physics does not fit gymnasium's changed env: the change is not ignored.
    _, _, _, default_terminated, _, default_info = step_batch(states, actions, DEFAULT_PARAMS)
    differs = np.max(np.abs(np.asarray(default_info["final_observation"]) - rows["obs"])) > 1e-3
    assert differs or np.any(np.asarray(default_terminated) != rows["terminated"])


def test_vmap_over_params_gives_each_env_its_own_physics():
    """Domain randomisation: a batch of params, one per env, each matching gymnasium's env."""
    masspoles = np.array([0.05, 0.1, 0.4, 1.0])
    lengths = np.array([0.3, 0.5, 0.7, 1.2])
    params = jax.tree.map(lambda v: jnp.full(len(masspoles), v), DEFAULT_PARAMS)
    params = dataclasses.replace(params, masspole=jnp.asarray(masspoles), length=jnp.asarray(lengths))
    start = np.array([0.1, -0.3, 0.15, 0.8])
    state = cartpole_state(*start)
    obs, _, _, _, _ = jax.jit(jax.vmap(ENV.step_env, in_axes=(None, None, None, 0)))(None, state, 1, params)
    for i, (masspole, length) in enumerate(zip(masspoles, lengths)):
        gym = gymnasium_cartpole(masspole=masspole, length=length).unwrapped
        gym.reset(seed=0)
        gym.state = start.copy()
        expected = gym.step(1)[0]
        np.testing.assert_allclose(obs[i], expected, rtol=0, atol=1e-6)
    assert len({round(float(v), 6) for v in obs[:, 3]}) == len(masspoles)  # per-env physics


def test_reset_distribution_is_uniform_in_the_documented_box():
    keys = jax.random.split(jax.random.key(1234), 4096)
    obs, states = jax.jit(jax.vmap(ENV.reset, in_axes=(0, None)))(keys, DEFAULT_PARAMS)
    values = np.stack([states.x, states.x_dot, states.theta, states.theta_dot], -1)
    np.testing.assert_array_equal(np.asarray(obs), values)
    np.testing.assert_array_equal(np.asarray(states.time), 0)
    assert values.min() >= -0.05 and values.max() <= 0.05
    # Uniform on [-0.05, 0.05] per component: Kolmogorov-Smirnov distance to the uniform CDF
    # (the 1% critical value at n=4096 is 0.025; keys are fixed, so this cannot flake).
    sorted_values = np.sort(values, axis=0)
    uniform_cdf = (sorted_values + 0.05) / 0.1
    empirical = np.arange(1, len(values) + 1)[:, None] / len(values)
    assert np.max(np.abs(empirical - uniform_cdf)) < 0.025
    # Independent components (no correlation), and different keys give different states.
    correlation = np.corrcoef(values.T) - np.eye(4)
    assert np.max(np.abs(correlation)) < 0.06
    assert len(np.unique(values, axis=0)) == len(values)


def test_spaces_match_gymnasium():
    gym = CartPoleEnv()
    action_space, observation_space = ENV.action_space(DEFAULT_PARAMS), ENV.observation_space(DEFAULT_PARAMS)
    assert action_space.n == gym.action_space.n == ENV.num_actions
    np.testing.assert_array_equal(np.asarray(observation_space.low), gym.observation_space.low)
    np.testing.assert_array_equal(np.asarray(observation_space.high), gym.observation_space.high)
    assert observation_space.shape == gym.observation_space.shape


def test_params_are_gymnasiums_constants_and_nothing_derived():
    gym = CartPoleEnv()
    names = {f.name for f in dataclasses.fields(CartPoleParams)}
    assert names == {
        "gravity", "masscart", "masspole", "length", "force_mag", "tau",
        "theta_threshold_radians", "x_threshold", "max_steps_in_episode",
    }
    for name in names - {"max_steps_in_episode"}:
        assert getattr(DEFAULT_PARAMS, name) == getattr(gym, name), name
    assert DEFAULT_PARAMS.max_steps_in_episode == 500
    assert {f.name for f in dataclasses.fields(CartPoleState)} == {"x", "x_dot", "theta", "theta_dot", "time"}
    assert isinstance(ENV, CartPole)
