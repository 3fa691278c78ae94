"""diffgym.gymnax_compat: diffgym's envs through gymnax's own wrappers (gymnax 1.0.1, the bench venv).

Runs where gymnax is installed (``make .venv-bench/.installed``, then
``.venv-bench/bin/python -m pytest tests/test_gymnax_compat.py``); skipped in the project's .venv.
"""

import subprocess
import sys

import numpy as np
import pytest

gymnax = pytest.importorskip("gymnax")

import gymnasium  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from gymnax.environments import spaces as gymnax_spaces  # noqa: E402
from gymnax.environments.environment import Environment as GymnaxEnvironmentBase  # noqa: E402
from gymnax.wrappers import GymnaxToGymWrapper, StickyActionWrapper  # noqa: E402
from gymnax.wrappers.purerl import FlattenObservationWrapper, LogWrapper  # noqa: E402

import diffgym  # noqa: E402
from diffgym.gymnax_compat import GymnaxEnvironment, make, to_gymnax, to_gymnax_space  # noqa: E402

ENV_IDS = diffgym.registered_envs()


def test_import_diffgym_does_not_import_gymnax():
    code = (
        "import sys, diffgym, diffgym.gym; "
        "assert not {'gymnax', 'diffgym.gymnax_compat'} & set(sys.modules), sys.modules.keys()"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------------------------------------
# Spaces
# ------------------------------------------------------------------------------------------------
def test_spaces_convert_to_gymnax_spaces_with_the_same_bounds_and_dtypes():
    discrete = to_gymnax_space(diffgym.Discrete(3))
    assert isinstance(discrete, gymnax_spaces.Discrete)
    assert (discrete.n, discrete.shape, discrete.dtype) == (3, (), jnp.int32)
    box = diffgym.Box(-1.0, jnp.array([1.0, jnp.inf]), (2,))
    converted = to_gymnax_space(box)
    assert isinstance(converted, gymnax_spaces.Box)
    assert converted.shape == (2,) and converted.dtype == jnp.float32
    np.testing.assert_array_equal(converted.low, [-1.0, -1.0])
    np.testing.assert_array_equal(converted.high, [1.0, np.inf])
    assert to_gymnax_space(converted) is converted
    uniform = to_gymnax_space(diffgym.Box(-2.0, 2.0, (1,)))  # bounds as scalars, as gymnax's Pendulum
    assert uniform.shape == (1,) and np.shape(uniform.low) == np.shape(uniform.high) == ()
    assert (float(uniform.low), float(uniform.high)) == (-2.0, 2.0)
    with pytest.raises(TypeError, match="gymnasium.spaces.discrete.Discrete|of type Discrete"):
        to_gymnax_space(gymnasium.spaces.Discrete(2))


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_adapted_env_is_a_gymnax_environment_with_gymnax_spaces(env_id):
    env, params = make(env_id)
    assert isinstance(env, GymnaxEnvironment) and isinstance(env, GymnaxEnvironmentBase)
    assert env.name == env_id and params == diffgym.make(env_id)[1]
    assert isinstance(env.action_space(params), (gymnax_spaces.Discrete, gymnax_spaces.Box))
    assert isinstance(env.observation_space(params), gymnax_spaces.Box)
    # gymnax's own conversion gives the spaces of diffgym's gymnasium shell.
    shell = gymnasium.make(f"diffgym/{env_id}")
    assert gymnax_spaces.gymnax_space_to_gym_space(env.action_space(params)) == shell.action_space
    assert gymnax_spaces.gymnax_space_to_gym_space(env.observation_space(params)) == shell.observation_space
    shell.close()


def test_make_passes_physics_keywords_and_to_gymnax_rejects_other_objects():
    env, params = make("pendulum", g=9.81)
    assert params.g == 9.81 and env.diffgym_env.name == "Pendulum-v1"
    assert to_gymnax(env).diffgym_env is env.diffgym_env  # adapting twice adapts once
    with pytest.raises(TypeError, match="expects a diffgym Environment.*got 'CartPole-v1' of type str"):
        to_gymnax("CartPole-v1")


# ------------------------------------------------------------------------------------------------
# The adapter's dynamics are diffgym's
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("env_id", ["CartPole-v1", "Pendulum-v1"])
def test_reset_and_step_equal_the_diffgym_envs(env_id):
    adapted, params = make(env_id)
    env = adapted.diffgym_env
    keys = jax.random.split(jax.random.key(0), 3)
    obs, state = adapted.reset(keys[0], params)
    expected_obs, expected_state = jax.jit(env.reset)(keys[0], params)
    np.testing.assert_array_equal(obs, expected_obs)
    action = adapted.action_space(params).sample(keys[1])
    got = adapted.step(keys[2], state, action, params)
    expected = jax.jit(env.step)(keys[2], expected_state, action, params)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(a, b)


def test_transitions_keep_diffgyms_gradients():
    adapted, params = make("Pendulum-v1")
    assert adapted.transition_gradients_enabled
    _, state = adapted.reset(jax.random.key(0), params)

    def next_theta_dot(torque, env):
        return env.step_env(jax.random.key(1), state, torque, params)[1].theta_dot

    grad = jax.grad(next_theta_dot)(jnp.array([0.5]), adapted)
    expected = jax.grad(next_theta_dot)(jnp.array([0.5]), adapted.diffgym_env)
    assert float(grad[0]) != 0.0
    np.testing.assert_array_equal(grad, expected)


# ------------------------------------------------------------------------------------------------
# gymnax's wrappers
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("env_id", ["CartPole-v1", "Pendulum-v1"])
def test_gymnax_to_gym_wrapper_steps(env_id):
    env, params = make(env_id)
    gym_env = GymnaxToGymWrapper(env, params, seed=0)
    assert isinstance(gym_env.action_space, (gymnasium.spaces.Discrete, gymnasium.spaces.Box))
    obs, _ = gym_env.reset(seed=1)
    assert gym_env.observation_space.contains(np.asarray(obs))
    gym_env.action_space.seed(0)
    for _ in range(5):
        obs, reward, _, _, info = gym_env.step(gym_env.action_space.sample())
        assert gym_env.observation_space.contains(np.asarray(obs))
        assert np.isfinite(float(reward)) and "final_observation" in info


def test_sticky_action_wrapper_replays_the_previous_action_on_cartpole():
    env, params = make("CartPole-v1")
    keys = jax.random.split(jax.random.key(0), 20)
    # Probability 1: the first executed action (0, the wrapper's initial one) is replayed forever.
    sticky = StickyActionWrapper(env, sticky_action_prob=1.0)
    obs, state = sticky.reset(keys[0], params)
    plain_state = state.env_state
    for key in keys[1:]:
        obs, state, *_ = sticky.step(key, state, 1, params)
        # The wrapper splits the key into a replay draw and the step key; step with the same.
        plain_obs, plain_state, *_ = env.step(jax.random.split(key)[1], plain_state, 0, params)
        np.testing.assert_array_equal(obs, plain_obs)
        assert int(state.last_action) == 0
    # Probability 0: the requested action is executed.
    sticky = StickyActionWrapper(env, sticky_action_prob=0.0)
    _, state = sticky.reset(keys[0], params)
    _, state, *_ = sticky.step(keys[1], state, 1, params)
    assert int(state.last_action) == 1
    # A continuous action space is refused, as gymnax refuses its own Pendulum.
    with pytest.raises(ValueError, match="requires a Discrete action space"):
        StickyActionWrapper(make("Pendulum-v1")[0])


def test_log_and_flatten_observation_wrappers_report_batched_episodes():
    env, params = make("CartPole-v1")
    wrapped = LogWrapper(FlattenObservationWrapper(env))
    assert wrapped.observation_space(params).shape == (4,)
    batch, steps = 8, 100

    @jax.jit
    def rollout(key):
        reset_key, scan_key = jax.random.split(key)
        _, state = jax.vmap(wrapped.reset, in_axes=(0, None))(jax.random.split(reset_key, batch), params)

        def step(state, key):
            action_key, step_key = jax.random.split(key)
            action = jax.random.randint(action_key, (batch,), 0, 2)  # a random policy: short episodes
            _, state, reward, terminated, truncated, info = jax.vmap(wrapped.step, in_axes=(0, 0, 0, None))(
                jax.random.split(step_key, batch), state, action, params
            )
            return state, (reward, terminated | truncated, info)

        return jax.lax.scan(step, state, jax.random.split(scan_key, steps))[1]

    rewards, done, info = jax.tree.map(np.asarray, rollout(jax.random.key(0)))
    assert info["final_observation"].shape == (steps, batch, 4)
    np.testing.assert_array_equal(info["returned_episode"], done)
    # Each finished episode's length and return, counted here from the rewards and done flags.
    episodes = 0
    for b in range(batch):
        start = 0
        for t in np.flatnonzero(done[:, b]):
            assert info["returned_episode_lengths"][t, b] == t + 1 - start
            episode_return = rewards[start : t + 1, b].sum()
            np.testing.assert_allclose(info["returned_episode_returns"][t, b], episode_return)
            start, episodes = t + 1, episodes + 1
        assert info["returned_episode_valid"][-1, b] == (start > 0)
    assert episodes >= batch  # a random CartPole episode lasts about 20 steps
