"""The differentiability contract of the functional core.

* ``step_env`` stops no gradient: derivatives with respect to the state, the action and every
  param flow, and they are the right ones (an analytic Jacobian of one Pendulum step; rollout
  gradients of both envs against central finite differences in float64).
* Gradients are cut exactly where documented: at the torque and speed clips of Pendulum (zero),
  and through ``step``'s auto-reset (zero where the episode ended, ``step_env``'s elsewhere).
* ``grad``, ``jacfwd``, ``jacrev``, ``vmap`` and ``jit`` compose.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffgym
from diffgym.envs.cartpole import CartPole, CartPoleState
from diffgym.envs.pendulum import Pendulum, PendulumState, angle_normalize

CARTPOLE, CARTPOLE_PARAMS = diffgym.make("CartPole-v1")
PENDULUM, PENDULUM_PARAMS = diffgym.make("Pendulum-v1")


def test_no_stop_gradient_in_the_transitions():
    zero = jnp.float32(0.0)
    cartpole_state = CartPoleState(x=zero, x_dot=zero, theta=zero, theta_dot=zero, time=jnp.int32(0))
    pendulum_state = PendulumState(theta=zero, theta_dot=zero, last_u=zero, time=jnp.int32(0))
    key = jax.random.key(0)
    for env, state, params, action in (
        (CARTPOLE, cartpole_state, CARTPOLE_PARAMS, 1.0),
        (PENDULUM, pendulum_state, PENDULUM_PARAMS, 0.5),
    ):
        for method in (env.step_env, env.step, env.reset):
            args = (key, params) if method == env.reset else (key, state, action, params)
            jaxpr = str(jax.make_jaxpr(method)(*args))
            assert "stop_gradient" not in jaxpr, f"{env.name}.{method.__name__} stops a gradient"


# --------------------------------------------------------------------------------------------
# One Pendulum step: the Jacobian derived by hand
# --------------------------------------------------------------------------------------------
# Inputs differentiated: the state, the torque, and every physical param.
PENDULUM_INPUTS = ("theta", "theta_dot", "u", "g", "m", "l", "dt", "max_speed", "max_torque")
# Outputs: the observation, the next state and the reward.
PENDULUM_OUTPUTS = ("cos_theta", "sin_theta", "theta_dot_obs", "next_theta", "next_theta_dot", "reward")


def pendulum_step_flat(inputs: jax.Array) -> jax.Array:
    theta, theta_dot, u, g, m, l, dt, max_speed, max_torque = inputs  # noqa: E741
    params = dataclasses.replace(
        PENDULUM_PARAMS, g=g, m=m, l=l, dt=dt, max_speed=max_speed, max_torque=max_torque
    )
    state = PendulumState(theta=theta, theta_dot=theta_dot, last_u=jnp.zeros_like(theta), time=jnp.int32(0))
    obs, next_state, reward, _, _ = PENDULUM.step_env(None, state, u, params)
    return jnp.concatenate([obs, jnp.stack([next_state.theta, next_state.theta_dot, reward])])


def pendulum_step_jacobian_by_hand(inputs: np.ndarray) -> np.ndarray:
    """d(outputs)/d(inputs) of one step, rows ``PENDULUM_OUTPUTS``, columns ``PENDULUM_INPUTS``.

    u_c = clip(u, ±U);  a = 3g/(2l) sin(theta) + 3/(m l^2) u_c;  w = theta_dot + a dt;
    theta_dot' = clip(w, ±W);  theta' = theta + theta_dot' dt;  obs = [cos, sin](theta'), theta_dot';
    reward = -(wrap(theta)^2 + 0.1 theta_dot^2 + 0.001 u_c^2), on the state before the step.
    A clip passes the derivative of its argument inside the bounds, and the bound's outside.
    """
    theta, theta_dot, u, g, m, l, dt, max_speed, max_torque = (float(v) for v in inputs)  # noqa: E741
    i = {name: k for k, name in enumerate(PENDULUM_INPUTS)}
    torque_free = abs(u) < max_torque
    u_c = float(np.clip(u, -max_torque, max_torque))
    du_c = np.zeros(len(PENDULUM_INPUTS))
    du_c[i["u"]] = 1.0 if torque_free else 0.0
    du_c[i["max_torque"]] = 0.0 if torque_free else np.sign(u)

    a = 3 * g / (2 * l) * np.sin(theta) + 3 / (m * l**2) * u_c
    da = 3 / (m * l**2) * du_c
    da[i["theta"]] += 3 * g / (2 * l) * np.cos(theta)
    da[i["g"]] += 3 / (2 * l) * np.sin(theta)
    da[i["m"]] += -3 * u_c / (m**2 * l**2)
    da[i["l"]] += -3 * g / (2 * l**2) * np.sin(theta) - 6 * u_c / (m * l**3)

    w = theta_dot + a * dt
    dw = da * dt
    dw[i["theta_dot"]] += 1.0
    dw[i["dt"]] += a
    speed_free = abs(w) < max_speed
    next_theta_dot = float(np.clip(w, -max_speed, max_speed))
    dnext_theta_dot = dw if speed_free else np.zeros_like(dw)
    if not speed_free:
        dnext_theta_dot[i["max_speed"]] = np.sign(w)

    next_theta = theta + next_theta_dot * dt
    dnext_theta = dnext_theta_dot * dt
    dnext_theta[i["theta"]] += 1.0
    dnext_theta[i["dt"]] += next_theta_dot

    wrapped = (theta + np.pi) % (2 * np.pi) - np.pi
    dreward = -0.002 * u_c * du_c
    dreward[i["theta"]] += -2 * wrapped
    dreward[i["theta_dot"]] += -0.2 * theta_dot

    return np.stack([
        -np.sin(next_theta) * dnext_theta,
        np.cos(next_theta) * dnext_theta,
        dnext_theta_dot,
        dnext_theta,
        dnext_theta_dot,
        dreward,
    ])


def pendulum_inputs(theta, theta_dot, u):
    p = PENDULUM_PARAMS
    return np.array([theta, theta_dot, u, p.g, p.m, p.l, p.dt, p.max_speed, p.max_torque])


PENDULUM_CASES = {
    "unclipped": pendulum_inputs(0.5, 0.2, 0.4),
    "unclipped_hanging": pendulum_inputs(2.9, -1.3, -1.7),
    "torque_clipped_high": pendulum_inputs(0.5, 0.2, 3.0),
    "torque_clipped_low": pendulum_inputs(-2.0, 1.0, -2.5),
    "speed_clipped": pendulum_inputs(1.0, 7.9, 1.0),
    "speed_clipped_negative": pendulum_inputs(-1.0, -7.95, -0.5),
    "torque_and_speed_clipped": pendulum_inputs(1.0, 7.9, 4.0),
}


pendulum_step_jacfwd = jax.jit(jax.jacfwd(pendulum_step_flat))
pendulum_step_jacrev = jax.jit(jax.jacrev(pendulum_step_flat))


@pytest.mark.parametrize("case", PENDULUM_CASES, ids=list(PENDULUM_CASES))
def test_pendulum_step_jacobian_matches_the_hand_derivation(case):
    inputs = PENDULUM_CASES[case]
    expected = pendulum_step_jacobian_by_hand(inputs)
    with jax.enable_x64(True):
        forward = np.asarray(pendulum_step_jacfwd(jnp.asarray(inputs)))
        reverse = np.asarray(pendulum_step_jacrev(jnp.asarray(inputs)))
    np.testing.assert_allclose(forward, expected, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(reverse, expected, rtol=1e-12, atol=1e-14)
    # float32 gives the same Jacobian to float32 accuracy.
    single = np.asarray(pendulum_step_jacfwd(jnp.asarray(inputs, jnp.float32)))
    np.testing.assert_allclose(single, expected, rtol=1e-5, atol=1e-6)

    i = {name: k for k, name in enumerate(PENDULUM_INPUTS)}
    o = {name: k for k, name in enumerate(PENDULUM_OUTPUTS)}
    torque_clipped, speed_clipped = "torque" in case, "speed" in case
    # Where the torque is clipped nothing depends on it; where the speed is clipped the new speed
    # depends on nothing but max_speed (the documented kinks, checked on jax's own Jacobian).
    assert (forward[:, i["u"]] == 0).all() == torque_clipped
    if speed_clipped:
        assert (np.delete(forward[o["next_theta_dot"]], i["max_speed"]) == 0).all()
        assert forward[o["next_theta_dot"], i["max_speed"]] == np.sign(inputs[1])
    else:
        assert forward[o["next_theta_dot"], i["theta_dot"]] == 1.0


def test_docstrings_name_the_kinks_and_the_claims_hold():
    pendulum_doc = " ".join(Pendulum.__doc__.split())
    for phrase in ("Differentiability", "torque clip", "speed clip", "angle wrap", "auto-reset"):
        assert phrase in pendulum_doc, phrase
    cartpole_doc = " ".join(CartPole.__doc__.split())
    cartpole_phrases = ("Differentiability", "no ``stop_gradient``", "zero gradient", "termination", "cut")
    for phrase in cartpole_phrases:
        assert phrase in cartpole_doc, phrase
    assert "carry no gradient to the pre-reset state" in " ".join(diffgym.Environment.__doc__.split())

    # Pendulum: the wrap has derivative 1 everywhere it is differentiable.
    thetas = jnp.linspace(-10.0, 10.0, 1001)
    np.testing.assert_array_equal(jax.vmap(jax.grad(angle_normalize))(thetas), 1.0)
    # CartPole: the reward and the termination flag carry no gradient; the dynamics do.
    def reward_and_theta(theta):
        state = CartPoleState(x=jnp.zeros_like(theta), x_dot=jnp.zeros_like(theta), theta=theta,
                              theta_dot=jnp.ones_like(theta), time=jnp.int32(0))
        _, next_state, reward, _, _ = CARTPOLE.step_env(None, state, 1.0, CARTPOLE_PARAMS)
        return reward, next_state.theta_dot

    reward_and_theta_jacobian = jax.jit(jax.jacfwd(reward_and_theta))
    for theta in (0.0, 0.2, 0.3):  # alive, terminating, already terminated
        d_reward, d_theta_dot = reward_and_theta_jacobian(jnp.float32(theta))
        assert d_reward == 0.0 and d_theta_dot != 0.0


# --------------------------------------------------------------------------------------------
# Rollouts against central finite differences (float64)
# --------------------------------------------------------------------------------------------
def central_differences(f, x: jax.Array, eps: float) -> np.ndarray:
    """d f / d x by central differences, all 2n evaluations in one vmapped call."""
    directions = jnp.eye(x.size, dtype=x.dtype) * eps
    values = jax.jit(jax.vmap(f))(jnp.concatenate([x + directions, x - directions]))
    return np.asarray((values[: x.size] - values[x.size :]) / (2 * eps))


CARTPOLE_STEPS = 40
CARTPOLE_PARAM_NAMES = ("gravity", "masscart", "masspole", "length", "force_mag", "tau")


def cartpole_rollout_loss(z: jax.Array) -> jax.Array:
    """Sum over a 40-step rollout of x^2 + theta^2 + 0.1 theta_dot^2 (smooth; ``step_env``, no reset).

    ``z`` = initial state (4), relaxed actions in [0, 1] (40), params (6).
    """
    x, x_dot, theta, theta_dot = z[:4]
    actions = z[4 : 4 + CARTPOLE_STEPS]
    params = dataclasses.replace(CARTPOLE_PARAMS, **dict(zip(CARTPOLE_PARAM_NAMES, z[4 + CARTPOLE_STEPS :])))
    state = CartPoleState(x=x, x_dot=x_dot, theta=theta, theta_dot=theta_dot, time=jnp.zeros((), jnp.int32))

    def one_step(state, action):
        _, state, _, _, _ = CARTPOLE.step_env(None, state, action, params)
        return state, state.x**2 + state.theta**2 + 0.1 * state.theta_dot**2

    return jax.lax.scan(one_step, state, actions)[1].sum()


PENDULUM_STEPS = 40
PENDULUM_PARAM_NAMES = ("g", "m", "l", "dt")


def pendulum_rollout(z: jax.Array):
    """Rewards, speeds after the step and angles before it, over 40 steps.

    ``z`` = state (2), torques (40), params (4).
    """
    theta, theta_dot = z[:2]
    actions = z[2 : 2 + PENDULUM_STEPS]
    params = dataclasses.replace(PENDULUM_PARAMS, **dict(zip(PENDULUM_PARAM_NAMES, z[2 + PENDULUM_STEPS :])))
    state = PendulumState(theta=theta, theta_dot=theta_dot, last_u=jnp.zeros_like(theta), time=jnp.int32(0))

    def one_step(state, action):
        _, next_state, reward, _, _ = PENDULUM.step_env(None, state, action, params)
        return next_state, (reward, next_state.theta_dot, state.theta)

    return jax.lax.scan(one_step, state, actions)[1]


def pendulum_rollout_return(z):
    return pendulum_rollout(z)[0].sum()


def test_cartpole_rollout_gradient_matches_finite_differences():
    t = np.arange(CARTPOLE_STEPS)
    actions = 0.5 + 0.45 * np.sin(0.3 * t)  # relaxed actions strictly inside [0, 1]
    params = [getattr(CARTPOLE_PARAMS, name) for name in CARTPOLE_PARAM_NAMES]
    with jax.enable_x64(True):
        z = jnp.asarray(np.concatenate([[0.01, -0.02, 0.03, 0.01], actions, params]))
        gradient = np.asarray(jax.jit(jax.grad(cartpole_rollout_loss))(z))
        numeric = central_differences(cartpole_rollout_loss, z, eps=1e-6)
        forward = np.asarray(jax.jit(jax.jacfwd(cartpole_rollout_loss))(z))
    np.testing.assert_allclose(gradient, numeric, rtol=1e-5, atol=1e-7 * np.abs(numeric).max())
    np.testing.assert_allclose(forward, gradient, rtol=1e-10, atol=1e-12 * np.abs(gradient).max())
    # Every input matters (state, each action, each param): nothing is cut.
    assert np.all(np.abs(gradient) > 0)


def test_pendulum_rollout_gradient_matches_finite_differences():
    t = np.arange(PENDULUM_STEPS)
    torques = 0.8 * np.sin(0.2 * t) - 0.3  # inside the ±2 N m clip
    params = [getattr(PENDULUM_PARAMS, name) for name in PENDULUM_PARAM_NAMES]
    with jax.enable_x64(True):
        z = jnp.asarray(np.concatenate([[0.9, 0.3], torques, params]))
        _, speeds, thetas = pendulum_rollout(z)
        # The smooth regime the finite differences need: the speed never reaches the clip (8 rad/s)
        # and no angle sits at the wrap.
        assert np.abs(speeds).max() < 7.9
        assert np.abs(np.abs(angle_normalize(thetas)) - np.pi).min() > 1e-3
        gradient = np.asarray(jax.jit(jax.grad(pendulum_rollout_return))(z))
        numeric = central_differences(pendulum_rollout_return, z, eps=1e-6)
    np.testing.assert_allclose(gradient, numeric, rtol=1e-5, atol=1e-7 * np.abs(numeric).max())
    assert np.all(np.abs(gradient) > 0)


def test_jit_vmap_grad_composes_and_equals_per_sample_gradients():
    rng = np.random.default_rng(0)
    batch = 6
    z = np.concatenate(
        [
            rng.uniform(-0.05, 0.05, (batch, 4)),
            rng.uniform(0.0, 1.0, (batch, CARTPOLE_STEPS)),
            np.tile([getattr(CARTPOLE_PARAMS, n) for n in CARTPOLE_PARAM_NAMES], (batch, 1)),
        ],
        axis=1,
    ).astype(np.float32)
    batched = np.asarray(jax.jit(jax.vmap(jax.grad(cartpole_rollout_loss)))(z))
    single = jax.jit(jax.grad(cartpole_rollout_loss))
    for row, gradient in zip(z, batched):
        np.testing.assert_allclose(gradient, single(row), rtol=1e-4, atol=1e-4 * np.abs(gradient).max())
    assert len({float(g[0]) for g in batched}) == batch  # per-sample, not broadcast


# --------------------------------------------------------------------------------------------
# The gradient cut at the auto-reset
# --------------------------------------------------------------------------------------------
def auto_reset_jacobians(env, state_ctor, field_names):
    """A jitted function of (state values, time, action, float params) returning the Jacobians,
    with respect to all three, of ``step``'s next state and ``info["final_observation"]``, of
    ``step_env``'s next state and observation, and whether the episode ended."""

    def outputs(state_values, time, action, param_values):
        state = state_ctor(**dict(zip(field_names, state_values)), time=time)
        params = dataclasses.replace(env.default_params, **param_values)
        obs, next_state, _, terminated, truncated, info = env.step(jax.random.key(1), state, action, params)
        env_obs, env_next_state, _, _, _ = env.step_env(jax.random.key(1), state, action, params)
        stack = lambda s: jnp.stack([getattr(s, name) for name in field_names])  # noqa: E731
        jacobian_targets = (stack(next_state), info["final_observation"], stack(env_next_state), env_obs)
        return jacobian_targets, terminated | truncated

    def jacobians(state_values, time, action, param_values):
        wrt = lambda *diff: outputs(*diff[:1], time, *diff[1:])[0]  # noqa: E731
        jac = jax.jacfwd(wrt, argnums=(0, 1, 2))(state_values, action, param_values)
        return jac, outputs(state_values, time, action, param_values)[1]

    return jax.jit(jacobians)


