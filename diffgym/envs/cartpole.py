"""Differentiable CartPole-v1, step for step gymnasium's ``classic_control`` CartPole-v1."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from diffgym.core import Box, Discrete, Environment, EnvParams, EnvState, pytree_dataclass, uniform
from diffgym.registry import EnvSpec
from diffgym.task import Task


@pytree_dataclass
class CartPoleState(EnvState):
    x: jax.Array  # cart position, m
    x_dot: jax.Array  # cart velocity, m/s
    theta: jax.Array  # pole angle from upright, rad (positive: leaning right)
    theta_dot: jax.Array  # pole angular velocity, rad/s
    time: jax.Array  # steps taken in this episode


@pytree_dataclass
class CartPoleParams(EnvParams):
    gravity: float = 9.8  # m/s^2
    masscart: float = 1.0  # kg
    masspole: float = 0.1  # kg
    length: float = 0.5  # m, half the pole's length (gymnasium's convention)
    force_mag: float = 10.0  # N, the push of one action
    tau: float = 0.02  # s between state updates (explicit Euler)
    theta_threshold_radians: float = 12 * 2 * math.pi / 360
    x_threshold: float = 2.4  # m
    max_steps_in_episode: int = 500


class CartPole(Environment[CartPoleState, CartPoleParams]):
    """A pole hinged on a cart that moves along a frictionless track; keep it upright.

    The physics, thresholds, rewards and reset distribution are those of gymnasium's
    ``CartPole-v1`` (Barto, Sutton & Anderson 1983; equations from Florian 2007,
    https://coneural.org/florian/papers/05_cart_pole.pdf), integrated with explicit Euler.

    **Action** — a scalar ``a``: the integer 0 (push left) or 1 (push right), or any real number in
    [0, 1]. The force on the cart is ``(2a - 1) * force_mag``, so 0/1 give gymnasium's exact
    behaviour and a relaxed or straight-through action (``diffgym.discrete``) carries a gradient.

    **Observation** — ``[x, x_dot, theta, theta_dot]`` (float):

    ===  =====================  ===============  ===============
    idx  meaning                min              max
    ===  =====================  ===============  ===============
    0    cart position (m)      -4.8             4.8
    1    cart velocity (m/s)    -inf             inf
    2    pole angle (rad)       -0.418 (-24°)    0.418 (24°)
    3    pole angular velocity  -inf             inf
    ===  =====================  ===============  ===============

    **Reward** — 1 for every step, the terminating one included. Stepping on without a reset (not
    done by ``step``, which resets): 0 for a step from a terminated state into a terminated state,
    and 1 if the pole or cart comes back inside the thresholds, as gymnasium. One case differs:
    gymnasium remembers the first termination of an episode and pays 0 when the pole falls a
    second time; the state here has no such memory and pays 1.

    **Starting state** — every state variable uniform in [-0.05, 0.05].

    **Episode end** — terminated when ``|theta| > 12°`` or ``|x| > 2.4``; truncated after
    ``max_steps_in_episode`` (500) steps.

    **Differentiability** — ``step_env`` is smooth in state, action and every parameter
    (no ``stop_gradient``). The reward is piecewise constant (zero gradient) and the termination
    flag is a hard threshold (no gradient); use a smooth surrogate such as ``theta**2`` to train by
    backpropagation. ``step`` resets where an episode ends, which cuts the gradient there (see
    ``Environment.step``).

    **Parameters** — ``CartPoleParams`` holds only independent constants (nothing derived, so
    changing ``masspole`` changes the physics). A batch of params can be ``vmap``-ed over for
    domain randomisation.

    **Version history** — v1: gymnasium CartPole-v1 (500-step limit).
    """

    deterministic_transition = True
    observation_is_state_function = True

    @property
    def default_params(self) -> CartPoleParams:
        return CartPoleParams()

    def step_env(
        self, key: jax.Array, state: CartPoleState, action, params: CartPoleParams
    ) -> tuple[jax.Array, CartPoleState, jax.Array, jax.Array, dict[str, Any]]:
        del key  # deterministic
        action = jnp.asarray(action)
        if action.shape not in ((), (1,)):
            raise ValueError(
                f"CartPole takes a scalar action (0, 1 or a real in [0, 1]); got shape {action.shape}. "
                "Under vmap, the action of each env is a scalar."
            )
        action = jnp.reshape(action, ()).astype(state.x.dtype)
        prev_terminated = self.is_terminated(state, params)

        force = (2.0 * action - 1.0) * params.force_mag
        total_mass = params.masscart + params.masspole
        polemass_length = params.masspole * params.length
        costheta = jnp.cos(state.theta)
        sintheta = jnp.sin(state.theta)
        temp = (force + polemass_length * state.theta_dot**2 * sintheta) / total_mass
        thetaacc = (params.gravity * sintheta - costheta * temp) / (
            params.length * (4.0 / 3.0 - params.masspole * costheta**2 / total_mass)
        )
        xacc = temp - polemass_length * thetaacc * costheta / total_mass

        next_state = CartPoleState(
            x=state.x + params.tau * state.x_dot,
            x_dot=state.x_dot + params.tau * xacc,
            theta=state.theta + params.tau * state.theta_dot,
            theta_dot=state.theta_dot + params.tau * thetaacc,
            time=state.time + 1,
        )
        terminated = self.is_terminated(next_state, params)
        # gymnasium pays 0 only while the state stays past the thresholds after a termination: a
        # step that brings the pole back pays 1 (gymnax's ``1 - prev_terminal`` pays 0 there).
        reward = 1.0 - (prev_terminated & terminated).astype(state.x.dtype)
        info = {"discount": self.discount(next_state, params)}
        return self.get_obs(next_state), next_state, reward, terminated, info

    def reset_env(self, key: jax.Array, params: CartPoleParams) -> tuple[jax.Array, CartPoleState]:
        x, x_dot, theta, theta_dot = uniform(key, (4,), minval=-0.05, maxval=0.05)
        state = CartPoleState(x=x, x_dot=x_dot, theta=theta, theta_dot=theta_dot, time=jnp.zeros((), jnp.int32))
        return self.get_obs(state), state

    def get_obs(self, state: CartPoleState, params=None, key=None) -> jax.Array:
        return jnp.stack([state.x, state.x_dot, state.theta, state.theta_dot])

    def state_from_obs(self, obs, params: CartPoleParams | None = None) -> CartPoleState:
        """The state an observation ``[x, x_dot, theta, theta_dot]`` shows: the observation is the
        state. ``time`` (not observed) is 0. ``diffgym.identify`` fits params through this."""
        obs = jnp.asarray(obs)
        return CartPoleState(
            x=obs[0], x_dot=obs[1], theta=obs[2], theta_dot=obs[3], time=jnp.zeros((), jnp.int32)
        )

    def is_terminated(self, state: CartPoleState, params: CartPoleParams) -> jax.Array:
        return (
            (state.x < -params.x_threshold)
            | (state.x > params.x_threshold)
            | (state.theta < -params.theta_threshold_radians)
            | (state.theta > params.theta_threshold_radians)
        )

    @property
    def name(self) -> str:
        return "CartPole-v1"

    @property
    def num_actions(self) -> int:
        return 2

    def action_space(self, params: CartPoleParams | None = None) -> Discrete:
        return Discrete(2)

    def observation_space(self, params: CartPoleParams | None = None) -> Box:
        params = self.default_params if params is None else params
        high = jnp.array(
            [params.x_threshold * 2, jnp.inf, params.theta_threshold_radians * 2, jnp.inf], jnp.float32
        )
        return Box(-high, high, (4,), jnp.float32)


@dataclasses.dataclass(frozen=True, kw_only=True)
class CartPoleTask(Task):
    """Training CartPole by gradient: the reward is 1 per step until the pole falls, a constant
    with no gradient, so training needs a surrogate. The one documented here is a **termination
    penalty**: smooth costs for nearing the thresholds at which an episode terminates, scored on
    the state each action leads to.

    Terms (weights are fields, 0: off):

    * ``angle``: ``(theta / theta_threshold_radians)^2``, 1 at the 12 degree threshold.
    * ``position``: ``(x / x_threshold)^2``, 1 at the 2.4 m threshold.
    * ``speed``: ``(x_dot / 2 m/s)^2 + (theta_dot / 2 rad/s)^2``.

    Actions relax with the straight-through Bernoulli (``Task.relaxed_action``): the env takes
    any real ``a`` in [0, 1] and is affine in it, so the forward pass is gymnasium's 0/1.
    """

    angle: float = 0.0
    position: float = 0.0
    speed: float = 0.0

    def terms(self, params: CartPoleParams, state, action, next_state: CartPoleState) -> dict[str, jax.Array]:
        return {
            "angle": (next_state.theta / params.theta_threshold_radians) ** 2,
            "position": (next_state.x / params.x_threshold) ** 2,
            "speed": (next_state.x_dot / 2.0) ** 2 + (next_state.theta_dot / 2.0) ** 2,
        }


SPEC = EnvSpec(
    id="CartPole-v1",
    entry_point=CartPole,
    alias="cartpole",
    reward_threshold=475.0,
    eval_episodes=20,
    # x (m), x_dot (m/s), theta (rad: the 12 degree threshold), theta_dot (rad/s)
    obs_scale=(2.4, 2.0, 0.21, 2.0),
    task=CartPoleTask,
)
