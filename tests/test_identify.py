"""diffgym.identify: physical parameters back from logged gymnasium data, measured.

* Noise-free: 200 steps of gymnasium's numpy CartPole (masspole 0.3, length 0.8 set on
  ``env.unwrapped``, derived constants recomputed) and Pendulum (m, l, g changed), logged as a
  user would (several episodes, float32 observations), recovered from diffgym's defaults to 1e-6
  relative (the goal is 1e-3), the compiled fit in well under 1 s.
* Noise: the reported standard errors cover the truth (|error| < 3 SE) in most noisy repeats.
* Identifiability: CartPole's masses and force scaled together, and the Pendulum's m, l, g, are
  flagged as unidentifiable directions with infinite standard errors.
* Data layouts (lists, batches, flat logs with episode starts, ``.npz``), multi-step horizons,
  any environment (a user's own, with ``state_from_obs`` passed and a step that has no JVP),
  the generic ``fit_function``, and the errors.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gymnasium.envs.classic_control.cartpole import CartPoleEnv
from gymnasium.envs.classic_control.pendulum import PendulumEnv

import diffgym
from diffgym.core import Box, Environment, EnvParams, EnvState, pytree_dataclass
from diffgym.identify import (
    fit_function, identify, load_episodes, record_episodes, save_episodes, split_episodes,
)  # fmt: skip

CARTPOLE, CARTPOLE_DEFAULTS = diffgym.make("CartPole-v1")
PENDULUM, PENDULUM_DEFAULTS = diffgym.make("Pendulum-v1")
CARTPOLE_TRUE = {"masspole": 0.3, "length": 0.8}
PENDULUM_TRUE = {"m": 1.3, "l": 0.7, "g": 9.0}


@pytest.fixture(scope="module")
def cartpole_log():
    env = CartPoleEnv()
    env.masspole, env.length = CARTPOLE_TRUE["masspole"], CARTPOLE_TRUE["length"]
    env.total_mass = env.masspole + env.masscart  # gymnasium stores these derived constants
    env.polemass_length = env.masspole * env.length
    return record_episodes(env, lambda rng: int(rng.integers(2)), 200, seed=0)


@pytest.fixture(scope="module")
def pendulum_log():
    env = PendulumEnv(g=PENDULUM_TRUE["g"])
    env.m, env.l = PENDULUM_TRUE["m"], PENDULUM_TRUE["l"]
    return record_episodes(env, lambda rng: rng.uniform(-2, 2, (1,)).astype(np.float32), 200, seed=0)


def relative_error(fitted, truth: dict) -> float:
    return max(abs(getattr(fitted, name) / value - 1) for name, value in truth.items())


# --------------------------------------------------------------------------------------------
# Noise-free recovery
# --------------------------------------------------------------------------------------------
def test_cartpole_masspole_and_length_from_gymnasium_episodes(cartpole_log):
    observations, actions = cartpole_log
    assert len(observations) >= 3 and sum(len(a) for a in actions) == 200  # boundaries crossed
    assert observations[0].dtype == np.float32
    fitted, report = identify(CARTPOLE, observations, actions, CARTPOLE_DEFAULTS, fit=("masspole", "length"))
    assert relative_error(fitted, CARTPOLE_TRUE) < 1e-6, report.summary()
    assert isinstance(fitted, type(CARTPOLE_DEFAULTS)) and fitted.masscart == CARTPOLE_DEFAULTS.masscart
    assert report.converged and report.jacobian == "fwd" and not report.unidentifiable
    assert (
        report.num_windows == 200 and report.num_episodes == len(observations) and report.num_residuals == 800
    )
    history = report.loss_history
    assert (
        len(history) == report.iterations + 1
        and np.all(np.diff(history) <= 0)
        and history[-1] < 1e-8 * history[0]
    )
    # A second fit from another start (data of the same shapes) reuses the compiled solve.
    start = dataclasses.replace(CARTPOLE_DEFAULTS, masspole=0.2, length=1.0)
    fitted, again = identify(CARTPOLE, observations, actions, start, fit=("masspole", "length"))
    assert again.compile_seconds == 0.0 and again.solve_seconds < 1.0
    assert relative_error(fitted, CARTPOLE_TRUE) < 1e-6 and again.initial == {"masspole": 0.2, "length": 1.0}


def test_pendulum_m_and_l_from_gymnasium_with_g_known(pendulum_log):
    observations, actions = pendulum_log
    init = dataclasses.replace(PENDULUM_DEFAULTS, g=PENDULUM_TRUE["g"])
    fitted, report = identify(PENDULUM, observations, actions, init, fit=("m", "l"))
    assert relative_error(fitted, {"m": 1.3, "l": 0.7}) < 1e-6, report.summary()
    assert report.solve_seconds < 1.0 and report.converged
    # Multi-step windows (here 5 transitions simulated from each observation) fit as well.
    fitted, report = identify(PENDULUM, observations, actions, init, fit=("m", "l"), horizon=5)
    assert relative_error(fitted, {"m": 1.3, "l": 0.7}) < 1e-6, report.summary()
    assert report.num_windows == 196 and report.num_residuals == 196 * 5 * 3


# --------------------------------------------------------------------------------------------
# Noise and the uncertainty estimate
# --------------------------------------------------------------------------------------------
def test_standard_errors_cover_the_truth_under_observation_noise(cartpole_log):
    observations, actions = cartpole_log
    rng = np.random.default_rng(1)
    sigma = 1e-3
    covered, errors, standard_errors = [], [], []
    for _ in range(20):
        noisy = [o + sigma * rng.standard_normal(o.shape) for o in observations]
        fitted, report = identify(CARTPOLE, noisy, actions, CARTPOLE_DEFAULTS, fit=("masspole", "length"))
        assert report.compile_seconds == 0.0  # same shapes as the noise-free fit: compiled once
        for name, value in CARTPOLE_TRUE.items():
            error = getattr(fitted, name) - value
            covered.append(abs(error) < 3 * report.standard_errors[name])
            errors.append(error / value)
            standard_errors.append(report.standard_errors[name] / value)
    assert np.mean(covered) >= 0.9, np.mean(covered)
    # Noise makes the fit worse but it stays informative: errors of a few SE, SE well below 10 %.
    assert 1e-4 < np.median(np.abs(errors)) < 0.05 and np.max(standard_errors) < 0.1
    assert report.residual_std == pytest.approx(sigma * np.sqrt(2), rel=0.5)  # the noise of two observations


def test_fit_function_standard_errors_are_calibrated_on_independent_noise():
    """With independent residuals (noise on the outputs only), |error| / SE is a standard normal."""
    t = np.linspace(0.0, 3.0, 60)

    @pytree_dataclass
    class DecayCurve(EnvParams):
        amplitude: float = 1.0
        rate: float = 1.0

    def predict(params, times):
        return params.amplitude * jnp.exp(-params.rate * times)

    rng = np.random.default_rng(0)
    z = []
    for _ in range(40):
        data = 2.0 * np.exp(-0.7 * t) + 0.01 * rng.standard_normal(t.shape)
        fitted, report = fit_function(predict, t, data, DecayCurve(), fit=("amplitude", "rate"))
        z.append((fitted.rate - 0.7) / report.standard_errors["rate"])
    assert 0.7 < np.std(z) < 1.3 and np.mean(np.abs(np.array(z)) < 3) >= 0.95


# --------------------------------------------------------------------------------------------
# Identifiability
# --------------------------------------------------------------------------------------------
def test_cartpole_masses_and_force_only_enter_as_ratios(cartpole_log):
    observations, actions = cartpole_log
    truth = dataclasses.replace(CARTPOLE_DEFAULTS, **CARTPOLE_TRUE)
    fit = ("masscart", "masspole", "force_mag")
    fitted, report = identify(
        CARTPOLE, observations, actions, dataclasses.replace(truth, masscart=1.5), fit=fit
    )
    assert len(report.unidentifiable) == 1 and report.condition_number > 1e20
    direction = report.unidentifiable[0]
    np.testing.assert_allclose([direction[n] for n in fit], [3**-0.5] * 3, atol=1e-6)
    assert all(np.isinf(report.standard_errors[n]) for n in fit)
    assert "unidentifiable" in report.summary()
    # The data are still predicted: the ratios are right even though the values are not.
    assert report.loss < 1e-10
    ratio = fitted.force_mag / (fitted.masscart + fitted.masspole)
    assert ratio == pytest.approx(10.0 / 1.3, rel=1e-6) and fitted.masscart != pytest.approx(1.0, rel=1e-3)


def test_pendulum_m_l_g_together_are_not_identifiable(pendulum_log):
    observations, actions = pendulum_log
    fitted, report = identify(PENDULUM, observations, actions, PENDULUM_DEFAULTS, fit=("m", "l", "g"))
    (direction,) = report.unidentifiable
    # Only g / l and m l^2 act: moving log m by 2 and log l, log g by -1 each changes nothing.
    np.testing.assert_allclose(
        [direction[n] for n in ("m", "l", "g")], np.array([2, -1, -1]) / 6**0.5, atol=1e-6
    )
    assert fitted.g / fitted.l == pytest.approx(9.0 / 0.7, rel=1e-6)
    assert fitted.m * fitted.l**2 == pytest.approx(1.3 * 0.49, rel=1e-6)
    assert np.isnan(report.correlation).all() and all(np.isinf(v) for v in report.standard_errors.values())


# --------------------------------------------------------------------------------------------
# Data layouts, any environment, errors
# --------------------------------------------------------------------------------------------
def test_data_layouts_give_the_same_transitions(cartpole_log, tmp_path):
    observations, actions = cartpole_log
    episodes = split_episodes(observations, actions, obs_shape=(4,))
    path = tmp_path / "log.npz"
    save_episodes(path, observations, actions)
    logged = load_episodes(path)
    assert logged["observations"].shape == (200 + len(observations), 4) and logged[
        "episode_starts"
    ].sum() == len(observations)
    flat = split_episodes(**logged, obs_shape=(4,))
    assert len(flat) == len(episodes)
    for (o1, a1), (o2, a2) in zip(episodes, flat):
        np.testing.assert_array_equal(o1, o2)
        np.testing.assert_array_equal(a1, a2)
    fitted, _ = identify(CARTPOLE, **logged, init_params=CARTPOLE_DEFAULTS, fit=("masspole", "length"))
    assert relative_error(fitted, CARTPOLE_TRUE) < 1e-6
    # One episode as arrays, and a batch of equal-length episodes.
    single = split_episodes(observations[0], actions[0], obs_shape=(4,))
    assert len(single) == 1 and single[0][0].shape == observations[0].shape
    batch = split_episodes(np.stack([observations[0]] * 3), np.stack([actions[0]] * 3), obs_shape=(4,))
    assert len(batch) == 3
    with pytest.raises(ValueError, match="T\\+1 observations"):
        split_episodes([observations[0]], [actions[0][:-1]], obs_shape=(4,))


@pytree_dataclass
class DecayState(EnvState):
    level: jax.Array
    time: jax.Array


@pytree_dataclass
class DecayParams(EnvParams):
    rate: float = 0.5
    gain: float = 1.0
    max_steps_in_episode: int = 50


@jax.custom_vjp
def _decay(level, rate, gain, action):
    return level * jnp.exp(-rate) + gain * action


def _decay_fwd(level, rate, gain, action):
    value = _decay(level, rate, gain, action)
    return value, (level, rate)


def _decay_bwd(residuals, g):
    level, rate = residuals
    return g * jnp.exp(-rate), -g * level * jnp.exp(-rate), g * 0.0, g * 0.0  # gain, action: not needed here


_decay.defvjp(_decay_fwd, _decay_bwd)


class Decay(Environment[DecayState, DecayParams]):
    """A user's own env whose step is a custom_vjp (no JVP) and that has no state_from_obs."""

    deterministic_transition = True

    @property
    def default_params(self):
        return DecayParams()

    def step_env(self, key, state, action, params):
        level = _decay(state.level, params.rate, params.gain, jnp.reshape(action, ()))
        next_state = DecayState(level=level, time=state.time + 1)
        return jnp.reshape(level, (1,)), next_state, -level, jnp.zeros((), bool), {}

    def observation_space(self, params=None):
        return Box(-jnp.inf, jnp.inf, (1,))