CARTPOLE_FIELDS = ("x", "x_dot", "theta", "theta_dot")
PENDULUM_FIELDS = ("theta", "theta_dot", "last_u")
cartpole_auto_reset_jacobians = auto_reset_jacobians(CARTPOLE, CartPoleState, CARTPOLE_FIELDS)
pendulum_auto_reset_jacobians = auto_reset_jacobians(PENDULUM, PendulumState, PENDULUM_FIELDS)


def float_params(params) -> dict[str, jax.Array]:
    return {f.name: jnp.float32(getattr(params, f.name)) for f in dataclasses.fields(params)
            if f.name != "max_steps_in_episode"}


def check_auto_reset_cut(jacobians_fn, params, state_values, time, action, done):
    (step_state, final_obs, env_state, env_obs), ended = jacobians_fn(
        jnp.asarray(state_values, jnp.float32), jnp.int32(time), jnp.float32(action), float_params(params)
    )
    assert bool(ended) == done  # the episode really did (or did not) end here
    for got, reference in zip(jax.tree.leaves(step_state), jax.tree.leaves(env_state)):
        np.testing.assert_array_equal(got, 0.0 if done else reference)
    # The transition has a gradient wrt state, action and params, and final_observation keeps it.
    for wrt in env_state:
        assert any(np.abs(leaf).max() > 0 for leaf in jax.tree.leaves(wrt))
    for got, reference in zip(jax.tree.leaves(final_obs), jax.tree.leaves(env_obs)):
        np.testing.assert_array_equal(got, reference)


