"""Gymnasium shells around diffgym's functional environments, and their registration.

``import diffgym`` registers ``diffgym/<id>`` for every registered ``EnvSpec`` (``CartPole-v1``,
``Pendulum-v1``, ...) with string entry points, so the shells load on the first ``make``::

    env = gymnasium.make("diffgym/CartPole-v1", render_mode="rgb_array")
    envs = gymnasium.make_vec("diffgym/CartPole-v1", num_envs=8)   # one jitted call per step

``DiffgymEnv`` is one generic ``gymnasium.Env`` for every functional env: it owns the key, the state
and the params, returns numpy values in gymnasium's spaces and dtypes, and validates actions.
``DiffgymVectorEnv`` steps N copies in one vmapped call with gymnasium's ``NEXT_STEP`` autoreset.

How the step is kept cheap (measured in ``bench/results/shell.md``: about 2x gymnasium's numpy
CartPole-v1 step, 15-20x faster than gymnasium's own JAX shell): a jitted call costs a few
microseconds per argument and per result, so the whole shell state lives in ONE flat ``uint32``
device buffer -- the functional state's leaves bit-cast into words, followed by the observation,
reward, termination flag and info of the last step. A step is one compiled call
``buffer, action -> buffer`` (the old buffer donated, so written in place) and one ``np.array`` of
the result. Discrete actions are looked up in a table of device scalars (a host-to-device transfer
of the action would cost about a third of the call), deterministic transitions draw no random numbers, and
compiled kernels are shared by every shell with the same env and params.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Callable

import gymnasium
import jax
import jax.numpy as jnp
import numpy as np
from gymnasium import spaces
from gymnasium.error import ResetNeeded
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from diffgym.core import Box, Discrete, Environment, EnvParams
from diffgym.registry import EnvSpec, make, resolve_env_id

__all__ = ["DiffgymEnv", "DiffgymVectorEnv", "register_with_gymnasium", "trace_counts"]

#: How many times each compiled kernel was traced, keyed by ``(env name, kernel name)``. A kernel
#: is traced once per (env, params) and action dtype; a count that grows while stepping is a bug.
trace_counts: collections.Counter = collections.Counter()

RENDER_MODES = (None, "human", "rgb_array")


def register_with_gymnasium(spec: EnvSpec) -> None:
    """Register ``diffgym/<id>`` with gymnasium from the env's ``EnvSpec`` (string entry points:
    the shells load on the first ``gymnasium.make``). Re-registering replaces the entry."""
    values = dict(spec.gymnasium)
    if "max_episode_steps" not in values:
        env = spec.env_class()(**spec.kwargs)
        values["max_episode_steps"] = int(env.default_params.max_steps_in_episode)
    values.setdefault("reward_threshold", spec.reward_threshold)
    gym_id = f"diffgym/{spec.id}"
    gymnasium.registry.pop(gym_id, None)
    gymnasium.register(
        id=gym_id,
        entry_point="diffgym.gym:DiffgymEnv",
        vector_entry_point="diffgym.gym:DiffgymVectorEnv",
        kwargs={"env_id": spec.id},
        **values,
    )


def _render_fps(env: Environment) -> int:
    """The frame rate of ``env``'s renderer (30 when it has none: ``render()`` then says so)."""
    from diffgym.render import renderer_class

    try:
        return int(renderer_class(env).render_fps)
    except NotImplementedError:
        return 30


# --------------------------------------------------------------------------------------------
# Spaces
# --------------------------------------------------------------------------------------------
def to_gymnasium_space(space) -> spaces.Space:
    """gymnasium's equivalent of a diffgym ``Discrete`` or ``Box`` (float32 boxes, int64 discrete)."""
    if isinstance(space, Discrete):
        return spaces.Discrete(space.n)
    if isinstance(space, Box):
        return spaces.Box(
            low=np.asarray(space.low, np.float32), high=np.asarray(space.high, np.float32), dtype=np.float32
        )
    raise TypeError(f"cannot convert {space!r} of type {type(space).__name__} to a gymnasium space")


# --------------------------------------------------------------------------------------------
# A pytree laid out in a flat uint32 word vector
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Leaf:
    shape: tuple[int, ...]
    dtype: Any  # numpy dtype, or a jax PRNG key dtype
    start: int
    stop: int
    is_key: bool
    key_data_shape: tuple[int, ...] = ()
    key_impl: Any = None


