"""The functional core: registry, the gymnax 1.x API, pytree dataclasses, spaces, input errors."""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffgym
from diffgym.core import Box, Discrete
from diffgym.envs.acrobot import Acrobot, AcrobotParams, AcrobotState
from diffgym.envs.cartpole import CartPole, CartPoleParams, CartPoleState
from diffgym.envs.continuous_mountain_car import MountainCarContinuous, MountainCarContinuousParams
from diffgym.envs.mountain_car import MountainCar, MountainCarParams, MountainCarState
from diffgym.envs.pendulum import Pendulum, PendulumParams, PendulumState

ENV_CLASSES = {
    "CartPole-v1": CartPole,
    "Pendulum-v1": Pendulum,
    "Acrobot-v1": Acrobot,
    "MountainCar-v0": MountainCar,
    "MountainCarContinuous-v0": MountainCarContinuous,
}
ENV_IDS = list(ENV_CLASSES)


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("env_id", ENV_IDS)
def test_make_returns_the_env_and_its_default_params(env_id):
    env, params = diffgym.make(env_id)
    assert type(env) is ENV_CLASSES[env_id]
    assert env.name == env_id
    assert params == env.default_params
    for spelling in (f"diffgym/{env_id}", env_id.split("-")[0].lower()):
        other_env, other_params = diffgym.make(spelling)
        assert type(other_env) is type(env) and other_params == params
    assert env_id in diffgym.registered_envs()


@pytest.mark.parametrize(
    "name, closest", [("CartPole-v2", "CartPole-v1"), ("Pendulm-v1", "Pendulum-v1"), ("catpole", "cartpole")]
)
def test_unknown_env_lists_the_known_ones_and_suggests_the_closest(name, closest):
    with pytest.raises(ValueError) as error:
        diffgym.make(name)
    message = str(error.value)
    assert repr(name) in message
    assert f"Did you mean {closest!r}?" in message
    for known in diffgym.registered_envs():
        assert known in message


@pytest.mark.parametrize("name", ["CARTPOLE-V1", "Cartpole-V1", "cart-pole", "pendulum-v1", "PENDULUM_V1", "Pend"])
def test_the_suggested_name_is_one_that_resolves(name):
    with pytest.raises(ValueError, match="Did you mean") as error:
        diffgym.make(name)
    suggestion = re.search(r"Did you mean '([^']+)'\?", str(error.value)).group(1)
    assert diffgym.resolve_env_id(suggestion) in diffgym.registered_envs()


def test_non_string_env_id_says_what_it_got():
    with pytest.raises(TypeError, match=r"got 3 of type int"):
        diffgym.make(3)


# --------------------------------------------------------------------------------------------
# gymnax 1.x API
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("env_id", ENV_IDS)
def test_gymnax_api_signatures_and_return_types(env_id, key):
    env, params = diffgym.make(env_id)
    key_reset, key_action, key_step = jax.random.split(key, 3)
    obs, state = env.reset(key_reset, params)
    obs_default, state_default = env.reset(key_reset)  # params default to default_params, as gymnax
    np.testing.assert_array_equal(obs, obs_default)
    observation_space, action_space = env.observation_space(params), env.action_space(params)
    assert obs.shape == observation_space.shape and obs.dtype == jnp.float32
    assert bool(observation_space.contains(obs))
    action = action_space.sample(key_action)
    assert action.shape == action_space.shape and bool(action_space.contains(action))
    expected_num_actions = action_space.n if isinstance(action_space, Discrete) else action_space.shape[0]
    assert env.num_actions == expected_num_actions

    result = env.step(key_step, state, action, params)
    assert len(result) == 6
    next_obs, next_state, reward, terminated, truncated, info = result
    assert type(next_state) is type(state) and next_obs.shape == obs.shape
    assert reward.shape == () and jnp.issubdtype(reward.dtype, jnp.floating)
    assert terminated.dtype == jnp.bool_ and truncated.dtype == jnp.bool_
    assert {"final_observation", "terminated", "truncated", "discount"} <= set(info)
    np.testing.assert_array_equal(env.step(key_step, state, action)[0], next_obs)  # params=None

    result_env = env.step_env(key_step, state, action, params)
    assert len(result_env) == 5
    obs_env, state_env, reward_env, terminated_env, info_env = result_env
    np.testing.assert_array_equal(obs_env, info["final_observation"])
    assert float(reward_env) == float(reward) and bool(terminated_env) == bool(terminated)
    assert "discount" in info_env
    assert env.is_terminal(state_env, params).dtype == jnp.bool_
    assert bool(env.is_terminal(state_env, params)) == bool(terminated_env)
    assert float(env.discount(state_env, params)) == (0.0 if bool(terminated_env) else 1.0)
    np.testing.assert_array_equal(env.get_obs(state_env), obs_env)


