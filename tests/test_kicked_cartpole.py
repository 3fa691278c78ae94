"""KickedCartPole-v1: CartPole-v1 exactly at q = 0, kicks at rate q, the gymnasium shell, and the
derivative of the expected return in the policy's weights and in q against exact enumeration over
every action and kick sequence of a short episode."""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings

import gymnasium
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import diffgym
from diffgym import stochastic as st
from diffgym.envs.cartpole import CartPole, CartPoleState
from diffgym.envs.kicked_cartpole import KickedCartPole, KickedCartPoleParams, KickedCartPoleTask

ENV, PARAMS = diffgym.make("KickedCartPole-v1")
CARTPOLE, CARTPOLE_PARAMS = diffgym.make("CartPole-v1")


def _states(n: int, seed: int = 0) -> CartPoleState:
    """States across CartPole's range, some past its thresholds (termination, reward 0)."""
    rng = np.random.default_rng(seed)
    s = rng.uniform([-2.6, -2.0, -0.25, -2.5], [2.6, 2.0, 0.25, 2.5], (n, 4)).astype(np.float32)
    return CartPoleState(
        x=jnp.asarray(s[:, 0]), x_dot=jnp.asarray(s[:, 1]), theta=jnp.asarray(s[:, 2]),
        theta_dot=jnp.asarray(s[:, 3]), time=jnp.asarray(rng.integers(0, 499, n), jnp.int32),
    )  # fmt: skip


def test_registered_with_cartpoles_threshold_task_and_renderer():
    spec = diffgym.spec("kickedcartpole")
    assert spec.id == "KickedCartPole-v1" and spec.reward_threshold == 475.0
    assert spec.obs_scale == diffgym.spec("CartPole-v1").obs_scale
    assert isinstance(ENV, KickedCartPole) and isinstance(ENV, CartPole) and not ENV.deterministic_transition
    assert isinstance(diffgym.make_task("kickedcartpole", angle=1.0), KickedCartPoleTask)
    assert PARAMS == KickedCartPoleParams() and (PARAMS.kick_probability, PARAMS.kick_size) == (0.05, 0.5)
    assert diffgym.make("KickedCartPole-v1", kick_probability=0.2)[1].kick_probability == 0.2
    from diffgym.render import renderer_class
    from diffgym.render.cartpole import CartPoleRenderer

    assert renderer_class("KickedCartPole-v1") is CartPoleRenderer
    with pytest.raises(ValueError, match="transition is random: step_env needs a key"):
        ENV.step_env(None, jax.tree.map(lambda leaf: leaf[0], _states(1)), 1, PARAMS)


def test_without_kicks_it_is_cartpole_bit_for_bit():
    """q = 0: every step_env is CartPole's exactly, whatever the key, and so is a whole episode
    of a balancing rule stepped with ``Environment.step`` (which splits each key)."""
    no_kicks = dataclasses.replace(PARAMS, kick_probability=0.0)
    states = _states(4096)
    actions = jnp.asarray(np.random.default_rng(1).integers(0, 2, 4096), jnp.int32)
    keys = jax.random.split(jax.random.key(2), 4096)
    kicked = jax.jit(jax.vmap(lambda k, s, a: ENV.step_env(k, s, a, no_kicks)))(keys, states, actions)
    plain = jax.jit(jax.vmap(lambda s, a: CARTPOLE.step_env(None, s, a, CARTPOLE_PARAMS)))(states, actions)
    for ours, theirs in zip(kicked[:4], plain[:4]):
        for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(kicked[4]["kick"]), 0.0)

    gains = jnp.array([0.05, 0.2, 1.0, 0.3])

    def episode(env, params, key):
        def body(carry, k):
            obs, state = carry
            obs, state, reward, *_ = env.step(k, state, (obs @ gains > 0).astype(jnp.int32), params)
            return (obs, state), (obs, reward)

        state = CartPoleState(x=jnp.float32(0.01), x_dot=jnp.float32(0.0), theta=jnp.float32(0.02),
                              theta_dot=jnp.float32(-0.01), time=jnp.int32(0))  # fmt: skip
        return jax.lax.scan(body, (ENV.get_obs(state), state), jax.random.split(key, 300))[1]

    obs_kicked, _ = jax.jit(lambda k: episode(ENV, no_kicks, k))(jax.random.key(3))
    # No termination in 300 steps, so the auto-reset (whose key differs) never draws.
    obs_plain, rewards_plain = jax.jit(lambda k: episode(CARTPOLE, CARTPOLE_PARAMS, k))(jax.random.key(3))
    assert float(jnp.sum(rewards_plain)) == 300.0
    np.testing.assert_array_equal(np.asarray(obs_kicked), np.asarray(obs_plain))