def _key_impl(key) -> Any:
    """The PRNG implementation (``jax.random.key_impl``) of a typed key array or of its
    ``ShapeDtypeStruct``: ``key_impl`` takes arrays, so a struct is traced (nothing runs)."""
    found = []
    jax.eval_shape(lambda k: found.append(jax.random.key_impl(k)), key)
    return found[0]


class _WordLayout:
    """Where each leaf of a pytree lives in a 1-D ``uint32`` vector.

    4- and 8-byte leaves are bit-cast (exact for every value, NaN payloads included); 1- and 2-byte
    leaves take one word each; PRNG keys are stored as their key data (``jax.random.key_data``)
    and rebuilt with their implementation (``jax.random.key_impl``, ``jax.random.wrap_key_data``).
    ``example`` may hold arrays or ``jax.ShapeDtypeStruct``s (as ``jax.eval_shape`` gives).
    """

    def __init__(self, example):
        leaves, self.treedef = jax.tree.flatten(example)
        self.leaves: list[_Leaf] = []
        start = 0
        for leaf in leaves:
            is_key = jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key)
            key_data_shape: tuple[int, ...] = ()
            if is_key:
                key_data_shape = tuple(jax.eval_shape(jax.random.key_data, leaf).shape)
                words = int(np.prod(key_data_shape, dtype=int))
                dtype = leaf.dtype
            else:
                dtype = np.dtype(leaf.dtype)
                words = int(np.prod(leaf.shape, dtype=int)) * (2 if dtype.itemsize == 8 else 1)
            key_impl = _key_impl(leaf) if is_key else None
            self.leaves.append(
                _Leaf(tuple(leaf.shape), dtype, start, start + words, is_key, key_data_shape, key_impl)
            )
            start += words
        self.size = start

    def pack(self, tree) -> jax.Array:
        """Traced: the tree's words, shape ``(size,)``."""
        parts = []
        for spec, leaf in zip(self.leaves, jax.tree.leaves(tree), strict=True):
            leaf = jnp.asarray(leaf)
            if spec.is_key:
                words = jax.random.key_data(leaf).astype(jnp.uint32)
            elif spec.dtype.itemsize >= 4:
                words = jax.lax.bitcast_convert_type(leaf.astype(spec.dtype), jnp.uint32)
            elif spec.dtype == np.bool_:
                words = leaf.astype(jnp.uint32)
            else:
                narrow = jnp.uint16 if spec.dtype.itemsize == 2 else jnp.uint8
                words = jax.lax.bitcast_convert_type(leaf.astype(spec.dtype), narrow).astype(jnp.uint32)
            parts.append(jnp.ravel(words))
        return jnp.concatenate(parts) if parts else jnp.zeros((0,), jnp.uint32)

    def unpack(self, words: jax.Array):
        """Traced: the tree back from its words."""
        leaves = []
        for spec in self.leaves:
            chunk = words[spec.start : spec.stop]
            if spec.is_key:
                leaf = jax.random.wrap_key_data(chunk.reshape(spec.key_data_shape), impl=spec.key_impl)
            elif spec.dtype.itemsize == 8:
                leaf = jax.lax.bitcast_convert_type(chunk.reshape(spec.shape + (2,)), spec.dtype)
            elif spec.dtype.itemsize == 4:
                leaf = jax.lax.bitcast_convert_type(chunk, spec.dtype).reshape(spec.shape)
            elif spec.dtype == np.bool_:
                leaf = (chunk != 0).reshape(spec.shape)
            else:
                narrow = jnp.uint16 if spec.dtype.itemsize == 2 else jnp.uint8
                leaf = jax.lax.bitcast_convert_type(chunk.astype(narrow), spec.dtype).reshape(spec.shape)
            leaves.append(leaf)
        return jax.tree.unflatten(self.treedef, leaves)

    def unpack_numpy(self, words: np.ndarray):
        """Host-side ``unpack`` for plain dtypes (used for ``info``), numpy leaves."""
        leaves = []
        for spec in self.leaves:
            chunk = words[spec.start : spec.stop]
            if spec.dtype == np.bool_:
                leaf = chunk != 0
            elif spec.dtype.itemsize >= 4:
                leaf = chunk.view(spec.dtype)
            else:
                leaf = chunk.astype(np.uint16 if spec.dtype.itemsize == 2 else np.uint8).view(spec.dtype)
            leaves.append(leaf.reshape(spec.shape) if spec.shape else leaf[0])
        return jax.tree.unflatten(self.treedef, leaves)


