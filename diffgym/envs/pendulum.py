"""Differentiable Pendulum-v1, step for step gymnasium's ``classic_control`` Pendulum-v1."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from diffgym.core import Box, Environment, EnvParams, EnvState, pytree_dataclass, uniform
from diffgym.registry import EnvSpec
from diffgym.task import Task


@pytree_dataclass
class PendulumState(EnvState):
    theta: jax.Array  # rad, 0 = upright, not wrapped (as gymnasium)
    theta_dot: jax.Array  # rad/s
    last_u: jax.Array  # the torque applied on the last step after clipping, N m (for rendering)
    time: jax.Array  # steps taken in this episode


@pytree_dataclass
class PendulumParams(EnvParams):
    max_speed: float = 8.0  # rad/s, angular velocity clip
    max_torque: float = 2.0  # N m, torque clip
    dt: float = 0.05  # s, semi-implicit Euler step
    g: float = 10.0  # m/s^2
    m: float = 1.0  # kg
    l: float = 1.0  # m  # noqa: E741 -- gymnasium's name
    max_steps_in_episode: int = 200


def angle_normalize(theta: jax.Array) -> jax.Array:
    """Wrap an angle into [-pi, pi). Its derivative is 1 everywhere but at the wrap point."""
    return (theta + jnp.pi) % (2 * jnp.pi) - jnp.pi


class Pendulum(Environment[PendulumState, PendulumParams]):
    """Swing a torque-limited pendulum up and keep it upright.

    The dynamics, reward and reset distribution are those of gymnasium's ``Pendulum-v1``:
    ``theta_dot += (3 g / (2 l) sin(theta) + 3 / (m l^2) u) dt``, clipped to ±``max_speed``, then
    ``theta += theta_dot dt``.

    **Action** — torque ``u`` in N m, shape ``()`` or ``(1,)``, clipped to ±``max_torque`` (2).

    **Observation** — ``[cos(theta), sin(theta), theta_dot]``: bounds [-1, 1], [-1, 1], [-8, 8].

    **Reward** — ``-(angle_normalize(theta)^2 + 0.1 theta_dot^2 + 0.001 u^2)`` on the state before
    the step; at most 0 (upright, at rest, no torque), about -16.27 at worst.

    **Starting state** — ``theta`` uniform in [-pi, pi], ``theta_dot`` uniform in [-1, 1].

    **Episode end** — never terminates; truncated after ``max_steps_in_episode`` (200) steps.

    **Differentiability** — smooth in state, action and every parameter except at three
    documented kinks: the torque clip (gradient 0 with respect to ``u`` where ``|u| > max_torque``),
    the speed clip (gradient 0 through ``theta_dot`` where the new speed exceeds ``max_speed``) and
    the angle wrap in the reward (derivative 1 except at ``theta = pi (mod 2 pi)``). ``step`` cuts
    the gradient at the auto-reset (see ``Environment.step``).

    **Version history** — v1: gymnasium Pendulum-v1.
    """

    deterministic_transition = True
    observation_is_state_function = True

    @property
    def default_params(self) -> PendulumParams:
        return PendulumParams()

    def step_env(
        self, key: jax.Array, state: PendulumState, action, params: PendulumParams
    ) -> tuple[jax.Array, PendulumState, jax.Array, jax.Array, dict[str, Any]]:
        del key  # deterministic
        action = jnp.asarray(action)
        if action.shape not in ((), (1,)):
            raise ValueError(
                f"Pendulum takes a torque of shape () or (1,); got shape {action.shape}. "
                "Under vmap, the action of each env is a scalar or a 1-vector."
            )
        u = jnp.clip(jnp.reshape(action, ()).astype(state.theta.dtype), -params.max_torque, params.max_torque)
        costs = angle_normalize(state.theta) ** 2 + 0.1 * state.theta_dot**2 + 0.001 * u**2

        theta_dot = state.theta_dot + (
            3.0 * params.g / (2.0 * params.l) * jnp.sin(state.theta) + 3.0 / (params.m * params.l**2) * u
        ) * params.dt
        theta_dot = jnp.clip(theta_dot, -params.max_speed, params.max_speed)
        theta = state.theta + theta_dot * params.dt

        next_state = PendulumState(theta=theta, theta_dot=theta_dot, last_u=u, time=state.time + 1)
        terminated = jnp.zeros((), bool)
        info = {"discount": jnp.ones((), state.theta.dtype)}
        return self.get_obs(next_state), next_state, -costs, terminated, info

    def reset_env(self, key: jax.Array, params: PendulumParams) -> tuple[jax.Array, PendulumState]:
        high = jnp.array([jnp.pi, 1.0])
        theta, theta_dot = uniform(key, (2,), minval=-high, maxval=high)
        state = PendulumState(
            theta=theta, theta_dot=theta_dot, last_u=jnp.zeros_like(theta), time=jnp.zeros((), jnp.int32)
        )
        return self.get_obs(state), state

    def get_obs(self, state: PendulumState, params=None, key=None) -> jax.Array:
        return jnp.stack([jnp.cos(state.theta), jnp.sin(state.theta), state.theta_dot])

    def state_from_obs(self, obs, params: PendulumParams | None = None) -> PendulumState:
        """The state an observation ``[cos(theta), sin(theta), theta_dot]`` shows, with
        ``theta = atan2(sin, cos)`` in (-pi, pi] (the unwrapped angle is not observable, and no
        step depends on the wrap: the dynamics see ``sin(theta)``, the reward the wrapped angle).
        ``last_u``, the previous torque, is not in the observation and enters neither the
        transition nor the reward (it is only drawn), so it is 0. ``time`` is 0.
        ``diffgym.identify`` fits params through this."""
        obs = jnp.asarray(obs)
        theta = jnp.arctan2(obs[1], obs[0])
        return PendulumState(
            theta=theta, theta_dot=obs[2], last_u=jnp.zeros_like(theta), time=jnp.zeros((), jnp.int32)
        )

    def is_terminated(self, state: PendulumState, params: PendulumParams) -> jax.Array:
        return jnp.zeros((), bool)

    @property
    def name(self) -> str:
        return "Pendulum-v1"

    @property
    def num_actions(self) -> int:
        return 1

    def action_space(self, params: PendulumParams | None = None) -> Box:
        params = self.default_params if params is None else params
        return Box(-params.max_torque, params.max_torque, (1,), jnp.float32)

    def observation_space(self, params: PendulumParams | None = None) -> Box:
        params = self.default_params if params is None else params
        high = jnp.array([1.0, 1.0, params.max_speed], jnp.float32)
        return Box(-high, high, (3,), jnp.float32)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PendulumTask(Task):
    """Training the Pendulum by gradient.

    The env's own cost (``reward`` weight) scores the state *before* each step, so a short
    window barely sees what its torques do; and a window of a few steps cannot see a swing-up pay
    off through the angle cost at all (the speed cost even discourages swinging). Two terms help:

    * ``next_state_cost``: the env's cost ``theta^2 + 0.1 theta_dot^2 + 0.001 u^2`` scored on the
      state the action leads to (what a one-step window can see move).
    * ``energy``: the squared gap between the pendulum's energy and upright-at-rest's, normalised
      to 1 for hanging at rest. Per unit inertia ``E = theta_dot^2 / 2 + k cos(theta)``, with
      ``k = 3 g / (2 l)``, is conserved without torque; the gap shrinks at once when the torque
      pumps, so swinging up is a one-window lesson.

    **Training transition.** The forward pass is the env's step; the backward pass treats the
    speed clip (``max_speed``) as if it were not there (straight-through): the env's own gradient
    through a clipped speed is 0, so a pendulum spinning at the limit would get no signal to brake.

    Torques relax through the ``tanh`` squash into ``[-max_torque, max_torque]``.
    """

    next_state_cost: float = 0.0
    energy: float = 0.0

    def terms(self, params: PendulumParams, state, action, next_state: PendulumState) -> dict[str, jax.Array]:
        theta = angle_normalize(next_state.theta)
        cost = theta**2 + 0.1 * next_state.theta_dot**2 + 0.001 * next_state.last_u**2
        k = 3.0 * params.g / (2.0 * params.l)
        energy_gap = (0.5 * next_state.theta_dot**2 + k * jnp.cos(next_state.theta) - k) / (2.0 * k)
        return {"next_state_cost": cost, "energy": energy_gap**2}

    def transition(self, env, key, state, action, params):
        _, next_state, reward, terminated, _ = env.step_env(key, state, action, params)
        unclipped = dataclasses.replace(params, max_speed=jnp.inf)
        _, free, _, _, _ = env.step_env(key, state, action, unclipped)
        next_state = dataclasses.replace(
            next_state,
            theta=free.theta + jax.lax.stop_gradient(next_state.theta - free.theta),
            theta_dot=free.theta_dot + jax.lax.stop_gradient(next_state.theta_dot - free.theta_dot),
        )
        return next_state, reward, terminated


SPEC = EnvSpec(
    id="Pendulum-v1",
    entry_point=Pendulum,
    alias="pendulum",
    reward_threshold=-200.0,
    eval_episodes=100,
    obs_scale=(1.0, 1.0, 8.0),  # cos, sin, theta_dot (rad/s, max_speed 8)
    task=PendulumTask,
    gymnasium={"reward_threshold": None},  # gymnasium's Pendulum-v1 has none; -200 is the usual "solved"
)