@pytest.mark.parametrize(
    "state_values, time, done",
    [
        ([0.1, 0.2, 0.05, -0.3], 7, False),
        ([0.1, 0.2, 0.2, 1.0], 7, True),  # theta 0.2 + 0.02 * 1.0 > 12 degrees: terminated
        ([0.1, 0.2, 0.05, -0.3], CARTPOLE_PARAMS.max_steps_in_episode - 1, True),  # truncated
    ],
    ids=["alive", "terminated", "truncated"],
)
def test_cartpole_auto_reset_cuts_the_gradient_exactly_where_done(state_values, time, done):
    check_auto_reset_cut(cartpole_auto_reset_jacobians, CARTPOLE_PARAMS, state_values, time, 0.7, done)


@pytest.mark.parametrize(
    "time, done", [(7, False), (PENDULUM_PARAMS.max_steps_in_episode - 1, True)], ids=["alive", "truncated"]
)
def test_pendulum_auto_reset_cuts_the_gradient_exactly_where_done(time, done):
    check_auto_reset_cut(pendulum_auto_reset_jacobians, PENDULUM_PARAMS, [0.5, 0.2, 0.0], time, 0.4, done)


def test_auto_reset_cut_is_per_env_under_vmap():
    """A batch mixing ended and running episodes: only the ended rows lose their gradient."""
    thetas = jnp.array([0.0, 0.2, 0.05, 0.2])  # 0.2 + 0.02 * 1.0 > 12 degrees: terminates
    times = jnp.array([0, 0, CARTPOLE_PARAMS.max_steps_in_episode - 1, 3], jnp.int32)

    def next_theta(theta, time, step_fn):
        state = CartPoleState(x=jnp.zeros_like(theta), x_dot=jnp.zeros_like(theta), theta=theta,
                              theta_dot=jnp.ones_like(theta), time=time)
        return step_fn(jax.random.key(0), state, 1.0, CARTPOLE_PARAMS)[1].theta

    batched_grad = jax.vmap(jax.grad(next_theta), in_axes=(0, 0, None))
    cut = jax.jit(batched_grad, static_argnums=2)(thetas, times, CARTPOLE.step)
    full = batched_grad(thetas, times, CARTPOLE.step_env)
    np.testing.assert_array_equal(cut, np.where([False, True, True, True], 0.0, full))
    np.testing.assert_array_equal(full, 1.0)