# --------------------------------------------------------------------------------------------
# Compiled kernels, shared by every shell with the same env and params
# --------------------------------------------------------------------------------------------
def _cache_key(env: Environment, params: EnvParams, *extra) -> Any:
    """A hashable identity of (env configuration, params), or None when params hold arrays."""
    try:
        key = (type(env), tuple(sorted(vars(env).items())), params, *extra)
        hash(key)
    except TypeError:
        return None
    return key


def _public_info(info: dict) -> dict:
    # ``discount`` repeats ``terminated`` (it is for gymnax trainers); gymnasium users get the rest.
    return {k: v for k, v in info.items() if k != "discount"}


class _SingleKernels:
    """Jitted ``buffer``-in/``buffer``-out functions of one shell configuration.

    Buffer layout (``uint32`` words): ``[carry | obs (float32) | reward (float32) | terminated | info]``
    where carry is the functional state (plus the PRNG key when the transition is random).
    """

    def __init__(self, env: Environment, params: EnvParams):
        self.env, self.params = env, params
        name = env.name
        obs_space = env.observation_space(params)
        action_space = env.action_space(params)
        self.random_transition = not env.deterministic_transition
        if isinstance(action_space, Discrete):
            example_action = jax.ShapeDtypeStruct((), jnp.int32)
        else:
            example_action = jax.ShapeDtypeStruct(tuple(action_space.shape), jnp.float32)
        key_struct = jax.eval_shape(lambda: jax.random.key(0))
        _, state_struct = jax.eval_shape(lambda k: env.reset_env(k, params), key_struct)
        # A deterministic transition gets no key (as in Environment.step), here and in ``step``.
        step_key_struct = key_struct if self.random_transition else None
        step_out = jax.eval_shape(
            lambda k, s, a: env.step_env(k, s, a, params), step_key_struct, state_struct, example_action
        )
        carry_struct = (key_struct, state_struct) if self.random_transition else state_struct
        self.state_struct = state_struct
        self.carry = _WordLayout(carry_struct)
        self.info = _WordLayout(_public_info(step_out[4]))
        self.obs_shape = tuple(obs_space.shape)
        obs_words = int(np.prod(self.obs_shape, dtype=int))
        self.obs_slice = slice(self.carry.size, self.carry.size + obs_words)
        self.reward_index = self.obs_slice.stop
        self.terminated_index = self.reward_index + 1
        self.info_offset = self.terminated_index + 1
        self.has_info = self.info.size > 0

        def assemble(carry, obs, reward, terminated, info):
            return jnp.concatenate(
                [
                    self.carry.pack(carry),
                    jax.lax.bitcast_convert_type(jnp.ravel(obs).astype(jnp.float32), jnp.uint32),
                    jax.lax.bitcast_convert_type(jnp.reshape(reward, (1,)).astype(jnp.float32), jnp.uint32),
                    jnp.reshape(terminated, (1,)).astype(jnp.uint32),
                    self.info.pack(_public_info(info)),
                ]
            )

        def zero_info():
            return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), _public_info(step_out[4]))

        def from_carry(carry, obs=None):
            state = carry[1] if self.random_transition else carry
            obs = env.get_obs(state, params) if obs is None else obs
            terminated = env.is_terminated(state, params)
            return assemble(carry, obs, jnp.zeros(()), terminated, zero_info())

        def reset(seed):
            trace_counts[(name, "reset")] += 1
            key = jax.random.key(seed)
            key_carry, key_reset = jax.random.split(key)
            obs, state = env.reset_env(key_reset, params)
            return from_carry((key_carry, state) if self.random_transition else state, obs)

        def step(buffer, action):
            trace_counts[(name, "step")] += 1
            carry = self.carry.unpack(buffer[: self.carry.size])
            # Keys: the carried key is split on every step (one half carried on, one for
            # step_env), so no key feeds two draws; the reset kernel draws from a fresh seed.
            if self.random_transition:
                key, state = carry
                key, key_step = jax.random.split(key)
            else:
                state, key_step = carry, None  # step_env draws nothing: no key is carried
            obs, state, reward, terminated, info = env.step_env(key_step, state, action, params)
            return assemble((key, state) if self.random_transition else state, obs, reward, terminated, info)

        def get_carry(buffer):
            trace_counts[(name, "get_state")] += 1
            return self.carry.unpack(buffer[: self.carry.size])

        def set_state(buffer, state):
            trace_counts[(name, "set_state")] += 1
            if self.random_transition:
                key, _ = self.carry.unpack(buffer[: self.carry.size])
                return from_carry((key, state))
            return from_carry(state)

        self.reset = jax.jit(reset)
        # The shell drops the old buffer after each step: donating it lets XLA write the new one in
        # place (measured 3-4 us of 45 per step here).
        self.step = jax.jit(step, donate_argnums=0)
        self.get_carry = jax.jit(get_carry)
        self.set_state = jax.jit(set_state)
        if isinstance(action_space, Discrete):
            # Device scalars: a jitted call takes them without a host-to-device conversion.
            self.discrete_actions = [jnp.asarray(i, jnp.int32) for i in range(action_space.n)]


