"""LotkaVolterra-v0: the diffrax-integrated predator-prey env, measured.

* Against a high-accuracy reference (scipy's DOP853 at rtol = atol = 1e-12, float64) over a
  harvested episode: the error follows the env's tolerances.
* Gradients (float64) with respect to the state, the harvest and every rate, against central
  finite differences; where the harvest is clipped the gradient is 0; ``jit(vmap(grad))``
  composes; forward mode needs ``adjoint=diffrax.ForwardMode()`` as documented.
* The seed example: ``p = [2.2, 1.0, 2.0, 0.4]``, ``u0 = [1, 1]``, ``t`` in [0, 10] sampled every
  0.1: ``identify`` recovers p from the default rates; the loss-driven fit of the original
  example (``sum (x - 1)^2``, Adam 0.1, 100 iterations) converges.
* gymnasium's ``check_env`` through ``gymnasium.make("diffgym/LotkaVolterra-v0")``, the registry,
  the task and the renderer.
"""

from __future__ import annotations

import dataclasses
import warnings

import diffrax
import gymnasium
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from gymnasium.utils.env_checker import check_env
from scipy.integrate import solve_ivp

import diffgym
from diffgym.envs.lotka_volterra import (
    LotkaVolterra,
    LotkaVolterraParams,
    LotkaVolterraState,
    LotkaVolterraTask,
)
from diffgym.identify import identify

RATES = ("prey_growth_rate", "predation_rate", "predator_death_rate", "predator_growth_rate")
#: The seed example's parameters [alpha, beta, gamma, delta] (predator death 2.0, growth 0.4).
SEED_RATES = (2.2, 1.0, 2.0, 0.4)
SEED_PARAMS = LotkaVolterraParams(**dict(zip(RATES, SEED_RATES)), initial_spread=0.0)
STEPS = 100  # t in [0, 10] at dt = 0.1


def with_rates(params, rates):
    return dataclasses.replace(params, **{name: rates[i] for i, name in enumerate(RATES)})


def rollout(env, params, populations, actions):
    """Observations ``(T+1, 2)`` of ``step_env`` from ``populations`` under ``actions`` ``(T, 2)``."""
    state = env.state_from_obs(populations, params)

    def body(state, action):
        obs, state, _, _, _ = env.step_env(None, state, action, params)
        return state, obs

    _, observations = jax.lax.scan(body, state, actions)
    return jnp.concatenate([jnp.asarray(populations)[None], observations])


def scipy_reference(params, populations, actions) -> np.ndarray:
    """The same episode with scipy's DOP853 at rtol = atol = 1e-12: harvest, then flow for dt."""
    rates = [float(getattr(params, n)) for n in RATES]

    def field(t, y):
        alpha, beta, gamma, delta = rates
        return [(alpha - beta * y[1]) * y[0], (delta * y[0] - gamma) * y[1]]

    y = np.asarray(populations, np.float64)
    out = [y]
    for action in np.clip(actions, 0.0, 1.0):
        y = solve_ivp(field, (0.0, params.dt), y * (1.0 - action), method="DOP853", rtol=1e-12, atol=1e-12).y[
            :, -1
        ]
        out.append(y)
    return np.array(out)


HARVESTS = np.random.default_rng(0).uniform(0.0, 0.15, (STEPS, 2))
DEFAULT_ENV = LotkaVolterra()
#: One compiled step of the default env, shared by the tests that only need its values.
default_step = jax.jit(DEFAULT_ENV.step_env)


def test_episode_matches_a_high_accuracy_reference_to_the_tolerance():
    """The default env (rtol 1e-6, float32, stepped one compiled step at a time) and the precise
    one (rtol 1e-10, float64, the rollout of ``seed_loss``) against scipy: error follows tolerance."""
    expected = scipy_reference(SEED_PARAMS, np.ones(2), HARVESTS)
    assert np.min(expected) < 0.1 and np.max(expected) > 3  # a real cycle, with a close shave
    state = DEFAULT_ENV.state_from_obs(jnp.ones(2, jnp.float32), SEED_PARAMS)
    default = [np.ones(2)]
    for action in jnp.asarray(HARVESTS, jnp.float32):
        obs, state, _, _, _ = default_step(None, state, action, SEED_PARAMS)
        default.append(np.asarray(obs))
    default_error = np.max(np.abs(np.array(default) - expected) / np.abs(expected))
    with jax.enable_x64(True):
        (_, precise), _ = seed_loss_and_grad(jnp.array([1.0, 1.0, 1.0, *SEED_RATES, 0.1]))
    precise_error = np.max(np.abs(np.asarray(precise) - expected) / np.abs(expected))
    assert default_error < 1e-4 and precise_error < 1e-8, (default_error, precise_error)
    assert precise_error < 1e-3 * default_error


