"""The gymnasium shells: API conformance, parity with gymnasium's numpy envs, vector autoreset,
action validation, and one compiled call per step without retracing."""

from __future__ import annotations

import subprocess
import sys
import warnings

import gymnasium
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gymnasium.envs.classic_control.cartpole import CartPoleVectorEnv
from gymnasium.utils.env_checker import check_env

import diffgym
import diffgym.gym as dgym
from diffgym.envs.cartpole import CartPoleParams, CartPoleState
from diffgym.envs.pendulum import PendulumParams, PendulumState

ENV_IDS = ["CartPole-v1", "Pendulum-v1", "Acrobot-v1", "MountainCar-v0", "MountainCarContinuous-v0"]


def _check_env_warnings(env) -> set[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(env)
    return {str(w.message) for w in caught}


# ------------------------------------------------------------------------------------------------
# Registration
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("env_id", ENV_IDS)
def test_registered_like_gymnasium(env_id):
    ours, theirs = gymnasium.spec(f"diffgym/{env_id}"), gymnasium.spec(env_id)
    assert ours.max_episode_steps == theirs.max_episode_steps
    assert ours.reward_threshold == theirs.reward_threshold
    assert isinstance(ours.entry_point, str) and isinstance(ours.vector_entry_point, str)


def test_trebuchet_registered_one_step():
    spec = gymnasium.spec("diffgym/Trebuchet-v0")
    assert spec.max_episode_steps == 1 and spec.kwargs == {"env_id": "Trebuchet-v0"}


def test_import_is_cheap():
    """Registration reads each env's spec from its module, but imports no renderer, no pygame and
    none of the trainers' dependencies (the physics package works without them)."""
    code = (
        "import sys, diffgym, gymnasium; "
        "assert 'diffgym/CartPole-v1' in gymnasium.registry; "
        "heavy = [m for m in ('diffgym.render', 'pygame', 'tyro', 'tqdm', 'matplotlib', 'optax', 'agents') "
        "if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_unknown_id_gives_gymnasiums_error():
    with pytest.raises(gymnasium.error.NameNotFound, match="CartPole"):
        gymnasium.make("diffgym/CartPol-v1")


# ------------------------------------------------------------------------------------------------
# API conformance
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("env_id", ENV_IDS)
def test_check_env_passes_with_no_warning_beyond_gymnasiums_own(env_id):
    ours = gymnasium.make(f"diffgym/{env_id}", render_mode="rgb_array").unwrapped
    theirs = gymnasium.make(env_id, render_mode="rgb_array").unwrapped
    our_warnings = _check_env_warnings(ours)  # raises on any failed check; render modes included
    their_warnings = _check_env_warnings(theirs)
    # gymnasium warns about its own spaces (CartPole's infinite bounds, Pendulum's [-2, 2] torque):
    # the shell has the same spaces, so it must get those warnings and no others.
    assert our_warnings <= their_warnings, our_warnings - their_warnings
    ours.close()
    theirs.close()


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_spaces_dtypes_and_return_types_match_gymnasium(env_id):
    ours, theirs = gymnasium.make(f"diffgym/{env_id}"), gymnasium.make(env_id)
    assert ours.observation_space == theirs.observation_space
    assert ours.action_space == theirs.action_space
    assert ours.metadata["render_fps"] == theirs.metadata["render_fps"]
    obs, info = ours.reset(seed=0)
    assert type(obs) is np.ndarray and obs.dtype == np.float32 and obs in ours.observation_space
    assert info == {}
    ours.action_space.seed(0)
    obs, reward, terminated, truncated, info = ours.step(ours.action_space.sample())
    assert type(obs) is np.ndarray and obs.dtype == np.float32 and obs.flags.writeable
    assert type(reward) is float and type(terminated) is bool and type(truncated) is bool
    assert info == {}


def test_reset_seed_is_deterministic_and_seeds_differ():
    def rollout(env, seed):
        first, _ = env.reset(seed=seed)
        trajectory = [first]
        for t in range(30):
            obs, _, terminated, truncated, _ = env.step(t % 2)
            trajectory.append(obs)
            if terminated or truncated:
                trajectory.append(env.reset()[0])  # unseeded resets continue the seeded stream
        return np.stack(trajectory)

    env = gymnasium.make("diffgym/CartPole-v1")
    a, b, c = rollout(env, 5), rollout(env, 5), rollout(env, 6)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a[0], c[0])
    unseeded = [env.reset()[0] for _ in range(3)]
    assert not np.allclose(unseeded[0], unseeded[1])


def test_step_before_reset_raises():
    env = dgym.DiffgymEnv("CartPole-v1")
    with pytest.raises(gymnasium.error.ResetNeeded):
        env.step(0)


# ------------------------------------------------------------------------------------------------
# Action validation
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "action, quoted",
    [
        (2, "2"),
        (-1, "-1"),
        (0.5, "0.5"),
        (1.0, "1.0"),
        ("left", "'left'"),
        (None, "None"),
        (np.array([1]), "array([1])"),
        (np.array(1.0), "array(1.)"),
        (True, "True"),
    ],
)
def test_cartpole_bad_actions_raise_clearly(action, quoted):
    env = dgym.DiffgymEnv("CartPole-v1")
    env.reset(seed=0)
    before = np.asarray(jax.tree.leaves(env.state))
    with pytest.raises(ValueError) as error:
        env.step(action)
    message = str(error.value)
    assert quoted in message and "Discrete(2)" in message and "accepted" in message
    np.testing.assert_array_equal(np.asarray(jax.tree.leaves(env.state)), before)  # nothing stepped


