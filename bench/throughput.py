"""Batched throughput (env-steps/s) of diffgym beside gymnax 1.0.1 and gymnasium's numpy envs.

    .venv-bench/bin/python -m bench.throughput            # writes bench/results/throughput.md
    .venv-bench/bin/python -m bench.throughput --quick    # a smoke run: fewer sizes and repeats

What is timed: ``jit(scan(vmap(step)))`` over ``T`` steps of ``B`` envs, for CartPole-v1 and
Pendulum-v1, with diffgym's and gymnax's ``step`` (auto-reset) and ``step_env`` (no reset), at
batch sizes 1, 256, 4096 and 16384. The actions and the per-step keys, shape ``(T, B)``, are drawn
before the timed call, so the env's own cost is what is timed; the scan body adds each step's
reward, observation sum and done flags into a ``(B,)`` accumulator so that nothing the env returns
to a trainer is dead code. Compilation is timed apart (``lower().compile()``), one untimed call
warms up, then each of ``repeats`` timings calls the compiled rollout until at least
``min_repeat_s`` has passed; the table gives the median. diffgym runs as shipped: gradients on (no
``stop_gradient`` anywhere), float32 (jax's default, x64 off), and the caller's threefry keys.

Gymnasium's numpy envs are timed in the same run: the single env (``gymnasium.make``, reset by
hand when an episode ends), ``SyncVectorEnv`` (``gymnasium.make_vec(..., vectorization_mode=
"sync")``) and the numpy-vectorised env (``vectorization_mode="vector_entry_point"``, CartPole
only: gymnasium 1.x ships no vectorised Pendulum), all with pre-drawn numpy actions.

XLA reads its flags once, when jax initialises, so every setting (``CONFIGS``) runs in a fresh
subprocess: XLA's default threading, XLA on one thread pinned to one core, and the batch split
over two host devices (``--xla_force_host_platform_device_count=2``, one thread each). Libraries
are compared only within one setting; the headline table uses ``--headline`` (default: XLA's
default threading, the setting users get and the one the goal is stated for). A last subprocess
times variants of diffgym's ``step`` (what its speed comes from: the key split it skips, the reset
draw's threefry layout and hand-written alternatives to it, the observation computed from the
selected state, ``jnp.where`` vs ``lax.select``, PRNG implementations and
``jax_threefry_partitionable``) beside gymnax, at batch 4096 and 1, in the headline setting.

Needs gymnax 1.0.1 (and ``six``), which pins gymnasium below 1.4, so it lives in its own venv:
``python3 -m venv .venv-bench && .venv-bench/bin/pip install -e '.[render,test,bench]'``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
from bench.machine import cpu_model

RESULTS = Path(__file__).parent / "results" / "throughput.md"
ENV_IDS = ("CartPole-v1", "Pendulum-v1")
BATCH_SIZES = (1, 256, 4096, 16384)
QUICK_BATCH_SIZES = (1, 4096)

SINGLE_THREAD_XLA = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


@dataclasses.dataclass(frozen=True)
class Config:
    """One process-wide setting: environment variables read at jax's start, and CPU pinning."""

    name: str
    description: str
    env: dict[str, str]
    #: Cores the worker process may run on (``os.sched_setaffinity``); ``None`` leaves it free.
    cpus: tuple[int, ...] | None = None
    #: Split the batch over this many host devices (1: plain ``jit``).
    num_devices: int = 1


CONFIGS: dict[str, Config] = {
    config.name: config
    for config in (
        Config("default", "XLA's default threading, both cores", {}),
        Config(
            "one-core",
            "XLA on one thread, process pinned to one core",
            {"XLA_FLAGS": SINGLE_THREAD_XLA},
            cpus=(0,),
        ),
        Config(
            "two-devices",
            "batch split over two host devices, one XLA thread each",
            {"XLA_FLAGS": f"--xla_force_host_platform_device_count=2 {SINGLE_THREAD_XLA}"},
            num_devices=2,
        ),
    )
}
#: The setting users get, and the one the throughput goal is stated for.
DEFAULT_HEADLINE = "default"


@dataclasses.dataclass(frozen=True)
class Timing:
    """A throughput measurement: median env-steps/s over the repeats, and the compile time."""

    steps_per_s: float
    spread: tuple[float, float]  # min and max env-steps/s over the repeats
    compile_s: float
    repeats: int


# --------------------------------------------------------------------------------------------
# Timing helpers
# --------------------------------------------------------------------------------------------
def time_group(calls: dict[str, tuple[Callable[[], Any], int]], *, repeats: int, min_repeat_s: float):
    """Median env-steps/s of each ``name: (call, steps_per_call)``; each call blocks until done.

    The repeats are interleaved (every call once per round) so that a change in the machine's load
    during the run moves all of a group's numbers together and their ratios stay meaningful. Each
    repeat calls a function as many times as fit in ``min_repeat_s`` (at least once), so a fast
    call is not timed on a clock's resolution alone. Returns ``{name: (median, (min, max))}``.
    """
    calls_per_repeat = {}
    for name, (call, _) in calls.items():
        start = time.perf_counter()
        call()
        one_call_s = max(time.perf_counter() - start, 1e-9)
        calls_per_repeat[name] = max(1, int(np.ceil(min_repeat_s / one_call_s)))
    rates: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, (call, steps_per_call) in calls.items():
            start = time.perf_counter()
            for _ in range(calls_per_repeat[name]):
                call()
            rates[name].append(calls_per_repeat[name] * steps_per_call / (time.perf_counter() - start))
    return {name: (statistics.median(r), (min(r), max(r))) for name, r in rates.items()}


