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


def logit_rows_with_edge_cases(n: int, seed: int = 0) -> jax.Array:
    """Random rows of ``n`` logits, then the rows where argmax and softmax are delicate: ties (all
    equal, signed zeros, a tie for the maximum away from index 0), winners by the smallest normal
    float and by 1e-30, and saturated rows (±80, ±1e4) where the softmax is 0 or 1 in float32.
    (Not subnormal margins: XLA on CPU flushes subnormals to zero, making those ties.)"""
    z = jax.random.normal(jax.random.key(seed), (400, n)) * 4.0
    edge = np.zeros((8, n), np.float32)
    edge[1, 0] = -0.0  # -0.0 and 0.0 tie
    edge[2, 1] = edge[2, -1] = 5.0  # a tie for the maximum at indices 1 and n-1
    edge[3, 1] = np.finfo(np.float32).tiny  # the smallest normal float wins
    edge[4, -1] = 1e-30
    edge[5] = -80.0
    edge[5, -1] = 80.0
    edge[6] = 1e4
    edge[6, 0] = -1e4
    edge[7] = np.arange(n, dtype=np.float32)[::-1] * 1e-3  # a gentle slope: index 0 by a little
    return jnp.concatenate([z, jnp.asarray(edge)])


#: The argmax the edge rows must give (first index of the maximum, as ``jnp.argmax``).
def edge_case_argmax(n: int) -> list[int]:
    return [0, 0, 1, 1, n - 1, n - 1, 1, 0]


@pytest.mark.parametrize("n", [2, 3])
def test_argmax_forward_is_exactly_one_hot_at_every_edge_case(n):
    z = logit_rows_with_edge_cases(n)
    forward = jax.jit(straight_through_argmax)
    for temperature in TEMPERATURES:
        onehot = forward(z, temperature)
        assert onehot.dtype == z.dtype and onehot.shape == z.shape
        np.testing.assert_array_equal(onehot, jax.nn.one_hot(jnp.argmax(z, -1), n))
        np.testing.assert_array_equal(jnp.argmax(onehot[-8:], -1), edge_case_argmax(n))
        # Exactly 0.0 and 1.0, one 1.0 per row: soft + (hard - soft) cancels exactly.
        assert set(np.unique(onehot)) == {0.0, 1.0}
        np.testing.assert_array_equal(onehot.sum(-1), 1.0)
    # Float64 in, float64 out, still exactly one-hot.
    with jax.enable_x64(True):
        z64 = jnp.asarray(np.asarray(z), jnp.float64)
        onehot64 = jax.jit(straight_through_argmax)(z64, 0.5)
        assert onehot64.dtype == jnp.float64
        np.testing.assert_array_equal(onehot64, jax.nn.one_hot(jnp.argmax(z64, -1), n, dtype=jnp.float64))


@pytest.mark.parametrize("n", [2, 3])
def test_argmax_gradient_is_the_softmax_surrogates_at_every_edge_case(n):
    z = logit_rows_with_edge_cases(n, seed=1)
    cotangent = jax.random.normal(jax.random.key(2), z.shape)
    got = jax.jit(jax.grad(lambda z, t: jnp.sum(cotangent * straight_through_argmax(z, t))))
    expected = jax.jit(jax.grad(lambda z, t: jnp.sum(cotangent * jax.nn.softmax(z / t, axis=-1))))
    jacobian = jax.jit(jax.jacrev(straight_through_argmax))
    for temperature in TEMPERATURES:
        gradient = got(z, temperature)
        assert np.all(np.isfinite(gradient))  # saturated rows too: their gradient is ~0, not NaN
        np.testing.assert_allclose(gradient, expected(z, temperature), rtol=1e-5, atol=1e-7)
        # At a full tie the softmax Jacobian is (I / n - 1 / n^2) / T: smaller T, steeper surrogate.
        at_tie = (np.eye(n) / n - 1.0 / n**2) / temperature
        np.testing.assert_allclose(jacobian(jnp.zeros(n), temperature), at_tie, rtol=1e-6, atol=1e-8)
    # Unlike the hard one-hot's (zero everywhere), the gradient is there on the random rows.
    assert np.abs(gradient[:400]).max() > 0.01


