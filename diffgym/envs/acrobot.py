"""Differentiable Acrobot-v1, step for step gymnasium's ``classic_control`` Acrobot-v1."""

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
class AcrobotState(EnvState):
    theta1: jax.Array  # rad, angle of link 1 from hanging down, wrapped into [-pi, pi]
    theta2: jax.Array  # rad, angle of link 2 relative to link 1, wrapped into [-pi, pi]
    dtheta1: jax.Array  # rad/s, bounded to ±max_vel_1
    dtheta2: jax.Array  # rad/s, bounded to ±max_vel_2
    time: jax.Array  # steps taken in this episode


@pytree_dataclass
class AcrobotParams(EnvParams):
    """gymnasium's ``AcrobotEnv`` class constants, their upper-case names in lower case."""

    dt: float = 0.2  # s, one RK4 step per env step
    link_length_1: float = 1.0  # m
    link_length_2: float = 1.0  # m (enters the book dynamics nowhere; kept for rendering, as gymnasium)
    link_mass_1: float = 1.0  # kg
    link_mass_2: float = 1.0  # kg
    link_com_pos_1: float = 0.5  # m, from the pivot to link 1's centre of mass
    link_com_pos_2: float = 0.5  # m, from the elbow to link 2's centre of mass
    link_moi: float = 1.0  # kg m^2, moment of inertia of each link about its centre of mass
    max_vel_1: float = 4 * math.pi  # rad/s
    max_vel_2: float = 9 * math.pi  # rad/s
    g: float = 9.8  # m/s^2 (a local constant of gymnasium's ``_dsdt``)
    max_steps_in_episode: int = 500


def wrap(x: jax.Array, low: float, high: float) -> jax.Array:
    """gymnasium's ``wrap``: add or subtract ``high - low`` until ``low <= x <= high``.

    Computed as one shift by a whole number of periods (gymnasium loops; the values agree to
    rounding). The derivative with respect to ``x`` is 1 everywhere (the period count is piecewise
    constant), also at the jumps ``x = high + k (high - low)``.
    """
    period = high - low
    above = jnp.ceil((x - high) / period)  # periods to subtract when x > high
    below = jnp.ceil((low - x) / period)  # periods to add when x < low
    return jnp.where(x > high, x - above * period, jnp.where(x < low, x + below * period, x))


def bound(x: jax.Array, low, high) -> jax.Array:
    """gymnasium's ``bound``, ``min(max(x, low), high)``, with a one-sided gradient: 1 with respect
    to ``x`` inside ``[low, high]`` (the bounds included), 0 outside, where the bound passed on
    carries the gradient instead."""
    return jnp.where(x < low, low, jnp.where(x > high, high, x))


def tip_height(theta1: jax.Array, theta2: jax.Array) -> jax.Array:
    """``-cos(theta1) - cos(theta1 + theta2)``: the free end's height above the pivot for unit links
    (-2 hanging down, 2 upright). The episode terminates when it exceeds 1."""
    return -jnp.cos(theta1) - jnp.cos(theta2 + theta1)


def mechanical_energy(state: AcrobotState, params: AcrobotParams) -> jax.Array:
    """Kinetic plus potential energy (J) of the two links, zero potential at the pivot's height.

    ``T = (d1 dtheta1^2 + 2 d2 dtheta1 dtheta2 + d22 dtheta2^2) / 2`` with the inertias of
    ``_dsdt``, and ``V = -(m1 lc1 + m2 l1) g cos(theta1) - m2 lc2 g cos(theta1 + theta2)``; the book
    dynamics conserve ``T + V`` without torque.
    """
    m1, m2, l1 = params.link_mass_1, params.link_mass_2, params.link_length_1
    lc1, lc2, inertia = params.link_com_pos_1, params.link_com_pos_2, params.link_moi
    cos2 = jnp.cos(state.theta2)
    d1 = m1 * lc1**2 + m2 * (l1**2 + lc2**2 + 2 * l1 * lc2 * cos2) + 2 * inertia
    d2 = m2 * (lc2**2 + l1 * lc2 * cos2) + inertia
    d22 = m2 * lc2**2 + inertia
    kinetic = 0.5 * (d1 * state.dtheta1**2 + 2 * d2 * state.dtheta1 * state.dtheta2 + d22 * state.dtheta2**2)
    potential = -(m1 * lc1 + m2 * l1) * params.g * jnp.cos(state.theta1) - m2 * lc2 * params.g * jnp.cos(
        state.theta1 + state.theta2
    )
    return kinetic + potential


