"""The one trainer interface: every trainer called the same way, on any environment.

A user's own environment, unknown to the registry, trains with BPTT and PPO through
``agents.trainers`` exactly as the bundled ones do; the generic trainers name no environment.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffgym
from agents import trainers
from agents.common import TrainResult, evaluate
from diffgym.core import Box, Environment, EnvParams, EnvState, pytree_dataclass

AGENTS = Path(__file__).resolve().parents[1] / "agents"


@pytree_dataclass
class PointState(EnvState):
    x: jax.Array  # m
    v: jax.Array  # m/s


@pytree_dataclass
class PointParams(EnvParams):
    dt: float = 0.1  # s
    max_steps_in_episode: int = 40


class PointMass(Environment[PointState, PointParams]):
    """A user's env, registered nowhere: push a unit mass (force in [-1, 1] N) to the origin.
    Reward ``-(x^2 + 0.1 v^2)``, smooth in state and action: its own reward is a usable cost."""

    @property
    def default_params(self) -> PointParams:
        return PointParams()

    @property
    def name(self) -> str:
        return "PointMass-v0"

    def step_env(self, key, state, action, params):
        force = jnp.reshape(jnp.asarray(action, jnp.float32), ())
        v = state.v + params.dt * force
        next_state = PointState(x=state.x + params.dt * v, v=v, time=state.time + 1)
        reward = -(next_state.x**2 + 0.1 * next_state.v**2)
        return self.get_obs(next_state), next_state, reward, jnp.zeros((), bool), {}

    def reset_env(self, key, params):
        x = jax.random.uniform(key, (), minval=-1.0, maxval=1.0)
        state = PointState(x=x, v=jnp.zeros(()), time=jnp.zeros((), jnp.int32))
        return self.get_obs(state), state

    def get_obs(self, state, params=None, key=None):
        return jnp.stack([state.x, state.v])

    def is_terminated(self, state, params):
        return jnp.zeros((), bool)

    def action_space(self, params=None) -> Box:
        return Box(-1.0, 1.0, (1,), jnp.float32)

    def observation_space(self, params=None) -> Box:
        return Box(-jnp.inf, jnp.inf, (2,), jnp.float32)


def _mean_return(policy, env=None, episodes=64) -> float:
    return float(np.mean(evaluate(env or PointMass(), policy, key=jax.random.key(7), episodes=episodes)))


@pytest.mark.parametrize(
    "name, config",
    [
        ("bptt", {"total_env_steps": 800, "window": 10, "eval_every": 400, "learning_rate": 3e-2}),
        ("ppo", {"total_env_steps": 8_192, "num_envs": 8, "num_steps": 64, "eval_every_updates": 8}),
    ],
)
def test_a_users_own_environment_trains_through_the_interface(name, config):
    """An unregistered env instance: the generic defaults (its spec is one of defaults), a config
    changed through dataclasses.replace, the same call for every trainer, the same result type.
    BPTT also learns on this budget: its mean return beats pushing nothing by 2x (PPO, measured
    here, needs tens of thousands of steps on it; its learning is tested on CartPole)."""
    env = PointMass()
    module = trainers.trainer(name)
    assert diffgym.spec(env).id == "PointMass-v0" and diffgym.spec(env).reward_threshold is None
    run_config = dataclasses.replace(module.default_config(env), **config)
    result = module.train(env, run_config, seed=0)
    assert isinstance(result, TrainResult) and result.extra["algo"] == name
    assert result.extra["env_id"] == "PointMass-v0"
    assert result.policy.kind == "box" and result.spec["obs_size"] == 2
    assert result.env_steps == config["total_env_steps"] and result.curve[-1]["env_steps"] == result.env_steps
    assert np.isfinite(_mean_return(result.policy))
    if name == "bptt":
        untrained = _mean_return(lambda obs: jnp.zeros(1))
        trained = _mean_return(result.policy)
        assert trained > untrained / 2, (untrained, trained)


def test_env_params_reach_every_trainer():
    """Physics given as env_params is what the trainer trains and evaluates in: a NaN time step
    stops BPTT at its first update (the guard), whatever the id's defaults are."""
    params = dataclasses.replace(PointParams(), dt=float("nan"))
    module = trainers.trainer("bptt")
    config = dataclasses.replace(module.default_config(PointMass()), total_env_steps=100, eval_every=100)
    with pytest.raises(FloatingPointError, match="BPTT on PointMass-v0 stopped at update 0"):
        module.train(PointMass(), config, env_params=params)


def test_every_trainer_has_the_same_signature():
    expected = ["env", "config", "seed", "env_params", "progress_fn", "render_fn"]
    for name in trainers.TRAINERS:
        module = __import__(trainers.TRAINERS[name], fromlist=["train"])
        assert list(inspect.signature(module.train).parameters) == expected, name
        assert list(inspect.signature(module.default_config).parameters) == ["env"], name
        assert module.NAME == name


def test_unknown_trainer_suggests_the_closest():
    with pytest.raises(ValueError, match="unknown trainer 'bpt'. Did you mean 'bptt'?"):
        trainers.trainer("bpt")


def test_the_gradient_trainer_follows_the_tuned_settings():
    assert trainers.gradient_trainer("cartpole") == "bptt"
    assert trainers.gradient_trainer("trebuchet") == "aiming"
    assert trainers.gradient_trainer(PointMass()) == "bptt"


@pytest.mark.parametrize("module", ["bptt.py", "ppo.py", "common.py", "trainers.py", "compare.py", "cli.py", "play.py"])
def test_generic_agents_name_no_environment(module):
    """No env id, alias or env module in the generic trainers and tools: per-env facts come from
    the EnvSpec, the Task and the bundled hyperparams only."""
    source = (AGENTS / module).read_text()
    tree = ast.parse(source)
    imported = [
        node.module if isinstance(node, ast.ImportFrom) else alias.name
        for node in ast.walk(tree)
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in node.names
    ]
    assert not [name for name in imported if name and name.startswith("diffgym.envs")], imported
    strings = [node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)]
    names = {spelling for env_id in diffgym.registered_envs() for spelling in (env_id, diffgym.spec(env_id).alias)}
    docstrings = {ast.get_docstring(node) for node in ast.walk(tree) if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef))}
    code_strings = [text for text in strings if text not in docstrings]
    assert not [text for text in code_strings if text in names], module