def test_harvest_removes_the_fraction_before_the_flow_and_is_clipped():
    env, params = DEFAULT_ENV, LotkaVolterraParams()
    state = LotkaVolterraState(prey=jnp.float32(2.0), predator=jnp.float32(1.0), time=jnp.int32(0))

    def step(action, state=state):
        return default_step(None, state, action, params)

    obs, _, reward, terminated, info = step(jnp.array([0.5, 0.0]))
    halved = dataclasses.replace(state, prey=jnp.float32(1.0))
    np.testing.assert_allclose(
        obs, step(jnp.array([0.0, 0.0]), halved)[0], rtol=1e-6
    )  # (2, 1) halved, then dt
    assert not np.allclose(obs, step(jnp.array([0.0, 0.0]))[0], rtol=1e-2)
    np.testing.assert_allclose(info["harvest"], [1.0, 0.0])
    expected_reward = -((float(obs[0]) - 3.0) ** 2 + (float(obs[1]) - 1.5) ** 2)
    assert float(reward) == pytest.approx(expected_reward, rel=1e-6)
    assert not bool(terminated)
    np.testing.assert_array_equal(step(jnp.array([1.7, -0.3]))[0], step(jnp.array([1.0, 0.0]))[0])
    with pytest.raises(ValueError, match=r"shape \(2,\).*got shape \(\)"):
        env.step_env(None, state, 0.1, params)


# --------------------------------------------------------------------------------------------
# Gradients (float64) against central finite differences
# --------------------------------------------------------------------------------------------
def _central_differences(f, x: np.ndarray, relative_step: float = 1e-6) -> np.ndarray:
    columns = []
    for i in range(len(x)):
        h = relative_step * max(abs(x[i]), 1.0)
        up, down = x.copy(), x.copy()
        up[i] += h
        down[i] -= h
        columns.append((np.asarray(f(up)) - np.asarray(f(down))) / (2 * h))
    return np.stack(columns, -1)


PRECISE = LotkaVolterra(rtol=1e-10, atol=1e-12)  # finite differences need a smooth forward


def seed_loss(inputs):
    """The seed example's loss ``sum_t (x_t - 1)^2 + (y_t - 1)^2`` over t in 0.1:0.1:10 (t = 0 adds
    nothing from (1, 1)), as a function of every input: the start, a harvest scale (0: none), the
    four rates and ``dt``; and the observations (aux)."""
    prey, predator, harvest_scale, alpha, beta, gamma, delta, dt = inputs
    params = dataclasses.replace(with_rates(SEED_PARAMS, (alpha, beta, gamma, delta)), dt=dt)
    observations = rollout(
        PRECISE, params, jnp.stack([prey, predator]), harvest_scale * jnp.asarray(HARVESTS)
    )
    return jnp.sum((observations[1:] - 1.0) ** 2), observations


#: One compile for the finite-difference test and the Adam fit (float64 inputs).
seed_loss_and_grad = jax.jit(jax.value_and_grad(seed_loss, has_aux=True))


def test_gradients_match_finite_differences_in_state_harvest_and_every_rate():
    with jax.enable_x64(True):
        inputs = np.array([1.2, 0.8, 1.0, *SEED_RATES, 0.1])
        gradient = np.asarray(seed_loss_and_grad(jnp.asarray(inputs))[1])
        expected = _central_differences(lambda x: float(seed_loss_and_grad(jnp.asarray(x))[0][0]), inputs)
    np.testing.assert_allclose(gradient, expected, rtol=1e-5)
    assert np.all(np.abs(gradient) > 1e-3)  # every input matters


