"""Differentiable MountainCarContinuous-v0, step for step gymnasium's ``classic_control``
``continuous_mountain_car`` (MountainCarContinuous-v0)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from diffgym.core import Box, EnvParams, pytree_dataclass
from diffgym.envs.mountain_car import (
    MountainCarBase,
    MountainCarState,
    clip,
    move,
    scalar_action,
    surrogate_terms,
)
from diffgym.registry import EnvSpec
from diffgym.task import Task


@pytree_dataclass
class MountainCarContinuousParams(EnvParams):
    """gymnasium's ``Continuous_MountainCarEnv`` attributes, and ``gravity``, a literal 0.0025 there
    (named as in MountainCar-v0)."""

    min_action: float = -1.0
    max_action: float = 1.0
    min_position: float = -1.2  # the left wall
    max_position: float = 0.6
    max_speed: float = 0.07  # per step
    goal_position: float = 0.45  # gymnasium's; MountainCar-v0's flag is at 0.5
    goal_velocity: float = 0.0
    power: float = 0.0015  # the push of a unit throttle, per step^2
    gravity: float = 0.0025  # the hill pulls by gravity * cos(3 position), per step^2
    max_steps_in_episode: int = 999


class MountainCarContinuous(MountainCarBase):
    """Drive an underpowered car out of a valley with a continuous throttle, sparingly.

    The dynamics, reward and reset distribution are those of gymnasium's
    ``MountainCarContinuous-v0`` (Moore 1990, adapted by Arnaud de Broissia; gymnasium's
    ``continuous_mountain_car.py``): ``velocity += clip(a, min_action, max_action) power -
    gravity cos(3 position)``, clipped to ±``max_speed``; then ``position += velocity``, clipped to
    [``min_position``, ``max_position``]; a car at the left wall moving left stops there
    (velocity 0). gymnasium rounds its state to float32 after every step; diffgym keeps the
    working precision (float32, unless ``jax_enable_x64``).

    **Action** — the throttle ``a`` (float), shape ``()`` or ``(1,)``:

    ===  =========================  ======  =====
    idx  meaning                    min     max
    ===  =========================  ======  =====
    0    throttle (push / power)    -1      1
    ===  =========================  ======  =====

    The dynamics clip it to [``min_action``, ``max_action``]; the reward's action cost takes it
    unclipped, as gymnasium's.

    **Observation** — ``[position, velocity]`` (float):

    ===  ==========================  ======  ======
    idx  meaning                     min     max
    ===  ==========================  ======  ======
    0    position along the x axis   -1.2    0.6
    1    velocity (per step)         -0.07   0.07
    ===  ==========================  ======  ======

    **Reward** — ``-0.1 a^2`` every step, plus 100 on the step that reaches the goal.

    **Starting state** — position uniform in [-0.6, -0.4], velocity 0.

    **Episode end** — terminated when ``position >= goal_position`` (0.45) and
    ``velocity >= goal_velocity`` (0); truncated after ``max_steps_in_episode`` (999) steps.

    **Differentiability** — smooth in the state, the action and every parameter except at:

    * the throttle clip: the dynamics' gradient with respect to ``a`` is 0 where ``a`` lies outside
      [``min_action``, ``max_action``] (the bound reached carries it); the reward's action cost
      has its gradient ``-0.2 a`` everywhere.
    * the speed clip: where the new velocity lies outside ±``max_speed``, its gradient with respect
      to the state, the action and the other params is 0 (±1 with respect to ``max_speed``);
      inside, bounds included, it passes unchanged.
    * the position clip, likewise: 0 where ``position + velocity`` lies outside
      [``min_position``, ``max_position``].
    * the left wall: where the car reaches ``min_position`` moving left, the velocity is set to 0,
      a constant: zero gradient with respect to everything.
    * the goal bonus (100) and the termination flag are step functions of the state: zero gradient
      and no gradient. Only the action cost has a gradient, and it says "push less"; use a smooth
      surrogate (``MountainCarContinuousTask``'s energy or position) to reach the goal.

    ``step`` resets where an episode ends, which cuts the gradient there (see ``Environment.step``).
    No ``stop_gradient`` anywhere.

    **Parameters** — ``MountainCarContinuousParams`` holds gymnasium's attributes, nothing derived.

    **Version history** — v0: gymnasium MountainCarContinuous-v0 (999-step limit).
    """

    @property
    def default_params(self) -> MountainCarContinuousParams:
        return MountainCarContinuousParams()

    def step_env(
        self, key: jax.Array, state: MountainCarState, action, params: MountainCarContinuousParams
    ) -> tuple[jax.Array, MountainCarState, jax.Array, jax.Array, dict[str, Any]]:
        del key  # deterministic
        throttle = scalar_action(action, "MountainCarContinuous", "a real throttle")
        throttle = throttle.astype(state.position.dtype)
        push = clip(throttle, params.min_action, params.max_action) * params.power
        # gymnasium's order of operations: the push minus the pull, then added to the velocity
        velocity = state.velocity + (push - params.gravity * jnp.cos(3 * state.position))
        position, velocity = move(state.position, velocity, params)
        next_state = MountainCarState(position=position, velocity=velocity, time=state.time + 1)
        terminated = self.is_terminated(next_state, params)
        reward = jnp.where(terminated, 100.0, 0.0).astype(throttle.dtype) - throttle**2 * 0.1
        info = {"discount": self.discount(next_state, params)}
        return self.get_obs(next_state), next_state, reward, terminated, info

    @property
    def name(self) -> str:
        return "MountainCarContinuous-v0"

    @property
    def num_actions(self) -> int:
        return 1

    def action_space(self, params: MountainCarContinuousParams | None = None) -> Box:
        params = self.default_params if params is None else params
        return Box(params.min_action, params.max_action, (1,), jnp.float32)


@dataclasses.dataclass(frozen=True, kw_only=True)
class MountainCarContinuousTask(Task):
    """Training MountainCarContinuous by gradient: the reward is 100 on reaching the goal minus
    ``0.1 a^2`` every step. The goal bonus is a step function of the state (zero gradient), so the
    env's reward gives a gradient only through its action cost, and that says "push less": alone
    it teaches standing still. Smooth surrogates, scored on the state each action leads to (the
    first two as in ``diffgym.envs.mountain_car.MountainCarTask``):

    * ``energy``: the squared shortfall of the car's mechanical energy ``v^2/2 + gravity/3 sin(3 x)``
      below the goal's, normalised to 1 at rest at the valley's bottom and 0 from the goal's
      energy on: ``(max(E_goal - E, 0) / (E_goal - E_valley))^2``. Rocking the car lowers it long
      before the car nears the flag.
    * ``position``: ``(goal_position - x) / (goal_position - min_position)``, linear: 1 at the left
      wall, 0 at the flag.
    * ``action_cost``: ``0.1 a^2``, the part of minus the reward that has a gradient, to weigh on
      its own (with ``reward=0``, say, and ``energy`` to reach the goal).

    Throttles relax through the ``tanh`` squash into [``min_action``, ``max_action``].
    """

    energy: float = 0.0
    position: float = 0.0
    action_cost: float = 0.0

    def terms(
        self, params: MountainCarContinuousParams, state, action, next_state: MountainCarState
    ) -> dict[str, jax.Array]:
        throttle = jnp.reshape(jnp.asarray(action), ())
        return {**surrogate_terms(params, next_state), "action_cost": 0.1 * throttle**2}


SPEC = EnvSpec(
    id="MountainCarContinuous-v0",
    entry_point=MountainCarContinuous,
    alias="mountaincarcontinuous",
    reward_threshold=90.0,
    eval_episodes=100,
    # as MountainCar-v0's: position around the middle of its box, velocity over its bound
    obs_mean=(-0.3, 0.0),
    obs_scale=(0.9, 0.07),
    task=MountainCarContinuousTask,
)
