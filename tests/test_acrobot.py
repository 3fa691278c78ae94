"""Acrobot-v1 against gymnasium's numpy Acrobot, transition by transition; its gradients; its task.

The double pendulum is chaotic, so whole trajectories cannot be compared. gymnasium plays whole
episodes (random torques, and an energy-pumping rule that reaches the goal and the velocity
bounds) plus single steps from set states anywhere in the state box (angles that wrap, velocities
that hit the bounds); diffgym takes each recorded state and action and must return the same next
observation, reward and flags: to 1e-4 in float32, and to 1e-9 with x64 against gymnasium's
float64 internal state.
"""

from __future__ import annotations

import dataclasses
import math

import gymnasium
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gymnasium.envs.classic_control.acrobot import AcrobotEnv
from gymnasium.wrappers import TimeLimit

import diffgym
from diffgym.envs.acrobot import (
    Acrobot,
    AcrobotParams,
    AcrobotState,
    AcrobotTask,
    _dsdt,
    mechanical_energy,
    rk4_step,
    upright_energy,
    wrap,
)

ENV, DEFAULT_PARAMS = diffgym.make("Acrobot-v1")
MAX_STEPS = 500
#: diffgym's param names -> gymnasium's ``AcrobotEnv`` attributes (its ``g`` is a local constant).
GYMNASIUM_NAMES = {
    "dt": "dt",
    "link_length_1": "LINK_LENGTH_1",
    "link_length_2": "LINK_LENGTH_2",
    "link_mass_1": "LINK_MASS_1",
    "link_mass_2": "LINK_MASS_2",
    "link_com_pos_1": "LINK_COM_POS_1",
    "link_com_pos_2": "LINK_COM_POS_2",
    "link_moi": "LINK_MOI",
    "max_vel_1": "MAX_VEL_1",
    "max_vel_2": "MAX_VEL_2",
}
COLUMNS = "state time action obs next_state reward terminated truncated".split()
STEPS_AFTER_TERMINATION = 20
SET_STATES = 1000


def gymnasium_acrobot(**physics) -> TimeLimit:
    env = AcrobotEnv()
    for name, value in physics.items():
        setattr(env, GYMNASIUM_NAMES[name], value)
    return TimeLimit(env, max_episode_steps=MAX_STEPS)


def pumping_action(state: np.ndarray) -> int:
    """Torque along link 1's swing pumps energy in: alone it reaches the goal in 100-300 steps."""
    return 2 if state[2] + 0.3 * state[3] > 0 else 0


def record_episodes(seeds, random_action_probability: float, **physics) -> dict[str, np.ndarray]:
    """One gymnasium episode per seed; every transition as a row: ``state`` (float64, before the
    step), ``time``, ``action``, ``obs`` (float32), ``next_state`` (float64 internal), ``reward``,
    ``terminated``, ``truncated``. After the goal the episode goes on for
    ``STEPS_AFTER_TERMINATION`` more steps without a reset (gymnasium's env allows it: reward 0
    while the tip stays above the line, -1 once it falls back)."""
    rows: dict[str, list] = {k: [] for k in COLUMNS}
    env = gymnasium_acrobot(**physics)
    raw = env.unwrapped
    for seed in seeds:
        rng = np.random.default_rng(seed)
        env.reset(seed=int(seed))
        steps_after_termination = 0
        for time in range(MAX_STEPS):
            state = np.asarray(raw.state, np.float64).copy()
            if rng.random() < random_action_probability:
                action = int(rng.integers(3))
            else:
                action = pumping_action(state)
            obs, reward, terminated, truncated, _ = env.step(action)
            row = (state, time, action, obs, raw.state.copy(), reward, terminated, truncated)
            for name, value in zip(rows, row):
                rows[name].append(value)
            if terminated or steps_after_termination:
                steps_after_termination += 1
            if truncated or steps_after_termination > STEPS_AFTER_TERMINATION:
                break
    return {name: np.asarray(values) for name, values in rows.items()}


def record_set_states(count: int, seed: int) -> dict[str, np.ndarray]:
    """Single steps from states drawn over the whole box: angles in [-pi, pi], velocities up to
    their bounds, so that many steps end beyond a velocity bound (play alone rarely gets there:
    over 3500 pumping steps, one) or with an angle past pi. The states are rounded to float32
    first, so that float32 diffgym starts from the same numbers: at 20 rad/s a step amplifies
    the rounding of its start past 1e-4."""
    rng = np.random.default_rng(seed)
    env = gymnasium_acrobot()
    raw = env.unwrapped
    env.reset(seed=seed)
    rows: dict[str, list] = {k: [] for k in COLUMNS}
    high = np.array([np.pi, np.pi, raw.MAX_VEL_1, raw.MAX_VEL_2])
    for _ in range(count):
        state = rng.uniform(-high, high).astype(np.float32).astype(np.float64)
        action = int(rng.integers(3))
        raw.state = state.copy()
        obs, reward, terminated, _, _ = raw.step(action)
        for name, value in zip(rows, (state, 0, action, obs, raw.state.copy(), reward, terminated, False)):
            rows[name].append(value)
    return {name: np.asarray(values) for name, values in rows.items()}