#: Compiled kernels by (env configuration, params, kind); least recently used first. Bounded, so
#: shells made with many different params (domain randomisation) do not pile up executables.
_KERNEL_CACHE: collections.OrderedDict[Any, Any] = collections.OrderedDict()
_KERNEL_CACHE_SIZE = 32


def _kernels(factory: Callable, env: Environment, params: EnvParams, *extra):
    cache_key = _cache_key(env, params, factory, *extra)
    if cache_key is None:
        return factory(env, params, *extra)
    if cache_key in _KERNEL_CACHE:
        _KERNEL_CACHE.move_to_end(cache_key)
    else:
        _KERNEL_CACHE[cache_key] = factory(env, params, *extra)
        if len(_KERNEL_CACHE) > _KERNEL_CACHE_SIZE:
            _KERNEL_CACHE.popitem(last=False)
    return _KERNEL_CACHE[cache_key]


# --------------------------------------------------------------------------------------------
# Action validation
# --------------------------------------------------------------------------------------------
_FLOAT32 = np.dtype(np.float32)  # builtin dtypes are singletons: `is` is the cheapest test
_INTEGER_TYPES = frozenset(
    {int, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64}
)


def _describe(value) -> str:
    text = repr(value)
    if len(text) > 120:
        text = text[:117] + "..."
    shape = getattr(value, "shape", None)
    dtype = getattr(value, "dtype", None)
    details = type(value).__name__
    if shape is not None:
        details += f", shape {tuple(shape)}, dtype {dtype}"
    return f"{text} ({details})"


def _discrete_error(env_name: str, space: spaces.Discrete, action, shape: tuple[int, ...] = ()) -> ValueError:
    accepted = (
        f"an integer in {space} (0 .. {space.n - 1})"
        if not shape
        else f"an integer array of shape {shape} with values in 0 .. {space.n - 1}"
    )
    return ValueError(f"{env_name}: invalid action {_describe(action)}; accepted: {accepted}.")


def _box_accepted(space: spaces.Box, shape: tuple[int, ...]) -> str:
    low, high = space.low, space.high
    if np.all(low == low.min()) and np.all(high == high.max()):
        return f"a float array of shape {shape} with values in [{low.min()}, {high.max()}]"
    return f"a float array of shape {shape} within low={low.tolist()}, high={high.tolist()}"


def _box_action(env_name: str, space: spaces.Box, action, shape: tuple[int, ...]) -> np.ndarray:
    """``action`` as a float32 array of ``shape`` inside ``space``, or a ValueError saying why not.

    The checks are ordered cheapest first and the message is only built on failure: this runs on
    every step.
    """
    array = action if isinstance(action, np.ndarray) else np.asarray(action)
    if array.dtype.kind not in "fiu":
        reason = "not a real number"
    elif array.shape != shape:
        reason = f"shape {array.shape}, expected {shape}"
    else:
        array = array.astype(np.float32, copy=False)
        if ((array >= space.low) & (array <= space.high)).all():
            return array
        reason = "NaN or inf" if not np.isfinite(array).all() else "outside the action space"
    hint = ""
    if reason == "outside the action space":
        hint = " (clip it first, e.g. np.clip(action, space.low, space.high))"
    accepted = _box_accepted(space, shape)
    raise ValueError(f"{env_name}: invalid action {_describe(action)}: {reason}; accepted: {accepted}{hint}.")


def _functional_env(env, env_kwargs: dict) -> tuple[str, Environment, EnvParams]:
    """``(id, env, default params)`` from a registered id or a functional env instance."""
    if isinstance(env, Environment):
        if env_kwargs:
            raise TypeError(f"env keyword arguments {sorted(env_kwargs)} need an env id, not an env instance")
        return env.name, env, env.default_params
    env_id = resolve_env_id(env)
    functional_env, default_params = make(env_id, **env_kwargs)
    return env_id, functional_env, default_params


