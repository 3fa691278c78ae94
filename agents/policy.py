"""Policy networks shared by every trainer, their checkpoints, and ``load_policy``.

A ``Policy`` is an equinox module: an MLP from observation to a raw output, and an action head
that turns the raw output into the env's action. Every trainer (BPTT, PPO) returns one, so one
checkpoint format and one ``load_policy`` serve them all.

Action heads (``kind``), chosen from the env's action space by ``policy_spec``:

* ``"bernoulli"`` — ``Discrete(2)``; the raw output is the logit of action 1, the hard action
  ``1[logit > 0]``.
* ``"categorical"`` — ``Discrete(n)``, ``n > 2``; the raw output holds ``n`` logits, the hard action
  is their argmax.
* ``"box"`` — continuous actions in ``[low, high]``; the raw output is squashed by ``tanh`` and
  scaled, so the action is always inside the box and smooth in the weights.

The relaxed (differentiable) action of a raw output is the env task's business
(``diffgym.task.Task.relaxed_action``); its forward pass is this module's hard action.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import diffgym

KINDS = ("bernoulli", "categorical", "box")
CHECKPOINT_WEIGHTS = "policy.eqx"
CHECKPOINT_SPEC = "policy.json"


class Policy(eqx.Module):
    """An MLP policy with an action head.

    Args:
        obs_size: length of the observation vector.
        action_size: 1 for ``"bernoulli"``, the number of actions for ``"categorical"``, the
            action vector's length for ``"box"``.
        kind: ``"bernoulli"``, ``"categorical"`` or ``"box"``.
        low, high: the box bounds (``"box"`` only), one per action dimension.
        width, depth: hidden layer width and number of hidden layers.
        key: PRNG key for the initial weights.
    """

    mlp: eqx.nn.MLP
    kind: str = eqx.field(static=True)
    low: tuple[float, ...] = eqx.field(static=True)
    high: tuple[float, ...] = eqx.field(static=True)

    def __init__(
        self,
        obs_size: int,
        action_size: int,
        kind: str,
        *,
        low: tuple[float, ...] = (),
        high: tuple[float, ...] = (),
        width: int = 64,
        depth: int = 2,
        activation: str = "tanh",
        key: jax.Array,
    ):
        if kind not in KINDS:
            raise ValueError(f"Policy kind must be one of {KINDS}, got {kind!r}")
        if kind == "box" and not (len(low) == len(high) == action_size):
            raise ValueError(f"a box policy needs {action_size} low/high bounds, got low={low}, high={high}")
        self.mlp = eqx.nn.MLP(
            obs_size, action_size, width, depth, activation=_ACTIVATIONS[activation], key=key
        )
        self.kind = kind
        self.low = tuple(float(v) for v in low)
        self.high = tuple(float(v) for v in high)

    def raw(self, obs: jax.Array) -> jax.Array:
        """The network's output for one observation: shape ``(action_size,)``."""
        return self.mlp(obs)

    def __call__(self, obs: jax.Array) -> jax.Array:
        """The deterministic hard action: int32 0/1 (bernoulli), the int32 argmax (categorical) or
        a float vector in the box."""
        out = self.raw(obs)
        if self.kind == "bernoulli":
            return (out[0] > 0).astype(jnp.int32)
        if self.kind == "categorical":
            return jnp.argmax(out).astype(jnp.int32)
        return self.squash(out)

    @property
    def discrete(self) -> bool:
        return self.kind != "box"

    def squash(self, out: jax.Array) -> jax.Array:
        """A raw output mapped into the box: ``low + (high - low) (tanh(out) + 1) / 2``."""
        low, high = jnp.asarray(self.low), jnp.asarray(self.high)
        return low + (high - low) * (jnp.tanh(out) + 1.0) / 2.0


def policy_spec(env, params, *, width: int, depth: int, activation: str = "tanh") -> dict:
    """The ``Policy`` constructor arguments for ``env``'s spaces (what ``save_policy`` stores):
    the head is chosen from the action space, as every trainer does."""
    obs_size = int(np.prod(env.observation_space(params).shape))
    space = env.action_space(params)
    common = {"obs_size": obs_size, "width": width, "depth": depth, "activation": activation}
    if isinstance(space, diffgym.Discrete):
        if space.n < 2:
            raise ValueError(f"{env.name} has {space.n} action; a policy needs at least 2 to choose from")
        if space.n == 2:
            return {**common, "action_size": 1, "kind": "bernoulli", "low": (), "high": ()}
        return {**common, "action_size": space.n, "kind": "categorical", "low": (), "high": ()}
    if isinstance(space, diffgym.Box):
        low = tuple(float(v) for v in np.ravel(space.low))
        high = tuple(float(v) for v in np.ravel(space.high))
        if not (np.all(np.isfinite(low)) and np.all(np.isfinite(high))):
            raise ValueError(f"a box policy needs a bounded action box; {env.name} has {space}")
        return {**common, "action_size": len(low), "kind": "box", "low": low, "high": high}
    raise TypeError(f"unsupported action space {space!r} of {env.name}: diffgym's Discrete and Box are")


