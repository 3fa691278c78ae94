"""Differentiable MountainCar-v0, step for step gymnasium's ``classic_control`` MountainCar-v0.

Its state, reset, clips, left wall and the training surrogates are shared with
``diffgym.envs.continuous_mountain_car`` (MountainCarContinuous-v0).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from diffgym.core import Box, Discrete, Environment, EnvParams, EnvState, pytree_dataclass, uniform
from diffgym.registry import EnvSpec
from diffgym.task import Task


@pytree_dataclass
class MountainCarState(EnvState):
    position: jax.Array  # along the x axis, in [min_position, max_position]
    velocity: jax.Array  # position change per step, in [-max_speed, max_speed]
    time: jax.Array  # steps taken in this episode


@pytree_dataclass
class MountainCarParams(EnvParams):
    """gymnasium's ``MountainCarEnv`` attributes."""

    min_position: float = -1.2  # the left wall
    max_position: float = 0.6
    max_speed: float = 0.07  # per step
    goal_position: float = 0.5
    goal_velocity: float = 0.0
    force: float = 0.001  # the push of one action, per step^2
    gravity: float = 0.0025  # the hill pulls by gravity * cos(3 position), per step^2
    max_steps_in_episode: int = 200


def clip(x: jax.Array, low, high) -> jax.Array:
    """``min(max(x, low), high)`` with a one-sided gradient: 1 with respect to ``x`` inside
    ``[low, high]`` (the bounds included), 0 outside, where the bound passed on carries it."""
    return jnp.where(x < low, low, jnp.where(x > high, high, x))


def move(position: jax.Array, velocity: jax.Array, params) -> tuple[jax.Array, jax.Array]:
    """gymnasium's step once the push and the hill's pull are in ``velocity``: the speed clip, the
    position update and clip, and the inelastic left wall. ``params``: either mountain car's."""
    velocity = clip(velocity, -params.max_speed, params.max_speed)
    position = clip(position + velocity, params.min_position, params.max_position)
    at_wall = (position == params.min_position) & (velocity < 0)
    return position, jnp.where(at_wall, jnp.zeros_like(velocity), velocity)


def scalar_action(action, env_name: str, accepted: str) -> jax.Array:
    """``action`` as a scalar, or a ValueError quoting the shape received."""
    action = jnp.asarray(action)
    if action.shape not in ((), (1,)):
        raise ValueError(
            f"{env_name} takes an action of shape () or (1,) ({accepted}); got shape {action.shape} "
            f"(dtype {action.dtype}). Under vmap, the action of each env is a scalar or a 1-vector."
        )
    return jnp.reshape(action, ())


class MountainCarBase(Environment):
    """What both mountain cars share: state, reset, observation, termination, observation space."""

    deterministic_transition = True
    observation_is_state_function = True

    def reset_env(self, key: jax.Array, params) -> tuple[jax.Array, MountainCarState]:
        (position,) = uniform(key, (1,), minval=-0.6, maxval=-0.4)
        velocity = jnp.zeros_like(position)
        state = MountainCarState(position=position, velocity=velocity, time=jnp.zeros((), jnp.int32))
        return self.get_obs(state), state

    def get_obs(self, state: MountainCarState, params=None, key=None) -> jax.Array:
        return jnp.stack([state.position, state.velocity])

    def state_from_obs(self, obs, params=None) -> MountainCarState:
        """The state an observation ``[position, velocity]`` shows: the observation is the state.
        ``time`` (not observed) is 0. ``diffgym.identify`` fits params through this."""
        obs = jnp.asarray(obs)
        return MountainCarState(position=obs[0], velocity=obs[1], time=jnp.zeros((), jnp.int32))

    def is_terminated(self, state: MountainCarState, params) -> jax.Array:
        return (state.position >= params.goal_position) & (state.velocity >= params.goal_velocity)

    def observation_space(self, params=None) -> Box:
        params = self.default_params if params is None else params
        low = jnp.array([params.min_position, -params.max_speed], jnp.float32)
        high = jnp.array([params.max_position, params.max_speed], jnp.float32)
        return Box(low, high, (2,), jnp.float32)


