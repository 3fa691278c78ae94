"""agents.common: the evaluator's keys, the bounded compile cache, env resolution, tuned settings."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from noisy_env import NoisyDrift

import diffgym
from agents import common
from agents.common import BoundedCache, evaluate, evaluator, resolve_env


def test_evaluate_gives_every_reset_and_every_step_a_key_of_its_own():
    """On a noisy env, each episode's return is the one a step-by-step loop gets with the keys the
    evaluator documents (split per episode, then reset vs. steps, then one per step), and no two
    of those keys are equal: no draw ever reuses a key."""
    env = NoisyDrift()
    params = env.default_params
    key, episodes = jax.random.key(3), 4
    policy = lambda obs: -0.5 * obs  # noqa: E731
    returns = evaluate(env, policy, key=key, episodes=episodes)

    all_keys = []
    for episode_key in jax.random.split(key, episodes):
        key_reset, key_steps = jax.random.split(episode_key)
        step_keys = jax.random.split(key_steps, params.max_steps_in_episode)
        all_keys += [key_reset, *step_keys]
    data = np.asarray(jax.vmap(jax.random.key_data)(jnp.stack(all_keys)))
    assert len({tuple(row) for row in data}) == len(data)

    expected = []
    step_env = jax.jit(env.step_env)
    for episode_key in jax.random.split(key, episodes):
        key_reset, key_steps = jax.random.split(episode_key)
        obs, state = env.reset(key_reset, params)
        total, alive = 0.0, True
        for step_key in jax.random.split(key_steps, params.max_steps_in_episode):
            obs, state, reward, terminated, info = step_env(step_key, state, policy(obs), params)
            np.testing.assert_allclose(info["noise"], env.noise(step_key, params), rtol=1e-6, atol=1e-7)
            total += float(reward) if alive else 0.0
            alive = alive and not bool(terminated)
        expected.append(total)
    np.testing.assert_allclose(returns, expected, rtol=1e-5)


def test_evaluators_are_cached_per_env_params_and_episodes():
    env, params, spec = resolve_env("cartpole")
    assert spec.id == "CartPole-v1" and params == env.default_params
    first, _ = evaluator("cartpole", episodes=3)
    again, cached = evaluator(env, episodes=3)
    assert cached and again is first
    _, cached = evaluator(env, episodes=3, params=diffgym.make("cartpole", masspole=0.2)[1])
    assert not cached


def test_bounded_cache_keeps_the_most_recent_entries():
    cache = BoundedCache(2)
    builds = []
    for key in ("a", "b", "a", "c", "b"):
        cache.get(key, lambda key=key: builds.append(key) or key)
    assert builds == ["a", "b", "c", "b"] and len(cache) == 2  # "b" was evicted by "c"


def test_hyperparams_based_on_another_env_inherit_and_override(tmp_path, monkeypatch):
    """``based_on``: a missing table comes from the base env's file, a present one is laid key by
    key over the base's; a file based on itself (or a missing env) is an error naming it."""
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "hyperparams.toml").write_text('[bptt]\nwindow = 20\nlearning_rate = 0.03\n[ppo]\nnum_envs = 8\n')
    (tmp_path / "variant").mkdir()
    (tmp_path / "variant" / "hyperparams.toml").write_text('based_on = "base"\n[bptt]\nwindow = 50\n')
    (tmp_path / "loop").mkdir()
    (tmp_path / "loop" / "hyperparams.toml").write_text('based_on = "loop"\n')
    monkeypatch.setattr(common, "ASSETS_DIR", tmp_path)
    assert common._hyperparams("variant", "bptt", seen=()) == {"window": 50, "learning_rate": 0.03}
    assert common._hyperparams("variant", "ppo", seen=()) == {"num_envs": 8}
    assert common._hyperparams("variant", "sb3", seen=()) is None
    with pytest.raises(ValueError, match=r"loop/hyperparams.toml: based_on = 'loop' names no other env"):
        common._hyperparams("loop", "bptt", seen=())


def test_kicked_cartpole_trains_from_cartpoles_tuned_settings():
    assert common.tuned_settings("kickedcartpole", "ppo") == common.tuned_settings("cartpole", "ppo")