@pytest.mark.parametrize(
    "action, quoted, reason",
    [
        (np.array([3.0], np.float32), "array([3.]", "outside the action space"),
        (np.array([-2.5]), "array([-2.5])", "outside the action space"),
        (np.array([np.nan], np.float32), "nan", "NaN or inf"),
        (np.array([np.inf]), "inf", "NaN or inf"),
        (1.0, "1.0", "shape ()"),
        (np.zeros((1, 1), np.float32), "array([[0.]]", "shape (1, 1)"),
        ("torque", "'torque'", "not a real number"),
        (np.array([1j]), "1.j", "not a real number"),
    ],
)
def test_pendulum_bad_actions_raise_clearly(action, quoted, reason):
    env = dgym.DiffgymEnv("Pendulum-v1")
    env.reset(seed=0)
    with pytest.raises(ValueError) as error:
        env.step(action)
    message = str(error.value)
    assert quoted in message and reason in message and "[-2.0, 2.0]" in message, message


@pytest.mark.parametrize(
    "action", [1, np.int64(1), np.int32(1), np.array(1), np.array(1, np.uint8), jnp.asarray(1)]
)
def test_cartpole_accepts_every_integer_form(action):
    env = dgym.DiffgymEnv("CartPole-v1")
    env.reset(seed=1)
    expected = dgym.DiffgymEnv("CartPole-v1")
    expected.reset(seed=1)
    np.testing.assert_array_equal(env.step(action)[0], expected.step(1)[0])


# ------------------------------------------------------------------------------------------------
# Parity with gymnasium's numpy envs
# ------------------------------------------------------------------------------------------------
def _cartpole_state(gym_state) -> CartPoleState:
    x, x_dot, theta, theta_dot = np.asarray(gym_state, np.float32)
    return CartPoleState(x=x, x_dot=x_dot, theta=theta, theta_dot=theta_dot, time=np.int32(0))


@pytest.mark.parametrize("seed", range(5))
def test_cartpole_episode_matches_gymnasium_from_the_same_state(seed):
    """Random actions from gymnasium's start state: same trajectory, rewards and termination step."""
    theirs, ours = gymnasium.make("CartPole-v1"), gymnasium.make("diffgym/CartPole-v1")
    their_obs, _ = theirs.reset(seed=seed)
    ours.reset(seed=seed)
    ours.unwrapped.state = _cartpole_state(theirs.unwrapped.state)
    actions = np.random.default_rng(seed).integers(0, 2, size=500)
    for t, action in enumerate(actions):
        their_step = theirs.step(int(action))
        our_step = ours.step(int(action))
        np.testing.assert_allclose(our_step[0], their_step[0], rtol=1e-4, atol=1e-5, err_msg=f"step {t}")
        assert our_step[1:4] == their_step[1:4], f"step {t}: {our_step[1:4]} != {their_step[1:4]}"
        if their_step[2] or their_step[3]:
            break
    assert t > 5  # a real episode, not a one-step one