def gymnax_style_rollout(rng_input, env, env_params, steps_in_episode):
    """A rollout as gymnax's README and purejaxrl write it: scan over ``env.step`` with sampled actions."""
    rng_reset, rng_episode = jax.random.split(rng_input)
    obs, state = env.reset(rng_reset, env_params)

    def policy_step(state_input, _):
        obs, state, rng = state_input
        rng, rng_step, rng_net = jax.random.split(rng, 3)
        action = env.action_space(env_params).sample(rng_net)
        next_obs, next_state, reward, terminated, truncated, info = env.step(
            rng_step, state, action, env_params
        )
        carry = [next_obs, next_state, rng]
        return carry, [obs, state, action, reward, next_obs, next_state, terminated, truncated, info]

    _, scan_out = jax.lax.scan(policy_step, [obs, state, rng_episode], (), steps_in_episode)
    return scan_out


# CartPole and Pendulum: the checks below are theirs (every episode ends within the 260 steps).
@pytest.mark.parametrize("env_id", ["CartPole-v1", "Pendulum-v1"])
def test_gymnax_style_scan_rollout_with_auto_reset(env_id):
    env, params = diffgym.make(env_id)
    steps, batch = 260, 8
    rollouts = jax.jit(jax.vmap(gymnax_style_rollout, in_axes=(0, None, None, None)), static_argnums=(1, 3))
    obs, states, actions, rewards, next_obs, next_states, terminated, truncated, info = rollouts(
        jax.random.split(jax.random.key(42), batch), env, params, steps
    )
    done = np.asarray(terminated | truncated)
    assert obs.shape == (batch, steps, *env.observation_space(params).shape)
    assert done.any(axis=1).all()  # every env finished at least one episode
    # Where an episode ended the next state is a fresh episode; elsewhere it is the step's.
    np.testing.assert_array_equal(np.asarray(next_states.time)[done], 0)
    np.testing.assert_array_equal(np.asarray(next_states.time)[~done], np.asarray(states.time)[~done] + 1)
    np.testing.assert_array_equal(np.asarray(next_obs)[~done], np.asarray(info["final_observation"])[~done])
    assert not np.array_equal(np.asarray(next_obs)[done], np.asarray(info["final_observation"])[done])
    # final_observation is step_env's observation from the recorded state and action.
    flat = lambda tree: jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), tree)  # noqa: E731
    obs_env = jax.jit(jax.vmap(env.step_env, in_axes=(None, 0, 0, None)))(
        jax.random.key(0), flat(states), flat(actions), params
    )[0]
    np.testing.assert_allclose(obs_env, flat(info["final_observation"]), rtol=0, atol=1e-6)
    if env_id == "CartPole-v1":
        assert 20 < done.sum() and np.all(np.asarray(rewards) == 1.0)  # never stepped from a fallen pole
        reset_obs = np.asarray(next_obs)[done]
        assert np.all(np.abs(reset_obs) <= 0.05)
    else:
        # Pendulum never terminates: every episode is truncated after exactly 200 steps.
        assert not np.asarray(terminated).any()
        np.testing.assert_array_equal(np.nonzero(done)[1], np.full(batch, params.max_steps_in_episode - 1))
        assert np.all(np.abs(np.asarray(actions)) <= params.max_torque)