def test_any_environment_with_state_from_obs_passed_and_reverse_mode_fallback():
    env = Decay()
    truth = DecayParams(rate=0.3)
    level, observations = 2.0, [[2.0]]
    for _ in range(30):
        level = level * np.exp(-truth.rate)
        observations.append([level])
    actions = np.zeros((30,))

    def state_from_obs(obs, params):
        return DecayState(level=obs[0], time=jnp.zeros((), jnp.int32))

    with pytest.raises(TypeError, match="no state_from_obs"):
        identify(env, np.array(observations), actions, fit=("rate",))
    fitted, report = identify(
        env, np.array(observations), actions, fit=("rate",), state_from_obs=state_from_obs
    )
    assert report.jacobian == "bwd" and fitted.rate == pytest.approx(0.3, rel=1e-8)


def test_errors_name_what_was_given_and_what_is_accepted(cartpole_log):
    observations, actions = cartpole_log
    with pytest.raises(ValueError, match="no parameter 'masspol'.*Did you mean 'masspole'"):
        identify(CARTPOLE, observations, actions, fit=("masspol",))
    with pytest.raises(TypeError, match="max_steps_in_episode.*not a real-valued parameter"):
        identify(CARTPOLE, observations, actions, fit=("max_steps_in_episode",))
    with pytest.raises(ValueError, match="must start positive"):
        identify(
            CARTPOLE,
            observations,
            actions,
            dataclasses.replace(CARTPOLE_DEFAULTS, masspole=0.0),
            fit=("masspole",),
        )
    with pytest.raises(ValueError, match="no episode has 500 steps"):
        identify(CARTPOLE, observations, actions, fit=("masspole",), horizon=500)
    with pytest.raises(TypeError, match="sequence of parameter names"):
        identify(CARTPOLE, observations, actions, fit="masspole")
    with pytest.raises(ValueError, match="jac must be"):
        identify(CARTPOLE, observations, actions, fit=("masspole",), jac="central")