def concat(*recordings):
    return {name: np.concatenate([r[name] for r in recordings]) for name in recordings[0]}


def states_from(rows, dtype) -> AcrobotState:
    s = jnp.asarray(rows["state"], dtype)
    return AcrobotState(
        theta1=s[:, 0], theta2=s[:, 1], dtheta1=s[:, 2], dtheta2=s[:, 3],
        time=jnp.asarray(rows["time"], jnp.int32),
    )


def acrobot_state(theta1, theta2, dtheta1, dtheta2, time=0, dtype=jnp.float32) -> AcrobotState:
    return AcrobotState(
        theta1=jnp.asarray(theta1, dtype), theta2=jnp.asarray(theta2, dtype),
        dtheta1=jnp.asarray(dtheta1, dtype), dtheta2=jnp.asarray(dtheta2, dtype), time=jnp.int32(time),
    )


@jax.jit
def step_batch(states, actions, params):
    return jax.vmap(ENV.step, in_axes=(None, 0, 0, None))(jax.random.key(0), states, actions, params)


step_env_batch = jax.jit(jax.vmap(ENV.step_env, in_axes=(None, 0, 0, None)))


@pytest.fixture(scope="module")
def transitions():
    """~7k transitions: random play (truncated at 500), noisy pumping (terminations at varied
    times, then steps past the goal) and single steps from set states (velocity bounds, wraps)."""
    return concat(
        record_episodes(range(6), random_action_probability=1.0),
        record_episodes(range(100, 112), random_action_probability=0.3),
        record_set_states(SET_STATES, seed=7),
    )


def raw_step(state_values: jax.Array, action: jax.Array) -> jax.Array:
    """The RK4 step alone (before wrap and bounds) at the default params."""
    return rk4_step(lambda s: _dsdt(s, action - 1.0, DEFAULT_PARAMS), state_values, DEFAULT_PARAMS.dt)


@pytest.fixture(scope="module")
def float32_tolerance(transitions) -> np.ndarray:
    """Per transition, what float32 can promise: 1e-4, or float32's own limit where the step is
    ill-conditioned. At 20-28 rad/s one RK4 step amplifies a perturbation of its start up to
    2500-fold (its Jacobian, measured in float64), so a single float32 rounding (2^-24 relative)
    anywhere in it costs up to 4e-3, in any float32 implementation. Every transition of play is
    well-conditioned (checked below); only some set states at extreme speeds are not."""
    with jax.enable_x64(True):
        states = jnp.asarray(transitions["state"])
        jacobians = jax.jit(jax.vmap(jax.jacfwd(raw_step)))(states, jnp.asarray(transitions["action"], float))
    amplification = np.abs(np.asarray(jacobians)).sum(axis=2).max(axis=1)  # the infinity norm
    rounding = 2.0**-24 * np.abs(transitions["state"]).max(axis=1)
    return np.maximum(1e-4, 4 * amplification * rounding)


def _clipped(rows):
    next_state = rows["next_state"]
    return (np.abs(next_state[:, 2]) == 4 * np.pi), (np.abs(next_state[:, 3]) == 9 * np.pi)


def _wrapped(rows):
    """Steps whose integrated angle left [-pi, pi]: the wrapped angle jumped by about 2 pi."""
    jump = np.abs(rows["next_state"][:, :2] - rows["state"][:, :2])
    return (jump > np.pi).any(axis=1)


def test_recorded_transitions_cover_goal_truncation_bounds_and_wraps(transitions):
    # Guards the parity tests below against silently testing only the easy regime.
    assert transitions["terminated"].sum() > 10
    assert transitions["truncated"].sum() >= 6  # every random episode, and pumping ones that miss
    clipped_1, clipped_2 = _clipped(transitions)
    assert clipped_1.sum() > 50 and clipped_2.sum() > 50
    wrapped = _wrapped(transitions)
    assert wrapped.sum() > 300 and wrapped[:-SET_STATES].sum() > 50  # play wraps too
    # Past the goal: the tip stays above the line (reward 0) or falls back (-1).
    after_goal = np.zeros(len(wrapped), bool)
    after_goal[1:] = transitions["terminated"][:-1]
    assert (after_goal & transitions["terminated"]).sum() > 20
    assert (after_goal & ~transitions["terminated"]).sum() > 5
    assert set(np.unique(transitions["reward"])) == {-1.0, 0.0}
    np.testing.assert_array_equal(transitions["reward"] == 0.0, transitions["terminated"])