def test_clipped_harvest_has_zero_gradient_and_forward_mode_needs_its_adjoint():
    """The gradient is 0 where the harvest is clipped; forward mode fails with the default adjoint
    (custom VJP) and works under ForwardMode: ``jit(vmap(jacfwd))`` matches finite differences.
    (Reverse mode through the default adjoint is checked against finite differences above.)"""
    state = LotkaVolterraState(prey=jnp.float32(1.0), predator=jnp.float32(1.0), time=jnp.int32(0))

    def next_prey(env):
        return lambda action: env.step_env(None, state, action, SEED_PARAMS)[1].prey

    actions = jnp.array([[0.2, 0.1], [1.5, -0.5], [-0.1, 0.3]])
    with pytest.raises(TypeError, match="custom_vjp"):
        jax.jit(jax.vmap(jax.jacfwd(next_prey(DEFAULT_ENV)))).lower(actions)
    forward = jax.jit(jax.vmap(jax.jacfwd(next_prey(LotkaVolterra(adjoint=diffrax.ForwardMode())))))(actions)
    assert forward[0, 0] < 0 and forward[0, 1] != 0  # harvesting prey lowers the prey
    np.testing.assert_array_equal(forward[1], [0.0, 0.0])  # both clipped
    assert forward[2, 0] == 0.0 and forward[2, 1] != 0.0
    h = 1e-2  # float32 differences of the default env's compiled step
    for action, gradient in zip(np.asarray(actions), np.asarray(forward)):
        for i in range(2):
            up, down = action.copy(), action.copy()
            up[i] += h
            down[i] -= h
            if not (0 < down[i] and up[i] < 1):
                continue  # the difference would straddle the clip
            difference = (
                float(default_step(None, state, jnp.asarray(up), SEED_PARAMS)[1].prey)
                - float(default_step(None, state, jnp.asarray(down), SEED_PARAMS)[1].prey)
            ) / (2 * h)
            assert gradient[i] == pytest.approx(difference, rel=1e-3)


def test_solver_options_and_the_step_limit():
    env, params = diffgym.make("lotkavolterra", rtol=1e-9, atol=1e-11, predation_rate=1.1)
    assert env.rtol == 1e-9 and params.predation_rate == 1.1
    state = LotkaVolterraState(prey=jnp.float32(1.0), predator=jnp.float32(1.0), time=jnp.int32(0))
    fixed = LotkaVolterra(solver=diffrax.Dopri5(), stepsize_controller=diffrax.ConstantStepSize(), dt0=0.01)
    adaptive = default_step(None, state, jnp.zeros(2), params)[0]  # Tsit5, rtol 1e-6
    np.testing.assert_allclose(jax.jit(fixed.flow)(jnp.ones(2), params), adaptive, rtol=1e-5)
    starved = LotkaVolterra(rtol=1e-12, atol=1e-12, max_solver_steps=2)
    with pytest.raises(Exception, match="maximum number of solver steps"):
        jax.block_until_ready(jax.jit(starved.step_env)(None, state, jnp.zeros(2), params))
    with pytest.raises(ValueError, match="rtol must be a positive number, got -1"):
        LotkaVolterra(rtol=-1)


# --------------------------------------------------------------------------------------------
# The seed example
# --------------------------------------------------------------------------------------------
def test_seed_example_parameters_are_recovered_from_sampled_trajectories():
    """Samples of an independent high-accuracy solution (scipy), fitted through the env's one-step
    predictions from the default rates (1.5, 1, 3, 1): recovered to the env's solver tolerance."""
    observations = scipy_reference(SEED_PARAMS, np.ones(2), np.zeros((STEPS, 2)))
    env = LotkaVolterra(adjoint=diffrax.ForwardMode())  # forward-mode Jacobians for the fit
    fitted, report = identify(env, observations, np.zeros((STEPS, 2)), LotkaVolterraParams(), fit=RATES)
    relative_error = max(abs(getattr(fitted, n) / v - 1) for n, v in zip(RATES, SEED_RATES))
    assert relative_error < 1e-4, report.summary()
    assert report.converged and report.jacobian == "fwd" and report.iterations < 30
    assert not report.unidentifiable and report.loss_history[0] > 1e4 * report.loss