# --------------------------------------------------------------------------------------------
# The single-env shell
# --------------------------------------------------------------------------------------------
class DiffgymEnv(gymnasium.Env):
    """A ``gymnasium.Env`` around any functional diffgym environment.

    Made by ``gymnasium.make("diffgym/<id>")`` (which adds gymnasium's ``TimeLimit``,
    ``OrderEnforcing`` and ``PassiveEnvChecker``) or directly, ``DiffgymEnv("CartPole-v1")``.

    Args:
        env_id: a diffgym id or short name (``"CartPole-v1"``, ``"pendulum"``), or a functional
            ``Environment`` instance (any subclass: the shell is generic).
        render_mode: ``None``, ``"rgb_array"`` (``render()`` returns an ``HxWx3`` uint8 frame) or
            ``"human"`` (a pygame window, updated on every ``reset`` and ``step`` at
            ``metadata["render_fps"]``).
        params: the functional env's params (default: ``env.default_params``). They are compiled
            into the step, so changing physics means making a new shell.
        **env_kwargs: passed to the functional env's constructor.

    Like gymnasium's classic-control envs, the shell itself never truncates (``truncated`` is
    always False): the time limit is ``gymnasium.make``'s ``TimeLimit`` wrapper, with
    gymnasium's ``max_episode_steps``. Stepping after termination keeps stepping the physics
    (CartPole then rewards 0, as gymnasium).

    Observations are fresh float32 numpy arrays, rewards Python floats, ``info`` a fresh dict
    (empty for CartPole and Pendulum). Actions are checked before they reach the simulator: a wrong
    type, shape, a value outside the space, NaN or inf raises ``ValueError`` quoting the action.

    The functional state is readable and writable through ``state`` (a pytree dataclass such as
    ``CartPoleState``), e.g. to start from a given state or to compare with another simulator.
    """

    metadata: dict[str, Any] = {"render_modes": ["human", "rgb_array"], "render_fps": 30}

    def __init__(
        self,
        env_id: str | Environment = "CartPole-v1",
        *,
        render_mode: str | None = None,
        params: EnvParams | None = None,
        **env_kwargs,
    ):
        if render_mode not in RENDER_MODES:
            raise ValueError(f"render_mode={render_mode!r} is not supported; accepted: {RENDER_MODES}")
        self.env_id, self.functional_env, default_params = _functional_env(env_id, env_kwargs)
        self.params = default_params if params is None else params
        self.render_mode = render_mode
        self.metadata = {**type(self).metadata, "render_fps": _render_fps(self.functional_env)}
        self.observation_space = to_gymnasium_space(self.functional_env.observation_space(self.params))
        self.action_space = to_gymnasium_space(self.functional_env.action_space(self.params))
        self._kernels: _SingleKernels = _kernels(_SingleKernels, self.functional_env, self.params)
        self._name = self.functional_env.name
        self._buffer: jax.Array | None = None
        self._renderer = None
        self._window = None
        if isinstance(self.action_space, spaces.Discrete):
            self._encode_action = self._encode_discrete
            self._discrete_actions = self._kernels.discrete_actions
        else:
            self._encode_action = self._encode_box
            self._action_shape = tuple(self.action_space.shape)
            # Python floats: for the few numbers of an action, comparing them in Python beats
            # numpy's per-call overhead (the fast path of _encode_box).
            self._action_bounds = list(
                zip(self.action_space.low.ravel().tolist(), self.action_space.high.ravel().tolist())
            )

    # -- actions -------------------------------------------------------------------------------
    def _encode_discrete(self, action) -> jax.Array:
        if type(action) in _INTEGER_TYPES and 0 <= action < len(self._discrete_actions):
            return self._discrete_actions[action]
        # Slow path: 0-d integer arrays (numpy or jax) are accepted; everything else is an error.
        shape = getattr(action, "shape", None)
        dtype = getattr(action, "dtype", None)
        if shape == () and dtype is not None and np.issubdtype(np.dtype(dtype), np.integer):
            value = int(action)
            if 0 <= value < len(self._discrete_actions):
                return self._discrete_actions[value]
        raise _discrete_error(self._name, self.action_space, action)

    def _encode_box(self, action) -> np.ndarray:
        # Fast path: a float32 array of the right shape within bounds (NaN fails every comparison).
        if type(action) is np.ndarray and action.dtype is _FLOAT32 and action.shape == self._action_shape:
            for value, (low, high) in zip(action.ravel().tolist(), self._action_bounds):
                if not low <= value <= high:
                    break
            else:
                return action
        return _box_action(self._name, self.action_space, action, self._action_shape)

    # -- gymnasium API --------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        """Draw an initial state. With ``seed``, the draw and every later unseeded reset are reproducible."""
        super().reset(seed=seed)
        if options:
            raise ValueError(f"{self._name}: reset takes no options; got options={options!r}")
        # Every reset draws its JAX seed from np_random, which super().reset seeds.
        jax_seed = np.uint32(self.np_random.integers(0, 2**32, dtype=np.uint64))
        self._buffer = self._kernels.reset(jax_seed)
        words = np.array(self._buffer)
        obs = words[self._kernels.obs_slice].view(np.float32).reshape(self._kernels.obs_shape)
        if self.render_mode == "human":
            self.render()
        return obs, {}

    def step(self, action):
        """One transition: ``(obs, reward, terminated, False, info)``, numpy/Python values."""
        if self._buffer is None:
            raise ResetNeeded(f"{self._name}: call reset() before step()")
        device_action = self._encode_action(action)
        kernels = self._kernels
        self._buffer = buffer = kernels.step(self._buffer, device_action)
        words = np.array(buffer)  # a copy: the obs handed out must be writable and not shared
        floats = words.view(np.float32)
        obs = floats[kernels.obs_slice]
        if len(kernels.obs_shape) != 1:
            obs = obs.reshape(kernels.obs_shape)
        reward = floats.item(kernels.reward_index)
        terminated = bool(words[kernels.terminated_index])
        info = kernels.info.unpack_numpy(words[kernels.info_offset :]) if kernels.has_info else {}
        if self.render_mode == "human":
            self.render()
        return obs, reward, terminated, False, info

    @property
    def state(self):
        """The functional state (e.g. ``CartPoleState``), or None before the first reset.

        Assigning a state of the same type sets the simulator to it (the key of a random
        transition is kept); ``step`` then continues from there.
        """
        if self._buffer is None:
            return None
        carry = self._kernels.get_carry(self._buffer)
        return carry[1] if self._kernels.random_transition else carry

    @state.setter
    def state(self, state) -> None:
        expected = self._kernels.state_struct
        if jax.tree.structure(state) != jax.tree.structure(expected):
            raise TypeError(
                f"{self._name}: state must be a {type(expected).__name__} like env.state; "
                f"got {_describe(state)}"
            )
        state = jax.tree.map(lambda x, s: jnp.broadcast_to(jnp.asarray(x, s.dtype), s.shape), state, expected)
        if self._buffer is None:
            self.reset()
        self._buffer = self._kernels.set_state(self._buffer, state)

    def render(self):
        """rgb_array: the current frame (``HxWx3`` uint8; the last frame of an animated step).
        human: shows the frames of the current state in a window, returns None."""
        if self.render_mode is None:
            gymnasium.logger.warn(
                "render() was called without a render_mode; make the env with "
                f'gymnasium.make("diffgym/{self.env_id}", render_mode="rgb_array")'
            )
            return None
        if self._buffer is None:
            raise ResetNeeded(f"{self._name}: call reset() before render()")
        if self._renderer is None:
            from diffgym.render import make_renderer

            self._renderer = make_renderer(self.functional_env)
        frames = self._renderer.frames(self.state, self.params)
        if self.render_mode == "rgb_array":
            return frames[-1]
        if self._window is None:
            from diffgym.render import Window

            height, width = frames[0].shape[:2]
            self._window = Window(
                width, height, fps=self.metadata["render_fps"], title=f"diffgym/{self.env_id}"
            )
        self._window.show(frames)
        return None

    def close(self) -> None:
        if self._window is not None:
            self._window.close()
            self._window = None
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None