@pytest.mark.parametrize("action_dtype", [jnp.int32, jnp.float32], ids=["int", "float"])
def test_step_matches_gymnasium_float32(transitions, float32_tolerance, action_dtype):
    # 1e-4 on all of play and on most set states; float32's own limit on the rest.
    assert np.all(float32_tolerance[:-SET_STATES] == 1e-4)
    assert np.mean(float32_tolerance[-SET_STATES:] == 1e-4) > 0.7
    states = states_from(transitions, jnp.float32)
    obs, next_states, reward, terminated, truncated, info = step_batch(
        states, jnp.asarray(transitions["action"], action_dtype), DEFAULT_PARAMS
    )
    assert info["final_observation"].dtype == jnp.float32
    error = np.abs(np.asarray(info["final_observation"]) - transitions["obs"]).max(axis=1)
    assert np.all(error <= float32_tolerance), (error - float32_tolerance).max()
    assert np.mean(error > 1e-4) < 0.001  # measured: 2 of 7800, at 19 and 28 rad/s
    np.testing.assert_array_equal(np.asarray(terminated), transitions["terminated"])
    np.testing.assert_array_equal(np.asarray(truncated), transitions["truncated"])
    np.testing.assert_array_equal(np.asarray(reward), transitions["reward"])
    # Auto-reset: where the episode ended the returned state is a fresh one, elsewhere the step's.
    done = transitions["terminated"] | transitions["truncated"]
    np.testing.assert_array_equal(np.asarray(obs)[~done], np.asarray(info["final_observation"])[~done])
    reset = np.stack([next_states.theta1, next_states.theta2, next_states.dtheta1, next_states.dtheta2], -1)
    assert np.all(np.abs(reset[done]) <= 0.1)
    np.testing.assert_array_equal(np.asarray(next_states.time), np.where(done, 0, transitions["time"] + 1))


