"""KickedCartPole-v1: CartPole-v1 whose pole is kicked at random, a discrete random event."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from diffgym import stochastic
from diffgym.core import pytree_dataclass
from diffgym.envs.cartpole import CartPole, CartPoleParams, CartPoleState, CartPoleTask
from diffgym.registry import EnvSpec


@pytree_dataclass
class KickedCartPoleParams(CartPoleParams):
    kick_probability: float = 0.05
    """Probability ``q`` that a step ends with a kick, in [0, 1] (0: CartPole-v1 exactly)."""
    kick_size: float = 0.5
    """rad/s added to (or, with probability 1/2, taken from) the pole's angular velocity by a kick."""


class KickedCartPole(CartPole):
    """CartPole-v1 whose pole is struck now and then: keep it upright through random kicks.

    Every step is gymnasium's ``CartPole-v1`` step (see ``diffgym.envs.cartpole.CartPole``), after
    which, with probability ``kick_probability`` (``q``), the pole is kicked: ``kick_size`` rad/s
    is added to its angular velocity, to the right or to the left with probability 1/2 each. The
    kick acts on the state the step returns, so the policy sees it in the next observation and has
    every later step to catch it. The physics is otherwise CartPole's; the kick is diffgym's
    addition (not a gymnasium env), in the spirit of the "pole kicked" disturbances of the
    robust-control literature.

    **Action** — as CartPole: 0 (push left), 1 (push right), or a real ``a`` in [0, 1] (force
    ``(2a - 1) * force_mag``).

    **Observation** — as CartPole: ``[x, x_dot, theta, theta_dot]``; a kick shows in ``theta_dot``.

    **Reward** — 1 for every step, the terminating one included (CartPole's rule).

    **Starting state** — every state variable uniform in [-0.05, 0.05], as CartPole.

    **Episode end** — terminated when ``|theta| > 12°`` or ``|x| > 2.4``; truncated after
    ``max_steps_in_episode`` (500) steps. A kick changes the angular velocity only, so it never
    terminates the step it happens in.

    **Randomness** — the transition is random (``deterministic_transition = False``):
    ``Environment.step`` hands ``step_env`` a key of its own. ``step_env`` splits it in two and
    draws the kick with :func:`diffgym.stochastic.bernoulli` (probability ``q``) and its direction
    with another (probability 1/2): ``kick = kick_size * occurs * (2 * right - 1)``. Outside an
    estimator these are plain samples, ``u >= 1 - q`` of ``jax.random.uniform``; with ``q = 0`` no
    kick ever happens (``u < 1``) and the step is CartPole-v1's exactly, bit for bit.

    **Differentiability** — with the kicks held fixed (any sampled run), ``step_env`` is CartPole's:
    smooth in state, action and every parameter, ``kick_size`` included (the kick enters additively).
    The kick itself is a discrete random event, piecewise constant in ``q``: ``jax.grad`` of a
    sampled run with respect to ``kick_probability`` is 0 and says nothing about the derivative of
    the *expected* return. Inside :func:`diffgym.stochastic.derivative_estimate` (``f(p, key)``
    steps the env with ``q`` taken from ``p``):

    * ``estimator="triples"`` (stochastic triples): unbiased. A step without a kick gains one at
      rate ``dq / (1 - q)``, a kicked one loses it at rate ``-dq / q``, and the alternative run
      re-simulates the episode from there with every later draw's own uniform.
    * ``estimator="score"``: unbiased, ``(f - baseline) * d log P(kicks)``; larger variance.
    * ``estimator="straight_through"``: the sampled kick forward, the derivative of its mean backward
      (``d kick / d q = kick_size * (2 * right - 1)`` on every step, kicked or not): biased, as the
      return is not linear in the kicks.

    A policy's own Bernoulli actions (``stochastic.bernoulli`` on its probability) are handled the
    same way, so one estimate differentiates the expected return in the policy's weights and in
    ``q`` at once (``tests/test_kicked_cartpole.py`` checks all three against exact enumeration over
    the actions and the kicks of short episodes). A trainer differentiating with respect to the
    policy only (``agents.bptt``, either estimator) sees the kicks as exogenous noise: the same in
    both passes of the triple estimator, constants to the straight-through gradient.

    **Parameters** — ``KickedCartPoleParams``: CartPole's constants plus ``kick_probability`` and
    ``kick_size``, all independent; ``diffgym.make("KickedCartPole-v1", kick_probability=0.1)``.

    **Version history** — v1: CartPole-v1 with kicks (500-step limit).
    """

    deterministic_transition = False
    observation_is_state_function = True

    @property
    def default_params(self) -> KickedCartPoleParams:
        return KickedCartPoleParams()

    @staticmethod
    def kick(key: jax.Array, params: KickedCartPoleParams) -> jax.Array:
        """The angular-velocity change (rad/s) ``step_env`` adds for ``key``: 0 or ``±kick_size``."""
        key_occurs, key_direction = jax.random.split(key)
        occurs = stochastic.bernoulli(key_occurs, params.kick_probability)
        right = stochastic.bernoulli(key_direction, jnp.full_like(occurs, 0.5))
        return params.kick_size * occurs * (2.0 * right - 1.0)

    def step_env(
        self, key: jax.Array, state: CartPoleState, action, params: KickedCartPoleParams
    ) -> tuple[jax.Array, CartPoleState, jax.Array, jax.Array, dict[str, Any]]:
        if key is None:
            raise ValueError(
                "KickedCartPole's transition is random: step_env needs a key (Environment.step "
                "splits one off for it)"
            )
        _, next_state, reward, terminated, info = super().step_env(None, state, action, params)
        kick = self.kick(key, params).astype(next_state.theta_dot.dtype)
        next_state = CartPoleState(
            x=next_state.x,
            x_dot=next_state.x_dot,
            theta=next_state.theta,
            theta_dot=next_state.theta_dot + kick,
            time=next_state.time,
        )
        return self.get_obs(next_state), next_state, reward, terminated, {**info, "kick": kick}

    @property
    def name(self) -> str:
        return "KickedCartPole-v1"


@dataclasses.dataclass(frozen=True, kw_only=True)
class KickedCartPoleTask(CartPoleTask):
    """CartPole's training task (``CartPoleTask``: the termination penalty's ``angle``,
    ``position`` and ``speed`` terms, the straight-through Bernoulli action), on the kicked pole.
    The terms are scored on the state a step returns, kick included: a kick toward the threshold
    costs at once."""


SPEC = EnvSpec(
    id="KickedCartPole-v1",
    entry_point=KickedCartPole,
    alias="kickedcartpole",
    reward_threshold=475.0,
    eval_episodes=20,
    obs_scale=(2.4, 2.0, 0.21, 2.0),  # CartPole's
    task=KickedCartPoleTask,
)