def upright_energy(params: AcrobotParams) -> jax.Array:
    """The energy of both links upright at rest (J): ``(m1 lc1 + m2 l1 + m2 lc2) g``."""
    m1, m2 = params.link_mass_1, params.link_mass_2
    mass_moment = m1 * params.link_com_pos_1 + m2 * params.link_length_1 + m2 * params.link_com_pos_2
    return jnp.asarray(mass_moment * params.g)


class Acrobot(Environment[AcrobotState, AcrobotParams]):
    """Two links hanging from a pivot, torque on the joint between them; swing the tip up.

    The dynamics (Sutton & Barto's book equations, gymnasium's default ``book_or_nips="book"``),
    their RK4 integration (gymnasium's ``rk4`` with ``_dsdt``, one step of ``dt`` = 0.2 s), the
    angle wrapping and velocity bounds, the reward and the reset distribution are those of
    gymnasium's ``Acrobot-v1`` (Sutton 1996; source: RLPy's ``Acrobot.py``,
    https://github.com/rlpy/rlpy/blob/master/rlpy/Domains/Acrobot.py).

    **Action** — a scalar ``a``: the integer 0, 1 or 2 (torque -1, 0, +1 N m on the joint), or any
    real number in [0, 2]. The torque is ``a - 1``, so 0/1/2 give gymnasium's exact behaviour and a
    straight-through relaxed index (``Task.relaxed_action``) carries a gradient.

    ===  ==========================  ============
    a    torque on the joint (N m)   gymnasium
    ===  ==========================  ============
    0    -1                          action 0
    1    0                           action 1
    2    +1                          action 2
    ===  ==========================  ============

    **Observation** — ``[cos theta1, sin theta1, cos theta2, sin theta2, dtheta1, dtheta2]``
    (float), where ``theta1`` is link 1's angle from hanging straight down and ``theta2`` link 2's
    angle relative to link 1:

    ===  ===========================  =================  ================
    idx  meaning                      min                max
    ===  ===========================  =================  ================
    0    cos theta1                   -1                 1
    1    sin theta1                   -1                 1
    2    cos theta2                   -1                 1
    3    sin theta2                   -1                 1
    4    dtheta1 (rad/s)              -4 pi (-12.567)    4 pi (12.567)
    5    dtheta2 (rad/s)              -9 pi (-28.274)    9 pi (28.274)
    ===  ===========================  =================  ================

    **Reward** — -1 for every step, 0 for the step that reaches the goal (terminates).

    **Starting state** — ``theta1, theta2, dtheta1, dtheta2`` each uniform in [-0.1, 0.1]: hanging
    down, nearly at rest.

    **Episode end** — terminated when the tip is above the goal line,
    ``-cos(theta1) - cos(theta1 + theta2) > 1``; truncated after ``max_steps_in_episode`` (500).

    **Differentiability** — the RK4 step is smooth in the state, the action and every parameter;
    after it come three non-smooth places:

    * the angle wrapping (gymnasium's ``wrap`` into [-pi, pi]): the derivative of the wrapped angle
      with respect to the integrated one is 1 everywhere, at the jump too (the whole number of
      periods subtracted carries no gradient); observations are smooth through it.
    * the velocity clips (gymnasium's ``bound`` to ±``max_vel_1``, ±``max_vel_2``): where the
      integrated velocity lies outside the bound, the clipped velocity's gradient with respect to
      the state, action and other params is 0, and it is 1 (or -1) with respect to
      ``max_vel_1``/``max_vel_2``; inside (bounds included) it passes unchanged.
    * the reward and the termination flag are step functions of the state: zero gradient and no
      gradient. Use a smooth surrogate (``AcrobotTask``'s tip height or energy).

    ``step`` resets where an episode ends, which cuts the gradient there (see ``Environment.step``).
    No ``stop_gradient`` anywhere.

    **Parameters** — ``AcrobotParams`` holds gymnasium's constants (lower-case names), nothing
    derived. gymnasium's ``torque_noise_max`` (0) and the ``"nips"`` dynamics are not offered.

    **Version history** — v1: gymnasium Acrobot-v1 (500-step limit, cos/sin observations).
    """

    deterministic_transition = True
    observation_is_state_function = True

    @property
    def default_params(self) -> AcrobotParams:
        return AcrobotParams()

    def step_env(
        self, key: jax.Array, state: AcrobotState, action, params: AcrobotParams
    ) -> tuple[jax.Array, AcrobotState, jax.Array, jax.Array, dict[str, Any]]:
        del key  # deterministic
        action = jnp.asarray(action)
        if action.shape not in ((), (1,)):
            raise ValueError(
                f"Acrobot takes a scalar action (0, 1, 2 or a real in [0, 2]); got shape {action.shape} "
                f"(dtype {action.dtype}). Under vmap, the action of each env is a scalar."
            )
        torque = jnp.reshape(action, ()).astype(state.theta1.dtype) - 1.0

        y = jnp.stack([state.theta1, state.theta2, state.dtheta1, state.dtheta2])
        y = rk4_step(lambda s: _dsdt(s, torque, params), y, params.dt)
        pi = math.pi
        next_state = AcrobotState(
            theta1=wrap(y[0], -pi, pi),
            theta2=wrap(y[1], -pi, pi),
            dtheta1=bound(y[2], -params.max_vel_1, params.max_vel_1),
            dtheta2=bound(y[3], -params.max_vel_2, params.max_vel_2),
            time=state.time + 1,
        )
        terminated = self.is_terminated(next_state, params)
        reward = jnp.where(terminated, 0.0, -1.0).astype(y.dtype)
        info = {"discount": self.discount(next_state, params)}
        return self.get_obs(next_state), next_state, reward, terminated, info

    def reset_env(self, key: jax.Array, params: AcrobotParams) -> tuple[jax.Array, AcrobotState]:
        theta1, theta2, dtheta1, dtheta2 = uniform(key, (4,), minval=-0.1, maxval=0.1)
        state = AcrobotState(
            theta1=theta1, theta2=theta2, dtheta1=dtheta1, dtheta2=dtheta2, time=jnp.zeros((), jnp.int32)
        )
        return self.get_obs(state), state

    def get_obs(self, state: AcrobotState, params=None, key=None) -> jax.Array:
        return jnp.stack([
            jnp.cos(state.theta1), jnp.sin(state.theta1), jnp.cos(state.theta2), jnp.sin(state.theta2),
            state.dtheta1, state.dtheta2,
        ])

    def state_from_obs(self, obs, params: AcrobotParams | None = None) -> AcrobotState:
        """The state an observation ``[cos theta1, sin theta1, cos theta2, sin theta2, dtheta1,
        dtheta2]`` shows, each angle ``atan2(sin, cos)`` in (-pi, pi]: the state's own angle up to
        rounding (both wraps agree but at -pi, which becomes pi, and no step tells the two apart:
        the dynamics and the termination see only cos and sin). ``time`` (not observed) is 0.
        ``diffgym.identify`` fits params through this."""
        obs = jnp.asarray(obs)
        return AcrobotState(
            theta1=jnp.arctan2(obs[1], obs[0]), theta2=jnp.arctan2(obs[3], obs[2]),
            dtheta1=obs[4], dtheta2=obs[5], time=jnp.zeros((), jnp.int32),
        )

    def is_terminated(self, state: AcrobotState, params: AcrobotParams) -> jax.Array:
        return tip_height(state.theta1, state.theta2) > 1.0

    @property
    def name(self) -> str:
        return "Acrobot-v1"

    @property
    def num_actions(self) -> int:
        return 3

    def action_space(self, params: AcrobotParams | None = None) -> Discrete:
        return Discrete(3)

    def observation_space(self, params: AcrobotParams | None = None) -> Box:
        params = self.default_params if params is None else params
        high = jnp.array([1.0, 1.0, 1.0, 1.0, params.max_vel_1, params.max_vel_2], jnp.float32)
        return Box(-high, high, (6,), jnp.float32)


