"""MountainCar-v0 and MountainCarContinuous-v0 against gymnasium's numpy envs, transition by
transition; their gradients at and away from the clips and the wall; their tasks; their pictures.

gymnasium plays whole episodes (random actions, and a rule that pushes along the velocity and
reaches the flag; after the goal the episode goes on a few steps into the right-hand clip) plus
single steps from set states over the whole box (speed clips, the left wall); diffgym takes each
recorded state and action and must return the same next observation, reward and flags: to 1e-4
in float32, and with x64 to 1e-9 of MountainCar-v0's float64 internal state. MountainCarContinuous
rounds its state to float32 after every step; there, diffgym's float64 step rounded to float32 must
be gymnasium's state bit for bit (gymnasium fed float64 inputs, so that its arithmetic is float64).
"""

from __future__ import annotations

import dataclasses

import gymnasium
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gymnasium.envs.classic_control.continuous_mountain_car import Continuous_MountainCarEnv
from gymnasium.envs.classic_control.mountain_car import MountainCarEnv
from gymnasium.wrappers import TimeLimit

import diffgym
from diffgym.envs.continuous_mountain_car import (
    MountainCarContinuous,
    MountainCarContinuousParams,
    MountainCarContinuousTask,
)
from diffgym.envs.mountain_car import (
    MountainCar,
    MountainCarParams,
    MountainCarState,
    MountainCarTask,
    goal_energy,
    mechanical_energy,
)

MC, MC_PARAMS = diffgym.make("MountainCar-v0")
MCC, MCC_PARAMS = diffgym.make("MountainCarContinuous-v0")
ENVS = {"MountainCar-v0": (MC, MC_PARAMS), "MountainCarContinuous-v0": (MCC, MCC_PARAMS)}
GYMNASIUM_CLASSES = {"MountainCar-v0": MountainCarEnv, "MountainCarContinuous-v0": Continuous_MountainCarEnv}
CONTINUOUS = "MountainCarContinuous-v0"
STEPS_AFTER_TERMINATION = 10
SET_STATES = 1500
COLUMNS = (
    "state time action obs next_state reward terminated truncated reference_state reference_reward".split()
)


def gymnasium_env(env_id: str, **physics) -> TimeLimit:
    env = GYMNASIUM_CLASSES[env_id]()
    for name, value in physics.items():
        assert hasattr(env, name), name
        setattr(env, name, value)
    return TimeLimit(env, max_episode_steps=int(ENVS[env_id][1].max_steps_in_episode))


def policy_action(env_id: str, state: np.ndarray, rng, random_action_probability: float):
    """Push along the velocity (from rest: right), or a random action; MountainCarContinuous's
    throttles go past the [-1, 1] clip (as float32 values, as an agent would send)."""
    if env_id != CONTINUOUS:
        if rng.random() < random_action_probability:
            return int(rng.integers(3))
        return 2 if state[1] >= 0 else 0
    if rng.random() < random_action_probability:
        return float(np.float32(rng.uniform(-1.5, 1.5)))
    return 1.2 if state[1] >= 0 else -1.2


def gymnasium_action(env_id: str, action, dtype=np.float32):
    return action if env_id != CONTINUOUS else np.array([action], dtype)


def reference_step(reference, env_id: str, state: np.ndarray, action):
    """gymnasium's step from ``state`` with float64 inputs: MountainCarContinuous's arithmetic is
    then float64 up to its final float32 rounding (from float32 inputs numpy would compute
    ``3 * position`` and the push in float32)."""
    reference.state = np.asarray(state, np.float64).copy()
    _, reward, _, _, _ = reference.step(gymnasium_action(env_id, action, np.float64))
    return np.asarray(reference.state, np.float64).copy(), reward


def record_episodes(env_id: str, seeds, random_action_probability: float, **physics) -> dict[str, np.ndarray]:
    """One gymnasium episode per seed; every transition as a row: ``state`` (before the step, as
    gymnasium holds it), ``time``, ``action``, ``obs``, ``next_state``, ``reward``, the flags, and
    the float64-input ``reference_state``/``reference_reward`` (see ``reference_step``). After the
    goal the episode goes on ``STEPS_AFTER_TERMINATION`` steps without a reset."""
    rows: dict[str, list] = {k: [] for k in COLUMNS}
    env, reference = gymnasium_env(env_id, **physics), gymnasium_env(env_id, **physics).unwrapped
    raw = env.unwrapped
    reference.reset(seed=0)
    for seed in seeds:
        rng = np.random.default_rng(seed)
        env.reset(seed=int(seed))
        steps_after_termination = 0
        for time in range(int(ENVS[env_id][1].max_steps_in_episode)):
            state = np.asarray(raw.state, np.float64).copy()
            action = policy_action(env_id, state, rng, random_action_probability)
            obs, reward, terminated, truncated, _ = env.step(gymnasium_action(env_id, action))
            next_state = np.asarray(raw.state, np.float64).copy()
            row = (state, time, action, obs, next_state, reward, terminated, truncated,
                   *reference_step(reference, env_id, state, action))
            for name, value in zip(rows, row):
                rows[name].append(value)
            if terminated or steps_after_termination:
                steps_after_termination += 1
            if truncated or steps_after_termination > STEPS_AFTER_TERMINATION:
                break
    return {name: np.asarray(values) for name, values in rows.items()}