def test_cartpole_balanced_500_step_episode_matches_gymnasium_step_by_step():
    """A balancing controller for the whole 500 steps, truncation included. The upright pole is
    unstable, so float32 and float64 drift apart exponentially; each step therefore starts the shell
    from gymnasium's state and compares one transition (the rewards, flags and obs of all 500)."""
    theirs, ours = gymnasium.make("CartPole-v1"), gymnasium.make("diffgym/CartPole-v1")
    obs, _ = theirs.reset(seed=3)
    ours.reset(seed=3)
    total = 0.0
    for t in range(500):
        state = _cartpole_state(theirs.unwrapped.state)
        ours.unwrapped.state = CartPoleState(**{**vars(state), "time": np.int32(t)})
        action = int(obs[2] + 0.5 * obs[3] + 0.05 * obs[1] > 0)
        obs, reward, terminated, truncated, _ = theirs.step(action)
        our_obs, our_reward, our_terminated, our_truncated, _ = ours.step(action)
        np.testing.assert_allclose(our_obs, obs, rtol=1e-5, atol=1e-6, err_msg=f"step {t}")
        assert (our_reward, our_terminated, our_truncated) == (reward, terminated, truncated), t
        total += our_reward
    assert truncated and not terminated and total == 500.0


def _pendulum_state(gym_env, time: int) -> PendulumState:
    theta, theta_dot = np.asarray(gym_env.unwrapped.state, np.float32)
    last_u = np.float32(gym_env.unwrapped.last_u or 0.0)
    return PendulumState(theta=theta, theta_dot=theta_dot, last_u=last_u, time=np.int32(time))


@pytest.mark.parametrize("seed", range(3))
def test_pendulum_episode_matches_gymnasium(seed):
    """Random torques over a whole 200-step episode. Free-running from gymnasium's start state, the
    first 100 steps agree to float32 rounding; after that the float32 and float64 swings drift
    apart (measured up to 3e-3 by step 185), so the whole episode is compared one transition at a
    time from gymnasium's state, with the TimeLimit truncation at 200 on both."""
    torques = np.random.default_rng(seed).uniform(-2, 2, size=(200, 1)).astype(np.float32)
    for resync in (False, True):
        theirs, ours = gymnasium.make("Pendulum-v1"), gymnasium.make("diffgym/Pendulum-v1")
        theirs.reset(seed=seed)
        ours.reset(seed=seed)
        ours.unwrapped.state = _pendulum_state(theirs, 0)
        for t, torque in enumerate(torques if resync else torques[:100]):
            if resync:
                ours.unwrapped.state = _pendulum_state(theirs, t)
            their_obs, their_reward, *their_flags, _ = theirs.step(torque)
            our_obs, our_reward, *our_flags, _ = ours.step(torque)
            atol = 1e-5 if resync else 1e-4
            np.testing.assert_allclose(our_obs, their_obs, atol=atol, err_msg=f"step {t}, resync={resync}")
            np.testing.assert_allclose(our_reward, their_reward, rtol=1e-5, atol=atol, err_msg=f"step {t}")
            assert our_flags == their_flags, t
    assert our_flags == [False, True]  # TimeLimit truncation at 200 on both


def test_state_property_round_trips_and_steps_from_the_assigned_state():
    env = dgym.DiffgymEnv("Pendulum-v1")
    env.reset(seed=0)
    state = PendulumState(
        theta=np.float32(0.3), theta_dot=np.float32(-1.0), last_u=np.float32(0.5), time=np.int32(7)
    )
    env.state = state
    for field in ("theta", "theta_dot", "last_u", "time"):
        assert float(getattr(env.state, field)) == float(getattr(state, field))
    functional, params = diffgym.make("Pendulum-v1")
    expected_obs, expected_state, expected_reward, _, _ = functional.step_env(
        jax.random.key(0), jax.tree.map(jnp.asarray, state), jnp.array([1.5]), params
    )
    obs, reward, *_ = env.step(np.array([1.5], np.float32))
    np.testing.assert_allclose(obs, expected_obs, rtol=1e-6)
    assert reward == pytest.approx(float(expected_reward), rel=1e-6)
    assert int(env.state.time) == 8
    with pytest.raises(TypeError, match="PendulumState"):
        env.state = _cartpole_state(np.zeros(4))


def test_params_are_used_by_the_shell():
    heavy = dgym.DiffgymEnv("Pendulum-v1", params=PendulumParams(g=20.0))
    light = dgym.DiffgymEnv("Pendulum-v1")
    heavy.reset(seed=0)
    light.reset(seed=0)
    action = np.zeros(1, np.float32)
    assert not np.allclose(heavy.step(action)[0], light.step(action)[0])