def _dsdt(s: jax.Array, torque: jax.Array, params: AcrobotParams) -> jax.Array:
    """gymnasium's ``AcrobotEnv._dsdt`` (book dynamics): ``[dtheta1, dtheta2, ddtheta1, ddtheta2]``
    of ``s = [theta1, theta2, dtheta1, dtheta2]``. The torque is constant over the step
    (gymnasium's augmented state has derivative 0 there).

    Term for term gymnasium's expressions, in their left-to-right order of operations; the shared
    factors (``m2 l1 lc2``, ``l1 lc2 cos(theta2)``, ``sin(theta2)``) are computed once, which changes
    no bit (only exact factors of 2 and signs move) and makes the step's gradients cheaper to
    compile.
    """
    m1, m2 = params.link_mass_1, params.link_mass_2
    l1, lc1, lc2 = params.link_length_1, params.link_com_pos_1, params.link_com_pos_2
    i1 = i2 = params.link_moi
    g = params.g
    theta1, theta2, dtheta1, dtheta2 = s[0], s[1], s[2], s[3]
    pi = math.pi
    sin2 = jnp.sin(theta2)
    l1_lc2_cos2 = l1 * lc2 * jnp.cos(theta2)
    coupling = m2 * l1 * lc2
    d1 = m1 * lc1**2 + m2 * (l1**2 + lc2**2 + 2 * l1_lc2_cos2) + i1 + i2
    d2 = m2 * (lc2**2 + l1_lc2_cos2) + i2
    phi2 = m2 * lc2 * g * jnp.cos(theta1 + theta2 - pi / 2.0)
    phi1 = (
        -coupling * dtheta2**2 * sin2
        - 2 * coupling * dtheta2 * dtheta1 * sin2
        + (m1 * lc1 + m2 * l1) * g * jnp.cos(theta1 - pi / 2)
        + phi2
    )
    ddtheta2 = (torque + d2 / d1 * phi1 - coupling * dtheta1**2 * sin2 - phi2) / (
        m2 * lc2**2 + i2 - d2**2 / d1
    )
    ddtheta1 = -(d2 * ddtheta2 + phi1) / d1
    return jnp.stack([dtheta1, dtheta2, ddtheta1, ddtheta2])