def record_set_states(env_id: str, count: int, seed: int) -> dict[str, np.ndarray]:
    """Single steps from states over the whole box, a third at the left wall's side moving left and
    a third near the speed bound (play reaches the speed clip rarely: it needs a long swing).
    States are float32 values, so float32 diffgym starts from the same numbers."""
    rng = np.random.default_rng(seed)
    env = gymnasium_env(env_id)
    raw, reference = env.unwrapped, gymnasium_env(env_id).unwrapped
    env.reset(seed=seed)
    reference.reset(seed=seed)
    rows: dict[str, list] = {k: [] for k in COLUMNS}
    for i in range(count):
        if i % 3 == 0:  # at the wall's side, moving left
            state = np.array([rng.uniform(-1.2, -1.1), rng.uniform(-0.07, 0.0)])
        elif i % 3 == 1:  # near the speed bound
            state = np.array([rng.uniform(-1.2, 0.6), rng.choice([-1, 1]) * rng.uniform(0.065, 0.07)])
        else:
            state = np.array([rng.uniform(-1.2, 0.6), rng.uniform(-0.07, 0.07)])
        state = state.astype(np.float32).astype(np.float64)
        action = policy_action(env_id, state, rng, 1.0)
        raw.state = state.copy()
        obs, reward, terminated, _, _ = raw.step(gymnasium_action(env_id, action))
        next_state = np.asarray(raw.state, np.float64).copy()
        row = (state, 0, action, obs, next_state, reward, terminated, False,
               *reference_step(reference, env_id, state, action))
        for name, value in zip(rows, row):
            rows[name].append(value)
    return {name: np.asarray(values) for name, values in rows.items()}


def concat(*recordings):
    return {name: np.concatenate([r[name] for r in recordings]) for name in recordings[0]}


def states_from(rows, dtype) -> MountainCarState:
    s = jnp.asarray(rows["state"], dtype)
    return MountainCarState(position=s[:, 0], velocity=s[:, 1], time=jnp.asarray(rows["time"], jnp.int32))


def car(position, velocity, time=0, dtype=jnp.float32) -> MountainCarState:
    return MountainCarState(
        position=jnp.asarray(position, dtype), velocity=jnp.asarray(velocity, dtype), time=jnp.int32(time)
    )


def actions_from(env_id: str, rows, dtype=jnp.float32) -> jax.Array:
    actions = jnp.asarray(rows["action"], dtype)
    return actions[:, None] if env_id == CONTINUOUS else actions


STEP_BATCH = {
    env_id: jax.jit(jax.vmap(env.step, in_axes=(None, 0, 0, None))) for env_id, (env, _) in ENVS.items()
}
STEP_ENV_BATCH = {
    env_id: jax.jit(jax.vmap(env.step_env, in_axes=(None, 0, 0, None))) for env_id, (env, _) in ENVS.items()
}


@pytest.fixture(scope="module")
def recordings():
    """Per env: random play (truncated), noisy pushing along the velocity (goals at varied times,
    the left wall, the right clip after the goal) and single steps from set states."""
    return {
        env_id: concat(
            record_episodes(env_id, range(4), random_action_probability=1.0),
            record_episodes(env_id, range(100, 115), random_action_probability=0.3),
            record_set_states(env_id, SET_STATES, seed=7),
        )
        for env_id in ENVS
    }


def _regions(env_id, rows):
    params = ENVS[env_id][1]
    next_state = rows["next_state"]
    # MountainCarContinuous's gymnasium state is float32: its bounds are float32 numbers there.
    bound = np.float32 if env_id == CONTINUOUS else np.float64
    return {
        "speed clip": np.abs(next_state[:, 1]) == bound(params.max_speed),
        # Clipped to the wall means arriving with a negative velocity, which the wall zeroes.
        "left wall": next_state[:, 0] == bound(params.min_position),
        "right clip": next_state[:, 0] == bound(params.max_position),
    }