class MountainCar(MountainCarBase):
    """Drive an underpowered car out of a valley: rock it back and forth to reach the flag.

    The dynamics, reward and reset distribution are those of gymnasium's ``MountainCar-v0``
    (Moore 1990; Sutton & Barto, http://incompleteideas.net/sutton/book/MountainCar/MountainCar1.cp):
    ``velocity += (a - 1) force - cos(3 position) gravity``, clipped to ±``max_speed``; then
    ``position += velocity``, clipped to [``min_position``, ``max_position``]; a car at the left
    wall (``position == min_position``) moving left stops there (velocity 0: an inelastic wall).

    **Action** — a scalar ``a``: the integer 0, 1 or 2, or any real number in [0, 2]. The push is
    ``(a - 1) * force``, so 0/1/2 give gymnasium's exact behaviour and a straight-through relaxed
    index (``Task.relaxed_action``) carries a gradient.

    ===  ====================  ===================
    a    push (per step^2)     meaning
    ===  ====================  ===================
    0    -0.001                accelerate left
    1    0                     coast
    2    +0.001                accelerate right
    ===  ====================  ===================

    **Observation** — ``[position, velocity]`` (float):

    ===  ==========================  ======  ======
    idx  meaning                     min     max
    ===  ==========================  ======  ======
    0    position along the x axis   -1.2    0.6
    1    velocity (per step)         -0.07   0.07
    ===  ==========================  ======  ======

    The hill's height is ``sin(3 position)`` (drawn as ``0.45 sin(3 x) + 0.55``); the valley's
    bottom is at ``-pi/6`` (-0.52).

    **Reward** — -1 for every step, the terminating one included.

    **Starting state** — position uniform in [-0.6, -0.4], velocity 0.

    **Episode end** — terminated when ``position >= goal_position`` (0.5) and
    ``velocity >= goal_velocity`` (0); truncated after ``max_steps_in_episode`` (200) steps.

    **Differentiability** — the push and the hill's pull are smooth in the state, the action and
    every parameter. The non-smooth places:

    * the speed clip: where the new velocity lies outside ±``max_speed``, its gradient with respect
      to the state, the action and the other params is 0 (it is ±1 with respect to
      ``max_speed``); inside, bounds included, it passes unchanged.
    * the position clip, likewise: where ``position + velocity`` lies outside
      [``min_position``, ``max_position``] the new position's gradient is 0 (1 with respect to
      the bound reached).
    * the left wall: where the car reaches ``min_position`` moving left, the velocity is set to 0,
      a constant: zero gradient with respect to everything.
    * the reward is constant (zero gradient) and the termination flag a hard threshold (no
      gradient). Use a smooth surrogate (``MountainCarTask``'s energy or position).

    ``step`` resets where an episode ends, which cuts the gradient there (see ``Environment.step``).
    No ``stop_gradient`` anywhere.

    **Parameters** — ``MountainCarParams`` holds gymnasium's attributes, nothing derived.

    **Version history** — v0: gymnasium MountainCar-v0 (200-step limit).
    """

    @property
    def default_params(self) -> MountainCarParams:
        return MountainCarParams()

    def step_env(
        self, key: jax.Array, state: MountainCarState, action, params: MountainCarParams
    ) -> tuple[jax.Array, MountainCarState, jax.Array, jax.Array, dict[str, Any]]:
        del key  # deterministic
        action = scalar_action(action, "MountainCar", "0, 1, 2 or a real in [0, 2]")
        action = action.astype(state.position.dtype)
        # gymnasium's order of operations: the push plus the pull, then added to the velocity
        pull = jnp.cos(3 * state.position) * (-params.gravity)
        velocity = state.velocity + ((action - 1) * params.force + pull)
        position, velocity = move(state.position, velocity, params)
        next_state = MountainCarState(position=position, velocity=velocity, time=state.time + 1)
        terminated = self.is_terminated(next_state, params)
        reward = jnp.full((), -1.0, state.position.dtype)
        info = {"discount": self.discount(next_state, params)}
        return self.get_obs(next_state), next_state, reward, terminated, info

    @property
    def name(self) -> str:
        return "MountainCar-v0"

    @property
    def num_actions(self) -> int:
        return 3

    def action_space(self, params: MountainCarParams | None = None) -> Discrete:
        return Discrete(3)


# --------------------------------------------------------------------------------------------
# Training surrogates, shared with MountainCarContinuous-v0
# --------------------------------------------------------------------------------------------
def mechanical_energy(state: MountainCarState, params) -> jax.Array:
    """``velocity^2 / 2 + gravity / 3 * sin(3 position)`` (per unit mass, in position units and
    steps): the hill's pull ``-gravity cos(3 position)`` is minus this potential's slope, so
    without a push, away from the clips, the energy stays nearly constant (the semi-implicit
    Euler step moves it by at most a few per cent of the valley-to-goal gap: 2.3 % over 200
    coasting steps from rest at -0.9)."""
    return 0.5 * state.velocity**2 + params.gravity / 3.0 * jnp.sin(3.0 * state.position)


