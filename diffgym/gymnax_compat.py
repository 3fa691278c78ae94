"""diffgym's environments as gymnax environments, for gymnax's wrappers and gymnax-based trainers.

diffgym's envs already follow gymnax's functional API (``reset(key, params)``, ``step(key, state,
action, params)`` with its 6-tuple), but their spaces are diffgym's own ``Discrete`` and ``Box``,
and gymnax's wrappers check ``isinstance(space, gymnax.environments.spaces.Discrete)``:
``GymnaxToGymWrapper`` raises ``Conversion of Discrete not supported`` and ``StickyActionWrapper``
``requires a Discrete action space``. The adapter here returns gymnax spaces and otherwise calls
the diffgym env unchanged::

    from diffgym.gymnax_compat import make
    from gymnax.wrappers import GymnaxToGymWrapper, LogWrapper, StickyActionWrapper

    env, params = make("CartPole-v1")                 # as gymnax.make; keywords set physics
    env = LogWrapper(StickyActionWrapper(env, sticky_action_prob=0.25))
    obs, state = env.reset(key, params)

    gym_env = GymnaxToGymWrapper(make("Pendulum-v1")[0])   # a gymnasium.Env through gymnax

``to_gymnax(env)`` wraps an env instance (``diffgym.make(...)[0]`` or your own subclass) and
``to_gymnax_space(space)`` converts one space. The adapter is an instance of gymnax's
``Environment``; its ``reset`` and ``step`` are jitted as gymnax's are. Params and states stay
diffgym's pytree dataclasses, and the transitions keep diffgym's gradients (``step_env`` never
stops them; ``transition_gradients_enabled`` says so). Any other attribute is read from the diffgym
env (``adapter.diffgym_env``).

Needs gymnax >= 1.0 (its 6-tuple ``step``), which diffgym does not depend on: ``pip install gymnax``.
Importing this module imports gymnax; ``import diffgym`` does not import this module.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from diffgym.core import Box, Discrete, Environment, EnvParams

_GYMNAX_HINT = "pip install 'gymnax>=1.0'"

try:
    from gymnax.environments import environment as _gymnax_environment
    from gymnax.environments import spaces as gymnax_spaces
except ModuleNotFoundError as error:
    if (error.name or "").partition(".")[0] != "gymnax":
        raise
    raise ModuleNotFoundError(
        f"diffgym.gymnax_compat adapts diffgym's envs to gymnax, which is not installed: {_GYMNAX_HINT}",
        name=error.name,
    ) from error

__all__ = ["GymnaxEnvironment", "make", "to_gymnax", "to_gymnax_space"]


def to_gymnax_space(space) -> gymnax_spaces.Space:
    """gymnax's equivalent of a diffgym ``Discrete`` or ``Box`` (same ``n``, bounds, shape, dtype).

    A box whose bounds are each one value throughout gets them as scalars (0-d arrays), others as
    arrays of the box's shape. A gymnax space is returned as it is.
    """
    if isinstance(space, gymnax_spaces.Space):
        return space
    if isinstance(space, Discrete):
        return gymnax_spaces.Discrete(space.n, dtype=space.dtype)
    if isinstance(space, Box):
        low, high = space.low, space.high
        # Uniform bounds as scalars, as gymnax's own envs write them: its gymnasium conversion
        # calls float() on any bound of size 1, which a shape-(1,) array refuses.
        if bool(jnp.all(low == low.ravel()[0])) and bool(jnp.all(high == high.ravel()[0])):
            low, high = low.ravel()[0], high.ravel()[0]
        return gymnax_spaces.Box(low, high, space.shape, space.dtype)
    raise TypeError(
        f"cannot convert {space!r} of type {type(space).__name__} to a gymnax space: "
        "expected a diffgym.Discrete, a diffgym.Box or a gymnax space"
    )


class GymnaxEnvironment(_gymnax_environment.Environment):
    """A diffgym environment seen as a gymnax ``Environment``: gymnax spaces, diffgym dynamics.

    Args:
        env: the diffgym functional environment to adapt (as ``diffgym.make`` returns).

    ``action_space(params)`` and ``observation_space(params)`` are gymnax spaces; ``reset``,
    ``step`` (with diffgym's auto-reset and ``info["final_observation"]``), ``step_env``,
    ``reset_env``, ``get_obs``, ``is_terminated``, ``is_truncated``, ``discount``,
    ``default_params``, ``name`` and ``num_actions`` are the diffgym env's.
    """

    # diffgym's transitions are differentiable and never cut the gradient (see diffgym.core).
    _supports_transition_gradients = True
    _transition_gradients_enabled = True

    #: The adapted diffgym environment.
    diffgym_env: Environment

    def __init__(self, env: Environment):
        if isinstance(env, GymnaxEnvironment):
            env = env.diffgym_env
        if not isinstance(env, Environment):
            raise TypeError(
                f"to_gymnax expects a diffgym Environment (diffgym.make(...)[0]), got {env!r} "
                f"of type {type(env).__name__}"
            )
        self.diffgym_env = env

    def __getattr__(self, name: str) -> Any:
        # Only reached for attributes not found on the adapter: env-specific helpers and constants.
        if name == "diffgym_env" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.diffgym_env, name)

    def __repr__(self) -> str:
        return f"GymnaxEnvironment({self.diffgym_env.name})"

    @property
    def default_params(self) -> EnvParams:
        return self.diffgym_env.default_params

    @property
    def name(self) -> str:
        return self.diffgym_env.name

    @property
    def num_actions(self) -> int:
        return self.diffgym_env.num_actions

    @functools.partial(jax.jit, static_argnames=("self",))
    def step(self, key: jax.Array, state, action, params: EnvParams | None = None):
        return self.diffgym_env.step(key, state, action, params)

    @functools.partial(jax.jit, static_argnames=("self",))
    def reset(self, key: jax.Array, params: EnvParams | None = None):
        return self.diffgym_env.reset(key, params)

    def step_env(self, key: jax.Array, state, action, params: EnvParams):
        return self.diffgym_env.step_env(key, state, action, params)

    def reset_env(self, key: jax.Array, params: EnvParams):
        return self.diffgym_env.reset_env(key, params)

    def get_obs(self, state, params: EnvParams | None = None, key: jax.Array | None = None):
        return self.diffgym_env.get_obs(state, params, key)

    def is_terminated(self, state, params: EnvParams) -> jax.Array:
        return self.diffgym_env.is_terminated(state, params)

    def is_terminal(self, state, params: EnvParams) -> jax.Array:
        return self.diffgym_env.is_terminal(state, params)

    def is_truncated(self, state, params: EnvParams) -> jax.Array:
        return self.diffgym_env.is_truncated(state, params)

    def discount(self, state, params: EnvParams) -> jax.Array:
        return self.diffgym_env.discount(state, params)

    def action_space(self, params: EnvParams | None = None) -> gymnax_spaces.Space:
        return to_gymnax_space(self.diffgym_env.action_space(params))

    def observation_space(self, params: EnvParams | None = None) -> gymnax_spaces.Space:
        return to_gymnax_space(self.diffgym_env.observation_space(params))


def to_gymnax(env: Environment) -> GymnaxEnvironment:
    """``env`` (a diffgym functional environment) as a gymnax ``Environment``."""
    return GymnaxEnvironment(env)


def make(env_id: str, **physics) -> tuple[GymnaxEnvironment, EnvParams]:
    """``gymnax.make`` for diffgym's envs: ``diffgym.make(env_id, **physics)``, the env adapted.

    ``env_id`` is any id or alias ``diffgym.make`` accepts (``"CartPole-v1"``, ``"pendulum"``);
    keywords set physical parameters (``masspole=0.3``). Returns ``(env, params)``.
    """
    from diffgym.registry import make as make_diffgym

    env, params = make_diffgym(env_id, **physics)
    return GymnaxEnvironment(env), params