def steps_per_rollout(batch_size: int) -> int:
    """Scan length ``T`` for a batch: about 2**20 env-steps per call, 64..32768 steps."""
    return int(min(2**15, max(64, 2**20 // batch_size)))


# --------------------------------------------------------------------------------------------
# JAX worker: diffgym and gymnax under one process-wide setting
# --------------------------------------------------------------------------------------------
def _make_envs(library: str, env_id: str):
    if library == "diffgym":
        import diffgym

        return diffgym.make(env_id)
    import gymnax

    return gymnax.make(env_id)


def _draw_actions(env_id: str, key, shape):
    import jax
    import jax.numpy as jnp

    if env_id == "CartPole-v1":
        return jax.random.randint(key, shape, 0, 2, dtype=jnp.int32)
    return jax.random.uniform(key, shape, jnp.float32, -2.0, 2.0)


def prepare_rollout(
    env,
    params,
    env_id: str,
    batch_size: int,
    *,
    function: str,
    num_devices: int,
    key_impl: str | None = None,
) -> tuple[Callable[[], Any], int, float]:
    """Compile ``jit(scan(vmap(env.<function>)))`` on ``batch_size`` envs and warm it up.

    Returns ``(call, env_steps_per_call, compile_s)``; ``call()`` runs the rollout to completion.

    ``function`` is ``"step"`` (auto-reset) or ``"step_env"``. With ``num_devices > 1`` (and a
    batch they divide) every batched array is split along the batch axis over that many devices.
    """
    import jax
    import jax.numpy as jnp

    num_steps = steps_per_rollout(batch_size)
    root = jax.random.key(0, impl=key_impl) if key_impl else jax.random.key(0)
    key_reset, key_steps, key_actions = jax.random.split(root, 3)
    step_keys = jax.random.split(key_steps, num_steps * batch_size).reshape(num_steps, batch_size)
    actions = _draw_actions(env_id, key_actions, (num_steps, batch_size))
    _, state = jax.vmap(env.reset, in_axes=(0, None))(jax.random.split(key_reset, batch_size), params)
    accumulator = jnp.zeros((batch_size,), jnp.float32)

    if function == "step":
        batched = jax.vmap(env.step, in_axes=(0, 0, 0, None))

        def one_step(key, state, action):
            obs, state, reward, terminated, truncated, _ = batched(key, state, action, params)
            return state, reward + obs.sum(-1) + terminated + truncated

    elif function == "step_env":
        batched = jax.vmap(env.step_env, in_axes=(0, 0, 0, None))

        def one_step(key, state, action):
            obs, state, reward, terminated, _ = batched(key, state, action, params)
            return state, reward + obs.sum(-1) + terminated

    else:
        raise ValueError(f"function must be 'step' or 'step_env', got {function!r}")

    def rollout(state, accumulator, step_keys, actions):
        def body(carry, inputs):
            state, accumulator = carry
            key, action = inputs
            state, summary = one_step(key, state, action)
            return (state, accumulator + summary), None

        (state, accumulator), _ = jax.lax.scan(body, (state, accumulator), (step_keys, actions))
        return state, accumulator

    if num_devices > 1 and batch_size % num_devices == 0:
        from jax.sharding import NamedSharding, PartitionSpec

        mesh = jax.make_mesh((num_devices,), ("batch",))
        by_env = NamedSharding(mesh, PartitionSpec("batch"))
        by_step_and_env = NamedSharding(mesh, PartitionSpec(None, "batch"))
        state = jax.device_put(state, by_env)
        accumulator = jax.device_put(accumulator, by_env)
        step_keys = jax.device_put(step_keys, by_step_and_env)
        actions = jax.device_put(actions, by_step_and_env)

    start = time.perf_counter()
    compiled = jax.jit(rollout).lower(state, accumulator, step_keys, actions).compile()
    compile_s = time.perf_counter() - start
    jax.block_until_ready(compiled(state, accumulator, step_keys, actions))  # warm-up, untimed

    def call():
        jax.block_until_ready(compiled(state, accumulator, step_keys, actions))

    return call, num_steps * batch_size, compile_s


def jax_worker(args) -> dict:
    """Every (library, env, function, batch) of one setting; returns the rows as a dict.

    The four rollouts of one (env, batch) are timed together, interleaved (``time_group``).
    """
    import jax

    rows = []
    for env_id in ENV_IDS:
        envs = {library: _make_envs(library, env_id) for library in ("diffgym", "gymnax")}
        for batch_size in args.batch_sizes:
            calls, compile_s = {}, {}
            for library, (env, params) in envs.items():
                for function in ("step", "step_env"):
                    call, steps, compile_s[library, function] = prepare_rollout(
                        env, params, env_id, batch_size, function=function, num_devices=args.num_devices
                    )
                    calls[library, function] = (call, steps)
            timings = time_group(calls, repeats=args.repeats, min_repeat_s=args.min_repeat_s)
            for (library, function), (median, spread) in timings.items():
                timing = Timing(median, spread, compile_s[library, function], args.repeats)
                rows.append(
                    {"env": env_id, "library": library, "function": function, "batch": batch_size}
                    | dataclasses.asdict(timing)
                )
                _progress(f"{library:8s} {env_id:12s} {function:8s} B={batch_size:<6d} "
                          f"{median / 1e6:8.3f} M steps/s  (compile {timing.compile_s:.2f} s)")
    return {"rows": rows, "devices": [str(d) for d in jax.devices()]}


# --------------------------------------------------------------------------------------------
# Variants of diffgym's step: where its speed comes from
# --------------------------------------------------------------------------------------------
# The hand-written Threefry draws below live here only, as measured alternatives to the shipped
# reset draw (``diffgym.core.uniform``: ``jax.random.uniform`` in the non-partitionable layout).
# diffgym itself uses public ``jax.random`` only.

#: Threefry-2x32's rotation constants, for even and odd blocks of four rounds.
_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def bits_to_uniform(bits, minval, maxval):
    """``jax.random.uniform``'s float32 map from 32 random bits to [minval, maxval): 23 mantissa
    bits in [1, 2), minus 1, scaled."""
    import jax
    import jax.numpy as jnp

    minval = jnp.asarray(minval, jnp.float32)
    maxval = jnp.asarray(maxval, jnp.float32)
    mantissa = jax.lax.shift_right_logical(bits, jnp.uint32(9)) | jnp.uint32(0x3F800000)
    unit = jax.lax.bitcast_convert_type(mantissa, jnp.float32) - jnp.float32(1.0)
    return jax.lax.max(minval, unit * (maxval - minval) + minval)


def threefry2x32_written_out(key1, key2, first_counts, second_counts) -> tuple[list, list]:
    """Threefry-2x32 (20 rounds) of the blocks ``(first_counts[j], second_counts[j])`` under the key
    ``(key1, key2)``, written out as plain ``uint32`` arithmetic: the same bits as jax's
    ``threefry2x32``, which jax lowers on CPU to a rolled 5-iteration loop."""
    import jax.numpy as jnp

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


def _uniform_unrolled_threefry(key, shape=(), dtype=None, minval=0.0, maxval=1.0):
    """Bit for bit ``jax.random.uniform`` (threefry keys, float32), with the hash written out at
    every batch size (``threefry2x32_written_out``)."""
    import jax
    import jax.numpy as jnp

    data = jax.random.key_data(key)
    key1, key2, size = data[0], data[1], int(np.prod(shape))
    if jax.config.jax_threefry_partitionable:  # word i: both halves of block (0, i), xored
        firsts, seconds = threefry2x32_written_out(key1, key2, [0] * size, list(range(size)))
        words = [x ^ y for x, y in zip(firsts, seconds)]
    else:  # counts 0..n-1 (padded with a 0 to even length), hashed as two halves
        counts = list(range(size)) + [0] * (size % 2)
        half = len(counts) // 2
        firsts, seconds = threefry2x32_written_out(key1, key2, counts[:half], counts[half:])
        words = (firsts + seconds)[:size]
    return bits_to_uniform(jnp.stack(words).reshape(shape), minval, maxval)


#: Below this many envs under ``vmap`` the per-block draw writes the hash out; from it on it binds
#: jax's ``threefry2x32`` primitive once per block (the draw diffgym shipped before 2026-12).
_LOOPED_HASH_FROM_BATCH = 64


def _uniform_per_block(key, shape=(), dtype=None, minval=0.0, maxval=1.0):
    """The reset draw diffgym shipped until it went back to ``jax.random.uniform``: the same bits
    (non-partitionable layout), hashed block by block on scalar counters, batched by a
    ``jax.custom_batching.custom_vmap`` -- written out below 64 envs, jax's ``threefry2x32``
    primitive (``jax.extend.random.threefry2x32_p``, not a stable API) per block from there.
    Kept in the bench only, to measure what the public draw costs against it."""
    import jax
    import jax.extend
    import jax.numpy as jnp

    size = int(np.prod(shape))
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

    return bits_to_uniform(bits(jax.random.key_data(key)).reshape(shape), minval, maxval)


def _uniform_from_split_bits(key, shape=(), dtype=None, minval=0.0, maxval=1.0):
    """Same distribution, half the hashes: the 2 words of each ``jax.random.split`` key are used
    as random bits, so n uniforms cost ceil(n/2) threefry hashes instead of n (partitionable)."""
    import jax

    size = int(np.prod(shape))
    words = jax.random.key_data(jax.random.split(key, (size + 1) // 2)).reshape(-1)[:size]
    return bits_to_uniform(words.reshape(shape), minval, maxval)


def _uniform_jax(partitionable: bool):
    """``jax.random.uniform`` itself, in the given threefry layout."""

    def draw(key, shape=(), dtype=None, minval=0.0, maxval=1.0):
        import jax

        with jax.threefry_partitionable(partitionable):
            return jax.random.uniform(key, shape, minval=minval, maxval=maxval)

    return draw


#: Variant name -> replacement for the envs' reset draw (``diffgym.core.uniform``, which is
#: ``jax.random.uniform`` in the non-partitionable layout) while the rollout is traced. The
#: per-block and unrolled draws give the very same bits; the other two the same distribution.
RESET_DRAWS = {
    "diffgym step, reset draw in jax's partitionable layout (jax's default)": _uniform_jax(True),
    "diffgym step, reset draw per block, custom_vmap (the hand-written draw shipped before; same bits)":
        _uniform_per_block,
    "diffgym step, reset draw with unrolled threefry (same bits)": _uniform_unrolled_threefry,
    "diffgym step, reset draw from split-key bits (half the hashes)": _uniform_from_split_bits,
}
#: The variant that measures the key-safety alternative: split every step's key as gymnax does.
KEY_SPLIT_VARIANT = "diffgym step, key always split (as gymnax; step_env gets a key it ignores)"


@contextlib.contextmanager
def _reset_draw(variant: str):
    """Replace the envs' reset draw (``uniform`` in their modules) while ``variant`` is traced."""
    import diffgym.envs.cartpole
    import diffgym.envs.pendulum

    replacement = RESET_DRAWS.get(variant)
    if replacement is None:
        yield
        return
    modules = (diffgym.envs.cartpole, diffgym.envs.pendulum)
    originals = [module.uniform for module in modules]

    def draw(key, shape, minval=0.0, maxval=1.0):
        import jax

        from diffgym.core import RESET_DRAW_PARTITIONABLE

        # The shipped draw's layout, unless the variant sets its own.
        with jax.threefry_partitionable(RESET_DRAW_PARTITIONABLE):
            return replacement(key, shape, None, minval, maxval)

    for module in modules:
        module.uniform = draw
    try:
        yield
    finally:
        for module, original in zip(modules, originals):
            module.uniform = original


def _variant_envs(env_id: str):
    """diffgym variants that differ from the shipped env in one respect each (same semantics)."""
    import jax
    import jax.numpy as jnp

    import diffgym

    shipped, _ = diffgym.make(env_id)
    base = type(shipped)

    class WithKeySplit(base):
        """Splits the step key as gymnax does, although the transition ignores it: the other
        key-safe design (the shipped one gives a deterministic ``step_env`` no key)."""

        deterministic_transition = False

    class WithSelectedObservation(base):
        """Selects between the reset's and the transition's observations, as gymnax does, instead
        of observing the selected state."""

        observation_is_state_function = False

    class WithLaxSelect(base):
        """Auto-reset with ``lax.select`` on every leaf, as gymnax writes it."""

        def step(self, key, state, action, params=None):
            params = self.default_params if params is None else params
            obs_st, state_st, reward, terminated, info = self.step_env(None, state, action, params)
            truncated = self.is_truncated(state_st, params)
            done = jnp.logical_or(terminated, truncated)
            obs_re, state_re = self.reset_env(key, params)
            state = jax.tree.map(lambda r, s: jax.lax.select(done, r, s), state_re, state_st)
            obs = self.get_obs(state, params)  # as shipped (observation_is_state_function)
            info = {**info, "terminated": terminated, "truncated": truncated, "final_observation": obs_st}
            return obs, state, reward, terminated, truncated, info

    class NoAutoReset(base):
        """The floor: ``step`` without the reset draw and select (not the same semantics)."""

        def step(self, key, state, action, params=None):
            params = self.default_params if params is None else params
            obs, state, reward, terminated, info = self.step_env(None, state, action, params)
            return obs, state, reward, terminated, self.is_truncated(state, params), info

    return {
        "diffgym step (shipped)": shipped,
        KEY_SPLIT_VARIANT: WithKeySplit(),
        "diffgym step, observations selected as gymnax": WithSelectedObservation(),
        "diffgym step, lax.select": WithLaxSelect(),
        **{name: base() for name in RESET_DRAWS},
        "diffgym step without auto-reset (floor)": NoAutoReset(),
    }


def variants_worker(args) -> dict:
    """Times the variants and the PRNG implementations at batch 4096 and 1."""
    import jax

    rows = []
    partitionable = bool(jax.config.jax_threefry_partitionable)
    for seed in range(8):  # the "same bits" claims of the hand-written reset draws, checked every run
        key, shape, low, high = jax.random.key(seed), (4,), -0.05, 0.05
        reference = jax.jit(lambda k: jax.random.uniform(k, shape, minval=low, maxval=high))(key)
        unrolled = jax.jit(lambda k: _uniform_unrolled_threefry(k, shape, None, low, high))(key)
        if not np.array_equal(np.asarray(reference), np.asarray(unrolled)):
            raise AssertionError(f"unrolled threefry draw differs from jax.random.uniform: {unrolled} vs {reference}")
        keys = jax.random.split(key, 70)  # both batched forms of the per-block draw: 70 and 1 envs
        for batch in (keys, keys[:1]):
            with jax.threefry_partitionable(False):
                reference = jax.jit(jax.vmap(lambda k: jax.random.uniform(k, shape, minval=low, maxval=high)))(batch)
            per_block = jax.jit(jax.vmap(lambda k: _uniform_per_block(k, shape, None, low, high)))(batch)
            if not np.array_equal(np.asarray(reference), np.asarray(per_block)):
                raise AssertionError("per-block threefry draw differs from jax.random.uniform (non-partitionable)")
    for env_id in ENV_IDS:
        _, params = _make_envs("diffgym", env_id)
        gymnax_env, gymnax_params = _make_envs("gymnax", env_id)
        cases: list[tuple[str, Any, Any, str | None]] = [
            (name, env, params, None) for name, env in _variant_envs(env_id).items()
        ]
        cases.append(("gymnax step", gymnax_env, gymnax_params, None))
        if not args.threefry_only:
            for impl in ("rbg", "unsafe_rbg"):
                diffgym_env, _ = _make_envs("diffgym", env_id)
                cases.append((f"diffgym step, {impl} keys", diffgym_env, params, impl))
                cases.append((f"gymnax step, {impl} keys", gymnax_env, gymnax_params, impl))
        else:
            kept = ("diffgym step (shipped)", "gymnax step", KEY_SPLIT_VARIANT)
            cases = [c for c in cases if c[0] in kept]
        for batch_size in args.batch_sizes:
            calls, compile_s = {}, {}
            for name, env, env_params, impl in cases:
                row = {"env": env_id, "variant": name, "batch": batch_size, "threefry_partitionable": partitionable}
                try:
                    with _reset_draw(name):
                        call, steps, compile_s[name] = prepare_rollout(
                            env, env_params, env_id, batch_size, function="step",
                            num_devices=args.num_devices, key_impl=impl,
                        )
                except Exception as error:  # e.g. rbg keys cannot be split over devices under vmap
                    rows.append(row | {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:60]}…"})
                    _progress(f"{name:42s} {env_id:12s} B={batch_size:<6d} failed: {rows[-1]['error']}")
                    continue
                calls[name] = (call, steps)
            for name, (median, spread) in time_group(
                calls, repeats=args.repeats, min_repeat_s=args.min_repeat_s
            ).items():
                timing = Timing(median, spread, compile_s[name], args.repeats)
                rows.append({"env": env_id, "variant": name, "batch": batch_size,
                             "threefry_partitionable": partitionable} | dataclasses.asdict(timing))
                _progress(f"{name:42s} {env_id:12s} B={batch_size:<6d} {median / 1e6:8.3f} M steps/s")
    return {"rows": rows}


# --------------------------------------------------------------------------------------------
# Gymnasium worker: numpy envs, no jax
# --------------------------------------------------------------------------------------------
def gymnasium_worker(args) -> dict:
    """Gymnasium's single env, SyncVectorEnv and numpy-vectorised env on pre-drawn actions."""
    import gymnasium

    rows = []
    rng = np.random.default_rng(0)

    def actions_for(env_id: str, shape):
        if env_id == "CartPole-v1":
            return rng.integers(0, 2, size=shape).astype(np.int64)
        return rng.uniform(-2.0, 2.0, size=(*shape, 1)).astype(np.float32)

    for env_id in ENV_IDS:
        # Single env: gymnasium.make as a user gets it (TimeLimit, OrderEnforcing, checker).
        env = gymnasium.make(env_id)
        env.reset(seed=0)
        num_steps = 20_000 if not args.quick else 5_000
        actions = list(actions_for(env_id, (num_steps,)))

        def run_single(env=env, actions=actions):
            for action in actions:
                _, _, terminated, truncated, _ = env.step(action)
                if terminated or truncated:
                    env.reset()

        (median, spread), = time_group(
            {"single": (run_single, num_steps)}, repeats=args.repeats, min_repeat_s=0.0
        ).values()
        rows.append({"env": env_id, "kind": "single env", "batch": 1, "steps_per_s": median, "spread": spread})
        _progress(f"gymnasium single     {env_id:12s} B=1      {median / 1e6:8.3f} M steps/s")
        env.close()

        for kind, mode in (("SyncVectorEnv", "sync"), ("vector env", "vector_entry_point")):
            for batch_size in args.batch_sizes:
                try:
                    start = time.perf_counter()
                    vec = gymnasium.make_vec(env_id, num_envs=batch_size, vectorization_mode=mode)
                    make_s = time.perf_counter() - start
                except Exception as error:  # gymnasium has no vector entry point for Pendulum-v1
                    rows.append({"env": env_id, "kind": kind, "batch": batch_size, "error": repr(error)})
                    _progress(f"gymnasium {kind} {env_id}: {error!r}")
                    break
                vec.reset(seed=0)
                # About 0.2 s of work per repeat for the slowest (sync) case: ~3 us per sub-env step.
                num_steps = max(4, min(2_000, 60_000 // batch_size))
                vec_actions = actions_for(env_id, (num_steps, batch_size))

                def run_vector(vec=vec, vec_actions=vec_actions):
                    for action in vec_actions:
                        vec.step(action)

                (median, spread), = time_group(
                    {kind: (run_vector, num_steps * batch_size)}, repeats=args.repeats, min_repeat_s=0.0
                ).values()
                rows.append(
                    {"env": env_id, "kind": kind, "batch": batch_size, "steps_per_s": median, "spread": spread,
                     "make_s": make_s}
                )
                _progress(f"gymnasium {kind:13s} {env_id:12s} B={batch_size:<6d} {median / 1e6:8.3f} M steps/s")
                vec.close()
    return {"rows": rows}


# --------------------------------------------------------------------------------------------
# Orchestration: one subprocess per setting, then the markdown report
# --------------------------------------------------------------------------------------------
def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _run_worker(kind: str, config: Config, args, extra_env: dict[str, str] | None = None) -> dict:
    """Runs ``--worker kind`` in a fresh interpreter under ``config``; returns its JSON result."""
    env = {**os.environ, **config.env, **(extra_env or {})}
    command = [
        sys.executable, "-m", "bench.throughput", "--worker", kind, "--config", config.name,
        "--repeats", str(args.repeats), "--min-repeat-s", str(args.min_repeat_s),
        "--batch-sizes", *map(str, args.worker_batch_sizes or args.batch_sizes),
    ] + (["--quick"] if args.quick else []) + (["--threefry-only"] if args.threefry_only else [])
    _progress(f"--- {kind} worker, setting {config.name!r}: {config.description}")
    start = time.perf_counter()
    done = subprocess.run(command, env=env, stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parent.parent)
    if done.returncode != 0:
        raise RuntimeError(f"{kind} worker under {config.name!r} exited with {done.returncode}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["wall_s"] = time.perf_counter() - start
    return result


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    from importlib.metadata import PackageNotFoundError, version

    for package in ("jax", "jaxlib", "gymnax", "gymnasium", "numpy", "flax"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def _machine() -> dict[str, str]:
    cpu = cpu_model()
    memory = "unknown"
    try:
        kib = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0])
        memory = f"{kib / 2**20:.1f} GiB"
    except (OSError, IndexError, ValueError):
        pass
    return {
        "cpu": cpu,
        "cores": f"{os.cpu_count()} logical ({len(os.sched_getaffinity(0))} usable by this process)",
        "memory": memory,
        "os": platform.platform(),
    }


def _load() -> str:
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


def _fmt(steps_per_s: float | None) -> str:
    if steps_per_s is None:
        return "—"
    if steps_per_s >= 1e6:
        return f"{steps_per_s / 1e6:.2f} M"
    return f"{steps_per_s / 1e3:.0f} k"


def _lookup(rows, **match) -> dict | None:
    for row in rows:
        if all(row.get(k) == v for k, v in match.items()):
            return row
    return None


def _rate(rows, **match) -> float | None:
    row = _lookup(rows, **match)
    return None if row is None or "steps_per_s" not in row else row["steps_per_s"]


def _ratio(a: float | None, b: float | None) -> str:
    return "—" if a is None or b is None else f"{a / b:.2f}×"


def _noise(rows) -> str:
    spreads = sorted((row["spread"][1] - row["spread"][0]) / row["steps_per_s"] for row in rows
                     if "steps_per_s" in row)
    return f"{100 * statistics.median(spreads):.0f}% [{100 * spreads[-1]:.0f}%]"


def render_markdown(results: dict, args) -> str:
    """The report: machine, method, headline table, every setting, compile times, variants."""
    headline = args.headline
    lines = [
        "# Batched throughput: diffgym vs gymnax 1.0.1 vs gymnasium (numpy)",
        "",
        f"Generated by `{results['command']}` on {results['started']} in {results['wall_s']:.0f} s. "
        "Env-steps per second, higher is better; medians of "
        f"{args.repeats} repeats (each ≥ {args.min_repeat_s} s of calls), compile excluded.",
        "",
        "## Machine",
        "",
    ]
    for key, value in results["machine"].items():
        lines.append(f"- **{key}**: {value}")
    lines.append("- **versions**: " + ", ".join(f"{k} {v}" for k, v in results["versions"].items()))
    lines.append(
        f"- **load average** (1/5/15 min) at start: {results['load_start']}; at end: {results['load_end']}"
        + (" — the machine was shared with other jobs during this run, so absolute numbers are noisy; "
           "ratios within one setting are the meaningful part" if args.shared else "")
    )
    lines.append("- **settings** (each in its own process; `XLA_FLAGS` as given):")
    for name in results["configs"]:
        config = CONFIGS[name]
        flags = config.env.get("XLA_FLAGS", "(none: XLA defaults)")
        pin = f", pinned to CPU {list(config.cpus)}" if config.cpus else ""
        lines.append(f"  - `{name}`: {config.description}{pin}; `XLA_FLAGS={flags}`")
    lines += [
        "",
        "Method: `jit(lax.scan(vmap(step)))` over T steps of B envs, T ≈ 2^20 / B (64 … 32768); "
        "actions and per-step keys, shape (T, B), drawn before the timed call; the scan body sums "
        "reward, observation and done flags into a (B,) accumulator so that nothing the env returns "
        "is dead code. diffgym's `step` is the shipped one: auto-reset, gradients on (no "
        "`stop_gradient`), float32. gymnax's `step` draws a reset state every step and splits the "
        "key; its CartPole `step_env` applies `stop_gradient` to the state. With two devices the "
        "batch is split over them (batch 1 runs on one device). Gymnasium rows: `gymnasium.make` "
        "single env (reset by hand at episode end), `make_vec(..., 'sync')` and "
        "`make_vec(..., 'vector_entry_point')`, numpy actions drawn beforehand.",
        "",
    ]

    jax_results = results["jax"]
    gym_rows = results["gymnasium"]["rows"]

    def library_table(config_name: str, title: str) -> list[str]:
        rows = jax_results[config_name]["rows"]
        out = [
            f"## {title}",
            "",
            "| env | batch | diffgym `step` | gymnax `step` | ratio | diffgym `step_env` | gymnax `step_env` "
            "| ratio | gymnasium single | gymnasium `SyncVectorEnv` | gymnasium vector env |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for env_id in ENV_IDS:
            for batch_size in args.batch_sizes:
                d_step = _rate(rows, env=env_id, library="diffgym", function="step", batch=batch_size)
                g_step = _rate(rows, env=env_id, library="gymnax", function="step", batch=batch_size)
                d_env = _rate(rows, env=env_id, library="diffgym", function="step_env", batch=batch_size)
                g_env = _rate(rows, env=env_id, library="gymnax", function="step_env", batch=batch_size)
                single = _rate(gym_rows, env=env_id, kind="single env", batch=1) if batch_size == 1 else None
                sync = _rate(gym_rows, env=env_id, kind="SyncVectorEnv", batch=batch_size)
                vector = _rate(gym_rows, env=env_id, kind="vector env", batch=batch_size)
                out.append(
                    f"| {env_id} | {batch_size} | {_fmt(d_step)} | {_fmt(g_step)} | **{_ratio(d_step, g_step)}** "
                    f"| {_fmt(d_env)} | {_fmt(g_env)} | {_ratio(d_env, g_env)} | {_fmt(single)} | {_fmt(sync)} "
                    f"| {_fmt(vector)} |"
                )
        return out + [""]

    lines += library_table(headline, f"Headline: setting `{headline}` ({CONFIGS[headline].description})")

    # Goals, checked on the headline setting.
    rows = jax_results[headline]["rows"]
    ratios = {
        (env_id, b): _rate(rows, env=env_id, library="diffgym", function="step", batch=b)
        / _rate(rows, env=env_id, library="gymnax", function="step", batch=b)
        for env_id in ENV_IDS
        for b in args.batch_sizes
    }
    lines += ["### Goals (headline setting)", ""]
    if 4096 in args.batch_sizes:
        for env_id in ENV_IDS:
            r = ratios[(env_id, 4096)]
            lines.append(f"- {env_id}: diffgym `step` / gymnax `step` at batch 4096 = {r:.2f}× "
                         f"(goal ≥ 1.5×: {'met' if r >= 1.5 else 'NOT met'})")
    worst = min(ratios, key=ratios.get)
    lines.append(f"- lowest ratio over all batch sizes: {ratios[worst]:.2f}× ({worst[0]}, batch {worst[1]}) "
                 f"(goal ≥ 1×: {'met' if ratios[worst] >= 1.0 else 'NOT met'})")
    if 4096 in args.batch_sizes:
        others = []
        for name in results["configs"]:
            if name == headline:
                continue
            config_rows = jax_results[name]["rows"]
            cells = [
                f"{env_id} {_ratio(_rate(config_rows, env=env_id, library='diffgym', function='step', batch=4096), _rate(config_rows, env=env_id, library='gymnax', function='step', batch=4096))}"
                for env_id in ENV_IDS
            ]
            others.append(f"`{name}`: " + ", ".join(cells))
        if others:
            lines.append("- the same ratio at batch 4096 in the other settings: " + "; ".join(others))
    lines.append("")
    lines.append("Run-to-run noise, (max − min) / median over the repeats of each cell, median [largest] over "
                 "the cells of a setting: " + "; ".join(
                     f"`{name}` {_noise(jax_results[name]['rows'])}" for name in results["configs"]) + ".")
    lines.append("")

    # Best setting per library, so a reader sees which setting each library prefers.
    lines += ["## Every setting", "", "`step` / `step_env`, M env-steps/s:", "",
              "| env | batch | library | " + " | ".join(f"`{c}`" for c in results["configs"]) + " |",
              "|---|---:|---|" + "---:|" * len(results["configs"])]
    for env_id in ENV_IDS:
        for batch_size in args.batch_sizes:
            for library in ("diffgym", "gymnax"):
                cells = []
                for config_name in results["configs"]:
                    config_rows = jax_results[config_name]["rows"]
                    s = _rate(config_rows, env=env_id, library=library, function="step", batch=batch_size)
                    e = _rate(config_rows, env=env_id, library=library, function="step_env", batch=batch_size)
                    cells.append(f"{s / 1e6:.2f} / {e / 1e6:.2f}")
                lines.append(f"| {env_id} | {batch_size} | {library} | " + " | ".join(cells) + " |")
    lines.append("")
    for config_name in results["configs"]:
        if config_name != headline:
            lines += library_table(config_name, f"Setting `{config_name}` ({CONFIGS[config_name].description})")

    lines += ["## Compile times (warm-up, excluded above)", "",
              "Seconds for `jit(...).lower(...).compile()` of one rollout, median over batch sizes, "
              "per setting:", "",
              "| library | function | " + " | ".join(f"`{c}`" for c in results["configs"]) + " |",
              "|---|---|" + "---:|" * len(results["configs"])]
    for library in ("diffgym", "gymnax"):
        for function in ("step", "step_env"):
            cells = []
            for config_name in results["configs"]:
                compile_times = [r["compile_s"] for r in jax_results[config_name]["rows"]
                                 if r["library"] == library and r["function"] == function]
                cells.append(f"{statistics.median(compile_times):.2f}")
            lines.append(f"| {library} | `{function}` | " + " | ".join(cells) + " |")
    lines.append("")

    if results.get("variants"):
        lines += [
            f"## Where diffgym's `step` speed comes from (setting `{headline}`)",
            "",
            "Each diffgym row changes one thing in the shipped `step`. `rbg`/`unsafe_rbg` rows pass "
            "keys of that PRNG implementation (`jax.random.key(seed, impl=...)`) to both libraries; "
            "the last block reruns with `JAX_THREEFRY_PARTITIONABLE=0` (gymnax's draws then take the "
            "non-partitionable layout too). The *floor* is not a valid `step` (no auto-reset): it bounds "
            "what any reset scheme can reach. The shipped reset draw (`diffgym.core.uniform`) is "
            "`jax.random.uniform` in JAX's non-partitionable Threefry layout "
            "(`jax.threefry_partitionable(False)`), and the shipped `step` gives a deterministic "
            "`step_env` no key. *Key always split*: the other key-safe design, gymnax's. *Per block, "
            "custom_vmap*: the hand-written draw diffgym shipped before (same bits; jax's private-ish "
            "`jax.extend` threefry primitive, so it lives in this bench only). *Unrolled threefry (same "
            "bits)*: the hash written out at every batch size. Both are checked bit-identical to "
            "`jax.random.uniform` at the start of every run. *Split-key bits*: the same distribution "
            "(23-bit float32 uniforms) from half the hashes, but other draws for a given key. M env-steps/s:",
            "",
            "| variant | env | batch | M steps/s | min–max over repeats | vs gymnax `step` (same block) "
            "| vs shipped diffgym `step` (same block) |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for block in results["variants"]:
            for row in block["rows"]:
                reference = _rate(block["rows"], env=row["env"], variant="gymnax step", batch=row["batch"])
                shipped = _rate(block["rows"], env=row["env"], variant="diffgym step (shipped)", batch=row["batch"])
                label = row["variant"] + ("" if row["threefry_partitionable"] else " [partitionable off]")
                if "error" in row:
                    lines.append(f"| {label} | {row['env']} | {row['batch']} | failed: {row['error']} | — | — | — |")
                    continue
                low, high = row["spread"]
                lines.append(f"| {label} | {row['env']} | {row['batch']} | {row['steps_per_s'] / 1e6:.2f} "
                             f"| {low / 1e6:.2f}–{high / 1e6:.2f} | {_ratio(row['steps_per_s'], reference)} "
                             f"| {_ratio(row['steps_per_s'], shipped)} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="batch 1 and 4096 only, 3 repeats")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS),
                        help="settings to run, each in its own process")
    parser.add_argument("--headline", default=DEFAULT_HEADLINE, choices=list(CONFIGS),
                        help="setting of the headline table and of the variant study")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None)
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per cell (median)")
    parser.add_argument("--min-repeat-s", type=float, default=0.05, help="seconds of calls per repeat")
    parser.add_argument("--no-variants", action="store_true", help="skip the variant study")
    parser.add_argument("--quiet-machine", dest="shared", action="store_false",
                        help="do not flag the numbers as taken on a shared machine")
    parser.add_argument("--out", type=Path, default=RESULTS, help="markdown report to write")
    parser.add_argument("--worker", choices=("jax", "gymnasium", "variants"), help=argparse.SUPPRESS)
    parser.add_argument("--config", default="default", help=argparse.SUPPRESS)
    parser.add_argument("--threefry-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.batch_sizes = tuple(args.batch_sizes or (QUICK_BATCH_SIZES if args.quick else BATCH_SIZES))
    args.repeats = args.repeats or (3 if args.quick else 5)
    args.worker_batch_sizes = None

    if args.worker:
        config = CONFIGS[args.config]
        args.num_devices = config.num_devices
        if config.cpus is not None:
            os.sched_setaffinity(0, set(config.cpus))
        worker = {"jax": jax_worker, "gymnasium": gymnasium_worker, "variants": variants_worker}[args.worker]
        print(json.dumps(worker(args)))
        return

    if args.headline not in args.configs:
        parser.error(f"--headline {args.headline!r} must be one of the settings run: {args.configs}")
    try:
        import gymnax  # noqa: F401
    except ImportError as error:
        raise SystemExit(
            f"bench.throughput compares against gymnax 1.0.1, which failed to import ({error!r}). Install "
            "it in a separate venv: python3 -m venv .venv-bench && .venv-bench/bin/pip install -e "
            "'.[render,test,bench]' and run .venv-bench/bin/python -m bench.throughput"
        ) from None

    started = datetime.datetime.now(datetime.timezone.utc)
    results: dict[str, Any] = {
        "command": "python -m bench.throughput " + " ".join(argv if argv is not None else sys.argv[1:]),
        "started": started.strftime("%Y-%m-%d %H:%M UTC"),
        "machine": _machine(),
        "versions": _versions(),
        "load_start": _load(),
        "configs": args.configs,
        "jax": {},
    }
    start = time.perf_counter()
    for name in args.configs:
        results["jax"][name] = _run_worker("jax", CONFIGS[name], args)
    results["gymnasium"] = _run_worker("gymnasium", CONFIGS["default"], args)
    results["variants"] = []
    if not args.no_variants:
        variant_args = argparse.Namespace(**{**vars(args), "worker_batch_sizes": (4096, 1)})
        results["variants"].append(_run_worker("variants", CONFIGS[args.headline], variant_args))
        threefry_args = argparse.Namespace(**{**vars(variant_args), "threefry_only": True})
        results["variants"].append(
            _run_worker("variants", CONFIGS[args.headline], threefry_args, {"JAX_THREEFRY_PARTITIONABLE": "0"})
        )
    results["wall_s"] = time.perf_counter() - start
    results["load_end"] = _load()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render_markdown(results, args))
    print(f"wrote {args.out} in {results['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