def test_int_and_float_actions_give_bitwise_identical_transitions(transitions):
    states = states_from(transitions, jnp.float32)
    as_int = step_batch(states, jnp.asarray(transitions["action"], jnp.int32), DEFAULT_PARAMS)
    as_float = step_batch(states, jnp.asarray(transitions["action"], jnp.float32), DEFAULT_PARAMS)
    for a, b in zip(jax.tree.leaves(as_int), jax.tree.leaves(as_float)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("action", [2, 2.0, np.int64(2), np.float32(2.0), jnp.array([2]), jnp.array(2.0)])
def test_every_spelling_of_positive_torque_is_the_same_action(action):
    state = acrobot_state(0.1, -0.2, 0.3, 0.4)
    reference = ENV.step_env(None, state, jnp.int32(2), DEFAULT_PARAMS)[1]
    got = ENV.step_env(None, state, action, DEFAULT_PARAMS)[1]
    assert jax.tree.map(lambda a, b: bool(a == b), got, reference) == jax.tree.map(lambda a: True, got)
    # The torque acts on the joint: +1 speeds link 2 up relative to no torque, -1 slows it down.
    dtheta2 = [float(ENV.step_env(None, state, a, DEFAULT_PARAMS)[1].dtheta2) for a in (0, 1, 2)]
    assert dtheta2[0] < dtheta2[1] < dtheta2[2] == float(got.dtheta2)


def test_wrong_action_shape_quotes_what_was_received():
    state = acrobot_state(0.0, 0.0, 0.0, 0.0)
    expected = r"Acrobot takes a scalar action.*got shape \(3,\) \(dtype float32\)"
    with pytest.raises(ValueError, match=expected):
        ENV.step_env(None, state, jnp.zeros(3), DEFAULT_PARAMS)


def test_step_env_matches_gymnasium_float64_state(transitions):
    with jax.enable_x64(True):
        states = states_from(transitions, jnp.float64)
        assert states.theta1.dtype == jnp.float64
        obs, next_states, reward, terminated, _ = step_env_batch(
            None, states, jnp.asarray(transitions["action"]), DEFAULT_PARAMS
        )
        assert obs.dtype == jnp.float64
        next_state = np.stack(
            [next_states.theta1, next_states.theta2, next_states.dtheta1, next_states.dtheta2], -1
        )
        np.testing.assert_allclose(next_state, transitions["next_state"], rtol=0, atol=1e-9)
        np.testing.assert_array_equal(np.asarray(terminated), transitions["terminated"])
        np.testing.assert_array_equal(np.asarray(reward), transitions["reward"])
        # Exactly at the bounds where gymnasium clipped, and wrapped into [-pi, pi] everywhere.
        clipped_1, clipped_2 = _clipped(transitions)
        np.testing.assert_array_equal(np.abs(next_state[clipped_1, 2]), 4 * np.pi)
        np.testing.assert_array_equal(np.abs(next_state[clipped_2, 3]), 9 * np.pi)
        assert np.all(np.abs(next_state[:, :2]) <= np.pi)
    assert not jax.config.jax_enable_x64
    assert jnp.zeros(()).dtype == jnp.float32


# Each changes the physics; diffgym must follow gymnasium's env with the same attributes changed.
PHYSICS_CHANGES = [
    {"link_mass_2": 2.0, "link_length_1": 1.4, "dt": 0.1},
    {"link_com_pos_1": 0.3, "link_com_pos_2": 0.7, "link_moi": 0.5, "link_mass_1": 0.6},
    {"max_vel_1": 2.0, "max_vel_2": 5.0},
]
CHANGED_PARAMS_ROWS = 700


@pytest.mark.parametrize("change", PHYSICS_CHANGES, ids=lambda c: ",".join(c))
def test_changed_params_change_the_dynamics_as_in_gymnasium(change):
    rows = concat(
        record_episodes(range(1), random_action_probability=1.0, **change),
        record_episodes(range(50, 53), random_action_probability=0.3, **change),
    )
    # A fixed number of rows, so the jitted batch step compiles once for every change.
    assert len(rows["action"]) >= CHANGED_PARAMS_ROWS
    rows = {name: column[:CHANGED_PARAMS_ROWS] for name, column in rows.items()}
    params = dataclasses.replace(DEFAULT_PARAMS, **change)
    states, actions = states_from(rows, jnp.float32), jnp.asarray(rows["action"])
    _, _, _, terminated, _, info = step_batch(states, actions, params)
    np.testing.assert_allclose(info["final_observation"], rows["obs"], rtol=0, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(terminated), rows["terminated"])
    # And the default physics does not fit gymnasium's changed env: the change is not ignored.
    _, _, _, _, _, default_info = step_batch(states, actions, DEFAULT_PARAMS)
    assert np.max(np.abs(np.asarray(default_info["final_observation"]) - rows["obs"])) > 1e-2


def test_reset_distribution_is_uniform_in_the_documented_box():
    keys = jax.random.split(jax.random.key(2024), 4096)
    obs, states = jax.jit(jax.vmap(ENV.reset, in_axes=(0, None)))(keys, DEFAULT_PARAMS)
    values = np.stack([states.theta1, states.theta2, states.dtheta1, states.dtheta2], -1)
    np.testing.assert_allclose(obs, jax.vmap(ENV.get_obs)(states), rtol=0, atol=0)
    np.testing.assert_array_equal(np.asarray(states.time), 0)
    assert values.min() >= -0.1 and values.max() <= 0.1
    # Kolmogorov-Smirnov distance to the uniform CDF on [-0.1, 0.1] (1% critical value at n=4096:
    # 0.025; fixed keys, so this cannot flake), independent components.
    cdf = (np.sort(values, axis=0) + 0.1) / 0.2
    empirical = np.arange(1, len(values) + 1)[:, None] / len(values)
    assert np.max(np.abs(empirical - cdf)) < 0.025
    assert np.max(np.abs(np.corrcoef(values.T) - np.eye(4))) < 0.06
    assert not ENV.is_terminated(states, DEFAULT_PARAMS).any()


def test_state_from_obs_is_the_observed_state(transitions):
    states = states_from(transitions, jnp.float32)
    observed = jax.jit(jax.vmap(lambda s: ENV.state_from_obs(ENV.get_obs(s))))(states)
    for name in ("theta1", "theta2", "dtheta1", "dtheta2"):
        np.testing.assert_allclose(
            getattr(observed, name), getattr(states, name), rtol=0, atol=1e-6, err_msg=name
        )
    np.testing.assert_array_equal(np.asarray(observed.time), 0)


def test_spaces_match_gymnasium():
    gym = AcrobotEnv()
    action_space, observation_space = ENV.action_space(DEFAULT_PARAMS), ENV.observation_space(DEFAULT_PARAMS)
    assert action_space.n == gym.action_space.n == ENV.num_actions == 3
    np.testing.assert_array_equal(np.asarray(observation_space.low), gym.observation_space.low)
    np.testing.assert_array_equal(np.asarray(observation_space.high), gym.observation_space.high)
    assert observation_space.shape == gym.observation_space.shape


def test_params_are_gymnasiums_constants_and_nothing_derived():
    gym = AcrobotEnv()
    names = {f.name for f in dataclasses.fields(AcrobotParams)}
    assert names == set(GYMNASIUM_NAMES) | {"g", "max_steps_in_episode"}
    for name, gymnasium_name in GYMNASIUM_NAMES.items():
        assert getattr(DEFAULT_PARAMS, name) == getattr(gym, gymnasium_name), name
    assert DEFAULT_PARAMS.g == 9.8 and DEFAULT_PARAMS.max_steps_in_episode == 500
    assert gym.book_or_nips == "book" and gym.torque_noise_max == 0.0 and gym.AVAIL_TORQUE == [-1.0, 0.0, 1]
    state_names = {f.name for f in dataclasses.fields(AcrobotState)}
    assert state_names == {"theta1", "theta2", "dtheta1", "dtheta2", "time"}
    assert isinstance(ENV, Acrobot) and ENV.deterministic_transition and ENV.observation_is_state_function


# --------------------------------------------------------------------------------------------
# Gradients
# --------------------------------------------------------------------------------------------
def central_differences(f, x: jax.Array, eps: float) -> np.ndarray:
    """d f / d x by central differences, all 2n evaluations in one vmapped call."""
    directions = jnp.eye(x.size, dtype=x.dtype) * eps
    values = jax.jit(jax.vmap(f))(jnp.concatenate([x + directions, x - directions]))
    return np.asarray((values[: x.size] - values[x.size :]) / (2 * eps))


ROLLOUT_STEPS = 15
PARAM_NAMES = (
    "dt", "link_length_1", "link_mass_1", "link_mass_2", "link_com_pos_1", "link_com_pos_2", "link_moi", "g"
)


def rollout(z: jax.Array):
    """``z`` = initial state (4), relaxed actions in [0, 2] (15), params (8); returns the
    observations and the velocities after each step, from ``step_env`` (no reset)."""
    state = acrobot_state(*z[:4], dtype=z.dtype)
    actions = z[4 : 4 + ROLLOUT_STEPS]
    params = dataclasses.replace(DEFAULT_PARAMS, **dict(zip(PARAM_NAMES, z[4 + ROLLOUT_STEPS :])))

    def one_step(state, action):
        obs, state, _, _, _ = ENV.step_env(None, state, action, params)
        return state, obs

    return jax.lax.scan(one_step, state, actions)[1]


def rollout_loss(z: jax.Array) -> jax.Array:
    """Smooth in the observations (cos/sin hide the wrap): the tip height plus a speed cost."""
    obs = rollout(z)
    cos1, sin1, cos2, sin2 = obs[:, 0], obs[:, 1], obs[:, 2], obs[:, 3]
    tip = -cos1 - (cos1 * cos2 - sin1 * sin2)
    return jnp.sum(tip + 0.01 * obs[:, 4] ** 2 + 0.001 * obs[:, 5] ** 2)


def smooth_inputs() -> np.ndarray:
    actions = 1.0 + 0.9 * np.sin(0.7 * np.arange(ROLLOUT_STEPS))  # relaxed, strictly inside [0, 2]
    params = [getattr(DEFAULT_PARAMS, name) for name in PARAM_NAMES]
    return np.concatenate([[0.05, -0.08, 0.3, -0.2], actions, params])


# Forward mode for the finite-difference test, reverse mode (under vmap) for the composition test,
# which compares the two: compiling the reverse pass of RK4 with traced params takes seconds, so
# each is compiled once (both in float64).
rollout_gradient_forward = jax.jit(jax.jacfwd(rollout_loss))


def test_rollout_gradient_matches_finite_differences():
    with jax.enable_x64(True):
        z = jnp.asarray(smooth_inputs())
        obs = np.asarray(rollout(z))
        # The smooth regime: no velocity near its bound (the wrap is invisible through cos/sin).
        assert np.abs(obs[:, 4]).max() < 0.9 * 4 * np.pi and np.abs(obs[:, 5]).max() < 0.9 * 9 * np.pi
        gradient = np.asarray(rollout_gradient_forward(z))
        numeric = central_differences(rollout_loss, z, eps=1e-6)
    np.testing.assert_allclose(gradient, numeric, rtol=1e-5, atol=1e-7 * np.abs(numeric).max())
    # Every input matters (state, each action, each param): nothing is cut.
    assert np.all(np.abs(gradient) > 0)


def step_jacobians(state_values, action, max_vels):
    """Jacobians of the next state and of the raw RK4 result (before wrap and bounds) with respect
    to the state, the action and ``(max_vel_1, max_vel_2)``."""

    def outputs(state_values, action, max_vels):
        params = dataclasses.replace(DEFAULT_PARAMS, max_vel_1=max_vels[0], max_vel_2=max_vels[1])
        state = acrobot_state(*state_values)
        _, next_state, reward, _, _ = ENV.step_env(None, state, action, params)
        raw = rk4_step(lambda s: _dsdt(s, action - 1.0, params), state_values, params.dt)
        stacked = jnp.stack([next_state.theta1, next_state.theta2, next_state.dtheta1, next_state.dtheta2])
        return stacked, raw, reward

    args = (state_values, action, max_vels)
    return jax.jacfwd(outputs, argnums=(0, 1, 2))(*args), outputs(*args)


step_jacobians_jit = jax.jit(step_jacobians)


def test_gradient_through_the_wrap_is_one_and_through_a_clipped_velocity_zero():
    # Both angles swing past pi (wrapped); link 2 spins past its bound, link 1 stays inside its own.
    state_values = jnp.array([2.8, 0.0, 3.0, 27.0])
    (d_next, d_raw, d_reward), (next_state, raw, _) = step_jacobians_jit(
        state_values, jnp.float32(2.0), jnp.array([4 * np.pi, 9 * np.pi], jnp.float32)
    )
    for angle in (0, 1):
        assert raw[angle] > np.pi
        assert float(next_state[angle]) == pytest.approx(float(raw[angle]) - 2 * np.pi, abs=1e-5)
    assert abs(raw[2]) < 4 * np.pi and raw[3] > 9 * np.pi  # dtheta1 free, dtheta2 clipped
    for wrt in range(3):
        # Angles and the free velocity: exactly the raw RK4 derivatives (wrap has derivative 1).
        for row in (0, 1, 2):
            np.testing.assert_array_equal(d_next[wrt][row], d_raw[wrt][row])
        # The clipped velocity: nothing passes but its own bound.
        expected = np.zeros_like(d_next[wrt][3])
        if wrt == 2:
            expected[1] = 1.0  # d dtheta2' / d max_vel_2
        np.testing.assert_array_equal(d_next[wrt][3], expected)
        np.testing.assert_array_equal(d_reward[wrt], 0.0)  # the reward is a step function
    assert np.abs(d_next[0][0]).max() > 0 and abs(float(d_next[1][2])) > 0


def test_wrap_matches_gymnasiums_loop_and_has_derivative_one():
    from gymnasium.envs.classic_control.acrobot import wrap as gymnasium_wrap

    xs = np.concatenate([np.linspace(-30.0, 30.0, 2001), [np.pi, -np.pi, 3 * np.pi, -3 * np.pi]])
    with jax.enable_x64(True):
        ours = np.asarray(wrap(jnp.asarray(xs), -np.pi, np.pi))
        slopes = np.asarray(jax.vmap(jax.grad(lambda x: wrap(x, -np.pi, np.pi)))(jnp.asarray(xs)))
    theirs = np.array([gymnasium_wrap(x, -np.pi, np.pi) for x in xs])
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-13)
    np.testing.assert_array_equal(slopes, 1.0)


