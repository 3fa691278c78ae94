"""diffgym: differentiable physics control environments in JAX.

Functional core (gymnax 1.x API)::

    env, params = diffgym.make("CartPole-v1")
    obs, state = env.reset(key, params)
    obs, state, reward, terminated, truncated, info = env.step(key, state, action, params)

Gymnasium shells, registered on import: ``gymnasium.make("diffgym/CartPole-v1")``.
"""

from diffgym import discrete
from diffgym.core import Box, Discrete, Environment, EnvParams, EnvState, make, registered_envs, resolve_env_id
from diffgym.gym import register_envs as _register_gymnasium_envs

_register_gymnasium_envs()  # string entry points: the shells load on the first gymnasium.make

__all__ = [
    "Box",
    "Discrete",
    "EnvParams",
    "EnvState",
    "Environment",
    "discrete",
    "make",
    "registered_envs",
    "resolve_env_id",
]
__version__ = "0.1.0"