def test_kicks_happen_at_rate_q_in_both_directions():
    """The step is CartPole's plus ``kick(key)`` on the angular velocity; kicks of exactly
    ±kick_size come at rate q (within 5 standard errors), half each way, from the step's key."""
    q, n = 0.1, 200_000
    params = dataclasses.replace(PARAMS, kick_probability=q, kick_size=0.7)
    states = jax.tree.map(lambda leaf: jnp.resize(leaf, (n,)), _states(1000))
    keys = jax.random.split(jax.random.key(4), n)
    step = jax.jit(jax.vmap(lambda k, s: ENV.step_env(k, s, 1, params)))
    _, next_states, _, _, info = step(keys, states)
    _, plain, _, _, _ = jax.jit(jax.vmap(lambda s: CARTPOLE.step_env(None, s, 1, CARTPOLE_PARAMS)))(states)
    kicks = np.asarray(jax.jit(jax.vmap(lambda k: ENV.kick(k, params)))(keys))
    np.testing.assert_array_equal(kicks, np.asarray(info["kick"]))
    np.testing.assert_array_equal(np.asarray(next_states.theta_dot), np.asarray(plain.theta_dot + kicks))
    for field in ("x", "x_dot", "theta", "time"):
        np.testing.assert_array_equal(np.asarray(getattr(next_states, field)), np.asarray(getattr(plain, field)))
    np.testing.assert_array_equal(np.unique(kicks), np.float32([-0.7, 0.0, 0.7]))
    rate = np.mean(kicks != 0)
    assert abs(rate - q) < 5 * math.sqrt(q * (1 - q) / n), rate
    right = np.mean(kicks[kicks != 0] > 0)
    assert abs(right - 0.5) < 5 * math.sqrt(0.25 / np.sum(kicks != 0)), right
    # Environment.step gives step_env the first half of its split key, as for every random env.
    state = jax.tree.map(lambda leaf: leaf[0], states)
    key = jax.random.key(5)
    info = ENV.step(key, state, 1, params)[5]
    assert float(info["kick"]) == float(ENV.kick(jax.random.split(key)[0], params))


def test_gymnasium_check_env_and_seeded_kicks():
    ours = gymnasium.make("diffgym/KickedCartPole-v1", render_mode="rgb_array")
    theirs = gymnasium.make("CartPole-v1", render_mode="rgb_array").unwrapped
    caught = {}
    for name, env in (("ours", ours.unwrapped), ("theirs", theirs)):
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            check_env(env)  # raises on any failed check, render modes included
        caught[name] = {str(w.message) for w in record}
    # gymnasium warns about CartPole's own spaces (infinite bounds): the same spaces, the same warnings.
    assert caught["ours"] <= caught["theirs"], caught["ours"] - caught["theirs"]
    assert ours.spec.max_episode_steps == 500 and ours.spec.reward_threshold == 475.0
    ours.reset(seed=0)
    assert ours.render().shape == (400, 600, 3)  # CartPole's renderer

    def kicks(seed, kick_probability=0.3):
        env = gymnasium.make("diffgym/KickedCartPole-v1", kick_probability=kick_probability)
        env.reset(seed=seed)
        out = [float(env.step(i % 2)[4]["kick"]) for i in range(40)]
        env.close()
        return out

    assert kicks(7) == kicks(7) and kicks(7) != kicks(8)
    assert 0 < sum(k != 0 for k in kicks(7)) < 40
    assert all(k == 0 for k in kicks(7, kick_probability=0.0))
    ours.close()
    theirs.close()


