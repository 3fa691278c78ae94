"""Tasks: what gradient-based training of an environment differentiates.

An environment's ``Task`` (named in its ``EnvSpec``, written next to the env) says three things:

* the **training cost** of one step, ``cost(params, state, action, next_state, reward)``: by
  default minus the env's own reward, plus the env's documented **surrogate terms**, each a named
  weight (a dataclass field, 0 by default: off). CartPole's reward is constant until the pole
  falls, so its task offers smooth penalties for nearing the termination thresholds; the
  Pendulum's offers its energy gap to upright-at-rest.
* how a **relaxed action** is formed from a network's raw output (``relaxed_action``):
  straight-through estimators for discrete actions (exactly the hard action forward, a soft
  surrogate's gradient backward), a ``tanh`` squash into the box for continuous ones.
* the **training transition** (``transition``): ``step_env`` as training sees it. The forward
  pass is always the env's; a task may document a different backward pass (the Pendulum's
  straight-through speed clip).

Weights are keyword arguments::

    task = diffgym.make_task("Pendulum-v1", reward=0.0, next_state_cost=1.0, energy=30.0)
    task.cost(params, state, action, next_state, reward)     # a scalar, differentiable

A trainer asks the task, never the env id: ``agents.bptt`` and PPO's shaped-reward option train
any registered (or user) environment through it.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp

from diffgym.core import Box, Discrete
from diffgym.discrete import straight_through_argmax, straight_through_bernoulli

if TYPE_CHECKING:
    from diffgym.core import Environment

__all__ = ["Task", "inward_tanh"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Task:
    """The env's own reward as a training cost; subclasses add named surrogate terms.

    Every field is the weight of one term: ``reward`` weighs ``-reward``, and each field a
    subclass adds weighs the term of the same name in ``terms``. A term with weight 0 is not
    part of the cost.
    """

    reward: float = 1.0
    """Weight of minus the env's reward."""

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(
                    f"{type(self).__name__}.{field.name} is a term weight and must be a number, got {value!r}"
                )

    @classmethod
    def term_names(cls) -> tuple[str, ...]:
        """The names of the surrogate terms (every weight but ``reward``)."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.name != "reward")

    def terms(self, params, state, action, next_state) -> dict[str, jax.Array]:
        """The value of every surrogate term for one step (a scalar each); none in the base task."""
        return {}

    def cost(self, params, state, action, next_state, reward) -> jax.Array:
        """The training cost of one step: ``-reward_weight * reward + sum_k weight_k * term_k``."""
        # In the reward's own dtype (float64 under x64); a weight of 0 leaves the reward out.
        total = -self.reward * jnp.asarray(reward) if self.reward else jnp.zeros((), jnp.result_type(float))
        for name, value in self.terms(params, state, action, next_state).items():
            weight = getattr(self, name)
            if weight:
                total = total + weight * value
        return total

    def weights(self) -> dict[str, float]:
        """Every weight by name (``reward`` first)."""
        return {f.name: float(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def transition(self, env: Environment, key: jax.Array, state, action, params) -> tuple[Any, jax.Array, jax.Array]:
        """``env.step_env`` as training differentiates it: ``(next_state, reward, terminated)``."""
        _, next_state, reward, terminated, _ = env.step_env(key, state, action, params)
        return next_state, reward, terminated

    def relaxed_action(
        self, raw: jax.Array, space, *, temperature: float = 1.0, inward_gradient: bool = False
    ) -> jax.Array:
        """The env action for a network's raw output, with a gradient.

        * ``Discrete(2)``: ``raw`` is one logit, of action 1; the action is the straight-through
          Bernoulli value, exactly 0.0 or 1.0, with the gradient of ``sigmoid(logit / temperature)``.
        * ``Discrete(n)``: ``raw`` holds ``n`` logits; the action is the straight-through index
          ``onehot(argmax) @ [0, 1, .., n-1]``, exactly the argmax, with the gradient of the
          expected index under ``softmax(logits / temperature)``.
        * ``Box``: ``raw`` is squashed by ``tanh`` into ``[low, high]`` (always inside the box);
          ``inward_gradient`` swaps ``tanh``'s gradient for ``inward_tanh``'s.

        Discrete envs take such a real index as their action (their dynamics are affine in it, see
        each env's Action section), so the forward pass is the env's own.
        """
        if isinstance(space, Discrete):
            if space.n == 2:
                return straight_through_bernoulli(raw[0], temperature)
            onehot = straight_through_argmax(raw, temperature)
            return onehot @ jnp.arange(space.n, dtype=onehot.dtype)
        if isinstance(space, Box):
            squash = inward_tanh if inward_gradient else jnp.tanh
            return space.low + (space.high - space.low) * (squash(raw) + 1.0) / 2.0
        raise TypeError(f"no relaxed action for the space {space!r}; diffgym's Discrete and Box have one")


@jax.custom_vjp
def inward_tanh(x: jax.Array) -> jax.Array:
    """``tanh(x)`` whose gradient does not vanish on the way back from saturation.

    Forward: exactly ``tanh``. Backward: the cotangent ``g`` passes with slope 1 where a gradient
    step (``x -= lr * g``) moves ``tanh(x)`` towards 0 (``g * tanh(x) > 0``), and with ``tanh'(x) =
    1 - tanh(x)^2`` where it pushes further into saturation. A saturated action that the loss
    wants reversed is reversed at the pace of an unsaturated one (bang-bang torques otherwise get
    stuck on the box's faces); one the loss wants pushed further still saturates as with ``tanh``.
    """
    return jnp.tanh(x)


def _inward_tanh_fwd(x):
    t = jnp.tanh(x)
    return t, t


def _inward_tanh_bwd(t, g):
    return (jnp.where(g * t > 0, 1.0, 1.0 - t**2) * g,)


inward_tanh.defvjp(_inward_tanh_fwd, _inward_tanh_bwd)