# --------------------------------------------------------------------------------------------
# The vector env
# --------------------------------------------------------------------------------------------
class _VectorKernels:
    """Jitted reset/step of ``num_envs`` copies with ``NEXT_STEP`` autoreset, buffer in, buffer out.

    Buffer layout (``uint32`` words): ``[carry | outputs]``, carry = ``(key, batched state,
    prev_done)`` and outputs the float32 bits of a ``(num_envs, obs + 3)`` array
    ``[obs | reward | terminated | truncated]``: one argument and one result per call.

    The key is an ``rbg`` key: vmapped draws (the reset states of every env) cost about a fifth of
    threefry's on CPU (measured: 90 vs 480 us for 64 CartPole resets). The reset states are drawn
    only on steps where some env ended on the previous step.
    """

    def __init__(self, env: Environment, params: EnvParams, num_envs: int, max_episode_steps: int):
        name = env.name
        obs_size = int(np.prod(env.observation_space(params).shape, dtype=int))
        self.obs_slice = slice(0, obs_size)
        self.out_shape = (num_envs, obs_size + 3)
        batched_reset = jax.vmap(env.reset_env, in_axes=(0, None))

        def draw_resets(key):
            return batched_reset(jax.random.split(key, num_envs), params)

        key_struct = jax.eval_shape(lambda: jax.random.key(0, impl="rbg"))
        _, state_struct = jax.eval_shape(draw_resets, key_struct)
        self.carry = _WordLayout((key_struct, state_struct, jax.ShapeDtypeStruct((num_envs,), jnp.bool_)))
        self.out_offset = self.carry.size

        def assemble(key, state, prev_done, obs, reward, terminated, truncated):
            out = jnp.concatenate(
                [
                    jnp.reshape(obs, (num_envs, -1)).astype(jnp.float32),
                    reward.astype(jnp.float32)[:, None],
                    terminated.astype(jnp.float32)[:, None],
                    truncated.astype(jnp.float32)[:, None],
                ],
                axis=1,
            )
            out_words = jax.lax.bitcast_convert_type(out, jnp.uint32).ravel()
            return jnp.concatenate([self.carry.pack((key, state, prev_done)), out_words])

        def reset(seed):
            trace_counts[(name, "vector_reset")] += 1
            key, key_reset = jax.random.split(jax.random.key(seed, impl="rbg"))
            obs, state = draw_resets(key_reset)
            no = jnp.zeros((num_envs,), bool)
            return assemble(key, state, no, obs, jnp.zeros((num_envs,)), no, no)

        def step(buffer, actions):
            trace_counts[(name, "vector_step")] += 1
            key, state, prev_done = self.carry.unpack(buffer[: self.carry.size])
            # Keys: every step splits the carried key into the next carried key, the reset
            # draws' key and (random transitions only) one step key per env; step_env of a
            # deterministic transition gets none, as in Environment.step.
            if env.deterministic_transition:
                key, key_reset = jax.random.split(key)
                step_keys, key_axis = None, None
            else:
                key, key_step, key_reset = jax.random.split(key, 3)
                step_keys, key_axis = jax.random.split(key_step, num_envs), 0
            obs_st, state_st, reward, terminated, _ = jax.vmap(env.step_env, in_axes=(key_axis, 0, 0, None))(
                step_keys, state, actions, params
            )
            truncated = state_st.time >= max_episode_steps

            def autoreset(_):
                # NEXT_STEP autoreset: an env that ended on the previous step returns its reset.
                obs_re, state_re = draw_resets(key_reset)

                def select(reset_leaf, step_leaf):
                    mask = jnp.reshape(prev_done, prev_done.shape + (1,) * (step_leaf.ndim - 1))
                    return jnp.where(mask, reset_leaf, step_leaf)

                return select(obs_re, obs_st), jax.tree.map(select, state_re, state_st)

            obs, state = jax.lax.cond(prev_done.any(), autoreset, lambda _: (obs_st, state_st), None)
            reward = jnp.where(prev_done, 0.0, reward)
            terminated = terminated & ~prev_done
            truncated = truncated & ~prev_done
            return assemble(key, state, terminated | truncated, obs, reward, terminated, truncated)

        def get_states(buffer):
            trace_counts[(name, "vector_get_states")] += 1
            return self.carry.unpack(buffer[: self.carry.size])[1]

        self.reset = jax.jit(reset)
        self.step = jax.jit(step, donate_argnums=0)  # written in place, as the single-env step
        self.get_states = jax.jit(get_states)