def test_a_sampled_run_has_no_gradient_in_q_and_the_pathwise_one_in_kick_size():
    """The kick is piecewise constant in q (``jax.grad`` is 0: only an estimator says anything
    about the expected return) and enters additively with ``kick_size``."""
    state = jax.tree.map(lambda leaf: leaf[0], _states(1, seed=6))
    key = jax.random.key(9)  # a key whose step kicks (checked below)
    params = dataclasses.replace(PARAMS, kick_probability=0.5)

    def theta_dot(q, size):
        moved = dataclasses.replace(params, kick_probability=q, kick_size=size)
        return ENV.step_env(key, state, 1, moved)[1].theta_dot

    kick = float(ENV.kick(key, params))
    assert kick != 0.0
    d_q, d_size = jax.grad(theta_dot, argnums=(0, 1))(0.5, 0.5)
    assert float(d_q) == 0.0 and float(d_size) == pytest.approx(kick / 0.5)


# --------------------------------------------------------------------------------------------
# Exact enumeration: a stochastic Bernoulli policy, kicks at rate q, T = 6 steps
# --------------------------------------------------------------------------------------------
HORIZON = 6
KICK_SIZE = 1.0
# Leaning right and falling: whether the pole passes 12 degrees within 6 steps depends on the
# actions and on the kicks (a kick to the left can save it, one to the right tips it over).
START = CartPoleState(
    x=jnp.float32(0.0), x_dot=jnp.float32(0.0), theta=jnp.float32(0.17), theta_dot=jnp.float32(0.3),
    time=jnp.int32(0),
)  # fmt: skip
#: The differentiated parameters: a linear-sigmoid policy and the kick probability.
P = {"weights": jnp.array([0.1, 0.5, 3.0, 1.0]), "bias": jnp.float32(0.0), "kick_probability": jnp.float32(0.3)}


def _params(p):
    return dataclasses.replace(PARAMS, kick_probability=p["kick_probability"], kick_size=KICK_SIZE)


def _push_right_probability(p, state):
    return jax.nn.sigmoid(ENV.get_obs(state) @ p["weights"] + p["bias"])


def _objectives(rewards, terminated, theta, x):
    """(episode return, smooth cost): rewards until the first termination; -Σ (θ² + 0.1 x²)."""
    alive_before = jnp.cumprod(jnp.concatenate([jnp.ones(1), 1.0 - terminated[:-1]]))
    return jnp.stack([jnp.sum(rewards * alive_before), -jnp.sum(theta**2 + 0.1 * x**2)])


def stochastic_rollout(p, key):
    """``f(p, key)``: the env's own kicks (``step_env`` with the step's key) and the policy's
    ``stochastic.bernoulli`` actions, one key each."""
    params = _params(p)

    def step(state, k):
        key_action, key_env = jax.random.split(k)
        action = st.bernoulli(key_action, _push_right_probability(p, state))
        _, state, reward, terminated, _ = ENV.step_env(key_env, state, action, params)
        return state, (reward, terminated.astype(jnp.float32), state.theta, state.x)

    return _objectives(*jax.lax.scan(step, START, jax.random.split(key, HORIZON))[1])