# ------------------------------------------------------------------------------------------------
# Speed contract: one compiled call per step, no retracing
# ------------------------------------------------------------------------------------------------
def test_no_retracing_after_the_first_step_and_kernels_are_shared():
    params = CartPoleParams(force_mag=9.5)  # params no other test uses: a fresh kernel
    env = dgym.DiffgymEnv("CartPole-v1", params=params)
    env.reset(seed=0)
    key = ("CartPole-v1", "step")
    before = dgym.trace_counts[key]
    actions = [0, 1, np.int64(1), np.int32(0), np.array(1), jnp.asarray(0, jnp.int32)]
    for t in range(60):
        _, _, terminated, _, _ = env.step(actions[t % len(actions)])
        if terminated:
            env.reset()
    assert dgym.trace_counts[key] == before + 1
    again = dgym.DiffgymEnv("CartPole-v1", params=params)  # a second shell reuses the compiled step
    again.reset(seed=1)
    again.step(1)
    assert dgym.trace_counts[key] == before + 1


def test_pendulum_no_retracing_across_action_dtypes():
    params = PendulumParams(max_speed=7.5)
    env = dgym.DiffgymEnv("Pendulum-v1", params=params)
    env.reset(seed=0)
    key = ("Pendulum-v1", "step")
    before = dgym.trace_counts[key]
    for action in ([0.5], np.array([0.5]), np.array([1], np.int64), np.array([-1.0], np.float32), (0.1,)):
        env.step(action)
    assert dgym.trace_counts[key] == before + 1


# ------------------------------------------------------------------------------------------------
# Vector env
# ------------------------------------------------------------------------------------------------
def test_make_vec_uses_the_vmapped_vector_env():
    envs = gymnasium.make_vec("diffgym/CartPole-v1", num_envs=6)
    assert isinstance(envs.unwrapped, dgym.DiffgymVectorEnv)
    reference = CartPoleVectorEnv(num_envs=6)
    assert envs.single_observation_space == reference.single_observation_space
    assert envs.observation_space == reference.observation_space
    assert envs.action_space == reference.action_space
    assert envs.metadata["autoreset_mode"] == gymnasium.vector.AutoresetMode.NEXT_STEP
    assert envs.unwrapped.max_episode_steps == 500
    envs = gymnasium.make_vec("diffgym/CartPole-v1", num_envs=6, max_episode_steps=25)
    obs, info = envs.reset(seed=0)
    assert obs.shape == (6, 4) and obs.dtype == np.float32 and info == {}


def test_vector_env_follows_gymnasiums_cartpole_vector_env():
    """Side by side with gymnasium's own CartPoleVectorEnv (NEXT_STEP autoreset, truncation at a
    short limit): the random reset draws differ, so each draw of ours is copied into gymnasium's
    state; everything else -- dynamics, rewards, flags, the reset step -- must agree."""
    num_envs, limit = 6, 25
    ours = gymnasium.make_vec("diffgym/CartPole-v1", num_envs=num_envs, max_episode_steps=limit)
    theirs = CartPoleVectorEnv(num_envs=num_envs, max_episode_steps=limit)
    obs, _ = ours.reset(seed=0)
    theirs.reset(seed=0)
    theirs.state = obs.T.astype(np.float64)
    rng = np.random.default_rng(0)
    previous_done = np.zeros(num_envs, bool)
    seen = {"terminated": 0, "truncated": 0, "reset": 0}
    for t in range(120):
        actions = rng.integers(0, 2, size=num_envs)
        obs, reward, terminated, truncated, info = ours.step(actions)
        their_obs, their_reward, their_terminated, their_truncated, _ = theirs.step(actions)
        # Where an env restarted this step, both return a fresh draw; use ours in gymnasium.
        np.testing.assert_array_equal(previous_done, theirs.steps == 0)
        theirs.state[:, previous_done] = obs[previous_done].T
        their_obs[previous_done] = obs[previous_done]
        np.testing.assert_allclose(obs, their_obs, rtol=1e-4, atol=1e-5, err_msg=f"step {t}")
        np.testing.assert_array_equal(reward, their_reward)
        np.testing.assert_array_equal(terminated, their_terminated)
        np.testing.assert_array_equal(truncated, their_truncated)
        assert np.all(np.abs(obs[previous_done]) <= 0.05)  # reset draws
        assert obs.dtype == np.float32 and reward.dtype == np.float32 and terminated.dtype == bool
        seen["terminated"] += terminated.sum()
        seen["truncated"] += truncated.sum()
        seen["reset"] += previous_done.sum()
        previous_done = terminated | truncated
    assert min(seen.values()) > 3, seen  # every branch of the autoreset was exercised


