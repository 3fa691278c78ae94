"""diffgym: differentiable physics control environments in JAX.

Functional core (gymnax 1.x API)::

    env, params = diffgym.make("CartPole-v1")          # keywords override physics: masspole=0.3
    obs, state = env.reset(key, params)
    obs, state, reward, terminated, truncated, info = env.step(key, state, action, params)

Every environment has one record, its ``EnvSpec`` (``diffgym.spec("cartpole")``), and a training
``Task`` (``diffgym.make_task``). Gymnasium shells are registered on import:
``gymnasium.make("diffgym/CartPole-v1")``. For gymnax's wrappers and gymnax-based trainers,
``diffgym.gymnax_compat.make("CartPole-v1")`` gives the env with gymnax spaces (needs gymnax).
System identification fits an env's physical params to logged episodes:
``fitted, report = diffgym.identify(env, observations, actions, params, fit=("masspole", "length"))``.
"""

from diffgym import discrete, stochastic
from diffgym.core import Box, Discrete, Environment, EnvParams, EnvState
from diffgym.identify import IdentifyReport, fit_function, identify, load_episodes
from diffgym.registry import EnvSpec, make, make_task, register, registered_envs, resolve_env_id, spec
from diffgym.task import Task

import diffgym.envs  # noqa: E402,F401  (registers the bundled environments)

__all__ = [
    "Box",
    "Discrete",
    "EnvParams",
    "EnvSpec",
    "EnvState",
    "Environment",
    "IdentifyReport",
    "Task",
    "discrete",
    "fit_function",
    "identify",
    "load_episodes",
    "make",
    "make_task",
    "register",
    "registered_envs",
    "resolve_env_id",
    "spec",
    "stochastic",
]
__version__ = "0.1.0"