@jax.jit
def auto_reset_jacobians(state_values, time, action):
    """Jacobians of ``step``'s and ``step_env``'s next state with respect to the state, and whether
    the episode ended."""

    def next_state(state_values, step):
        state = dataclasses.replace(acrobot_state(*state_values), time=time)
        out = step(jax.random.key(1), state, action, DEFAULT_PARAMS)
        return jnp.stack([out[1].theta1, out[1].theta2, out[1].dtheta1, out[1].dtheta2])

    cut = jax.jacfwd(lambda s: next_state(s, ENV.step))(state_values)
    full = jax.jacfwd(lambda s: next_state(s, ENV.step_env))(state_values)
    state = dataclasses.replace(acrobot_state(*state_values), time=time)
    _, _, _, terminated, truncated, _ = ENV.step(jax.random.key(1), state, action, DEFAULT_PARAMS)
    return cut, full, terminated | truncated


@pytest.mark.parametrize(
    "state_values, time, done",
    [
        ([0.1, 0.2, 0.3, -0.3], 7, False),
        ([2.5, 0.3, 1.0, 0.5], 7, True),  # the tip is above the goal line after the step: terminated
        ([0.1, 0.2, 0.3, -0.3], MAX_STEPS - 1, True),  # truncated
    ],
    ids=["alive", "terminated", "truncated"],
)
def test_auto_reset_cuts_the_gradient_exactly_where_done(state_values, time, done):
    cut, full, ended = auto_reset_jacobians(jnp.asarray(state_values, jnp.float32), jnp.int32(time), 2.0)
    assert bool(ended) == done
    np.testing.assert_array_equal(cut, 0.0 if done else full)
    assert np.abs(full).max() > 0