def test_seed_example_loss_driven_fit_converges_with_adam():
    """The original example: minimise sum_t (x_t - 1)^2 + (y_t - 1)^2 over t in 0:0.1:10 from
    p = [2.2, 1.0, 2.0, 0.4] with Adam(0.1) for 100 iterations, through the env's rollout."""
    optimizer = optax.adam(0.1)
    with jax.enable_x64(True):
        start = jnp.array([1.0, 1.0, 0.0])  # from (1, 1), no harvest
        rates = jnp.asarray(SEED_RATES, jnp.float64)
        opt_state = optimizer.init(rates)
        losses = []
        for _ in range(100):
            (value, _), gradient = seed_loss_and_grad(jnp.concatenate([start, rates, jnp.array([0.1])]))
            updates, opt_state = optimizer.update(gradient[3:7], opt_state, rates)
            rates = optax.apply_updates(rates, updates)
            losses.append(float(value))
        final = float(seed_loss_and_grad(jnp.concatenate([start, rates, jnp.array([0.1])]))[0][0])
    assert losses[0] > 1000 and final < 1e-3 * losses[0], (losses[0], final)
    assert np.all(np.isfinite(losses))
    # (1, 1) is an equilibrium exactly when alpha = beta and gamma = delta: the fit heads there.
    alpha, beta, gamma, delta = np.asarray(rates)
    assert abs(alpha - beta) < 0.1 * alpha and abs(gamma - delta) < 0.1 * gamma


# --------------------------------------------------------------------------------------------
# gymnasium, registry, task, renderer
# --------------------------------------------------------------------------------------------
def test_gymnasium_check_env_passes():
    env = gymnasium.make("diffgym/LotkaVolterra-v0", render_mode="rgb_array")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(env.unwrapped)  # raises on any failed check, render modes included
    # gymnasium's own CartPole gets the same warning: populations have no upper bound.
    unexpected = [str(w.message) for w in caught if "maximum value is infinity" not in str(w.message)]
    assert not unexpected, unexpected
    obs, _ = env.reset(seed=0)
    assert obs.dtype == np.float32 and obs.shape == (2,) and np.all((obs >= 0.8) & (obs <= 1.2))
    steps = 0
    truncated = False
    while not truncated:
        obs, reward, terminated, truncated, info = env.step(np.array([0.02, 0.01], np.float32))
        steps += 1
        assert not terminated and reward <= 0 and info["harvest"].shape == (2,)
    assert steps == 100 and env.spec.max_episode_steps == 100
    frame = env.render()
    assert frame.shape == (400, 800, 3) and frame.dtype == np.uint8
    assert env.metadata["render_fps"] == 20
    env.close()


def test_registry_and_task_terms():
    spec = diffgym.spec("lotkavolterra")
    assert spec.id == "LotkaVolterra-v0" and spec.task_class() is LotkaVolterraTask
    task = diffgym.make_task("LotkaVolterra-v0", reward=0.0, target_distance=1.0, log_target_distance=2.0)
    params = LotkaVolterraParams()
    state = LotkaVolterraState(prey=jnp.float32(1.0), predator=jnp.float32(1.0), time=jnp.int32(0))
    action = jnp.array([0.1, 0.2])
    _, next_state, reward, _, _ = default_step(None, state, action, params)
    terms = task.terms(params, state, action, next_state)
    assert float(terms["target_distance"]) == pytest.approx(-float(reward), rel=1e-6)
    assert float(terms["harvest_effort"]) == pytest.approx(0.05, rel=1e-6)
    expected = float(terms["target_distance"]) + 2.0 * float(terms["log_target_distance"])
    assert float(task.cost(params, state, action, next_state, reward)) == pytest.approx(expected, rel=1e-6)
    assert set(LotkaVolterraTask.term_names()) == {"target_distance", "log_target_distance", "harvest_effort"}


def test_renderer_draws_the_history_and_restarts_with_an_episode():
    pytest.importorskip("pygame")
    from diffgym.render import make_renderer
    from diffgym.render.lotka_volterra import ORBIT_COLOR, PREY_COLOR

    renderer = make_renderer(LotkaVolterra())
    params = LotkaVolterraParams()

    def frame(t, prey, predator):
        state = LotkaVolterraState(prey=np.float32(prey), predator=np.float32(predator), time=np.int32(t))
        return renderer.frames(state, params)[0]

    def mask(image, color):
        return np.all(np.abs(image.astype(int) - np.array(color)) <= 20, axis=-1)

    first = frame(0, 1.0, 1.0)
    later = frame(50, 4.0, 0.5)
    assert mask(later, PREY_COLOR).sum() > mask(first, PREY_COLOR).sum() + 50  # the curve grew
    orbit = np.nonzero(mask(later, ORBIT_COLOR))
    assert orbit[1].min() >= 400  # the phase plane is the right half
    restarted = frame(0, 1.0, 1.0)
    np.testing.assert_array_equal(restarted, first)