def test_vector_env_is_one_traced_call_and_truncates_pendulum():
    envs = gymnasium.make_vec("diffgym/Pendulum-v1", num_envs=3)
    key = ("Pendulum-v1", "vector_step")
    envs.reset(seed=0)
    before = dgym.trace_counts[key]
    envs.step(np.zeros((3, 1), np.float32))
    after_first_step = dgym.trace_counts[key]
    assert after_first_step <= before + 1  # 0 when another test already compiled this config
    for t in range(2, 202):
        obs, reward, terminated, truncated, _ = envs.step(np.zeros((3, 1), np.float32))
        if t < 200:
            assert not truncated.any()
        elif t == 200:
            assert truncated.all() and not terminated.any()
        else:  # the step after: reset observation, reward 0, no flags
            assert not truncated.any() and (reward == 0).all()
    assert dgym.trace_counts[key] == after_first_step


def test_vector_env_rejects_bad_actions():
    envs = gymnasium.make_vec("diffgym/CartPole-v1", num_envs=6, max_episode_steps=25)
    envs.reset(seed=0)
    for bad in (np.array([0, 1, 0, 1, 0, 2]), np.ones(6), np.array([1]), np.zeros((6, 1), int)):
        with pytest.raises(ValueError, match="accepted"):
            envs.step(bad)
    pendulum = gymnasium.make_vec("diffgym/Pendulum-v1", num_envs=3)
    pendulum.reset(seed=0)
    with pytest.raises(ValueError, match="NaN or inf"):
        pendulum.step(np.array([[0.0], [np.nan], [1.0]]))


def test_vector_reset_is_deterministic():
    envs = gymnasium.make_vec("diffgym/CartPole-v1", num_envs=6, max_episode_steps=25)
    a, _ = envs.reset(seed=9)
    b, _ = envs.reset(seed=9)
    np.testing.assert_array_equal(a, b)
    assert len({tuple(row) for row in a.tolist()}) == 6  # the envs draw different states


# ------------------------------------------------------------------------------------------------
# Trebuchet
# ------------------------------------------------------------------------------------------------
def test_trebuchet_shell_one_shot_episode():
    env = gymnasium.make("diffgym/Trebuchet-v0")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*symmetric and normalized.*")  # deg and kg bounds
        check_env(env.unwrapped, skip_render_check=True)
    obs, _ = env.reset(seed=0)
    assert obs.shape == (2,) and obs.dtype == np.float32
    assert env.action_space.shape == (2,)
    env.action_space.seed(0)
    _, reward, terminated, truncated, _ = env.step(env.action_space.sample())
    assert isinstance(reward, float) and (terminated or truncated)


# ------------------------------------------------------------------------------------------------
# Genericity: a one-shot env with a random transition and an info dict, shaped like the trebuchet
# ------------------------------------------------------------------------------------------------
from diffgym.core import Box, Environment, EnvParams, EnvState, pytree_dataclass  # noqa: E402


@pytree_dataclass
class ShotState(EnvState):
    target_m: jax.Array
    wind_m_s: jax.Array
    time: jax.Array


@pytree_dataclass
class ShotParams(EnvParams):
    noise_m: float = 2.0
    max_steps_in_episode: int = 1