def test_jit_vmap_grad_composes_and_equals_per_sample_forward_mode_gradients():
    rng = np.random.default_rng(0)
    z = np.tile(smooth_inputs(), (5, 1))
    z[:, :4] += rng.uniform(-0.1, 0.1, (5, 4))
    z[:, 4 : 4 + ROLLOUT_STEPS] = rng.uniform(0.0, 2.0, (5, ROLLOUT_STEPS))
    with jax.enable_x64(True):
        z = jnp.asarray(z)
        batched = np.asarray(jax.jit(jax.vmap(jax.grad(rollout_loss)))(z))
        single = [np.asarray(rollout_gradient_forward(row)) for row in z]
    for gradient, expected in zip(batched, single):
        np.testing.assert_allclose(gradient, expected, rtol=1e-10, atol=1e-12 * np.abs(expected).max())
    assert len({float(g[0]) for g in batched}) == 5  # per-sample, not broadcast


def test_no_stop_gradient_in_the_transition():
    state = acrobot_state(0.1, 0.2, 0.3, 0.4)
    for method, args in ((ENV.step_env, (None, state, 1.0, DEFAULT_PARAMS)),
                         (ENV.step, (jax.random.key(0), state, 1.0, DEFAULT_PARAMS)),
                         (ENV.reset, (jax.random.key(0), DEFAULT_PARAMS))):
        assert "stop_gradient" not in str(jax.make_jaxpr(method)(*args)), method.__name__