@pytest.mark.parametrize("env_id", [*ENV_IDS, "Trebuchet-v0"])
def test_auto_reset_observation_is_the_reset_draws(env_id):
    """``observation_is_state_function`` lets ``step`` compute its observation from the selected
    state: its premise (``reset_env`` and ``step_env`` observe ``get_obs(state)``) and its result
    (where an episode ends, the observation ``reset_env`` gives for the step's key) are checked."""
    env, params = diffgym.make(env_id)
    assert env.observation_is_state_function
    keys = jax.random.split(jax.random.key(3), 16)
    obs, states = jax.vmap(env.reset, in_axes=(0, None))(keys, params)
    np.testing.assert_array_equal(obs, jax.vmap(env.get_obs)(states))
    actions = jax.vmap(env.action_space(params).sample)(keys)
    next_obs, next_states = jax.vmap(env.step_env, in_axes=(0, 0, 0, None))(keys, states, actions, params)[:2]
    np.testing.assert_array_equal(next_obs, jax.vmap(env.get_obs)(next_states))
    # Every episode ends at once (a one-step time limit): step's observation is the reset's.
    short = dataclasses.replace(params, max_steps_in_episode=1)
    step_keys = jax.random.split(jax.random.key(4), 16)
    stepped = jax.vmap(env.step, in_axes=(0, 0, 0, None))(step_keys, states, actions, short)
    assert np.all(np.asarray(stepped[3] | stepped[4]))
    reset_obs = jax.vmap(env.reset_env, in_axes=(0, None))(step_keys, short)[0]
    np.testing.assert_array_equal(stepped[0], reset_obs)
    np.testing.assert_array_equal(stepped[5]["final_observation"], next_obs)


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_x64_rollout_keeps_float64_through_auto_reset(env_id):
    """With x64 on, reset and step both give float64 states, so a scan carry survives auto-resets."""
    env, params = diffgym.make(env_id)
    with jax.enable_x64(True):
        _, states, _, _, next_obs, next_states, terminated, truncated, _ = jax.jit(
            gymnax_style_rollout, static_argnums=(1, 3)
        )(jax.random.key(5), env, dataclasses.replace(params, max_steps_in_episode=10), 25)
        assert bool((terminated | truncated).any())
        assert next_obs.dtype == jnp.float64
        for leaf in jax.tree.leaves(next_states):
            assert leaf.dtype in (jnp.float64, jnp.int32)
    assert not jax.config.jax_enable_x64


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_jit_vmap_and_scan_agree_with_plain_calls(env_id):
    env, params = diffgym.make(env_id)
    actions = jnp.asarray(np.random.default_rng(0).uniform(0.0, 1.0, (8, *env.action_space(params).shape)))
    if env_id == "CartPole-v1":
        actions = (actions > 0.5).astype(jnp.int32)
    _, state = env.reset(jax.random.key(7), params)
    keys = jax.random.split(jax.random.key(8), len(actions))

    eager, jitted_states = [], []
    jitted_step = jax.jit(env.step)
    s_eager = s_jit = state
    for k, a in zip(keys, actions):
        s_eager = env.step(k, s_eager, a, params)[1]
        s_jit = jitted_step(k, s_jit, a, params)[1]
        eager.append(env.get_obs(s_eager))
        jitted_states.append(env.get_obs(s_jit))

    def scan_body(s, key_and_action):
        step_key, action = key_and_action
        s = env.step(step_key, s, action, params)[1]
        return s, env.get_obs(s)

    scanned = jax.jit(lambda s: jax.lax.scan(scan_body, s, (keys, actions))[1])(state)
    np.testing.assert_allclose(np.stack(jitted_states), np.stack(eager), rtol=0, atol=1e-5)
    np.testing.assert_allclose(scanned, np.stack(eager), rtol=0, atol=1e-5)
    # vmap over a batch of states equals stepping each one.
    _, states = jax.vmap(env.reset, in_axes=(0, None))(jax.random.split(jax.random.key(9), 5), params)
    batched = jax.vmap(env.step_env, in_axes=(None, 0, None, None))(None, states, actions[0], params)[0]
    for i in range(5):
        one = jax.tree.map(lambda x: x[i], states)
        expected = env.step_env(None, one, actions[0], params)[0]
        np.testing.assert_allclose(batched[i], expected, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------------------------
# State and params: frozen pytree dataclasses
# --------------------------------------------------------------------------------------------
STATE_FIELDS = {
    "CartPole-v1": (CartPoleState, CartPoleParams, {"x", "x_dot", "theta", "theta_dot", "time"}),
    "Pendulum-v1": (PendulumState, PendulumParams, {"theta", "theta_dot", "last_u", "time"}),
    "Acrobot-v1": (AcrobotState, AcrobotParams, {"theta1", "theta2", "dtheta1", "dtheta2", "time"}),
    "MountainCar-v0": (MountainCarState, MountainCarParams, {"position", "velocity", "time"}),
    "MountainCarContinuous-v0": (
        MountainCarState, MountainCarContinuousParams, {"position", "velocity", "time"}
    ),
}
#: One physical param of each env, to change.
A_PHYSICAL_PARAM = {
    "CartPole-v1": "masspole",
    "Pendulum-v1": "m",
    "Acrobot-v1": "link_mass_2",
    "MountainCar-v0": "gravity",
    "MountainCarContinuous-v0": "power",
}


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_state_and_params_are_frozen_pytree_dataclasses(env_id, key):
    env, params = diffgym.make(env_id)
    state_cls, params_cls, state_fields = STATE_FIELDS[env_id]
    _, state = env.reset(key, params)
    assert type(state) is state_cls and type(params) is params_cls
    assert {f.name for f in dataclasses.fields(state)} == state_fields
    for tree in (state, params):
        assert dataclasses.is_dataclass(tree)
        first = dataclasses.fields(tree)[0].name
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(tree, first, 0.0)
        # Every field is a pytree leaf: tree maps and jit round trips keep the class.
        assert len(jax.tree.leaves(tree)) == len(dataclasses.fields(tree))
        doubled = jax.tree.map(lambda x: x * 2, tree)
        assert type(doubled) is type(tree)
        assert type(jax.jit(lambda t: t)(tree)) is type(tree)
    # replace returns a changed copy and leaves the original alone.
    later = dataclasses.replace(state, time=state.time + 3)
    assert int(later.time) == 3 and int(state.time) == 0
    heavier_name = A_PHYSICAL_PARAM[env_id]
    heavier = dataclasses.replace(params, **{heavier_name: 0.5})
    assert getattr(heavier, heavier_name) == 0.5 and params == env.default_params


def test_params_are_traced_not_static_so_changing_them_does_not_recompile(key):
    env, params = diffgym.make("CartPole-v1")
    _, state = env.reset(key, params)
    step = jax.jit(env.step_env)
    light = step(None, state, 1, params)[0]
    heavy = step(None, state, 1, dataclasses.replace(params, masspole=0.9))[0]
    assert step._cache_size() == 1
    assert not np.allclose(light, heavy)


# --------------------------------------------------------------------------------------------
# Spaces
# --------------------------------------------------------------------------------------------
def test_discrete_space_samples_every_action_and_nothing_else():
    space = Discrete(2)
    samples = jax.jit(jax.vmap(space.sample))(jax.random.split(jax.random.key(0), 400))
    assert samples.dtype == jnp.int32 and set(np.unique(samples)) == {0, 1}
    assert 150 < int(samples.sum()) < 250
    assert bool(space.contains(1)) and not bool(space.contains(2)) and not bool(space.contains(-1))
    assert repr(space) == "Discrete(2)"


def test_box_space_samples_inside_finite_bounds_and_finite_values_for_infinite_ones():
    box = Box(-2.0, jnp.array([2.0, 3.0, jnp.inf]), (3,))
    samples = jax.jit(jax.vmap(box.sample))(jax.random.split(jax.random.key(0), 1000))
    assert samples.shape == (1000, 3) and samples.dtype == jnp.float32
    assert np.all(np.isfinite(samples))
    assert np.all(samples[:, 0] >= -2.0) and np.all(samples[:, 0] <= 2.0)
    assert np.all(samples[:, 1] >= -2.0) and np.all(samples[:, 1] <= 3.0)
    assert samples[:, 0].std() > 0.9  # spread over the box (uniform on [-2, 2]: std 1.15)
    assert bool(box.contains(jnp.array([0.0, 2.5, 1e9])))
    assert not bool(box.contains(jnp.array([0.0, 3.5, 0.0])))


# --------------------------------------------------------------------------------------------
# Errors for bad input
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("env_id", ENV_IDS)
@pytest.mark.parametrize("bad_shape", [(2,), (1, 1), (3, 4)])
def test_wrong_action_shape_says_what_was_received_and_what_is_accepted(env_id, bad_shape, key):
    env, params = diffgym.make(env_id)
    _, state = env.reset(key, params)
    bad_action = jnp.zeros(bad_shape)
    accepted = "scalar" if env_id in ("CartPole-v1", "Acrobot-v1") else r"\(\) or \(1,\)"
    pattern = rf"(?s){env_id.split('-')[0]}.*{accepted}.*got shape {re.escape(str(bad_shape))}"
    for call in (env.step_env, env.step, jax.jit(env.step)):
        with pytest.raises(ValueError, match=pattern):
            call(key, state, bad_action, params)
    # The classic vmap mistake: one action vector for the whole batch, not one action per env.
    states = jax.tree.map(lambda x: jnp.stack([x, x]), state)
    with pytest.raises(ValueError, match=r"got shape \(3,\)"):
        jax.vmap(env.step, in_axes=(None, 0, None, None))(key, states, jnp.zeros(3), params)


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_accepted_action_shapes_give_the_same_transition(env_id, key):
    env, params = diffgym.make(env_id)
    _, state = env.reset(key, params)
    scalar = env.step_env(key, state, jnp.float32(1.0), params)[0]
    vector = env.step_env(key, state, jnp.ones((1,)), params)[0]
    np.testing.assert_array_equal(scalar, vector)


# --------------------------------------------------------------------------------------------
# The reset draw: jax.random.uniform in the documented Threefry layout
# --------------------------------------------------------------------------------------------
def _reference_uniform(key, shape, low, high):
    """``jax.random.uniform`` in the layout ``diffgym.core.uniform`` documents."""
    from diffgym.core import RESET_DRAW_PARTITIONABLE

    with jax.threefry_partitionable(RESET_DRAW_PARTITIONABLE):
        return jax.random.uniform(key, shape, minval=low, maxval=high)


RESET_DRAWS = {  # env id -> (state fields in draw order, shape, low, high)
    "CartPole-v1": (("x", "x_dot", "theta", "theta_dot"), (4,), -0.05, 0.05),
    "Pendulum-v1": (("theta", "theta_dot"), (2,), -jnp.array([jnp.pi, 1.0]), jnp.array([jnp.pi, 1.0])),
    "Acrobot-v1": (("theta1", "theta2", "dtheta1", "dtheta2"), (4,), -0.1, 0.1),
    "MountainCar-v0": (("position",), (1,), -0.6, -0.4),
    "MountainCarContinuous-v0": (("position",), (1,), -0.6, -0.4),
}


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_reset_is_jax_random_uniform_in_the_documented_layout(env_id):
    """Bit for bit: eagerly, under jit, under vmap and nested vmap, for typed and raw keys."""
    env, params = diffgym.make(env_id)
    fields, shape, low, high = RESET_DRAWS[env_id]

    def drawn(state):
        return jnp.stack([getattr(state, name) for name in fields], axis=-1)

    for key in (jax.random.key(3), jax.random.PRNGKey(4)):
        np.testing.assert_array_equal(drawn(env.reset(key, params)[1]), _reference_uniform(key, shape, low, high))
        np.testing.assert_array_equal(
            drawn(jax.jit(env.reset)(key, params)[1]), jax.jit(_reference_uniform, static_argnums=1)(key, shape, low, high)
        )
    for keys in (jax.random.split(jax.random.key(5), 70), jax.random.split(jax.random.key(6), (3, 33))):
        batched_reset, batched_reference = env.reset, lambda k: _reference_uniform(k, shape, low, high)
        for _ in range(keys.ndim):
            batched_reset = jax.vmap(batched_reset, in_axes=(0, None))
            batched_reference = jax.vmap(batched_reference)
        states = jax.jit(batched_reset)(keys, params)[1]
        np.testing.assert_array_equal(drawn(states), jax.jit(batched_reference)(keys))
    # The layout is set for the draw only: the caller's setting is left as it was.
    before = jax.config.jax_threefry_partitionable
    env.reset(jax.random.key(0), params)
    assert jax.config.jax_threefry_partitionable == before


def test_uniform_takes_other_key_implementations_and_float64():
    from diffgym.core import uniform

    key = jax.random.key(0, impl="rbg")
    np.testing.assert_array_equal(uniform(key, (4,)), _reference_uniform(key, (4,), 0.0, 1.0))
    with jax.enable_x64(True):
        draw = uniform(jax.random.key(0), (4,), -1.0, 1.0)
        assert draw.dtype == jnp.float64
        np.testing.assert_array_equal(draw, _reference_uniform(jax.random.key(0), (4,), -1.0, 1.0))


# --------------------------------------------------------------------------------------------
# Keys: Environment.step never feeds one key to two draws (a noisy env: tests/noisy_env.py)
# --------------------------------------------------------------------------------------------
def test_step_splits_the_key_between_the_transition_and_the_reset():
    """The transition's noise is ``noise(split(key)[0])`` and the reset's draw
    ``start_position(split(key)[1])``: two keys, as gymnax, and neither is the step's own key."""
    from noisy_env import NoisyDrift, NoisyDriftParams

    env = NoisyDrift()
    every_step_resets = NoisyDriftParams(max_steps_in_episode=1)
    keys = jax.random.split(jax.random.key(11), 8)
    _, states = jax.vmap(env.reset, in_axes=(0, None))(keys, every_step_resets)
    actions = jnp.zeros((8, 2))
    step_keys = jax.random.split(jax.random.key(12), 8)
    _, next_states, _, _, truncated, info = jax.jit(jax.vmap(env.step, in_axes=(0, 0, 0, None)))(
        step_keys, states, actions, every_step_resets
    )
    assert bool(truncated.all())
    key_step, key_reset = jax.vmap(jax.random.split, out_axes=1)(step_keys)
    noise = jax.vmap(env.noise, in_axes=(0, None))
    start = jax.vmap(env.start_position, in_axes=(0, None))
    # To float32 rounding (jit fuses the scaling differently); any other key is far off.
    np.testing.assert_allclose(info["noise"], noise(key_step, every_step_resets), rtol=1e-6)
    np.testing.assert_allclose(next_states.position, start(key_reset, every_step_resets), rtol=1e-6)
    np.testing.assert_allclose(info["final_state"].position, states.position + info["noise"], rtol=1e-6)
    for other in (step_keys, key_reset):
        assert not np.any(np.isclose(info["noise"], noise(other, every_step_resets)))
    for other in (step_keys, key_step):
        assert not np.any(np.isclose(next_states.position, start(other, every_step_resets)))


def test_step_draws_are_uncorrelated_where_one_key_would_correlate_them():
    """Over 4096 steps that all reset, the transition's noise and the reset's draw are
    uncorrelated (|r| < 0.06, 4 standard errors). Drawn from ONE key they would be almost
    perfectly correlated (``normal`` maps the same uniform bits monotonically): the control."""
    from noisy_env import NoisyDrift, NoisyDriftParams

    env = NoisyDrift()
    params = NoisyDriftParams(max_steps_in_episode=1)
    n = 4096
    keys = jax.random.split(jax.random.key(13), n)
    states = jax.vmap(env.reset, in_axes=(0, None))(jax.random.split(jax.random.key(14), n), params)[1]
    _, next_states, _, _, _, info = jax.jit(jax.vmap(env.step, in_axes=(0, 0, 0, None)))(
        keys, states, jnp.zeros((n, 2)), params
    )
    for i in range(2):
        r = np.corrcoef(np.asarray(info["noise"][:, i]), np.asarray(next_states.position[:, i]))[0, 1]
        assert abs(r) < 0.06, (i, r)
    same_key_noise = jax.vmap(env.noise, in_axes=(0, None))(keys, params)
    same_key_start = jax.vmap(env.start_position, in_axes=(0, None))(keys, params)
    assert np.corrcoef(np.asarray(same_key_noise[:, 0]), np.asarray(same_key_start[:, 0]))[0, 1] > 0.9


def test_a_rollout_never_draws_the_same_numbers_twice():
    """A gymnax-style rollout (a fresh key per step) of 8 noisy envs, 60 steps, episodes of 7:
    every transition noise and every reset draw is distinct from every other, so no key was used
    for two draws, within a step, across consecutive steps or across envs."""
    from noisy_env import NoisyDrift, NoisyDriftParams

    env = NoisyDrift()
    params = NoisyDriftParams(max_steps_in_episode=7)
    rollouts = jax.jit(jax.vmap(gymnax_style_rollout, in_axes=(0, None, None, None)), static_argnums=(1, 3))
    _, _, _, _, _, next_states, terminated, truncated, info = rollouts(
        jax.random.split(jax.random.key(15), 8), env, params, 60
    )
    done = np.asarray(terminated | truncated)
    assert done.sum() >= 8 * 8
    draws = np.concatenate([np.asarray(info["noise"]).reshape(-1, 2), np.asarray(next_states.position)[done]])
    assert len({tuple(row) for row in draws.tolist()}) == len(draws)
    # Consecutive steps of one env: uncorrelated noise (lag-1 correlation over 8 x 59 pairs).
    noise = np.asarray(info["noise"][..., 0])
    assert abs(np.corrcoef(noise[:, :-1].ravel(), noise[:, 1:].ravel())[0, 1]) < 0.2


def test_a_deterministic_transition_gets_no_key():
    """``deterministic_transition`` hands ``step_env`` ``key=None``: an env that declares it and
    still draws from its key fails while tracing instead of reusing the reset's key."""
    from noisy_env import NoisyDrift

    class Mislabelled(NoisyDrift):
        deterministic_transition = True

    env = Mislabelled()
    _, state = env.reset(jax.random.key(0))
    with pytest.raises(TypeError, match="PRNG key"):
        env.step(jax.random.key(1), state, jnp.zeros(2))
    for env_id in ENV_IDS:  # the shipped deterministic envs: step_env works without a key
        env, params = diffgym.make(env_id)
        _, state = env.reset(jax.random.key(0), params)
        action = env.action_space(params).sample(jax.random.key(1))
        np.testing.assert_allclose(
            jax.jit(env.step)(jax.random.key(2), state, action, params)[5]["final_observation"],
            env.step_env(None, state, action, params)[0],
            rtol=1e-6,
        )