class NoisyShot(Environment):
    """One shot at a target: landing = angle (deg) + counterweight / 10 (kg) + wind + noise (m)."""

    deterministic_transition = False

    @property
    def default_params(self):
        return ShotParams()

    def reset_env(self, key, params):
        low, high = jnp.array([50.0, -5.0]), jnp.array([150.0, 5.0])
        target, wind = jax.random.uniform(key, (2,), minval=low, maxval=high)
        state = ShotState(target_m=target, wind_m_s=wind, time=jnp.zeros((), jnp.int32))
        return self.get_obs(state), state

    def get_obs(self, state, params=None, key=None):
        return jnp.stack([state.target_m, state.wind_m_s])

    def step_env(self, key, state, action, params):
        landing = action[0] + action[1] / 10 + state.wind_m_s + params.noise_m * jax.random.normal(key)
        next_state = ShotState(target_m=state.target_m, wind_m_s=state.wind_m_s, time=state.time + 1)
        reward = -jnp.abs(landing - state.target_m)
        hit = jnp.abs(landing - state.target_m) < 1.0
        info = {"landing_m": landing, "hit": hit, "discount": jnp.zeros(())}
        return self.get_obs(next_state), next_state, reward, jnp.ones((), bool), info

    def is_terminated(self, state, params):
        return state.time >= 1

    @property
    def name(self):
        return "NoisyShot-v0"

    def action_space(self, params=None):
        return Box(jnp.array([10.0, 50.0]), jnp.array([80.0, 500.0]), (2,), jnp.float32)

    def observation_space(self, params=None):
        return Box(jnp.array([50.0, -5.0]), jnp.array([150.0, 5.0]), (2,), jnp.float32)


def test_generic_shell_random_transition_and_info():
    env = dgym.DiffgymEnv(NoisyShot())
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*symmetric and normalized.*")  # bounds in deg and kg
        check_env(env, skip_render_check=True)
    action = np.array([45.0, 300.0], np.float32)
    obs, _ = env.reset(seed=4)
    _, reward, terminated, truncated, info = env.step(action)
    assert terminated and not truncated and set(info) == {"landing_m", "hit"}
    assert isinstance(info["landing_m"], np.float32) and isinstance(info["hit"], np.bool_)
    assert reward == pytest.approx(-abs(float(info["landing_m"]) - obs[0]), abs=1e-4)
    # The noise comes from the shell's key: reproducible under a seed, fresh on every shot.
    landings = []
    for seed in (4, 4, None, None):
        obs_again, _ = env.reset(seed=seed)
        landings.append(float(env.step(action)[4]["landing_m"]))
    assert landings[0] == landings[1] == float(info["landing_m"])
    assert len(set(landings[1:])) == 3
    with pytest.raises(ValueError, match=r"low=\[10.0, 50.0\], high=\[80.0, 500.0\]"):
        env.step(np.array([45.0, 600.0], np.float32))


def test_generic_vector_env_one_shot_episodes():
    envs = dgym.DiffgymVectorEnv(NoisyShot(), num_envs=4, max_episode_steps=1)
    envs.reset(seed=0)
    actions = np.tile(np.array([45.0, 300.0], np.float32), (4, 1))
    _, reward, terminated, truncated, _ = envs.step(actions)
    assert terminated.all() and truncated.all() and (reward < 0).all()
    assert len(set(reward.tolist())) == 4  # independent noise per env
    _, reward, terminated, truncated, _ = envs.step(actions)  # NEXT_STEP: the reset step
    assert (reward == 0).all() and not terminated.any() and not truncated.any()


# ------------------------------------------------------------------------------------------------
# Keys: the shells never feed one key to two draws (a noisy env: tests/noisy_env.py)
# ------------------------------------------------------------------------------------------------
def test_shell_steps_draw_from_a_fresh_split_key_every_step():
    """The single-env shell splits its carried key on every step and gives step_env the second
    half: each step's noise is ``noise(split(carried key)[1])``, and no two steps draw alike."""
    from noisy_env import NoisyDrift

    functional = NoisyDrift()
    params = functional.default_params
    env = dgym.DiffgymEnv(functional)
    env.reset(seed=0)
    zero = np.zeros(2, np.float32)
    noises = []
    for _ in range(200):
        carried_key, _ = env._kernels.get_carry(env._buffer)
        _, _, terminated, _, info = env.step(zero)
        expected = functional.noise(jax.random.split(carried_key)[1], params)
        np.testing.assert_allclose(info["noise"], expected, rtol=1e-6)
        assert not np.allclose(info["noise"], functional.noise(carried_key, params))
        noises.append(info["noise"])
        if terminated:
            env.reset()
    noises = np.stack(noises)
    assert len({tuple(row) for row in noises.tolist()}) == len(noises)
    assert abs(np.corrcoef(noises[:-1, 0], noises[1:, 0])[0, 1]) < 0.25  # consecutive steps
    # Reproducible under a seed, and the reset's draw is not the first step's noise (other keys).
    again = dgym.DiffgymEnv(functional)
    again.reset(seed=0)
    np.testing.assert_array_equal(again.step(zero)[4]["noise"], noises[0])
    starts, firsts = [], []
    for seed in range(150):
        starts.append(again.reset(seed=seed)[0])
        firsts.append(again.step(zero)[4]["noise"])
    r = np.corrcoef(np.stack(starts)[:, 0], np.stack(firsts)[:, 0])[0, 1]
    assert abs(r) < 0.35, r  # 4 standard errors over 150 seeds; one shared key gives r > 0.9


