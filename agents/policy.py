"""Policy networks shared by every trainer, their checkpoints, and ``load_policy``.

A ``Policy`` is an equinox module: an MLP from observation to a raw output, and an action head
that turns the raw output into the env's action. Every trainer (BPTT, PPO) returns one, so one
checkpoint format and one ``load_policy`` serve them all.

Action heads (``kind``):

* ``"bernoulli"`` — two discrete actions; the raw output is the logit of action 1. Hard action
  ``1[logit > 0]``; ``relaxed`` is the straight-through action in {0., 1.} with a sigmoid gradient.
* ``"box"`` — continuous actions in ``[low, high]``; the raw output is squashed by ``tanh`` and
  scaled, so the action is always inside the box and smooth in the weights.
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

from diffgym.discrete import straight_through_bernoulli

CHECKPOINT_WEIGHTS = "policy.eqx"
CHECKPOINT_SPEC = "policy.json"


class Policy(eqx.Module):
    """An MLP policy with an action head.

    Args:
        obs_size: length of the observation vector.
        action_size: 1 for ``"bernoulli"``; the action vector's length for ``"box"``.
        kind: ``"bernoulli"`` or ``"box"``.
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
        if kind not in ("bernoulli", "box"):
            raise ValueError(f"Policy kind must be 'bernoulli' or 'box', got {kind!r}")
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

    def relaxed(self, obs: jax.Array, temperature: float = 1.0, *, inward_gradient: bool = False) -> jax.Array:
        """The action with a gradient: straight-through 0./1. (bernoulli) or the squashed box action.

        ``inward_gradient`` (box only) changes the squash's gradient, not its value: see
        ``inward_tanh``. A trainer whose best actions lie on the box's faces (bang-bang torques)
        otherwise finds its saturated outputs stuck there, with a vanishing gradient, even when the
        loss asks for the opposite face.
        """
        out = self.raw(obs)
        if self.kind == "bernoulli":
            return straight_through_bernoulli(out[0], temperature)
        return self._squash(out, inward_tanh if inward_gradient else jnp.tanh)

    def __call__(self, obs: jax.Array) -> jax.Array:
        """The deterministic hard action: int32 0/1 (bernoulli) or a float vector in the box."""
        out = self.raw(obs)
        if self.kind == "bernoulli":
            return (out[0] > 0).astype(jnp.int32)
        return self._squash(out)

    def _squash(self, out: jax.Array, tanh: Callable[[jax.Array], jax.Array] = jnp.tanh) -> jax.Array:
        low, high = jnp.asarray(self.low), jnp.asarray(self.high)
        return low + (high - low) * (tanh(out) + 1.0) / 2.0


@jax.custom_vjp
def inward_tanh(x: jax.Array) -> jax.Array:
    """``tanh(x)`` whose gradient does not vanish on the way back from saturation.

    Forward: exactly ``tanh``. Backward: the cotangent ``g`` passes with slope 1 where a gradient
    step (``x -= lr * g``) moves ``tanh(x)`` towards 0 (``g * tanh(x) > 0``), and with ``tanh'(x) =
    1 - tanh(x)^2`` where it pushes further into saturation. A saturated output that the loss wants
    reversed is reversed at the pace of an unsaturated one; one the loss wants pushed further
    still saturates as with ``tanh`` (its raw value does not run away).
    """
    return jnp.tanh(x)


def _inward_tanh_fwd(x):
    t = jnp.tanh(x)
    return t, t


def _inward_tanh_bwd(t, g):
    return (jnp.where(g * t > 0, 1.0, 1.0 - t**2) * g,)


inward_tanh.defvjp(_inward_tanh_fwd, _inward_tanh_bwd)


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
    discrete = policy.kind == "bernoulli"

    def act_numpy(obs: np.ndarray) -> int | np.ndarray:
        action = np.asarray(act(weights, np.asarray(obs, np.float32)))
        return int(action) if discrete else action.astype(np.float32)

    act_numpy.env_id = header["env_id"]
    act_numpy.module = policy
    return act_numpy