# --------------------------------------------------------------------------------------------
# The classic-control envs added since: the same call, gymnasium's own envs with other constants
# --------------------------------------------------------------------------------------------
def _acrobot_real():
    from gymnasium.envs.classic_control.acrobot import AcrobotEnv

    env = AcrobotEnv()
    env.LINK_MASS_1, env.LINK_MASS_2 = 1.4, 0.8  # class constants, shadowed on the instance
    return env, {"link_mass_1": 1.4, "link_mass_2": 0.8}, lambda rng: int(rng.integers(3))


def _mountain_car_real():
    from gymnasium.envs.classic_control.mountain_car import MountainCarEnv

    env = MountainCarEnv()
    env.force, env.gravity = 0.0012, 0.0022
    return env, {"force": 0.0012, "gravity": 0.0022}, lambda rng: int(rng.integers(3))


def _mountain_car_continuous_real():
    from gymnasium.envs.classic_control.continuous_mountain_car import Continuous_MountainCarEnv

    env = Continuous_MountainCarEnv()
    env.power = 0.0018  # gymnasium's gravity here is a literal 0.0025, so the power alone
    return env, {"power": 0.0018}, lambda rng: rng.uniform(-1, 1, (1,)).astype(np.float32)


@pytest.mark.parametrize(
    ("env_id", "real"),
    [("Acrobot-v1", _acrobot_real), ("MountainCar-v0", _mountain_car_real),
     ("MountainCarContinuous-v0", _mountain_car_continuous_real)],
)  # fmt: skip
def test_classic_control_constants_from_gymnasium_episodes(env_id, real):
    """200 random-action steps of gymnasium's own env with changed constants, from diffgym's
    defaults: recovered to the goal's 1e-3 (measured: 1e-8 to 1.5e-6 in 7-15 steps)."""
    gym_env, truth, policy = real()
    observations, actions = record_episodes(gym_env, policy, 200, seed=0)
    env, defaults = diffgym.make(env_id)
    fitted, report = identify(env, observations, actions, defaults, fit=tuple(truth))
    error = relative_error(fitted, truth)
    print(f"\n{env_id}: {({name: getattr(fitted, name) for name in truth})}, error {error:.1e}, {report.iterations} steps")
    assert error < 1e-3, (fitted, truth)
    assert report.converged and report.unidentifiable == ()
    assert all(np.isfinite(report.standard_errors[name]) for name in truth)