def goal_energy(params) -> jax.Array:
    """The energy at the goal: at ``goal_position`` moving at ``goal_velocity``."""
    return 0.5 * params.goal_velocity**2 + params.gravity / 3.0 * jnp.sin(3.0 * params.goal_position)


def surrogate_terms(params, next_state: MountainCarState) -> dict[str, jax.Array]:
    """The ``energy`` and ``position`` terms of both mountain car tasks."""
    valley = -params.gravity / 3.0  # the energy at rest at the valley's bottom
    shortfall = jnp.maximum(goal_energy(params) - mechanical_energy(next_state, params), 0.0)
    return {
        "energy": (shortfall / (goal_energy(params) - valley)) ** 2,
        "position": (params.goal_position - next_state.position)
        / (params.goal_position - params.min_position),
    }


@dataclasses.dataclass(frozen=True, kw_only=True)
class MountainCarTask(Task):
    """Training MountainCar by gradient: the reward is -1 for every step until the goal, a constant
    whose gradient is zero, so the env's reward gives gradient-based training nothing to follow
    (it only counts steps). Three smooth surrogates, scored on the state each action leads to:

    * ``energy``: the squared shortfall of the car's mechanical energy (``mechanical_energy``,
      ``v^2/2 + gravity/3 sin(3 x)``) below the goal's (``goal_energy``), normalised to 1 at rest
      at the valley's bottom and 0 from the goal's energy on:
      ``(max(E_goal - E, 0) / (E_goal - E_valley))^2``. Without a push the energy barely changes,
      so the term follows what the pushes pump in: rocking back and forth lowers it long before
      the car nears the flag.
    * ``position``: ``(goal_position - x) / (goal_position - min_position)``, linear: 1 at the left
      wall, 0 at the flag (negative beyond it).
    * ``speed``: ``1 - (v / max_speed)^2``: 1 at rest, 0 at top speed. A push adds energy at the
      rate ``force * v`` (its power), so speed is what pumping needs, and a car that turns slowly
      at the top of a swing pumps nothing in meanwhile. Scored on the next state, this term's
      one-step best push is along ``v - gravity cos(3 x)``, the velocity the hill's pull is about
      to give: the car reverses its push just before each turn, where the ``energy`` term, whose
      one-step best push is along ``v`` itself (the pull does no net work in one step), pushes on
      until the turn. Measured (the exact one-step greedy push on 2 000 starts of the reset
      distribution): ``energy`` with ``position = 0.1``, -120 (``energy`` alone has no preference
      once the car has the goal's energy); ``speed`` alone, -113; ``speed = 1, position = 0.2``,
      -106 (``position`` 0.1: -110, 0.3: -107, 0.5: -113; adding ``energy = 1`` changes it by
      under 1). The small ``position`` weight is a bias to the right that sets the first push from
      rest: right for starts left of -0.485, left otherwise, close to the best linear switching
      rule, push right iff ``v > 0.01 (x + 0.475)`` (-106; -115 with its first push from rest
      taken downhill instead). BPTT with one-step replay trains ``speed = 1, position = 0.2`` to
      -110 after 100-400 env steps (``agents/assets/mountaincar/hyperparams.toml``).

    Actions relax with the straight-through argmax over three logits (``Task.relaxed_action``): the
    env takes the real index in [0, 2] and is affine in it, so the forward pass is gymnasium's.
    """

    energy: float = 0.0
    position: float = 0.0
    speed: float = 0.0

    def terms(
        self, params: MountainCarParams, state, action, next_state: MountainCarState
    ) -> dict[str, jax.Array]:
        speed = 1.0 - (next_state.velocity / params.max_speed) ** 2
        return {**surrogate_terms(params, next_state), "speed": speed}


SPEC = EnvSpec(
    id="MountainCar-v0",
    entry_point=MountainCar,
    alias="mountaincar",
    reward_threshold=-110.0,
    eval_episodes=100,
    # position: the middle and half-width of [-1.2, 0.6]; velocity: its bound 0.07 (a swing that
    # reaches the flag spans most of both)
    obs_mean=(-0.3, 0.0),
    obs_scale=(0.9, 0.07),
    task=MountainCarTask,
)