def test_docstring_names_every_kink():
    doc = " ".join(Acrobot.__doc__.split())
    phrases = ("Differentiability", "angle wrapping", "is 1 everywhere", "velocity clips", "is 0",
               "termination flag", "no gradient", "resets where an episode ends", "cuts the gradient")
    for phrase in phrases:
        assert phrase in doc, phrase
    assert "nothing to follow" in " ".join(AcrobotTask.__doc__.split())


# --------------------------------------------------------------------------------------------
# The task
# --------------------------------------------------------------------------------------------
TASK = diffgym.make_task("Acrobot-v1", height=1.0, energy=1.0)


def test_task_is_the_specs_and_its_terms_are_the_documented_surrogates():
    assert type(TASK) is AcrobotTask and diffgym.spec("acrobot").task_class() is AcrobotTask
    assert AcrobotTask.term_names() == ("height", "energy")
    hanging = acrobot_state(0.0, 0.0, 0.0, 0.0)
    upright = acrobot_state(np.pi, 0.0, 0.0, 0.0)
    on_goal_line = acrobot_state(2 * np.pi / 3, 0.0, 0.0, 0.0)  # tip at -2 cos(2 pi / 3) = 1
    terms = jax.jit(TASK.terms)
    at = {name: terms(DEFAULT_PARAMS, s, 1, s) for name, s in
          (("hanging", hanging), ("upright", upright), ("goal", on_goal_line))}
    assert float(at["hanging"]["height"]) == pytest.approx(1.0)
    assert float(at["goal"]["height"]) == pytest.approx(0.0, abs=1e-6)
    assert float(at["hanging"]["energy"]) == pytest.approx(1.0)
    assert float(at["upright"]["energy"]) == pytest.approx(0.0, abs=1e-6)
    assert float(upright_energy(DEFAULT_PARAMS)) == pytest.approx((0.5 + 1.0 + 0.5) * 9.8)


def test_energy_is_conserved_by_the_torque_free_dynamics():
    """The energy term is the book dynamics' own energy: without torque, RK4 at a small step keeps
    it to 1e-7 of the hanging-to-upright gap over 4 s, while with torque it changes by 10%."""
    with jax.enable_x64(True):
        params = dataclasses.replace(DEFAULT_PARAMS, dt=0.005, max_vel_1=np.inf, max_vel_2=np.inf)

        @jax.jit
        def energies(action):
            def one_step(state, _):
                state = ENV.step_env(None, state, action, params)[1]
                return state, mechanical_energy(state, params)

            start = acrobot_state(1.0, -0.5, 0.5, 1.0, dtype=jnp.float64)
            return jax.lax.scan(one_step, start, None, length=800)[1]

        gap = 2 * float(upright_energy(params))
        free, pushed = np.asarray(energies(1.0)), np.asarray(energies(2.0))
    assert np.ptp(free) / gap < 1e-7
    assert np.ptp(pushed) / gap > 0.1


def test_cost_with_only_the_reward_is_minus_the_env_reward(transitions):
    rows = {name: column[3000:5000] for name, column in transitions.items()}  # pumping episodes
    states = states_from(rows, jnp.float32)
    actions = jnp.asarray(rows["action"])
    _, next_states, reward, _, _ = step_env_batch(None, states, actions, DEFAULT_PARAMS)
    reward_only = AcrobotTask()
    costs = jax.jit(jax.vmap(reward_only.cost, in_axes=(None, 0, 0, 0, 0)))
    cost = costs(DEFAULT_PARAMS, states, actions, next_states, reward)
    np.testing.assert_array_equal(cost, -np.asarray(reward))
    np.testing.assert_array_equal(np.unique(cost), [0.0, 1.0])  # the goal steps are among them
    # The surrogates are finite everywhere the recorded play went.
    terms = jax.jit(jax.vmap(TASK.terms, in_axes=(None, 0, 0, 0)))
    terms = terms(DEFAULT_PARAMS, states, actions, next_states)
    for name, values in terms.items():
        assert np.all(np.isfinite(values)), name