@pytest.mark.parametrize("env_id", ENVS)
def test_recorded_transitions_cover_goal_truncation_clips_and_the_wall(recordings, env_id):
    # Guards the parity tests below against silently testing only the easy regime.
    rows = recordings[env_id]
    play = slice(0, len(rows["action"]) - SET_STATES)
    assert rows["terminated"][play].sum() > 10 * (STEPS_AFTER_TERMINATION // 2)
    assert rows["truncated"].sum() >= 4
    regions = _regions(env_id, rows)
    assert regions["speed clip"].sum() > 20 and regions["left wall"].sum() > 150
    assert regions["left wall"][play].sum() > 3  # play rocks back into the wall too
    assert regions["right clip"][play].sum() > 3  # past the goal the car runs into the right end
    if env_id == CONTINUOUS:
        assert (np.abs(rows["action"]) > 1.0).sum() > 200  # the throttle clip
        goal_rewards = rows["reward"][rows["terminated"]]
        assert np.all((goal_rewards > 100 - 0.1 * 1.5**2) & (goal_rewards < 100))  # 100 - 0.1 a^2
    else:
        assert set(np.unique(rows["reward"])) == {-1.0} and set(np.unique(rows["action"])) == {0, 1, 2}


@pytest.mark.parametrize(
    "env_id, action_form", [("MountainCar-v0", "int"), ("MountainCar-v0", "float"),
                            (CONTINUOUS, "vector"), (CONTINUOUS, "scalar")]
)
def test_step_matches_gymnasium_float32(recordings, env_id, action_form):
    rows = recordings[env_id]
    params = ENVS[env_id][1]
    states = states_from(rows, jnp.float32)
    if action_form == "int":
        actions = jnp.asarray(rows["action"], jnp.int32)
    elif action_form == "scalar":
        actions = jnp.asarray(rows["action"], jnp.float32)
    else:
        actions = actions_from(env_id, rows)
    stepped = STEP_BATCH[env_id](jax.random.key(0), states, actions, params)
    obs, next_states, reward, terminated, truncated, info = stepped
    assert info["final_observation"].dtype == jnp.float32
    np.testing.assert_allclose(info["final_observation"], rows["obs"], rtol=0, atol=1e-4)
    np.testing.assert_allclose(reward, rows["reward"], rtol=0, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(terminated), rows["terminated"])
    np.testing.assert_array_equal(np.asarray(truncated), rows["truncated"])
    done = rows["terminated"] | rows["truncated"]
    np.testing.assert_array_equal(np.asarray(obs)[~done], np.asarray(info["final_observation"])[~done])
    reset = np.asarray(obs)[done]
    assert np.all((reset[:, 0] >= -0.6) & (reset[:, 0] <= -0.4)) and np.all(reset[:, 1] == 0.0)
    np.testing.assert_array_equal(np.asarray(next_states.time), np.where(done, 0, rows["time"] + 1))


def test_int_and_float_actions_give_bitwise_identical_transitions(recordings):
    rows = recordings["MountainCar-v0"]
    states = states_from(rows, jnp.float32)
    step = STEP_BATCH["MountainCar-v0"]
    as_int = step(jax.random.key(0), states, jnp.asarray(rows["action"], jnp.int32), MC_PARAMS)
    as_float = step(jax.random.key(0), states, jnp.asarray(rows["action"], jnp.float32), MC_PARAMS)
    for a, b in zip(jax.tree.leaves(as_int), jax.tree.leaves(as_float)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("action", [2, 2.0, np.int64(2), np.float32(2.0), jnp.array([2]), jnp.array(2.0)])
def test_every_spelling_of_push_right_is_the_same_action(action):
    state = car(-0.5, 0.01)
    reference = MC.step_env(None, state, jnp.int32(2), MC_PARAMS)[1]
    got = MC.step_env(None, state, action, MC_PARAMS)[1]
    assert jax.tree.map(lambda a, b: bool(a == b), got, reference) == jax.tree.map(lambda a: True, got)
    velocities = [float(MC.step_env(None, state, a, MC_PARAMS)[1].velocity) for a in (0, 1, 2)]
    assert velocities[0] < velocities[1] < velocities[2] == float(got.velocity)
    assert velocities[2] - velocities[1] == pytest.approx(MC_PARAMS.force, rel=1e-4)


@pytest.mark.parametrize(
    "env_id, name", [("MountainCar-v0", "MountainCar"), (CONTINUOUS, "MountainCarContinuous")]
)
def test_wrong_action_shape_quotes_what_was_received(env_id, name):
    env, params = ENVS[env_id]
    expected = rf"{name} takes an action of shape \(\) or \(1,\).*got shape \(2, 1\) \(dtype float32\)"
    with pytest.raises(ValueError, match=expected):
        env.step_env(None, car(-0.5, 0.0), jnp.zeros((2, 1)), params)


def test_mountain_car_step_env_matches_gymnasium_float64_state(recordings):
    rows = recordings["MountainCar-v0"]
    with jax.enable_x64(True):
        states = states_from(rows, jnp.float64)
        obs, next_states, reward, terminated, _ = STEP_ENV_BATCH["MountainCar-v0"](
            None, states, jnp.asarray(rows["action"]), MC_PARAMS
        )
        assert obs.dtype == jnp.float64
        next_state = np.stack([next_states.position, next_states.velocity], -1)
        np.testing.assert_allclose(next_state, rows["next_state"], rtol=0, atol=1e-9)
        np.testing.assert_array_equal(np.asarray(terminated), rows["terminated"])
        np.testing.assert_array_equal(np.asarray(reward), rows["reward"])
        # Exactly the bounds where gymnasium clipped, and velocity exactly 0 at the wall.
        regions = _regions("MountainCar-v0", rows)
        np.testing.assert_array_equal(np.abs(next_state[regions["speed clip"], 1]), 0.07)
        at_wall = next_state[regions["left wall"]]
        np.testing.assert_array_equal(at_wall, np.tile([-1.2, 0.0], (len(at_wall), 1)))
    assert not jax.config.jax_enable_x64


def test_continuous_step_env_in_float64_rounds_to_gymnasiums_float32_state(recordings):
    rows = recordings[CONTINUOUS]
    with jax.enable_x64(True):
        states = states_from(rows, jnp.float64)
        _, next_states, reward, terminated, _ = STEP_ENV_BATCH[CONTINUOUS](
            None, states, jnp.asarray(rows["action"], jnp.float64)[:, None], MCC_PARAMS
        )
        next_state = np.stack([next_states.position, next_states.velocity], -1)
        assert next_state.dtype == np.float64
        reference = rows["reference_state"]
        np.testing.assert_array_equal(next_state.astype(np.float32), reference.astype(np.float32))
        # gymnasium's float32 rounding is all that separates them: half a float32 ulp at |x| <= 1.2.
        np.testing.assert_allclose(next_state, rows["reference_state"], rtol=0, atol=2.0**-24 * 1.2)
        np.testing.assert_allclose(reward, rows["reference_reward"], rtol=0, atol=1e-9)
        np.testing.assert_array_equal(np.asarray(terminated), rows["terminated"])
    assert not jax.config.jax_enable_x64


def test_the_left_wall_stops_a_car_moving_left_and_only_that():
    for env_id, (env, params) in ENVS.items():
        push_left = 0 if env_id != CONTINUOUS else -1.0
        step = jax.jit(env.step_env)
        hits = step(None, car(-1.19, -0.03), push_left, params)[1]
        assert hits.position == np.float32(-1.2) and float(hits.velocity) == 0.0
        # At the wall, a car the hill pulls away from it (cos(3 x) < 0 there) leaves with no push.
        leaves = step(None, car(-1.2, 0.0), 1 if env_id != CONTINUOUS else 0.0, params)[1]
        assert float(leaves.velocity) > 0 and float(leaves.position) > -1.2
        # Moving right along the wall's side: not stopped.
        passes = step(None, car(-1.19, 0.02), push_left, params)[1]
        assert float(passes.velocity) > 0


PHYSICS_CHANGES = {
    "MountainCar-v0": [{"force": 0.002, "gravity": 0.003}, {"goal_position": 0.3, "goal_velocity": 0.01},
                       {"max_speed": 0.03, "min_position": -1.0}],
    CONTINUOUS: [{"power": 0.003}, {"goal_position": 0.3, "goal_velocity": 0.01},
                 {"max_speed": 0.03, "min_position": -1.0, "max_action": 0.5, "min_action": -0.5}],
}
CHANGED_PARAMS_ROWS = 400


@pytest.mark.parametrize(
    "env_id, change", [(env_id, change) for env_id, changes in PHYSICS_CHANGES.items() for change in changes],
    ids=lambda value: ",".join(value) if isinstance(value, dict) else value,
)
def test_changed_params_change_the_dynamics_as_in_gymnasium(env_id, change):
    # Pushing first (it reaches the goal, the wall and high speeds, where the changes show), then
    # random play to fill a fixed count of rows: one compile for every change.
    rows = concat(
        record_episodes(env_id, range(50, 53), random_action_probability=0.2, **change),
        record_episodes(env_id, range(2), random_action_probability=1.0, **change),
    )
    assert len(rows["action"]) >= CHANGED_PARAMS_ROWS
    rows = {name: column[:CHANGED_PARAMS_ROWS] for name, column in rows.items()}
    params = dataclasses.replace(ENVS[env_id][1], **change)
    states, actions = states_from(rows, jnp.float32), actions_from(env_id, rows)
    _, _, reward, terminated, _, info = STEP_BATCH[env_id](jax.random.key(0), states, actions, params)
    np.testing.assert_allclose(info["final_observation"], rows["obs"], rtol=0, atol=1e-4)
    np.testing.assert_allclose(reward, rows["reward"], rtol=0, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(terminated), rows["terminated"])
    # And the default params do not fit gymnasium's changed env: the change is not ignored.
    _, _, _, default_terminated, _, default_info = STEP_BATCH[env_id](
        jax.random.key(0), states, actions, ENVS[env_id][1]
    )
    gap = np.max(np.abs(np.asarray(default_info["final_observation"]) - rows["obs"]))
    assert gap > 5e-4 or np.any(np.asarray(default_terminated) != rows["terminated"])


@pytest.mark.parametrize("env_id", ENVS)
def test_reset_distribution_is_uniform_in_the_documented_interval(env_id):
    env, params = ENVS[env_id]
    keys = jax.random.split(jax.random.key(31), 4096)
    obs, states = jax.jit(jax.vmap(env.reset, in_axes=(0, None)))(keys, params)
    position = np.asarray(states.position)
    np.testing.assert_array_equal(obs, np.stack([position, np.asarray(states.velocity)], -1))
    np.testing.assert_array_equal(np.asarray(states.velocity), 0.0)
    np.testing.assert_array_equal(np.asarray(states.time), 0)
    assert position.min() >= -0.6 and position.max() <= -0.4
    # Kolmogorov-Smirnov distance to the uniform CDF (1% critical value at n=4096: 0.025).
    cdf = (np.sort(position) + 0.6) / 0.2
    assert np.max(np.abs(np.arange(1, len(position) + 1) / len(position) - cdf)) < 0.025
    assert len(np.unique(position)) > len(position) - 8  # float32 draws on [-0.6, -0.4] may collide


@pytest.mark.parametrize("env_id", ENVS)
def test_state_from_obs_is_the_observed_state(recordings, env_id):
    env, _ = ENVS[env_id]
    states = states_from(recordings[env_id], jnp.float32)
    observed = jax.vmap(lambda s: env.state_from_obs(env.get_obs(s)))(states)
    np.testing.assert_array_equal(observed.position, states.position)
    np.testing.assert_array_equal(observed.velocity, states.velocity)
    np.testing.assert_array_equal(np.asarray(observed.time), 0)


@pytest.mark.parametrize("env_id", ENVS)
def test_spaces_match_gymnasium(env_id):
    env, params = ENVS[env_id]
    gym = GYMNASIUM_CLASSES[env_id]()
    observation_space = env.observation_space(params)
    np.testing.assert_array_equal(np.asarray(observation_space.low), gym.observation_space.low)
    np.testing.assert_array_equal(np.asarray(observation_space.high), gym.observation_space.high)
    action_space = env.action_space(params)
    if env_id == CONTINUOUS:
        assert action_space.shape == gym.action_space.shape == (1,) and env.num_actions == 1
        np.testing.assert_array_equal(np.asarray(action_space.low), gym.action_space.low)
        np.testing.assert_array_equal(np.asarray(action_space.high), gym.action_space.high)
    else:
        assert action_space.n == gym.action_space.n == env.num_actions == 3


def test_params_are_gymnasiums_attributes_and_nothing_derived():
    names = {f.name for f in dataclasses.fields(MountainCarParams)} - {"max_steps_in_episode"}
    assert names == {
        "min_position", "max_position", "max_speed", "goal_position", "goal_velocity", "force", "gravity"
    }
    gym = MountainCarEnv()
    for name in names:
        assert getattr(MC_PARAMS, name) == getattr(gym, name), name
    names = {f.name for f in dataclasses.fields(MountainCarContinuousParams)}
    names -= {"max_steps_in_episode", "gravity"}
    assert names == {"min_action", "max_action", "min_position", "max_position", "max_speed", "goal_position",
                     "goal_velocity", "power"}
    gym = Continuous_MountainCarEnv()
    for name in names:
        assert getattr(MCC_PARAMS, name) == getattr(gym, name), name
    assert MCC_PARAMS.gravity == 0.0025  # a literal in gymnasium's step
    assert MCC_PARAMS.goal_position == 0.45 and MC_PARAMS.goal_position == 0.5
    assert (MC_PARAMS.max_steps_in_episode, MCC_PARAMS.max_steps_in_episode) == (200, 999)
    assert {f.name for f in dataclasses.fields(MountainCarState)} == {"position", "velocity", "time"}
    for env in (MC, MCC):
        assert env.deterministic_transition and env.observation_is_state_function
    assert isinstance(MC, MountainCar) and isinstance(MCC, MountainCarContinuous)


# --------------------------------------------------------------------------------------------
# Gradients
# --------------------------------------------------------------------------------------------
def central_differences(f, x: jax.Array, eps: float) -> np.ndarray:
    """d f / d x by central differences, all 2n evaluations in one vmapped call."""
    directions = jnp.eye(x.size, dtype=x.dtype) * eps
    values = jax.jit(jax.vmap(f))(jnp.concatenate([x + directions, x - directions]))
    return np.asarray((values[: x.size] - values[x.size :]) / (2 * eps))


ROLLOUT_STEPS = 30
PARAM_NAMES = {"MountainCar-v0": ("force", "gravity"), CONTINUOUS: ("power", "gravity")}


def rollout(env_id: str, z: jax.Array):
    """``z`` = initial state (2), relaxed actions (30), params; the states after each step and the
    rewards, from ``step_env`` (no reset)."""
    env, params = ENVS[env_id]
    state = car(z[0], z[1], dtype=z.dtype)
    actions = z[2 : 2 + ROLLOUT_STEPS]
    params = dataclasses.replace(params, **dict(zip(PARAM_NAMES[env_id], z[2 + ROLLOUT_STEPS :])))

    def one_step(state, action):
        _, state, reward, _, _ = env.step_env(None, state, action, params)
        return state, (state.position, state.velocity, reward)

    return jax.lax.scan(one_step, state, actions)[1]


def rollout_loss(env_id: str, z: jax.Array) -> jax.Array:
    position, velocity, reward = rollout(env_id, z)
    return jnp.sum((position - 0.5) ** 2 + 100.0 * velocity**2 - reward)


def smooth_inputs(env_id: str) -> np.ndarray:
    t = np.arange(ROLLOUT_STEPS)
    if env_id == CONTINUOUS:
        actions = 0.8 * np.sin(0.2 * t)  # strictly inside the [-1, 1] clip
    else:
        actions = 1.0 + 0.9 * np.sin(0.2 * t)  # relaxed, strictly inside [0, 2]
    params = [getattr(ENVS[env_id][1], name) for name in PARAM_NAMES[env_id]]
    return np.concatenate([[-0.5, 0.01], actions, params])


@pytest.mark.parametrize("env_id", ENVS)
def test_rollout_gradient_matches_finite_differences(env_id):
    loss = lambda z: rollout_loss(env_id, z)  # noqa: E731
    with jax.enable_x64(True):
        z = jnp.asarray(smooth_inputs(env_id))
        position, velocity, _ = rollout(env_id, z)
        # The smooth regime: no clip, no wall, no goal.
        assert np.abs(velocity).max() < 0.06 and -1.1 < np.min(position) and np.max(position) < 0.4
        gradient = np.asarray(jax.jit(jax.grad(loss))(z))
        numeric = central_differences(loss, z, eps=1e-7)
        forward = np.asarray(jax.jit(jax.jacfwd(loss))(z))
    np.testing.assert_allclose(gradient, numeric, rtol=1e-5, atol=1e-7 * np.abs(numeric).max())
    np.testing.assert_allclose(forward, gradient, rtol=1e-9, atol=1e-12 * np.abs(gradient).max())
    assert np.all(np.abs(gradient) > 0)  # every input matters: nothing is cut


def step_jacobians(env, params, state_values, action):
    """Jacobians of the next position, velocity and reward with respect to the state, the action
    and every float param (a dict)."""
    float_params = {f.name: jnp.asarray(getattr(params, f.name), jnp.float32)
                    for f in dataclasses.fields(params) if f.name != "max_steps_in_episode"}

    def outputs(state_values, action, float_params):
        _, next_state, reward, _, _ = env.step_env(
            None, car(*state_values), action, dataclasses.replace(params, **float_params)
        )
        return jnp.stack([next_state.position, next_state.velocity, reward])

    jacobians = jax.jacfwd(outputs, argnums=(0, 1, 2))(state_values, action, float_params)
    return jacobians, outputs(state_values, action, float_params)


STEP_JACOBIANS = {
    env_id: jax.jit(lambda s, a, env=env, params=params: step_jacobians(env, params, s, a))
    for env_id, (env, params) in ENVS.items()
}


def _nonzero(jacobians, row) -> set[str]:
    """The inputs that output ``row`` depends on."""
    d_state, d_action, d_params = jacobians
    found = {name for name, value in zip(("position", "velocity"), d_state[row]) if value != 0}
    found |= {"action"} if d_action[row] != 0 else set()
    return found | {name for name, value in d_params.items() if value[row] != 0}


@pytest.mark.parametrize("env_id", ENVS)
def test_gradients_at_the_clips_and_the_wall_are_the_documented_ones(env_id):
    push_right, push_left = (2.0, 0.0) if env_id != CONTINUOUS else (0.5, -0.5)
    strength = "force" if env_id != CONTINUOUS else "power"
    jacobians = STEP_JACOBIANS[env_id]
    position, velocity, reward = 0, 1, 2

    free, _ = jacobians(jnp.array([-0.5, 0.02]), push_right)
    assert _nonzero(free, position) == {"position", "velocity", "action", strength, "gravity"}
    assert _nonzero(free, velocity) == {"position", "velocity", "action", strength, "gravity"}

    # The speed clip: the new velocity depends on max_speed alone (+1, it is the upper bound).
    fast, values = jacobians(jnp.array([-0.8, 0.069]), push_right)  # the hill pulls right there
    assert float(values[velocity]) == pytest.approx(0.07)
    assert _nonzero(fast, velocity) == {"max_speed"} and fast[2]["max_speed"][velocity] == 1.0
    assert _nonzero(fast, position) == {"position", "max_speed"}  # x + clipped v

    # The right-hand clip: the position depends on max_position alone.
    end, values = jacobians(jnp.array([0.59, 0.05]), push_right)
    assert float(values[position]) == pytest.approx(0.6)
    assert _nonzero(end, position) == {"max_position"} and end[2]["max_position"][position] == 1.0

    # The left wall: the position is min_position, the velocity 0, a constant.
    wall, values = jacobians(jnp.array([-1.19, -0.03]), push_left)
    assert float(values[position]) == pytest.approx(-1.2) and float(values[velocity]) == 0.0
    assert _nonzero(wall, position) == {"min_position"} and _nonzero(wall, velocity) == set()

    if env_id == CONTINUOUS:
        # The throttle clip: the dynamics ignore the throttle past 1, the action cost does not.
        clipped, _ = jacobians(jnp.array([-0.5, 0.02]), 1.5)
        assert "action" not in _nonzero(clipped, velocity) and "max_action" in _nonzero(clipped, velocity)
        assert float(clipped[1][reward]) == pytest.approx(-0.2 * 1.5)
        assert float(free[1][reward]) == pytest.approx(-0.2 * push_right)
    else:
        assert _nonzero(free, reward) == set()  # -1 whatever happens


@pytest.mark.parametrize("env_id", ENVS)
@pytest.mark.parametrize("case", ["alive", "terminated", "truncated"])
def test_auto_reset_cuts_the_gradient_exactly_where_done(env_id, case):
    env, params = ENVS[env_id]
    start = {"alive": (-0.5, 0.02, 7), "terminated": (0.49, 0.03, 7),
             "truncated": (-0.5, 0.02, int(params.max_steps_in_episode) - 1)}[case]
    action = 2.0 if env_id != CONTINUOUS else 0.5

    def next_state(state_values, step):
        out = step(jax.random.key(1), car(*state_values, time=start[2]), action, params)
        return jnp.stack([out[1].position, out[1].velocity])

    jacobians = jax.jit(lambda s: (jax.jacfwd(lambda s: next_state(s, env.step))(s),
                                   jax.jacfwd(lambda s: next_state(s, env.step_env))(s)))
    cut, full = jacobians(jnp.array(start[:2], jnp.float32))
    state = car(*start[:2], time=start[2])
    _, _, _, terminated, truncated, _ = env.step(jax.random.key(1), state, action, params)
    assert bool(terminated | truncated) == (case != "alive") and bool(terminated) == (case == "terminated")
    np.testing.assert_array_equal(cut, 0.0 if case != "alive" else full)
    assert np.abs(full).max() > 0


def test_jit_vmap_grad_composes_and_equals_per_sample_gradients():
    rng = np.random.default_rng(1)
    z = np.tile(smooth_inputs("MountainCar-v0"), (5, 1))
    z[:, 0] = rng.uniform(-0.6, -0.4, 5)
    z[:, 2 : 2 + ROLLOUT_STEPS] = rng.uniform(0.0, 2.0, (5, ROLLOUT_STEPS))
    z = jnp.asarray(z, jnp.float32)
    loss = lambda z: rollout_loss("MountainCar-v0", z)  # noqa: E731
    batched = np.asarray(jax.jit(jax.vmap(jax.grad(loss)))(z))
    single = jax.jit(jax.grad(loss))
    for row, gradient in zip(z, batched):
        np.testing.assert_allclose(gradient, single(row), rtol=1e-4, atol=1e-4 * np.abs(gradient).max())
    assert len({float(g[0]) for g in batched}) == 5


@pytest.mark.parametrize("env_id", ENVS)
def test_no_stop_gradient_in_the_transition(env_id):
    env, params = ENVS[env_id]
    state = car(-0.5, 0.01)
    for method, args in ((env.step_env, (None, state, 1.0, params)),
                         (env.step, (jax.random.key(0), state, 1.0, params)),
                         (env.reset, (jax.random.key(0), params))):
        assert "stop_gradient" not in str(jax.make_jaxpr(method)(*args)), method.__name__


@pytest.mark.parametrize("env_class", [MountainCar, MountainCarContinuous])
def test_docstrings_name_every_kink(env_class):
    doc = " ".join(env_class.__doc__.split())
    for phrase in ("Differentiability", "speed clip", "position clip", "left wall", "zero gradient",
                   "termination flag", "resets where an episode ends", "cuts the gradient"):
        assert phrase in doc, phrase
    if env_class is MountainCarContinuous:
        assert "throttle clip" in doc


# --------------------------------------------------------------------------------------------
# The tasks
# --------------------------------------------------------------------------------------------
TASKS = {"MountainCar-v0": MountainCarTask, CONTINUOUS: MountainCarContinuousTask}


def test_tasks_are_the_specs_and_their_terms_are_the_documented_surrogates():
    assert MountainCarTask.term_names() == ("energy", "position", "speed")
    assert MountainCarContinuousTask.term_names() == ("energy", "position", "action_cost")
    for env_id, (env, params) in ENVS.items():
        assert diffgym.spec(env_id).task_class() is TASKS[env_id]
        task = diffgym.make_task(env_id, energy=1.0, position=1.0)
        terms = jax.jit(task.terms)
        valley = car(-np.pi / 6, 0.0)
        at_valley = terms(params, valley, 1.0, valley)
        at_wall = terms(params, car(params.min_position, 0.0), 1.0, car(params.min_position, 0.0))
        at_goal = terms(params, valley, 1.0, car(params.goal_position, params.goal_velocity))
        assert float(at_valley["energy"]) == pytest.approx(1.0, abs=1e-6)
        assert float(at_goal["energy"]) == 0.0 and float(at_goal["position"]) == 0.0
        assert float(at_wall["position"]) == pytest.approx(1.0)
        # Beyond the goal's energy the term stays 0: a fast car is not penalised.
        assert float(terms(params, valley, 1.0, car(-0.5, 0.06))["energy"]) == 0.0
    resting = car(-0.5, 0.0)
    throttle_cost = MountainCarContinuousTask(action_cost=1.0).terms(MCC_PARAMS, resting, jnp.array([0.7]), resting)
    assert float(throttle_cost["action_cost"]) == pytest.approx(0.1 * 0.49)


@pytest.mark.parametrize("env_id", ENVS)
def test_cost_with_only_the_reward_is_minus_the_env_reward(recordings, env_id):
    env, params = ENVS[env_id]
    rows = {name: column[-SET_STATES:] for name, column in recordings[env_id].items()}
    states, actions = states_from(rows, jnp.float32), actions_from(env_id, rows)
    _, next_states, reward, terminated, _ = STEP_ENV_BATCH[env_id](None, states, actions, params)
    costs = jax.jit(jax.vmap(TASKS[env_id]().cost, in_axes=(None, 0, 0, 0, 0)))
    np.testing.assert_array_equal(costs(params, states, actions, next_states, reward), -np.asarray(reward))
    # Every surrogate is finite, and MountainCarContinuous's action cost is the reward's smooth part.
    all_terms = TASKS[env_id](**{name: 1.0 for name in TASKS[env_id].term_names()})
    terms = jax.jit(jax.vmap(all_terms.terms, in_axes=(None, 0, 0, 0)))(params, states, actions, next_states)
    for name, values in terms.items():
        assert np.all(np.isfinite(values)), name
    if env_id == CONTINUOUS:
        smooth_part = -np.asarray(reward) + 100.0 * np.asarray(terminated)
        np.testing.assert_allclose(terms["action_cost"], smooth_part, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("env_id", ENVS)
def test_energy_barely_changes_when_coasting_and_pushing_along_the_velocity_pumps_it_in(env_id):
    env, params = ENVS[env_id]
    coast, push_right, push_left = (1, 2, 0) if env_id != CONTINUOUS else (0.0, 1.0, -1.0)
    task = TASKS[env_id](reward=0.0, energy=1.0)

    @jax.jit
    def energy_terms(start, pushing):
        def one_step(state, _):
            action = jnp.where(pushing, jnp.where(state.velocity >= 0, push_right, push_left), coast)
            next_state = env.step_env(None, state, action, params)[1]
            return next_state, (task.terms(params, state, action, next_state)["energy"],
                                mechanical_energy(next_state, params), next_state.position)

        return jax.lax.scan(one_step, start, None, length=200)[1]

    gap = float(goal_energy(params)) + params.gravity / 3.0
    _, coasting, _ = energy_terms(car(-0.9, 0.0), False)
    assert np.ptp(np.asarray(coasting)) / gap < 0.03  # measured 2.3 %: the semi-implicit step
    pumped, _, positions = energy_terms(car(-0.5, 0.0), True)
    pumped, positions = np.asarray(pumped), np.asarray(positions)
    reached = np.argmax(positions >= params.goal_position)
    assert reached > 0 and pumped[0] > 0.9 and pumped[reached - 1] < 0.05  # 1 to ~0 before the flag


@pytest.mark.parametrize("env_id", ENVS)
def test_the_energy_gradient_says_push_along_the_velocity(env_id):
    """At a car moving right (left), the energy term of the next state has a negative (positive)
    gradient with respect to the push: more push along the motion, more energy."""
    env, params = ENVS[env_id]
    task = TASKS[env_id](reward=0.0, energy=1.0)
    action = 1.0 if env_id != CONTINUOUS else 0.0  # the middle of the action range

    def energy_after(velocity, action):
        state = car(-0.5, velocity)
        next_state = env.step_env(None, state, action, params)[1]
        return task.cost(params, state, action, next_state, 0.0)

    slope = jax.jit(jax.grad(energy_after, argnums=1))
    assert float(slope(0.02, action)) < 0 < float(slope(-0.02, action))


def test_the_speed_term_pushes_along_the_velocity_the_pull_is_about_to_give():
    """``speed`` is 1 at rest and 0 at top speed; through one step its gradient with respect to the
    push is ``-2 force v' / max_speed^2``, ``v' = v - gravity cos(3 x)`` the coasting velocity
    (exact: the step is affine in the action inside the clips), so it reverses a push a step
    before the car turns, where the energy term pushes along ``v``."""
    env, params = ENVS["MountainCar-v0"]
    task = MountainCarTask(reward=0.0, speed=1.0)
    terms = jax.jit(task.terms)
    assert float(terms(params, car(-0.5, 0.0), 1.0, car(-0.5, 0.0))["speed"]) == 1.0
    for velocity in (params.max_speed, -params.max_speed):
        at_top_speed = terms(params, car(-0.5, 0.0), 1.0, car(-0.5, velocity))["speed"]
        assert float(at_top_speed) == pytest.approx(0.0, abs=1e-6)

    def cost_after(position, velocity, action):
        state = car(position, velocity)
        return task.cost(params, state, action, env.step_env(None, state, action, params)[1], 0.0)

    slope = jax.jit(jax.grad(cost_after, argnums=2))
    for position in (-1.0, -0.7, -0.52, -0.3, 0.0, 0.3):
        for velocity in (-0.03, -0.002, 0.002, 0.03):
            coasting = velocity - params.gravity * np.cos(3 * position)
            expected = -2 * params.force * coasting / params.max_speed**2
            assert float(slope(position, velocity, 1.0)) == pytest.approx(expected, rel=1e-4, abs=1e-7)
    # Moving right slowly on the right slope (about to turn): speed says push left, energy right.
    energy = MountainCarTask(reward=0.0, energy=1.0)
    state = car(0.0, 0.002)

    def energy_after(action):
        return energy.cost(params, state, action, env.step_env(None, state, action, params)[1], 0.0)

    energy_slope = jax.grad(energy_after)
    assert float(slope(0.0, 0.002, 1.0)) > 0 > float(energy_slope(1.0))


def test_one_step_greedy_on_speed_and_position_beats_the_threshold():
    """The documented measurement: pushing (0 or 2) to minimise ``speed = 1, position = 0.2`` of the
    next state, every step, returns -106 on 2 000 reset starts (-110 is MountainCar's threshold);
    ``energy = 1, position = 0.1`` returns -120."""
    env, params = ENVS["MountainCar-v0"]

    def mean_return(**weights):
        task = MountainCarTask(reward=0.0, **weights)

        def episode(key):
            _, state = env.reset_env(key, params)

            def body(carry, _):
                state, alive, total = carry
                left, right = (
                    task.cost(params, state, push, env.step_env(None, state, push, params)[1], 0.0)
                    for push in (0.0, 2.0)
                )
                action = jnp.where(right < left, 2.0, 0.0)
                _, state, reward, terminated, _ = env.step_env(None, state, action, params)
                return (state, alive & ~terminated, total + jnp.where(alive, reward, 0.0)), None

            return jax.lax.scan(body, (state, jnp.array(True), jnp.float32(0.0)), None, length=200)[0][2]

        return float(jnp.mean(jax.jit(jax.vmap(episode))(jax.random.split(jax.random.key(0), 2_000))))

    speed = mean_return(speed=1.0, position=0.2)
    assert -108 < speed < -104, speed
    assert -122 < mean_return(energy=1.0, position=0.1) < -118


def test_relaxed_actions_are_the_hard_actions_forward_and_have_gradients(recordings):
    rows = {name: column[-SET_STATES:] for name, column in recordings["MountainCar-v0"].items()}
    states = states_from(rows, jnp.float32)
    task = MountainCarTask(energy=1.0)
    space = MC.action_space(MC_PARAMS)
    logits = jax.random.normal(jax.random.key(9), (SET_STATES, 3)) * 2.0
    relaxed = jax.jit(jax.vmap(lambda z: task.relaxed_action(z, space)))(logits)
    np.testing.assert_array_equal(relaxed, np.argmax(logits, axis=-1).astype(np.float32))
    soft = STEP_ENV_BATCH["MountainCar-v0"](None, states, relaxed, MC_PARAMS)[1]
    hard = STEP_ENV_BATCH["MountainCar-v0"](None, states, jnp.argmax(logits, axis=-1), MC_PARAMS)[1]
    for a, b in zip(jax.tree.leaves(soft), jax.tree.leaves(hard)):
        np.testing.assert_array_equal(a, b)

    # Backward: the expected index under the softmax, and a nonzero gradient through a step.
    state = car(-0.5, 0.02)

    def cost(z):
        next_state = MC.step_env(None, state, task.relaxed_action(z, space), MC_PARAMS)[1]
        return task.cost(MC_PARAMS, state, None, next_state, -1.0)

    def expected_index(z):
        return jax.nn.softmax(z) @ jnp.arange(3.0)

    z = jnp.array([0.2, -0.1, 0.4])
    index_gradient = jax.jit(jax.grad(lambda z: task.relaxed_action(z, space)))
    np.testing.assert_allclose(index_gradient(z), jax.jit(jax.grad(expected_index))(z), rtol=1e-6)
    assert np.all(np.abs(jax.jit(jax.grad(cost))(z)) > 0)

    # MountainCarContinuous: the tanh squash, inside the box, with tanh's gradient.
    box = MCC.action_space(MCC_PARAMS)
    raw = jnp.linspace(-6.0, 6.0, 101)[:, None]
    throttle = jax.jit(jax.vmap(lambda r: MountainCarContinuousTask().relaxed_action(r, box)))(raw)
    assert np.all(np.abs(np.asarray(throttle)) <= 1.0)
    np.testing.assert_allclose(throttle, np.tanh(np.asarray(raw)), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("env_id, alias, threshold", [("MountainCar-v0", "mountaincar", -110.0),
                                                      (CONTINUOUS, "mountaincarcontinuous", 90.0)])
def test_spec_values(env_id, alias, threshold):
    spec = diffgym.spec(alias)
    assert (spec.id, spec.reward_threshold, spec.eval_episodes) == (env_id, threshold, 100)
    assert len(spec.obs_scale) == len(spec.obs_mean) == 2 and spec.task is TASKS[env_id]
    ours, theirs = gymnasium.spec(f"diffgym/{env_id}"), gymnasium.spec(env_id)
    assert ours.max_episode_steps == theirs.max_episode_steps
    assert ours.reward_threshold == theirs.reward_threshold == threshold
    # The scale maps the observation box onto [-1, 1].
    box = ENVS[env_id][0].observation_space(ENVS[env_id][1])
    np.testing.assert_allclose((np.asarray(box.low) - spec.obs_mean) / spec.obs_scale, -1.0, rtol=1e-6)
    np.testing.assert_allclose((np.asarray(box.high) - spec.obs_mean) / spec.obs_scale, 1.0, rtol=1e-6)


# --------------------------------------------------------------------------------------------
# The picture
# --------------------------------------------------------------------------------------------
def frame(env_id: str, position: float, params=None) -> np.ndarray:
    from diffgym.render import make_renderer

    env, default_params = ENVS[env_id]
    (picture,) = make_renderer(env).frames(car(position, 0.0), default_params if params is None else params)
    return picture


@pytest.mark.parametrize("env_id", ENVS)
@pytest.mark.parametrize("position", [-1.2, -0.5, 0.0, 0.4, 0.6])
def test_frame_reproduces_gymnasiums_picture(env_id, position):
    pytest.importorskip("pygame")
    theirs = gymnasium.make(env_id, render_mode="rgb_array").unwrapped
    theirs.reset(seed=0)
    theirs.state = np.array([position, 0.0])
    their_frame = theirs.render()
    theirs.close()
    ours = frame(env_id, position)
    assert ours.shape == their_frame.shape == (400, 600, 3) and ours.dtype == np.uint8
    differing = np.any(np.abs(ours.astype(int) - their_frame) > 60, axis=-1)
    assert differing.mean() < 0.003, differing.mean()  # antialiased edges only


def test_the_car_moves_with_the_position_and_the_flag_with_the_goal():
    pytest.importorskip("pygame")
    from diffgym.render.mountain_car import FLAG_COLOR, WHEEL_COLOR

    def columns(picture, color):
        mask = np.all(np.abs(picture.astype(int) - np.array(color)) <= 10, axis=-1)
        assert mask.sum() > 20
        return np.nonzero(mask)[1].mean()

    scale = 600 / 1.8  # px per position unit
    # The car: the pixels that differ between two positions and are not white in the frame.
    at_left, at_right = frame("MountainCar-v0", -0.9), frame("MountainCar-v0", 0.3)
    changed = np.any(at_left != at_right, axis=-1)
    left_car = np.nonzero(changed & np.any(at_left < 200, axis=-1))[1].mean()
    right_car = np.nonzero(changed & np.any(at_right < 200, axis=-1))[1].mean()
    assert left_car == pytest.approx((-0.9 + 1.2) * scale, abs=15)
    assert right_car == pytest.approx((0.3 + 1.2) * scale, abs=15)
    assert columns(at_left, WHEEL_COLOR) < columns(at_right, WHEEL_COLOR)
    flag_at = {env_id: columns(frame(env_id, -0.5), FLAG_COLOR) for env_id in ENVS}
    assert flag_at["MountainCar-v0"] - flag_at[CONTINUOUS] == pytest.approx(0.05 * scale, abs=2)
    moved = frame("MountainCar-v0", -0.5, dataclasses.replace(MC_PARAMS, goal_position=0.0))
    assert columns(moved, FLAG_COLOR) == pytest.approx(flag_at["MountainCar-v0"] - 0.5 * scale, abs=2)