def test_vector_shell_draws_are_all_distinct_across_envs_steps_and_resets():
    """16 noisy envs, 40 steps with zero actions, episodes of 6 steps (NEXT_STEP autoreset):
    every env's noise on every step and every reset draw differs from every other draw."""
    from noisy_env import NoisyDrift

    num_envs = 16
    envs = dgym.DiffgymVectorEnv(NoisyDrift(), num_envs=num_envs, max_episode_steps=6)
    obs, _ = envs.reset(seed=3)
    draws = [obs]  # the first reset draws
    previous_done = np.zeros(num_envs, bool)
    for _ in range(40):
        next_obs, _, terminated, truncated, _ = envs.step(np.zeros((num_envs, 2), np.float32))
        # A restarted env returns its reset draw; every other env moved by its noise alone.
        draws.append(np.where(previous_done[:, None], next_obs, next_obs - obs))
        obs, previous_done = next_obs, terminated | truncated
    draws = np.concatenate(draws)
    assert len({tuple(row) for row in draws.tolist()}) == len(draws)


def test_shells_give_a_deterministic_transition_no_key():
    """A transition declared deterministic gets ``key=None`` in the shells too, so an env that
    draws from it anyway fails when the step is traced instead of drawing from a constant key."""
    from noisy_env import NoisyDrift

    class Mislabelled(NoisyDrift):
        deterministic_transition = True

    with pytest.raises(TypeError, match="PRNG key"):
        dgym.DiffgymEnv(Mislabelled())
    envs = dgym.DiffgymVectorEnv(Mislabelled(), num_envs=2)
    envs.reset(seed=0)
    with pytest.raises(TypeError, match="PRNG key"):
        envs.step(np.zeros((2, 2), np.float32))


def test_word_layout_round_trips_keys_of_every_implementation():
    """Keys are stored as their key data and rebuilt with their own implementation (public
    ``jax.random`` API only), from a layout built on ``jax.eval_shape`` structs."""
    for impl in ("threefry2x32", "rbg", "unsafe_rbg"):
        keys = jax.random.split(jax.random.key(7, impl=impl), 3)
        tree = {"keys": keys, "x": jnp.arange(3.0), "flag": jnp.array([True, False, True])}
        layout = dgym._WordLayout(jax.eval_shape(lambda: tree))
        words = jax.jit(layout.pack)(tree)
        assert words.dtype == jnp.uint32 and words.shape == (layout.size,)
        back = jax.jit(layout.unpack)(words)
        assert jax.random.key_impl(back["keys"]) == jax.random.key_impl(keys)
        np.testing.assert_array_equal(jax.random.key_data(back["keys"]), jax.random.key_data(keys))
        np.testing.assert_array_equal(back["x"], tree["x"])
        np.testing.assert_array_equal(back["flag"], tree["flag"])


# ------------------------------------------------------------------------------------------------
# Stable-Baselines3, the main consumer of the shell
# ------------------------------------------------------------------------------------------------
def test_stable_baselines3_accepts_the_shells():
    sb3_env_checker = pytest.importorskip("stable_baselines3.common.env_checker")
    from stable_baselines3.common.env_util import make_vec_env

    for env_id in ENV_IDS:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sb3_env_checker.check_env(gymnasium.make(f"diffgym/{env_id}"))
        # SB3 only recommends a [-1, 1] torque box for Pendulum, as it does for gymnasium's own.
        assert all("symmetric and normalized" in str(w.message) for w in caught), [str(w.message) for w in caught]
    envs = make_vec_env("diffgym/CartPole-v1", n_envs=2, seed=0)
    envs.reset()
    finished = 0
    for _ in range(60):
        obs, rewards, dones, infos = envs.step(np.array([1, 1]))
        for done, info in zip(dones, infos):
            if done:
                finished += 1
                assert info["terminal_observation"].shape == (4,) and "episode" in info
    assert obs.dtype == np.float32 and finished >= 2
