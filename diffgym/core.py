"""The functional core: pytree dataclasses, spaces and the gymnax-compatible base environment.

An environment is a handful of pure functions over two frozen pytree dataclasses, ``EnvState``
(what evolves) and ``EnvParams`` (independent physical constants). Nothing here holds mutable
state, so every method composes with ``jit``, ``vmap``, ``lax.scan``, ``grad`` and ``jacfwd``.
The signatures follow gymnax 1.x, so a trainer written for gymnax runs on diffgym unchanged.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Generic, TypeVar, dataclass_transform

import jax
import jax.numpy as jnp
import numpy as np


_DataclassT = TypeVar("_DataclassT")


# dataclass_transform tells type checkers (mypy, pyright) that the decorated class gets a
# keyword-only, frozen dataclass __init__, so ``CartPoleState(x=...)`` type-checks.
@dataclass_transform(frozen_default=True, kw_only_default=True, field_specifiers=(dataclasses.field,))
def pytree_dataclass(cls: type[_DataclassT]) -> type[_DataclassT]:
    """Make ``cls`` a frozen dataclass whose fields are all pytree leaves.

    ``dataclasses.replace`` works on the result, and a batch of them (one leading axis on every
    field) can be built with ``jax.tree.map`` and consumed with ``jax.vmap``. Fields are
    keyword-only: subclasses inherit ``time`` first, so positional construction would be a trap.
    """
    cls = dataclasses.dataclass(frozen=True, kw_only=True)(cls)
    return jax.tree_util.register_dataclass(cls)


@pytree_dataclass
class EnvState:
    time: jax.Array


@pytree_dataclass
class EnvParams:
    max_steps_in_episode: int = 1


#: The Threefry layout of the envs' reset draws (``uniform``): ``False`` is JAX's
#: non-partitionable layout, ``jax.threefry_partitionable(False)``. See ``uniform`` for why.
RESET_DRAW_PARTITIONABLE = False


def uniform(key: jax.Array, shape: tuple[int, ...], minval=0.0, maxval=1.0) -> jax.Array:
    """The envs' reset draw: exactly ``jax.random.uniform(key, shape, minval=minval,
    maxval=maxval)`` under ``jax.threefry_partitionable(RESET_DRAW_PARTITIONABLE)``.

    JAX's default Threefry layout (partitionable, since JAX 0.5) hashes one block per random word
    so that a draw can be sharded; the non-partitionable layout reads both words of a block, so a
    draw costs half the hashes. A reset draw is a vector of 2-4 numbers per env (under ``vmap``,
    one per env), never sharded, so it takes the cheaper layout: measured on 2 CPU cores in
    ``bench/results/throughput.md`` (variant study). The layout is a documented JAX config
    context, read while tracing; the caller's own setting is restored afterwards. Keys of any
    implementation (typed or raw ``uint32[2]``) and float64 (``jax_enable_x64``) work as they do
    in ``jax.random.uniform``.
    """
    with jax.threefry_partitionable(RESET_DRAW_PARTITIONABLE):
        return jax.random.uniform(key, shape, minval=minval, maxval=maxval)


TState = TypeVar("TState", bound=EnvState)
TParams = TypeVar("TParams", bound=EnvParams)


# --------------------------------------------------------------------------------------------
# Spaces (the subset of gymnax's spaces that trainers use: sample, contains, shape, n, low/high)
# --------------------------------------------------------------------------------------------
class Discrete:
    """Integers ``0 .. n-1``."""

    def __init__(self, n: int):
        self.n = int(n)
        self.shape: tuple[int, ...] = ()
        self.dtype = jnp.int32

    def sample(self, key: jax.Array) -> jax.Array:
        return jax.random.randint(key, (), 0, self.n, dtype=self.dtype)

    def contains(self, x) -> jax.Array:
        return jnp.logical_and(x >= 0, x < self.n)

    def __repr__(self) -> str:
        return f"Discrete({self.n})"


class Box:
    """A box ``low <= x <= high`` of the given shape (bounds broadcast to it)."""

    def __init__(self, low, high, shape: tuple[int, ...], dtype=jnp.float32):
        self.shape = tuple(shape)
        self.dtype = dtype
        self.low = jnp.broadcast_to(jnp.asarray(low, dtype), self.shape)
        self.high = jnp.broadcast_to(jnp.asarray(high, dtype), self.shape)

    def sample(self, key: jax.Array) -> jax.Array:
        # Infinite bounds are sampled as a unit normal, as gymnasium does for unbounded boxes.
        finite = jnp.isfinite(self.low) & jnp.isfinite(self.high)
        uniform = jax.random.uniform(
            key, self.shape, self.dtype, jnp.where(finite, self.low, 0.0), jnp.where(finite, self.high, 1.0)
        )
        normal = jax.random.normal(key, self.shape, self.dtype)
        return jnp.where(finite, uniform, normal)

    def contains(self, x) -> jax.Array:
        x = jnp.asarray(x)
        return jnp.all(jnp.logical_and(x >= self.low, x <= self.high))

    def __repr__(self) -> str:
        return f"Box(low={np.asarray(self.low)}, high={np.asarray(self.high)}, shape={self.shape})"


# --------------------------------------------------------------------------------------------
# Base environment
# --------------------------------------------------------------------------------------------
class Environment(Generic[TState, TParams]):
    """Base class of diffgym's functional environments (gymnax 1.x API).

    Subclasses implement ``step_env``, ``reset_env``, ``get_obs``, ``is_terminated``,
    ``default_params``, ``action_space`` and ``observation_space``. The public ``step`` adds
    time-limit truncation and auto-reset.

    Gradients: ``step`` selects the reset state where an episode ended, so the returned state and
    observation carry no gradient to the pre-reset state there (``info["final_observation"]``
    does). ``step_env`` never stops gradients.
    """

    #: Whether ``step_env`` draws no random numbers. ``step`` then hands ``step_env`` no key at
    #: all (``key=None``: an env that sets this and still draws from its key fails loudly while
    #: tracing) and gives its whole key to the auto-reset draw, the only draw of the step. Random
    #: transitions (False) get ``jax.random.split(key)``: one key for ``step_env``, the other for
    #: the reset. Either way no key feeds two draws. Skipping the split is a measured choice: the
    #: split is one more Threefry hash per env and step, a large share of a small env's step
    #: (``bench/results/throughput.md``, variant "key split as gymnax").
    deterministic_transition: bool = False
    #: Whether the observation is ``get_obs(state, params)`` everywhere (``reset_env`` and
    #: ``step_env`` return exactly that; no observation noise). ``step`` then computes the
    #: observation from the state it selected (reset or not) rather than selecting between the
    #: reset's and the transition's observations; XLA fuses that better: 1.2-1.6x more steps/s at
    #: batch 4096 on 2 CPU cores (bench/results/throughput.md). Envs with noisy or keyed
    #: observations leave it False.
    observation_is_state_function: bool = False

    @property
    def default_params(self) -> TParams:
        raise NotImplementedError

    def step(
        self, key: jax.Array, state: TState, action, params: TParams | None = None
    ) -> tuple[jax.Array, TState, jax.Array, jax.Array, jax.Array, dict[str, Any]]:
        """One transition with truncation and auto-reset.

        Returns ``(obs, state, reward, terminated, truncated, info)``; where the episode ended
        (``terminated | truncated``) ``obs`` and ``state`` are a fresh reset and the last
        observation and state of the finished episode are ``info["final_observation"]`` and
        ``info["final_state"]`` (unused entries cost nothing under ``jit``).

        Keys: ``key`` feeds each random draw of the step exactly once. With
        ``deterministic_transition`` the transition gets ``key=None`` and the reset draws from
        ``key``; otherwise ``key_step, key_reset = jax.random.split(key)``, as gymnax does. The
        caller gives every step a fresh key (``jax.random.split`` per step, as in a gymnax rollout).
        """
        if params is None:
            params = self.default_params
        if self.deterministic_transition:
            key_step, key_reset = None, key  # step_env draws nothing: no key to reuse
        else:
            key_step, key_reset = jax.random.split(key)
        obs_st, state_st, reward, terminated, info = self.step_env(key_step, state, action, params)
        truncated = self.is_truncated(state_st, params)
        done = jnp.logical_or(terminated, truncated)
        obs_re, state_re = self.reset_env(key_reset, params)
        state = jax.tree.map(lambda r, s: jnp.where(done, r, s), state_re, state_st)
        if self.observation_is_state_function:
            obs = self.get_obs(state, params)
        else:
            obs = jax.tree.map(lambda r, s: jnp.where(done, r, s), obs_re, obs_st)
        info = {
            **info,
            "terminated": terminated,
            "truncated": truncated,
            "final_observation": obs_st,
            "final_state": state_st,
        }
        return obs, state, reward, terminated, truncated, info

    def reset(self, key: jax.Array, params: TParams | None = None) -> tuple[jax.Array, TState]:
        """Draw an initial state; returns ``(obs, state)``."""
        if params is None:
            params = self.default_params
        return self.reset_env(key, params)

    def step_env(self, key: jax.Array, state: TState, action, params: TParams):
        """The transition without auto-reset: ``(obs, state, reward, terminated, info)``."""
        raise NotImplementedError

    def reset_env(self, key: jax.Array, params: TParams) -> tuple[jax.Array, TState]:
        raise NotImplementedError

    def get_obs(self, state: TState, params: TParams | None = None, key=None) -> jax.Array:
        raise NotImplementedError

    def is_terminated(self, state: TState, params: TParams) -> jax.Array:
        raise NotImplementedError

    def is_truncated(self, state: TState, params: TParams) -> jax.Array:
        return state.time >= params.max_steps_in_episode

    def is_terminal(self, state: TState, params: TParams) -> jax.Array:
        """gymnax's name for ``is_terminated``."""
        return self.is_terminated(state, params)

    def discount(self, state: TState, params: TParams) -> jax.Array:
        return jnp.where(self.is_terminated(state, params), 0.0, 1.0)

    @property
    def name(self) -> str:
        return type(self).__name__

    @property
    def num_actions(self) -> int:
        raise NotImplementedError

    def action_space(self, params: TParams | None = None):
        raise NotImplementedError

    def observation_space(self, params: TParams | None = None):
        raise NotImplementedError
