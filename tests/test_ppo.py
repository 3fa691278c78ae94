"""PPO: GAE against a hand computation, the policy's distributions, and learning (fast and slow tiers)."""

import dataclasses
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffgym
from agents import ppo
from agents.common import evaluate
from agents.policy import Policy


def test_gae_matches_hand_computation():
    # Two envs side by side, three steps, gamma 0.9, lambda 0.8 (gamma * lambda = 0.72).
    # Env 0 is truncated at t=1 (time limit: bootstrap from next_values[1], then cut the chain);
    # env 1 terminates at t=1 (no bootstrap, cut the chain). Both bootstrap at the rollout's end.
    rewards = jnp.ones((3, 2))
    values = jnp.array([[0.5, 0.5], [0.4, 0.4], [0.3, 0.3]])
    next_values = jnp.array([[0.4, 0.4], [0.3, 0.3], [0.9, 0.9]])
    terminated = jnp.array([[False, False], [False, True], [False, False]])
    truncated = jnp.array([[False, False], [True, False], [False, False]])
    advantages, returns = ppo.gae(
        rewards, values, next_values, terminated, truncated, gamma=0.9, gae_lambda=0.8
    )
    # deltas: t0 = 1 + 0.9*0.4 - 0.5 = 0.86; t2 = 1 + 0.9*0.9 - 0.3 = 1.51;
    #   t1 = 1 + 0.9*0.3 - 0.4 = 0.87 (truncated) or 1 - 0.4 = 0.6 (terminated).
    # advantages: A2 = 1.51; A1 = delta1 (chain cut); A0 = 0.86 + 0.72 * A1.
    expected = np.array([[0.86 + 0.72 * 0.87, 0.86 + 0.72 * 0.6], [0.87, 0.6], [1.51, 1.51]])
    np.testing.assert_allclose(advantages, expected, rtol=1e-6)
    np.testing.assert_allclose(returns, expected + np.asarray(values), rtol=1e-6)


def test_gae_without_episode_end_is_discounted_td_sum():
    # lambda = 1 and no episode end: the advantage is the discounted sum of rewards plus the
    # discounted bootstrap minus the value (Monte Carlo with a bootstrapped tail).
    rng = np.random.default_rng(0)
    rewards, values = rng.normal(size=(5,)), rng.normal(size=(5,))
    next_values = np.append(values[1:], 2.0)
    no = np.zeros(5, bool)
    advantages, _ = ppo.gae(
        jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(next_values), no, no,
        gamma=0.95, gae_lambda=1.0,
    )
    expected = [
        sum(0.95**k * rewards[t + k] for k in range(5 - t)) + 0.95 ** (5 - t) * 2.0 - values[t]
        for t in range(5)
    ]
    np.testing.assert_allclose(advantages, expected, rtol=1e-5)


def test_bernoulli_log_prob_entropy_and_mode():
    config = ppo.default_config("CartPole-v1")
    spec = {"obs_size": 4, "action_size": 1, "kind": "bernoulli", "low": [], "high": [],
            "width": 8, "depth": 1, "activation": "tanh"}
    model = ppo.init_actor_critic(spec, config, jax.random.key(1))
    obs = jnp.array([0.1, -0.3, 0.05, 0.2])
    p1 = jax.nn.sigmoid(model.actor.raw(obs)[0])
    for action in (0.0, 1.0):
        log_prob, entropy = model.log_prob_entropy(obs, jnp.array([action]))
        np.testing.assert_allclose(log_prob, np.log(p1 if action else 1 - p1), rtol=1e-5)
    np.testing.assert_allclose(entropy, -(p1 * np.log(p1) + (1 - p1) * np.log(1 - p1)), rtol=1e-5)
    # Sampling frequency matches sigmoid(logit); the deterministic action is the mode.
    samples = jax.vmap(model.sample, in_axes=(0, None))(jax.random.split(jax.random.key(2), 4000), obs)
    assert abs(float(samples.mean()) - float(p1)) < 0.03
    assert int(model.actor(obs)) == int(p1 > 0.5)


