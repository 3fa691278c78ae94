"""Straight-through discretizers: exactly hard forward, exactly the surrogate's gradient backward."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffgym
from diffgym.discrete import straight_through_argmax, straight_through_bernoulli, straight_through_threshold
from diffgym.envs.cartpole import CartPoleState

TEMPERATURES = [0.1, 1.0, 7.0]


def logits_with_edge_cases(shape, seed=0) -> jax.Array:
    z = jax.random.normal(jax.random.key(seed), shape) * 4.0
    edge = jnp.array([0.0, -0.0, 1e-30, -1e-30, 1e-7, -1e-7, 80.0, -80.0, 1e4, -1e4])
    return jnp.concatenate([z.reshape(-1), edge])


def test_bernoulli_forward_is_exactly_hard():
    z = logits_with_edge_cases((5000,))
    forward = jax.jit(straight_through_bernoulli)
    for temperature in TEMPERATURES:
        action = forward(z, temperature)
        assert action.dtype == z.dtype and action.shape == z.shape
        np.testing.assert_array_equal(action, (z > 0).astype(z.dtype))  # 0 at logit 0, as 1[z > 0]
        assert set(np.unique(action)) == {0.0, 1.0}


def test_bernoulli_gradient_is_the_sigmoid_surrogates():
    z = logits_with_edge_cases((300,))
    cotangent = jax.random.normal(jax.random.key(1), z.shape)
    got = jax.jit(jax.grad(lambda z, t: jnp.sum(cotangent * straight_through_bernoulli(z, t))))
    expected = jax.jit(jax.grad(lambda z, t: jnp.sum(cotangent * jax.nn.sigmoid(z / t))))
    slope = jax.jit(jax.grad(straight_through_bernoulli))
    for temperature in TEMPERATURES:
        np.testing.assert_allclose(got(z, temperature), expected(z, temperature), rtol=1e-6, atol=0)
        # At the decision boundary the slope is 1 / (4 T): smaller T, steeper surrogate.
        np.testing.assert_allclose(slope(0.0, temperature), 1 / (4 * temperature), rtol=1e-6)


def test_threshold_forward_is_hard_and_gradient_is_identity():
    p = jnp.concatenate([jax.random.uniform(jax.random.key(2), (2000,)), jnp.array([0.0, 0.5, 1.0])])
    action = jax.jit(straight_through_threshold)(p)
    np.testing.assert_array_equal(action, (p > 0.5).astype(p.dtype))
    assert float(action[-2]) == 0.0  # exactly 0.5 is action 0
    jacobian = jax.jit(jax.jacrev(straight_through_threshold))(p[:50])
    np.testing.assert_array_equal(jacobian, np.eye(50))


@pytest.mark.parametrize("n", [2, 3, 7])
def test_argmax_forward_is_one_hot_and_gradient_is_the_softmax_surrogates(n):
    z = jax.random.normal(jax.random.key(n), (400, n)) * 3.0
    z = z.at[0].set(jnp.zeros(n))  # a tie: argmax picks the first
    forward = jax.jit(straight_through_argmax)
    jacobians = jax.jit(jax.vmap(jax.jacrev(straight_through_argmax), in_axes=(0, None)))
    surrogate_jacobians = jax.jit(jax.vmap(jax.jacrev(lambda r, t: jax.nn.softmax(r / t)), in_axes=(0, None)))
    for temperature in TEMPERATURES:
        onehot = forward(z, temperature)
        np.testing.assert_array_equal(onehot, jax.nn.one_hot(jnp.argmax(z, -1), n))
        assert float(onehot[0, 0]) == 1.0
        np.testing.assert_allclose(
            jacobians(z, temperature), surrogate_jacobians(z, temperature), rtol=1e-6, atol=1e-9
        )
    # Batch dimensions in front of the action axis are kept.
    np.testing.assert_array_equal(forward(z.reshape(20, 20, n), 1.0), onehot.reshape(20, 20, n))


# --------------------------------------------------------------------------------------------
# A straight-through policy on CartPole
# --------------------------------------------------------------------------------------------
ENV, PARAMS = diffgym.make("CartPole-v1")
ROLLOUT_STEPS = 60


def rollout(policy_params, initial_state, act):
    """``ROLLOUT_STEPS`` of ``step_env`` with a linear policy; returns (observations, rewards, actions).

    ``act`` maps the logit to the env's action: straight-through 0./1., or a hard int.
    """
    weights, bias = policy_params

    def one_step(state, _):
        logit = ENV.get_obs(state) @ weights + bias
        action = act(logit)
        obs, state, reward, _, _ = ENV.step_env(None, state, action, PARAMS)
        return state, (obs, reward, action)

    return jax.lax.scan(one_step, initial_state, None, length=ROLLOUT_STEPS)[1]


def straight_through(logit):
    return straight_through_bernoulli(logit, 0.5)


def hard_int(logit):
    return (logit > 0).astype(jnp.int32)


def rollout_loss(policy_params, initial_state):
    observations, _, _ = rollout(policy_params, initial_state, straight_through)
    return jnp.sum(observations[:, 2] ** 2 + 0.1 * observations[:, 0] ** 2)


def test_straight_through_cartpole_rollout_is_the_hard_rollout_and_has_a_gradient():
    _, initial_state = ENV.reset(jax.random.key(3), PARAMS)
    assert isinstance(initial_state, CartPoleState)
    # A balancing-ish linear policy, so the rollout uses both actions.
    policy_params = (jnp.array([0.1, 0.5, 3.0, 1.0]), jnp.float32(0.01))

    soft_obs, soft_rewards, soft_actions = jax.jit(rollout, static_argnums=2)(
        policy_params, initial_state, straight_through
    )
    hard_obs, hard_rewards, hard_actions = jax.jit(rollout, static_argnums=2)(
        policy_params, initial_state, hard_int
    )
    assert soft_actions.dtype == jnp.float32 and hard_actions.dtype == jnp.int32
    assert 0 < int(hard_actions.sum()) < ROLLOUT_STEPS  # both actions taken
    np.testing.assert_array_equal(soft_actions, hard_actions.astype(jnp.float32))
    np.testing.assert_array_equal(soft_obs, hard_obs)  # the same trajectory, bit for bit
    np.testing.assert_array_equal(soft_rewards, hard_rewards)

    weights_gradient, bias_gradient = jax.jit(jax.grad(rollout_loss))(policy_params, initial_state)
    assert np.all(np.isfinite(weights_gradient)) and np.isfinite(bias_gradient)
    assert np.all(np.abs(weights_gradient) > 0) and abs(float(bias_gradient)) > 0

    # Hard integer actions give no gradient at all: the straight-through estimator is what adds it.
    def hard_loss(policy_params):
        observations, _, _ = rollout(policy_params, initial_state, hard_int)
        return jnp.sum(observations[:, 2] ** 2)

    hard_weights_gradient, _ = jax.grad(hard_loss)(policy_params)
    np.testing.assert_array_equal(hard_weights_gradient, 0.0)