def fold_standardisation(policy: Policy, mean, scale) -> Policy:
    """The policy that acts on raw observations when ``policy`` was trained on ``(obs - mean) /
    scale``: ``W (obs - m) / s + b == (W / s) obs + (b - (W / s) m)``, folded into the first
    layer in numpy (no kernel to compile). ``mean=None`` is 0."""
    first = policy.mlp.layers[0]
    weight = np.asarray(first.weight) / np.asarray(scale, np.float32)
    bias = np.asarray(first.bias)
    if mean is not None:
        bias = bias - weight @ np.asarray(mean, np.float32)
    return eqx.tree_at(
        lambda p: (p.mlp.layers[0].weight, p.mlp.layers[0].bias),
        policy,
        (jnp.asarray(weight, first.weight.dtype), jnp.asarray(bias, first.bias.dtype)),
    )


_ACTIVATIONS = {"tanh": jnp.tanh, "relu": jax.nn.relu, "elu": jax.nn.elu, "softplus": jax.nn.softplus}


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------
def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file in the same folder, then rename: never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        # mkstemp creates 0600; give the file the mode an ordinary open() would (0666 less umask).
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    _atomic_write(Path(path), lambda p: p.write_text(text))


def save_policy(directory: str | os.PathLike, policy: Policy, spec: dict, **meta) -> None:
    """Save ``policy`` to ``directory`` (``policy.eqx`` weights, ``policy.json`` spec), atomically.

    Args:
        spec: the keyword arguments that rebuild the module's skeleton: ``obs_size``,
            ``action_size``, ``kind``, ``low``, ``high``, ``width``, ``depth``, ``activation``.
        meta: extra JSON-serialisable facts kept in ``policy.json`` (``env_id`` is required by
            ``load_policy``).
    """
    if "env_id" not in meta:
        raise ValueError("save_policy needs env_id=... so that load_policy knows the env")
    directory = Path(directory)
    # Weights first, spec last: a directory whose policy.json exists holds a complete checkpoint.
    _atomic_write(directory / CHECKPOINT_WEIGHTS, lambda p: eqx.tree_serialise_leaves(p, policy))
    atomic_write_text(directory / CHECKPOINT_SPEC, json.dumps({"spec": spec, **meta}, indent=2))


def load_policy_module(directory: str | os.PathLike) -> tuple[Policy, dict]:
    """The ``Policy`` module saved in ``directory`` and its ``policy.json`` contents."""
    directory = Path(directory)
    spec_path = directory / CHECKPOINT_SPEC
    if not spec_path.exists():
        raise FileNotFoundError(
            f"no policy checkpoint in {str(directory)!r}: expected {CHECKPOINT_SPEC} and {CHECKPOINT_WEIGHTS} "
            "(written by `train-controller ... --out DIR`)"
        )
    header = json.loads(spec_path.read_text())
    spec = dict(header["spec"])
    # Shapes only: initialising real weights just to overwrite them costs a compile per load.
    skeleton = eqx.filter_eval_shape(Policy, **spec, key=jax.random.key(0))
    policy = eqx.tree_deserialise_leaves(directory / CHECKPOINT_WEIGHTS, skeleton)
    return policy, header


def load_policy(directory: str | os.PathLike) -> Callable[[np.ndarray], int | np.ndarray]:
    """A ``policy(obs) -> action`` that acts directly on the gymnasium env the policy was trained for.

    numpy observation in; out, an ``int`` for a discrete env or a float32 array in the env's
    ``Box`` action space.
    """
    policy, header = load_policy_module(directory)
    weights, static = eqx.partition(policy, eqx.is_array)
    act = jax.jit(lambda weights, obs: eqx.combine(weights, static)(obs))
    discrete = policy.discrete

    def act_numpy(obs: np.ndarray) -> int | np.ndarray:
        action = np.asarray(act(weights, np.asarray(obs, np.float32)))
        return int(action) if discrete else action.astype(np.float32)

    act_numpy.env_id = header["env_id"]
    act_numpy.module = policy
    return act_numpy
