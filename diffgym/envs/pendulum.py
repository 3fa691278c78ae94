"""Differentiable Pendulum-v1, step for step gymnasium's ``classic_control`` Pendulum-v1."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from diffgym.core import Box, Environment, EnvParams, EnvState, pytree_dataclass, uniform


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
    render_fps = 30

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

    def renderer(self, *, width: int = 500, height: int = 500):
        from diffgym.render.pendulum import PendulumRenderer

        return PendulumRenderer(width=width, height=height)