def exact_expected_objectives(p):
    """Σ over the 6^T (action, kick) sequences of P(sequence) × objectives(sequence); a kick
    ``k`` in {-1, 0, 1} has probability ``q/2``, ``1 - q``, ``q/2`` and adds ``k · kick_size`` to
    the stepped angular velocity (what ``step_env`` does: tested above)."""
    codes = jnp.arange(6**HORIZON)[:, None] // (6 ** jnp.arange(HORIZON)) % 6
    actions, kicks = (codes % 2).astype(jnp.float32), (codes // 2 - 1).astype(jnp.float32)
    q = p["kick_probability"]

    def one(actions, kicks):
        def step(state, xs):
            action, kick = xs
            prob = _push_right_probability(p, state)
            _, state, reward, terminated, _ = CARTPOLE.step_env(None, state, action, CARTPOLE_PARAMS)
            state = dataclasses.replace(state, theta_dot=state.theta_dot + KICK_SIZE * kick)
            log_p = jnp.where(action > 0, jnp.log(prob), jnp.log1p(-prob))
            log_p = log_p + jnp.where(kick == 0, jnp.log1p(-q), jnp.log(q / 2))
            return state, ((reward, terminated.astype(jnp.float32), state.theta, state.x), log_p)

        _, (outputs, log_probs) = jax.lax.scan(step, START, (actions, kicks))
        objectives = _objectives(*outputs)
        return jnp.exp(jnp.sum(log_probs)) * objectives, objectives[0]

    weighted, returns = jax.vmap(one)(actions, kicks)
    return jnp.sum(weighted, axis=0), returns


def _matrix(tree) -> np.ndarray:
    """(..., 6): the derivative in (w_x, w_xdot, w_theta, w_thetadot, bias, q)."""
    return np.concatenate(
        [np.asarray(tree["weights"]), np.asarray(tree["bias"])[..., None], np.asarray(tree["kick_probability"])[..., None]],
        axis=-1,
    )


@functools.cache
def _estimates(estimator: str, n: int):
    run = functools.partial(st.derivative_estimates, stochastic_rollout, P, num_samples=n, estimator=estimator)
    return _matrix(jax.jit(run)(jax.random.key(13)))


def test_expected_return_derivative_in_weights_and_q_against_exact_enumeration():
    exact, returns = jax.jit(jax.jacrev(exact_expected_objectives, has_aux=True))(P)
    exact = _matrix(exact)
    # Some sequences fall, some do not; the kicks matter (the q column is not small).
    assert float(jnp.min(returns)) < HORIZON and float(jnp.max(returns)) == HORIZON
    assert abs(exact[0, 5]) > 0.1 * np.max(np.abs(exact[0]))
    n = 100_000
    print("\nKickedCartPole, T = 6, d E / d (w_x, w_xdot, w_theta, w_thetadot, bias, q); rows (return, smooth cost)")
    print("exact           ", np.array2string(exact, precision=4, suppress_small=True).replace("\n", " "))
    for estimator in ("triples", "score", "straight_through"):
        estimates = _estimates(estimator, n)
        mean, se = estimates.mean(0), estimates.std(0) / math.sqrt(n)
        z = np.abs(mean - exact) / np.maximum(se, 1e-12)
        print(f"{estimator:16s}", np.array2string(mean, precision=4, suppress_small=True).replace("\n", " "),
              f"max |z| {z.max():.1f}, std of the return row {np.array2string(estimates.std(0)[0], precision=2)}")  # fmt: skip
        if estimator == "straight_through":
            # The return is piecewise constant in the state: straight-through sees no slope at all,
            # and its smooth-cost derivative is biased.
            np.testing.assert_array_equal(mean[0], 0.0)
            assert z[1].max() > 10
            continue
        assert np.all(np.abs(mean - exact) <= 4 * se), estimator
        assert np.linalg.norm(mean - exact) < 0.05 * np.linalg.norm(exact), estimator


def test_bptt_balances_the_kicked_cartpole_with_its_tuned_settings():
    """The kicked env's tuned BPTT settings (50-step windows, a surrogate that pays for the cart's
    drift) cut to 6 000 env steps: the hard policy scores >= 400 on fresh kicked episodes, with the
    same trainer and no env branch. Measured (bench/results/stochastic_training): 475 reached on 3/3
    seeds after 1 000-6 000 steps."""
    from agents.bptt import default_config, train
    from agents.common import evaluate

    config = dataclasses.replace(default_config("kickedcartpole"), total_env_steps=6_000, eval_every=1_000)
    assert config.window == 50 and config.cost["position"] == 10.0
    result = train("kickedcartpole", config, seed=0)
    returns = evaluate(ENV, result.policy, key=jax.random.key(7), episodes=32, params=PARAMS)
    assert returns.mean() >= 400, f"mean return {returns.mean():.1f} after {result.env_steps} steps"