class DiffgymVectorEnv(VectorEnv):
    """``num_envs`` copies of a functional env stepped in one jitted (vmapped) call.

    Made by ``gymnasium.make_vec("diffgym/<id>", num_envs=N)``. Autoreset follows gymnasium 1.x's
    default ``AutoresetMode.NEXT_STEP``: the step that ends an episode returns its last observation
    with ``terminated`` or ``truncated``; the NEXT step ignores that env's action and returns the
    reset observation with reward 0 and both flags False. Episodes are truncated after
    ``max_episode_steps`` (gymnasium's value when made by ``make_vec``).

    Returns float32 observations ``(N, *obs_shape)``, float32 rewards ``(N,)``, bool flags ``(N,)``
    and an empty info dict. ``render_mode="rgb_array"`` renders one frame per env.
    """

    metadata: dict[str, Any] = {
        "render_modes": ["rgb_array"],
        "render_fps": 30,
        "autoreset_mode": AutoresetMode.NEXT_STEP,
    }

    def __init__(
        self,
        env_id: str | Environment = "CartPole-v1",
        num_envs: int = 1,
        *,
        max_episode_steps: int | None = None,
        render_mode: str | None = None,
        params: EnvParams | None = None,
        **env_kwargs,
    ):
        if not isinstance(num_envs, (int, np.integer)) or num_envs < 1:
            raise ValueError(f"num_envs must be a positive integer; got {num_envs!r}")
        if render_mode not in (None, "rgb_array"):
            raise ValueError(
                f"render_mode={render_mode!r} is not supported by the vector env; accepted: None, 'rgb_array'"
            )
        self.env_id, self.functional_env, default_params = _functional_env(env_id, env_kwargs)
        self.params = default_params if params is None else params
        self.num_envs = int(num_envs)
        self.max_episode_steps = int(
            self.params.max_steps_in_episode if max_episode_steps is None else max_episode_steps
        )
        self.render_mode = render_mode
        self.metadata = {**type(self).metadata, "render_fps": _render_fps(self.functional_env)}
        self._name = self.functional_env.name
        self.single_observation_space = to_gymnasium_space(self.functional_env.observation_space(self.params))
        self.single_action_space = to_gymnasium_space(self.functional_env.action_space(self.params))
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.action_space = batch_space(self.single_action_space, self.num_envs)
        self._kernels: _VectorKernels = _kernels(
            _VectorKernels, self.functional_env, self.params, self.num_envs, self.max_episode_steps
        )
        self._buffer: jax.Array | None = None
        self._renderer = None

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        """Reset every env. With an integer ``seed`` the draws are reproducible."""
        if seed is not None and not isinstance(seed, (int, np.integer)):
            raise ValueError(f"{self._name} vector env: seed must be an int or None; got {_describe(seed)}")
        super().reset(seed=seed)
        if options:
            raise ValueError(f"{self._name} vector env: reset takes no options; got options={options!r}")
        jax_seed = np.uint32(self.np_random.integers(0, 2**32, dtype=np.uint64))
        self._buffer = self._kernels.reset(jax_seed)
        return self._unpack()[0], {}

    def _unpack(self):
        kernels = self._kernels
        out = np.array(self._buffer)[kernels.out_offset :].view(np.float32).reshape(kernels.out_shape)
        obs = out[:, kernels.obs_slice].reshape((self.num_envs,) + self.single_observation_space.shape)
        return obs, out[:, -3], out[:, -2] != 0, out[:, -1] != 0

    def _encode_actions(self, actions):
        array = np.asarray(actions)
        shape = (self.num_envs,) + tuple(self.single_action_space.shape)
        if isinstance(self.single_action_space, spaces.Discrete):
            n = self.single_action_space.n
            if array.dtype.kind not in "iu" or array.shape != shape or not ((array >= 0) & (array < n)).all():
                raise _discrete_error(f"{self._name} vector env", self.single_action_space, actions, shape)
            return array.astype(np.int32, copy=False)
        return _box_action(f"{self._name} vector env", self.single_action_space, actions, shape)

    def step(self, actions):
        """Step every env: ``(obs, rewards, terminated, truncated, {})`` as numpy arrays."""
        if self._buffer is None:
            raise ResetNeeded(f"{self._name} vector env: call reset() before step()")
        self._buffer = self._kernels.step(self._buffer, self._encode_actions(actions))
        obs, reward, terminated, truncated = self._unpack()
        return obs, reward, terminated, truncated, {}

    @property
    def states(self):
        """The batched functional state (one leading axis of ``num_envs`` on every leaf), or None."""
        return None if self._buffer is None else self._kernels.get_states(self._buffer)

    def render(self):
        """rgb_array: a tuple with one ``HxWx3`` uint8 frame per env."""
        if self.render_mode is None:
            gymnasium.logger.warn(
                "render() was called without a render_mode; make the env with "
                f'gymnasium.make_vec("diffgym/{self.env_id}", render_mode="rgb_array")'
            )
            return None
        if self._buffer is None:
            raise ResetNeeded(f"{self._name} vector env: call reset() before render()")
        if self._renderer is None:
            from diffgym.render import make_renderer

            self._renderer = make_renderer(self.functional_env)
        states = self.states
        return tuple(
            self._renderer.frames(jax.tree.map(lambda leaf: leaf[i], states), self.params)[-1]
            for i in range(self.num_envs)
        )

    def close_extras(self, **kwargs) -> None:
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None