def test_gaussian_log_prob_is_scaled_to_the_box():
    config = dataclasses.replace(ppo.default_config("Pendulum-v1"), init_log_std=math.log(0.25))
    spec = {"obs_size": 3, "action_size": 1, "kind": "box", "low": [-2.0], "high": [2.0],
            "width": 8, "depth": 1, "activation": "tanh"}
    model = ppo.init_actor_critic(spec, config, jax.random.key(3))
    obs = jnp.array([1.0, 0.0, 0.5])
    mean = model.actor(obs)
    std = 0.25 * 2.0  # exp(log_std) times half the box width
    log_prob, entropy = model.log_prob_entropy(obs, jnp.array([0.7]))
    np.testing.assert_allclose(log_prob, jax.scipy.stats.norm.logpdf(0.7, mean[0], std), rtol=1e-5)
    np.testing.assert_allclose(entropy, 0.5 * np.log(2 * np.pi * np.e * std**2), rtol=1e-5)


def test_categorical_log_prob_entropy_and_mode():
    spec = {"obs_size": 6, "action_size": 3, "kind": "categorical", "low": [], "high": [],
            "width": 8, "depth": 1, "activation": "tanh"}
    model = ppo.init_actor_critic(spec, ppo.PPOConfig(), jax.random.key(5))
    model = eqx.tree_at(lambda m: m.actor.mlp.layers[-1].bias, model, jnp.array([0.3, -0.4, 1.0]))
    obs = jnp.linspace(-1.0, 1.0, 6)
    probs = np.asarray(jax.nn.softmax(model.actor.raw(obs)))
    for action in range(3):
        log_prob, entropy = model.log_prob_entropy(obs, jnp.array([float(action)]))
        np.testing.assert_allclose(log_prob, np.log(probs[action]), rtol=1e-5)
    np.testing.assert_allclose(entropy, -np.sum(probs * np.log(probs)), rtol=1e-5)
    samples = jax.vmap(model.sample, in_axes=(0, None))(jax.random.split(jax.random.key(6), 6000), obs)
    assert samples.shape == (6000, 1)
    frequencies = np.bincount(np.asarray(samples[:, 0], int), minlength=3) / 6000
    np.testing.assert_allclose(frequencies, probs, atol=0.02)
    assert int(model.actor(obs)) == int(np.argmax(probs))


def test_observation_standardisation_is_folded_into_the_acting_policy():
    # The trained networks see (obs - mean) / std; the returned Policy takes raw observations.
    config = ppo.default_config("Trebuchet-v0")
    assert config.standardise_obs
    spec = {"obs_size": 2, "action_size": 2, "kind": "box", "low": [0.0, 20.0], "high": [90.0, 220.0],
            "width": 8, "depth": 1, "activation": "tanh"}
    trebuchet = diffgym.spec("trebuchet")
    model = ppo.init_actor_critic(
        spec, config, jax.random.key(4), obs_mean=trebuchet.obs_mean, obs_std=trebuchet.obs_scale
    )
    # A non-zero first-layer bias, so that the fold's bias term is exercised.
    model = eqx.tree_at(lambda m: m.actor.mlp.layers[0].bias, model, jnp.linspace(-1.0, 1.0, 8))
    obs = jnp.array([[87.0, -12.0], [25.0, 3.5], [60.0, 0.0]])
    standardised = (obs - jnp.array(trebuchet.obs_mean)) / jnp.array(trebuchet.obs_scale)
    acting = model.acting_policy()
    np.testing.assert_allclose(
        jax.vmap(acting.raw)(obs), jax.vmap(model.actor.raw)(standardised), rtol=1e-5, atol=1e-5
    )
    # The critic standardises too; without a standardisation the actor is returned unchanged.
    np.testing.assert_allclose(model.value(obs[0]), model.critic(standardised[0]), rtol=1e-6)
    plain = ppo.init_actor_critic(spec, ppo.PPOConfig(), jax.random.key(4))
    assert plain.acting_policy() is plain.actor


def test_config_errors_quote_the_values():
    with pytest.raises(ValueError, match="reward_scale must be positive, got 0"):
        ppo.PPOConfig(reward_scale=0)
    with pytest.raises(ValueError, match="num_minibatches=3 must divide .* = 256"):
        ppo.PPOConfig(num_minibatches=3)
    with pytest.raises(ValueError, match="did you mean|Did you mean"):
        ppo.default_config("cartpol")


def test_default_config_stops_at_the_spec_threshold_and_shaped_cost_names_are_checked():
    assert ppo.default_config("pendulum").target_return == diffgym.spec("pendulum").reward_threshold == -200.0
    bad = dataclasses.replace(ppo.default_config("cartpole"), shaped_cost={"angel": 1.0})
    with pytest.raises(ValueError, match=r"PPOConfig.shaped_cost names \['angel'\].*Did you mean 'angle'"):
        ppo.train("cartpole", bad)


