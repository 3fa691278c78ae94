"""The functional core: pytree dataclasses, spaces and the gymnax-compatible base environment.

An environment is a handful of pure functions over two frozen pytree dataclasses, ``EnvState``
(what evolves) and ``EnvParams`` (independent physical constants). Nothing here holds mutable
state, so every method composes with ``jit``, ``vmap``, ``lax.scan``, ``grad`` and ``jacfwd``.
The signatures follow gymnax 1.x, so a trainer written for gymnax runs on diffgym unchanged.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Generic, TypeVar, dataclass_transform

import jax
import jax.extend
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


def uniform(key: jax.Array, shape: tuple[int, ...], minval=0.0, maxval=1.0) -> jax.Array:
    """``jax.random.uniform(key, shape, minval=minval, maxval=maxval)`` in JAX's non-partitionable
    Threefry layout (``jax.threefry_partitionable(False)``), bit for bit, hashed block by block.

    Same generator (Threefry-2x32, 20 rounds), same float conversion. The non-partitionable layout
    reads both 32-bit words of each hash block where the partitionable default (JAX >= 0.5) xors
    them into one, so a draw costs half the blocks; the envs' reset draws are small per-env vectors
    (under ``vmap``, one per env), which the default layout exists to shard and these never need.

    For float32 draws from Threefry keys the hash is computed here, block by block on scalar
    counters (``_threefry_bits``): under ``vmap`` each block is then a hash of ``(batch,)`` vectors,
    not of a ``(batch, blocks)`` array whose short minor axis vectorises poorly, and below 64 envs
    it is written out rather than run as jax's rolled loop. Measured on 2 CPU cores against
    ``jax.random.uniform`` in the same layout (CartPole's auto-resetting ``step``, one process,
    interleaved repeats): at batch 1, 16x more steps/s; with the batch split over two host devices,
    1.15x at 256 and 4096; with XLA's default threading on one device, 0.7-0.8x at 256 and 4096
    (bench/results/throughput.md has both libraries in every setting). Other keys (``rbg``, ...)
    and float64 draws (``jax_enable_x64``) go through ``jax.random.uniform``.
    """
    dtype = jax.dtypes.canonicalize_dtype(jnp.float_)
    if dtype != jnp.float32 or not _is_threefry_key(key):
        with jax.threefry_partitionable(False):
            return jax.random.uniform(key, shape, minval=minval, maxval=maxval)
    return _uniform_from_bits(jax.random.key_data(key), tuple(shape), minval, maxval)


# Jitted, as jax.random.uniform is: the same fusion (and so the same last bit) when called eagerly.
@functools.partial(jax.jit, static_argnums=1)
def _uniform_from_bits(key_words, shape, minval, maxval):
    return bits_to_uniform(_threefry_bits(int(np.prod(shape)))(key_words).reshape(shape), minval, maxval)


def bits_to_uniform(bits: jax.Array, minval, maxval) -> jax.Array:
    """``jax.random.uniform``'s float32 map from 32 random bits to [minval, maxval): 23 mantissa
    bits in [1, 2), minus 1, scaled."""
    minval = jnp.asarray(minval, jnp.float32)
    maxval = jnp.asarray(maxval, jnp.float32)
    mantissa = jax.lax.shift_right_logical(bits, jnp.uint32(9)) | jnp.uint32(0x3F800000)
    unit = jax.lax.bitcast_convert_type(mantissa, jnp.float32) - jnp.float32(1.0)
    return jax.lax.max(minval, unit * (maxval - minval) + minval)


#: Below this many envs under ``vmap`` the hash is written out (no loop); from it on, each block
#: is one ``threefry2x32`` call, which jax lowers on CPU to a rolled loop: per call it costs a
#: few microseconds (at batch 1, 35x the written-out hash), per env less (at batch 256, 1.1x
#: faster; at 16384, 1.8x).
_LOOPED_HASH_FROM_BATCH = 64
#: Threefry-2x32's rotation constants, for even and odd blocks of four rounds.
_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def threefry2x32_written_out(key1, key2, first_counts, second_counts) -> tuple[list, list]:
    """Threefry-2x32 (20 rounds) of the blocks ``(first_counts[j], second_counts[j])`` under the key
    ``(key1, key2)``, written out as plain ``uint32`` arithmetic: the same bits as jax's
    ``threefry2x32`` primitive, which jax lowers on CPU to a rolled 5-iteration loop."""
    schedule = (key1, key2, key1 ^ key2 ^ jnp.uint32(0x1BD11BDA))
    firsts = [jnp.uint32(count) + key1 for count in first_counts]
    seconds = [jnp.uint32(count) + key2 for count in second_counts]
    for block in range(5):
        for bits in _ROTATIONS[block % 2]:
            firsts = [x + y for x, y in zip(firsts, seconds)]
            left, right = jnp.uint32(bits), jnp.uint32(32 - bits)
            seconds = [x ^ ((y << left) | (y >> right)) for x, y in zip(firsts, seconds)]
        firsts = [x + schedule[(block + 1) % 3] for x in firsts]
        seconds = [y + schedule[(block + 2) % 3] + jnp.uint32(block + 1) for y in seconds]
    return firsts, seconds


@functools.lru_cache(maxsize=None)
def _threefry_bits(size: int):
    """``key_words (uint32[2]) -> uint32[size]``: the bits of ``jax.random.bits(key, (size,))`` in
    the non-partitionable layout. Counters ``0 .. size-1`` are padded with a 0 to even length;
    block ``j`` hashes ``(counts[j], counts[half + j])``; the words come out as every block's first
    word, then every block's second. Batched (``vmap``) by ``custom_vmap``: see
    ``_LOOPED_HASH_FROM_BATCH``. Integer in, integer out: nothing here is differentiated."""
    counts = list(range(size)) + [0] * (size % 2)
    half = len(counts) // 2

    def written_out(key1, key2):
        firsts, seconds = threefry2x32_written_out(key1, key2, counts[:half], counts[half:])
        return jnp.stack((firsts + seconds)[:size], axis=-1)

    def looped(key1, key2):
        def count(value):
            return jnp.full(key1.shape, value, jnp.uint32)

        blocks = [
            jax.extend.random.threefry2x32_p.bind(key1, key2, count(counts[j]), count(counts[half + j]))
            for j in range(half)
        ]
        return jnp.stack(([b[0] for b in blocks] + [b[1] for b in blocks])[:size], axis=-1)

    @jax.custom_batching.custom_vmap
    def bits(key_words):
        return written_out(key_words[0], key_words[1])

    @bits.def_vmap
    def _batched(axis_size, in_batched, key_words):
        if not in_batched[0]:
            return bits(key_words), False
        hash_ = written_out if axis_size < _LOOPED_HASH_FROM_BATCH else looped
        return hash_(key_words[..., 0], key_words[..., 1]), True

    return bits


def _is_threefry_key(key) -> bool:
    """A typed Threefry key or a raw ``uint32[2]`` key of the default (Threefry) implementation."""
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        return str(jax.random.key_impl(key)) == "threefry2x32"
    return key.shape == (2,) and str(jax.random.key_impl(key)) == "threefry2x32"


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

    #: Whether ``step_env`` ignores its key. Such envs use the whole ``step`` key for the auto-reset
    #: draw instead of splitting it, which saves one RNG call per step (a large share of the cost of
    #: a small env's step).
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
        """
        if params is None:
            params = self.default_params
        if self.deterministic_transition:
            key_step = key_reset = key
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