@pytest.mark.parametrize("n", [3])
def test_relaxed_index_is_the_argmax_forward_and_the_expected_index_backward(n):
    """``Task.relaxed_action`` for ``Discrete(n)``, n >= 3: ``onehot @ [0 .. n-1]``, exactly the
    argmax as a float (what Acrobot and MountainCar take), with the gradient of the expected index
    under ``softmax(logits / T)``."""
    task, space = diffgym.Task(), diffgym.Discrete(n)
    z = logit_rows_with_edge_cases(n, seed=3)

    def relaxed(r, t):
        return task.relaxed_action(r, space, temperature=t)

    def expected_index(r, t):
        return jax.nn.softmax(r / t) @ jnp.arange(n, dtype=r.dtype)

    index = jax.jit(jax.vmap(relaxed, in_axes=(0, None)))
    index_gradient = jax.jit(jax.vmap(jax.grad(relaxed), in_axes=(0, None)))
    expected_gradient = jax.jit(jax.vmap(jax.grad(expected_index), in_axes=(0, None)))
    for temperature in TEMPERATURES:
        np.testing.assert_array_equal(index(z, temperature), jnp.argmax(z, -1).astype(jnp.float32))
        np.testing.assert_allclose(
            index_gradient(z, temperature), expected_gradient(z, temperature), rtol=1e-5, atol=1e-7
        )


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


# --------------------------------------------------------------------------------------------
# A straight-through categorical policy on MountainCar (three actions)
# --------------------------------------------------------------------------------------------
MOUNTAIN_CAR, MOUNTAIN_CAR_PARAMS = diffgym.make("MountainCar-v0")
MOUNTAIN_CAR_SPEC = diffgym.spec("MountainCar-v0")


def categorical_rollout(policy_params, act):
    """``ROLLOUT_STEPS`` of MountainCar's ``step_env`` from rest with a linear policy of three
    logits; ``act`` maps the logits to the action (the relaxed index, or a hard int)."""
    weights, bias = policy_params
    mean, scale = jnp.asarray(MOUNTAIN_CAR_SPEC.obs_mean), jnp.asarray(MOUNTAIN_CAR_SPEC.obs_scale)
    _, start = MOUNTAIN_CAR.reset(jax.random.key(4), MOUNTAIN_CAR_PARAMS)

    def one_step(state, _):
        logits = weights @ ((MOUNTAIN_CAR.get_obs(state) - mean) / scale) + bias
        action = act(logits)
        obs, state, _, _, _ = MOUNTAIN_CAR.step_env(None, state, action, MOUNTAIN_CAR_PARAMS)
        return state, (obs, action)

    return jax.lax.scan(one_step, start, None, length=ROLLOUT_STEPS)[1]


def relaxed_index(logits):
    space = MOUNTAIN_CAR.action_space(MOUNTAIN_CAR_PARAMS)
    return diffgym.Task().relaxed_action(logits, space, temperature=0.5)


def hard_index(logits):
    return jnp.argmax(logits).astype(jnp.int32)


def test_straight_through_categorical_rollout_is_the_hard_rollout_and_has_a_gradient():
    # Coast while nearly at rest, else push along the velocity: all three actions are used.
    policy_params = (jnp.array([[0.0, -3.0], [0.0, 0.0], [0.0, 3.0]]), jnp.array([0.0, 0.01, 0.0]))
    rollouts = jax.jit(categorical_rollout, static_argnums=1)
    soft_obs, soft_actions = rollouts(policy_params, relaxed_index)
    hard_obs, hard_actions = rollouts(policy_params, hard_index)
    assert soft_actions.dtype == jnp.float32 and hard_actions.dtype == jnp.int32
    assert set(np.unique(hard_actions)) == {0, 1, 2}
    np.testing.assert_array_equal(soft_actions, hard_actions.astype(jnp.float32))
    np.testing.assert_array_equal(soft_obs, hard_obs)  # the same trajectory, bit for bit

    def loss(policy_params, act):
        observations, _ = categorical_rollout(policy_params, act)
        return -jnp.sum(observations[:, 1] ** 2)  # speed up

    weights_gradient, bias_gradient = jax.jit(jax.grad(loss), static_argnums=1)(policy_params, relaxed_index)
    assert np.all(np.isfinite(weights_gradient)) and np.all(np.isfinite(bias_gradient))
    assert np.abs(weights_gradient).max() > 0 and np.all(np.abs(bias_gradient) > 0)
    # Hard integer actions give no gradient at all.
    hard_weights_gradient, _ = jax.jit(jax.grad(loss), static_argnums=1)(policy_params, hard_index)
    np.testing.assert_array_equal(hard_weights_gradient, 0.0)