def test_shaped_ppo_learns_from_the_task_cost_not_the_reward():
    """shaped_cost {reward: 1} is minus the task cost -(-reward): the very same run as the plain
    one, bit for bit; a surrogate term changes what PPO learns (evaluations stay on the reward)."""
    config = dataclasses.replace(
        ppo.default_config("cartpole"), total_env_steps=1024, eval_every_updates=1, target_return=None
    )
    plain = ppo.train("cartpole", config, seed=0)
    as_cost = ppo.train("cartpole", dataclasses.replace(config, shaped_cost={"reward": 1.0}), seed=0)
    assert [p["eval_return"] for p in as_cost.curve] == [p["eval_return"] for p in plain.curve]
    surrogate = dataclasses.replace(config, shaped_cost={"reward": 0.0, "angle": 1.0})
    shaped = ppo.train("cartpole", surrogate, seed=0)
    assert shaped.curve[0]["eval_return"] == plain.curve[0]["eval_return"]  # the same initial policy
    assert [p["eval_return"] for p in shaped.curve] != [p["eval_return"] for p in plain.curve]


def test_cartpole_learns_on_a_small_budget():
    """Fast tier: from a poor initial policy (seed 2 balances ~10 steps) to 475 within 40k steps."""
    config = dataclasses.replace(ppo.default_config("CartPole-v1"), total_env_steps=40_960)
    points, rendered = [], []
    result = ppo.train("CartPole-v1", config, seed=2, progress_fn=points.append, render_fn=rendered.append)
    assert isinstance(result.policy, Policy) and result.policy.kind == "bernoulli"
    assert result.curve[0]["env_steps"] == 0 and result.curve[0]["eval_return"] < 100
    assert result.extra["solved"], result.curve
    assert result.extra["env_steps_to_target"] <= 40_960
    assert result.env_steps == result.curve[-1]["env_steps"] == result.extra["env_steps_to_target"]
    assert len(points) == len(rendered) == len(result.curve) - 1 and {"loss", "approx_kl"} <= set(points[-1])
    assert all(isinstance(policy, Policy) for policy in rendered)
    assert 0 < result.compile_seconds < result.wall_seconds
    # The returned policy, re-evaluated on fresh episodes, still balances.
    returns = evaluate("CartPole-v1", result.policy, key=jax.random.key(99), episodes=32)
    assert returns.mean() >= 400


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cartpole_reaches_475(seed):
    result = ppo.train("CartPole-v1", ppo.default_config("CartPole-v1"), seed=seed)
    assert result.extra["solved"], result.curve
    assert evaluate("CartPole-v1", result.policy, key=jax.random.key(7), episodes=50).mean() >= 475


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_pendulum_reaches_minus_200(seed):
    result = ppo.train("Pendulum-v1", ppo.default_config("Pendulum-v1"), seed=seed)
    assert result.policy.kind == "box" and result.extra["solved"], result.curve
    assert result.extra["env_steps_to_target"] <= 300_000
    assert evaluate("Pendulum-v1", result.policy, key=jax.random.key(7), episodes=100).mean() >= -230


def test_ppo_starts_from_a_checkpoint():
    """init_policy: the actor starts as the checkpoint (here behind PPO's observation
    standardisation, taken out of its first layer): the first curve point is the checkpoint's own
    return on PPO's evaluation episodes. A checkpoint of another size is refused before compiling."""
    from agents.common import ASSETS_DIR
    from agents.policy import load_policy_module

    checkpoint_dir = ASSETS_DIR / "cartpole"
    config = dataclasses.replace(
        ppo.default_config("cartpole"), width=32, depth=1, standardise_obs=True, total_env_steps=256,
        init_policy=checkpoint_dir, target_return=None,
    )  # fmt: skip
    result = ppo.train("cartpole", config, seed=2)
    checkpoint, _ = load_policy_module(checkpoint_dir)
    key_eval = jax.random.split(jax.random.key(2), 4)[3]  # as ppo.train draws it
    expected = evaluate("cartpole", checkpoint, key=jax.random.fold_in(key_eval, 0), episodes=config.eval_episodes)
    assert result.curve[0]["eval_return"] == pytest.approx(float(expected.mean())) and expected.mean() == 500.0
    with pytest.raises(ValueError, match="PPOConfig.init_policy .* width 32, depth 1.*width 64, depth 2"):
        ppo.train("cartpole", dataclasses.replace(config, width=64, depth=2), seed=0)