def test_relaxed_action_is_the_hard_action_forward_and_has_a_gradient(transitions):
    space = ENV.action_space(DEFAULT_PARAMS)
    logits = jax.random.normal(jax.random.key(5), (len(transitions["action"]), 3)) * 2.0
    relaxed = jax.jit(jax.vmap(lambda z: TASK.relaxed_action(z, space)))(logits)
    np.testing.assert_array_equal(relaxed, np.argmax(logits, axis=-1).astype(np.float32))
    # Forward through the env: bit for bit the integer action's transition (the batch step of the
    # parity tests, already compiled for float and int actions).
    states = states_from(transitions, jnp.float32)
    soft = step_batch(states, relaxed, DEFAULT_PARAMS)
    hard = step_batch(states, jnp.argmax(logits, axis=-1), DEFAULT_PARAMS)
    for a, b in zip(jax.tree.leaves(soft), jax.tree.leaves(hard)):
        np.testing.assert_array_equal(a, b)

    # Backward: the expected index under softmax(logits / T), and through one step and the task's
    # cost a nonzero gradient on every logit.
    def index(z, temperature):
        return TASK.relaxed_action(z, space, temperature=temperature)

    def expected_index(z, temperature):
        return jax.nn.softmax(z / temperature) @ jnp.arange(3.0)

    state = acrobot_state(0.5, 0.2, 1.0, -1.0)

    def cost(z):
        next_state = ENV.step_env(None, state, index(z, 1.0), DEFAULT_PARAMS)[1]
        return TASK.cost(DEFAULT_PARAMS, state, None, next_state, 0.0)

    index_gradients = jax.jit(jax.vmap(jax.grad(index), in_axes=(0, None)))
    expected_gradients = jax.jit(jax.vmap(jax.grad(expected_index), in_axes=(0, None)))
    for temperature in (0.3, 1.0, 3.0):
        got, expected = index_gradients(logits, temperature), expected_gradients(logits, temperature)
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
        assert np.all(np.abs(got).sum(axis=1) > 0)
    assert np.all(np.abs(jax.jit(jax.grad(cost))(jnp.array([0.1, -0.3, 0.4]))) > 0)


def test_a_gradient_step_on_the_energy_term_pumps_energy_in():
    """Near hanging, after a small swing, a step along minus the energy term's gradient with
    respect to a window of six relaxed actions lowers the term, and by more than a step of the
    same size in a random direction."""
    params, state = DEFAULT_PARAMS, acrobot_state(0.3, 0.0, 1.0, 0.0)
    energy_task = AcrobotTask(reward=0.0, energy=1.0)

    @jax.jit
    def window_cost(actions):
        def one_step(state, action):
            next_state = ENV.step_env(None, state, action, params)[1]
            return next_state, energy_task.cost(params, state, action, next_state, 0.0)

        return jax.lax.scan(one_step, state, actions)[1][-1]

    actions = jnp.ones(6)
    gradient = jax.jit(jax.jacfwd(window_cost))(actions)  # forward mode: six inputs, cheap to compile
    step = 0.5 * gradient / jnp.linalg.norm(gradient)
    before, after = float(window_cost(actions)), float(window_cost(actions - step))
    assert after < before - 1e-3
    for seed in range(3):
        random = jax.random.normal(jax.random.key(seed), (6,))
        assert after < float(window_cost(actions - 0.5 * random / jnp.linalg.norm(random)))


def test_spec_values():
    spec = diffgym.spec("acrobot")
    assert (spec.id, spec.reward_threshold, spec.eval_episodes) == ("Acrobot-v1", -100.0, 100)
    assert len(spec.obs_scale) == 6 and spec.task is AcrobotTask
    ours, theirs = gymnasium.spec("diffgym/Acrobot-v1"), gymnasium.spec("Acrobot-v1")
    assert ours.max_episode_steps == theirs.max_episode_steps == 500
    assert ours.reward_threshold == theirs.reward_threshold


# --------------------------------------------------------------------------------------------
# The picture
# --------------------------------------------------------------------------------------------
def acrobot_frame(theta1, theta2, params=DEFAULT_PARAMS) -> np.ndarray:
    from diffgym.render import make_renderer

    (frame,) = make_renderer(ENV).frames(acrobot_state(theta1, theta2, 0.0, 0.0), params)
    return frame


@pytest.mark.parametrize("angles", [(0.0, 0.0), (1.0, 0.5), (-2.5, 1.7), (3.0, -2.0)])
def test_frame_reproduces_gymnasiums_picture(angles):
    pytest.importorskip("pygame")
    theirs = gymnasium.make("Acrobot-v1", render_mode="rgb_array").unwrapped
    theirs.reset(seed=0)
    theirs.state = np.array([*angles, 0.0, 0.0])
    their_frame = theirs.render()
    theirs.close()
    ours = acrobot_frame(*angles)
    assert ours.shape == their_frame.shape == (500, 500, 3) and ours.dtype == np.uint8
    differing = np.any(np.abs(ours.astype(int) - their_frame) > 60, axis=-1)
    assert differing.mean() < 0.005, differing.mean()  # antialiased edges, one-pixel offsets


def test_frame_shows_the_links_where_the_angles_say():
    pytest.importorskip("pygame")
    from diffgym.render.acrobot import LINK_COLOR

    def link_columns(frame):
        mask = np.all(np.abs(frame.astype(int) - np.array(LINK_COLOR)) <= 10, axis=-1)
        assert mask.sum() > 500
        return np.nonzero(mask)

    rows, _ = link_columns(acrobot_frame(0.0, 0.0))
    assert rows.mean() > 250  # hanging: below the pivot
    _, columns = link_columns(acrobot_frame(math.pi / 2, 0.0))
    assert columns.mean() > 300  # theta1 = pi/2: straight out to the right
    rows, _ = link_columns(acrobot_frame(math.pi, 0.0))
    assert rows.mean() < 250  # upright