def rk4_step(derivs, y0: jax.Array, dt) -> jax.Array:
    """One classical Runge-Kutta step of ``dy/dt = derivs(y)``, as gymnasium's ``rk4`` over
    ``t = [0, dt]``."""
    dt2 = dt / 2.0
    k1 = derivs(y0)
    k2 = derivs(y0 + dt2 * k1)
    k3 = derivs(y0 + dt2 * k2)
    k4 = derivs(y0 + dt * k3)
    return y0 + dt / 6.0 * (k1 + 2 * k2 + 2 * k3 + k4)


@dataclasses.dataclass(frozen=True, kw_only=True)
class AcrobotTask(Task):
    """Training the Acrobot by gradient: the reward is -1 per step until the tip reaches the goal
    line (0 on that step), a step function of the state with zero gradient everywhere, so the
    env's reward alone gives gradient-based training nothing to follow. Two smooth surrogates,
    scored on the state each action leads to:

    * ``height``: ``(1 - h) / 3`` with ``h = -cos(theta1) - cos(theta1 + theta2)`` the tip height of
      the termination rule: 1 hanging straight down, 0 on the goal line (negative above it).
    * ``energy``: the squared gap between the links' mechanical energy (``mechanical_energy``) and
      upright-at-rest's, normalised to 1 for hanging at rest: ``((E - E_up) / (2 E_up))^2``.
      Without torque ``E`` is conserved, so the gap moves only as the torque pumps energy in: a
      swing-up that a short window sees progress on, long before the tip rises.

    Actions relax with the straight-through argmax over three logits (``Task.relaxed_action``): the
    env takes the real index in [0, 2] and is affine in it (torque ``a - 1``), so the forward pass
    is gymnasium's 0/1/2.
    """

    height: float = 0.0
    energy: float = 0.0

    def terms(self, params: AcrobotParams, state, action, next_state: AcrobotState) -> dict[str, jax.Array]:
        up = upright_energy(params)
        energy_gap = (mechanical_energy(next_state, params) - up) / (2.0 * up)
        return {
            "height": (1.0 - tip_height(next_state.theta1, next_state.theta2)) / 3.0,
            "energy": energy_gap**2,
        }


SPEC = EnvSpec(
    id="Acrobot-v1",
    entry_point=Acrobot,
    alias="acrobot",
    reward_threshold=-100.0,
    eval_episodes=100,
    # cos/sin in [-1, 1]; angular velocities (rad/s): their spread under an energy-pumping policy
    # that reaches the goal (standard deviations 1.8 and 5.5 measured over 5000 steps)
    obs_scale=(1.0, 1.0, 1.0, 1.0, 2.0, 5.0),
    task=AcrobotTask,
)
