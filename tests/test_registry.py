"""The registry: one EnvSpec per environment, physics keywords, and a user's env joining in."""

from __future__ import annotations

import dataclasses

import gymnasium
import numpy as np
import pytest

import diffgym
from diffgym.envs.cartpole import CartPole
from diffgym.registry import EnvSpec


def test_every_registered_env_has_one_consistent_record():
    for env_id in diffgym.registered_envs():
        spec = diffgym.spec(env_id)
        env, params = diffgym.make(env_id)
        assert spec.id == env.name == env_id and diffgym.spec(env) is spec
        assert diffgym.resolve_env_id(spec.alias) == env_id
        obs_size = int(np.prod(env.observation_space(params).shape))
        for field in ("obs_mean", "obs_scale"):
            assert getattr(spec, field) is None or len(getattr(spec, field)) == obs_size, (env_id, field)
        assert spec.action_kind() in ("discrete", "box")
        assert isinstance(diffgym.make_task(env_id), diffgym.Task)
        registered = gymnasium.spec(f"diffgym/{env_id}")
        assert registered.max_episode_steps == params.max_steps_in_episode


def test_physics_keywords_set_the_params_in_make_and_in_gymnasium():
    env, params = diffgym.make("Pendulum-v1", g=9.81, max_torque=1.5)
    assert (params.g, params.max_torque) == (9.81, 1.5)
    shell = gymnasium.make("diffgym/Pendulum-v1", g=9.81)
    assert shell.unwrapped.params.g == 9.81
    assert shell.action_space.high.tolist() == [2.0]
    assert gymnasium.make("diffgym/Pendulum-v1", max_torque=1.5).action_space.high.tolist() == [1.5]


@pytest.mark.parametrize("call", [diffgym.make, lambda name, **kw: gymnasium.make(f"diffgym/{name}", **kw)])
def test_unknown_keywords_get_a_did_you_mean(call):
    with pytest.raises(TypeError, match=r"Pendulum-v1 has no parameter 'max_torqe'\. Did you mean 'max_torque'\?.*Accepted: .*max_speed"):
        call("Pendulum-v1", max_torqe=1.0)


def test_a_users_env_registers_once_and_everything_finds_it():
    class LongCartPole(CartPole):
        @property
        def name(self):
            return "LongCartPole-v0"

    spec = diffgym.register(
        EnvSpec(id="LongCartPole-v0", entry_point=LongCartPole, alias="longcartpole", reward_threshold=400.0)
    )
    try:
        env, params = diffgym.make("longcartpole", length=1.0)
        assert isinstance(env, LongCartPole) and params.length == 1.0 and diffgym.spec(env) is spec
        shell = gymnasium.make("diffgym/LongCartPole-v0")
        assert shell.spec.reward_threshold == 400.0 and shell.spec.max_episode_steps == 500
        shell.reset(seed=0)
        shell.step(1)
        with pytest.raises(ValueError, match="alias 'longcartpole' of Other-v0 is already the alias of LongCartPole-v0"):
            diffgym.register(EnvSpec(id="Other-v0", entry_point=LongCartPole, alias="longcartpole"))
    finally:
        diffgym.registry._SPECS.pop("LongCartPole-v0")
        gymnasium.registry.pop("diffgym/LongCartPole-v0")


def test_an_unregistered_instance_gets_a_spec_of_defaults():
    class Renamed(CartPole):
        @property
        def name(self):
            return "Renamed-v0"

    spec = diffgym.spec(Renamed())
    assert (spec.id, spec.reward_threshold, spec.eval_episodes, spec.obs_scale) == ("Renamed-v0", None, 100, None)
    # A subclass that keeps the registered name (a wrapped CartPole) is that env, with its record.
    assert diffgym.spec(type("Wrapped", (CartPole,), {})()) is diffgym.spec("cartpole")


def test_spec_values_are_checked():
    with pytest.raises(ValueError, match="EnvSpec.eval_episodes must be a positive integer, got 0"):
        EnvSpec(id="X-v0", entry_point=CartPole, eval_episodes=0)
    with pytest.raises(ValueError, match="EnvSpec.obs_scale must be positive"):
        EnvSpec(id="X-v0", entry_point=CartPole, obs_scale=(1.0, 0.0))
    with pytest.raises(ValueError, match="without '/'"):
        EnvSpec(id="diffgym/X-v0", entry_point=CartPole)
    with pytest.raises(TypeError, match="register takes an EnvSpec"):
        diffgym.register({"id": "X-v0"})
    assert dataclasses.replace(diffgym.spec("cartpole"), eval_episodes=5).eval_episodes == 5
