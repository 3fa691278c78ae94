"""Differentiable trebuchet: the simulator of Trebuchet.jl and a one-shot aiming environment.

The physics reproduces Trebuchet.jl (FluxML, 2019; equations from virtualtrebuchet.com), the
simulator behind the "Differentiable Control Problems" post: a hinged counterweight, an arm on a
pivot, a sling dragging the projectile along the ground, then swinging it until release, then a
free flight with quadratic drag against the wind. Everything is explicit Euler at 60 Hz with the
three events (lift-off, release, landing) located on the linear interpolant of the Euler step, so
the landing distance is a piecewise-smooth function of wind, release angle and counterweight and
``jax.grad`` of it is what the post trained its aiming network on.

Public API:

* :func:`shoot` ``(wind, angle, counterweight, params=None) -> distance`` (m).
* :func:`shoot_trajectory` — the same shot with the whole trajectory (for rendering and plots).
* :func:`linkage_points` — pivot, arm ends, counterweight and sling end from the arm angles.
* :class:`Trebuchet` — the gymnax-style environment: one shot per episode at a random target
  distance and wind.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp

from diffgym.core import Box, Environment, EnvParams, EnvState, pytree_dataclass
from diffgym.registry import EnvSpec
from diffgym.task import Task

FOOT = 0.3048  # m
POUND = 0.45359237  # kg

#: Euler steps of each phase that the fixed-length scans cover (1 s, 1 s and 10 s at the default
#: dt = 1/60 s). Over the environment's action box (counterweight >= 20 kg) and winds in
#: +-15 m/s the ground phase takes at most 0.53 s, the sling phase 0.61 s and the flight 6.9 s
#: (measured on a grid). The cost of a shot is proportional to their sum. A shot that runs past
#: one is not an error; its ``status`` says which limit was hit (see ``shoot``).
MAX_GROUND_STEPS = 60
MAX_SLING_STEPS = 60
MAX_FLIGHT_STEPS = 600

#: ``|wind|`` is clipped to this (m/s) before the flight: explicit Euler on the quadratic drag is
#: stable up to ~1/(k dt) ~ 4000 m/s at the default constants, so this keeps every input finite.
WIND_CLIP = 1000.0
#: The arm phases stop (status ``DIVERGED``) when an angular speed exceeds this (rad/s). Normal
#: shots stay below ~40 rad/s; explicit Euler at 60 Hz turns unstable for counterweights above
#: ~250 kg at the default constants, and this catches the blow-up long before it overflows.
ANGULAR_SPEED_LIMIT = 200.0

# Outcomes of a shot (``ShotTrajectory.status``).
LANDED = 0  #: normal shot: the distance is where the projectile crossed the ground.
TOO_LIGHT = 1  #: the counterweight cannot lift the projectile (or is <= 0): the distance is the sling end's x on the ground.
NO_RELEASE = 2  #: the release direction was never reached within MAX_SLING_STEPS: released at the limit.
NOT_LANDED = 3  #: still airborne after MAX_FLIGHT_STEPS: the distance is x at that moment.
RELEASED_BELOW_GROUND = 4  #: the sling end was below ground level at release: the distance is the release x.
DIVERGED = 5  #: the arm's Euler integration blew up (counterweight far too heavy): the distance is the sling end's x then.
STATUS_NAMES = ("landed", "too_light", "no_release", "not_landed", "released_below_ground", "diverged")


@pytree_dataclass
class TrebuchetParams(EnvParams):
    """Physical constants (SI) of the trebuchet and the environment's task ranges.

    The defaults are Trebuchet.jl's (converted from feet and pounds), **including its inertia
    swap**: Trebuchet.jl builds an arm inertia ``mA (b + c)^2 / 12 = 2.7289 kg m^2`` and a weight
    inertia ``1 lb ft^2 = 0.042140 kg m^2`` and then uses them the other way round in its
    equations of motion (``IA3, IW3 = i.iw, i.ia``). Here the two inertias are ordinary
    parameters named after the term they enter, and their defaults put Trebuchet.jl's values where
    its equations use them: ``arm_inertia = 0.042140`` and ``weight_inertia = 2.7289``. The post's
    distances and gradients only reproduce with these defaults; for the physically labelled
    trebuchet use ``TrebuchetParams(arm_inertia=2.7289, weight_inertia=0.042140)``. Every field is
    independent: changing ``arm_mass`` does not change either inertia.
    """

    pivot_height: float = 5.0 * FOOT  # a, m (the pivot is the origin; the ground is y = -a)
    long_arm_length: float = 6.792 * FOOT  # b, m: pivot to sling attachment
    short_arm_length: float = 1.75 * FOOT  # c, m: pivot to counterweight hinge
    weight_arm_length: float = 2.0 * FOOT  # d, m: hinge to counterweight centre
    sling_length: float = 6.833 * FOOT  # e, m
    projectile_radius: float = 0.1245 * FOOT  # z, m
    projectile_mass: float = 0.328 * POUND  # kg
    arm_mass: float = 10.65 * POUND  # kg
    arm_inertia: float = POUND * FOOT**2  # kg m^2, the arm term's inertia (Trebuchet.jl's swap)
    weight_inertia: float = 10.65 * POUND * ((6.792 + 1.75) * FOOT) ** 2 / 12  # kg m^2 (swap)
    air_density: float = 1.0  # kg/m^3
    drag_coefficient: float = 1.0
    gravity: float = 9.80665  # m/s^2
    dt: float = 1.0 / 60.0  # s, explicit Euler step
    # --- the environment's task (ignored by ``shoot``) ---
    target_min: float = 20.0  # m, targets are drawn uniformly in [target_min, target_max]
    target_max: float = 100.0  # m
    wind_std: float = 5.0  # m/s, winds are drawn from N(0, wind_std^2) ...
    wind_limit: float = 15.0  # m/s, ... and clipped to [-wind_limit, wind_limit]
    angle_min_deg: float = 0.0  # action bounds: release angle, degrees
    angle_max_deg: float = 90.0
    counterweight_min_kg: float = 20.0  # action bounds: counterweight, kg
    counterweight_max_kg: float = 220.0
    max_steps_in_episode: int = 1


@pytree_dataclass
class ShotTrajectory:
    """One simulated shot, sampled at every Euler step (and at the event points).

    ``N = 1 + MAX_GROUND_STEPS + MAX_SLING_STEPS + MAX_FLIGHT_STEPS`` samples; those with
    ``valid == False`` lie after the shot ended and repeat the last state.

    Attributes:
        time: ``(N,)`` s since the counterweight was let go.
        phase: ``(N,)`` int, 0 ground (projectile sliding), 1 sling (hanging), 2 flight.
        valid: ``(N,)`` bool.
        arm_angles: ``(N, 3)`` rad, (arm, weight relative to arm, sling relative to arm); frozen at
            their release values during the flight.
        projectile: ``(N, 2)`` m, projectile centre (x, y), pivot at the origin.
        distance: landing x, m (what ``shoot`` returns).
        status: int, one of ``LANDED``, ``TOO_LIGHT``, ``NO_RELEASE``, ``NOT_LANDED``,
            ``RELEASED_BELOW_GROUND`` (names in ``STATUS_NAMES``).
        liftoff_time, release_time, landing_time: s (``landing_time`` is the end of the shot when
            it did not land).
        release_velocity: ``(2,)`` m/s.
    """

    time: jax.Array
    phase: jax.Array
    valid: jax.Array
    arm_angles: jax.Array
    projectile: jax.Array
    distance: jax.Array
    status: jax.Array
    liftoff_time: jax.Array
    release_time: jax.Array
    landing_time: jax.Array
    release_velocity: jax.Array


# --------------------------------------------------------------------------------------------
# Kinematics and equations of motion. Single-letter lengths follow the spec's symbols:
# a pivot height, b long arm, c short arm, d weight arm, e sling.
# --------------------------------------------------------------------------------------------
def _nonzero(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """``x`` pushed away from 0 by at least ``eps``: safe as a denominator in a discarded branch."""
    return jnp.where(jnp.abs(x) < eps, jnp.where(x < 0, -eps, eps), x)


def _safe_norm(x: jax.Array, y: jax.Array) -> jax.Array:
    # sqrt has an infinite slope at 0; the floor keeps the gradient finite there (and is far below
    # any speed that matters).
    return jnp.sqrt(jnp.maximum(x * x + y * y, 1e-12))


def _sling_end(p: TrebuchetParams, u: jax.Array) -> jax.Array:
    """Sling end (projectile while attached), m: ``(2,)``."""
    aq, sq = u[0], u[2]
    return jnp.stack(
        [
            -p.long_arm_length * jnp.sin(aq) - p.sling_length * jnp.sin(aq + sq),
            p.long_arm_length * jnp.cos(aq) + p.sling_length * jnp.cos(aq + sq),
        ]
    )


def _sling_velocity(p: TrebuchetParams, u: jax.Array) -> jax.Array:
    """Velocity of the sling end, m/s: ``(2,)``."""
    aq, sq, aw, sw = u[0], u[2], u[3], u[5]
    b, e = p.long_arm_length, p.sling_length
    return jnp.stack(
        [
            -e * (sw + aw) * jnp.cos(aq + sq) - b * aw * jnp.cos(aq),
            -e * (sw + aw) * jnp.sin(aq + sq) - b * aw * jnp.sin(aq),
        ]
    )


def _ground_derivative(p: TrebuchetParams, mw: jax.Array, u: jax.Array) -> jax.Array:
    """Phase 1 (projectile sliding on the ground): ``du/dt`` of ``u = (Aq, Wq, Sq, Aw, Ww, Sw)``."""
    aq, wq, sq, aw, ww, sw = u[0], u[1], u[2], u[3], u[4], u[5]
    b, c, d, e = p.long_arm_length, p.short_arm_length, p.weight_arm_length, p.sling_length
    mp, ma, g = p.projectile_mass, p.arm_mass, p.gravity
    ia, iw = p.arm_inertia, p.weight_inertia
    lacg = (b - c) / 2
    s_aq, c_aq, s_sq, c_sq = jnp.sin(aq), jnp.cos(aq), jnp.sin(sq), jnp.cos(sq)
    s_wq, c_wq = jnp.sin(wq), jnp.cos(wq)
    # S(Aq+Sq) vanishes only when the sling stands vertical, long after lift-off; the guard keeps
    # the masked-out evaluations after the phase ended finite.
    s_as = _nonzero(jnp.sin(aq + sq))
    c_as = jnp.cos(aq + sq)

    m11 = (
        -mp * b**2 * (-1 + 2 * s_aq * c_sq / s_as)
        + ia
        + iw
        + ma * lacg**2
        + mp * b**2 * s_aq**2 / s_as**2
        + mw * (c**2 + d**2 + 2 * c * d * c_wq)
    )
    m12 = iw + d * mw * (d + c * c_wq)
    m22 = iw + mw * d**2
    k = c_as * sw * (sw + 2 * aw) / s_as + (c_as / s_as + b * c_aq / (e * s_as)) * aw**2
    r1 = (
        g * lacg * ma * s_aq
        + b * e * mp * (s_sq * (aw + sw) ** 2 + c_sq * k)
        + b * mp * s_aq * (b * s_sq * aw**2 - e * k) / s_as
        - g * mw * (c * s_aq + d * jnp.sin(aq + wq))
        - c * d * mw * s_wq * (aw**2 - (aw + ww) ** 2)
    )
    r2 = -d * mw * (g * jnp.sin(aq + wq) + c * s_wq * aw**2)
    det = m11 * m22 - m12 * m12
    daw = (r1 * m22 - r2 * m12) / det
    dww = -(r1 * m12 - r2 * m11) / det
    dsw = -k - (b * s_aq + e * s_as) * daw / (e * s_as)
    return jnp.stack([aw, ww, sw, daw, dww, dsw])


def _sling_derivative(p: TrebuchetParams, mw: jax.Array, u: jax.Array) -> jax.Array:
    """Phase 2 (projectile hanging in the sling): ``du/dt``."""
    aq, wq, sq, aw, ww, sw = u[0], u[1], u[2], u[3], u[4], u[5]
    b, c, d, e = p.long_arm_length, p.short_arm_length, p.weight_arm_length, p.sling_length
    mp, ma, g = p.projectile_mass, p.arm_mass, p.gravity
    ia, iw = p.arm_inertia, p.weight_inertia
    lacg = (b - c) / 2
    s_aq, s_sq, c_sq = jnp.sin(aq), jnp.sin(sq), jnp.cos(sq)
    s_wq, c_wq = jnp.sin(wq), jnp.cos(wq)

    m11 = ia + iw + ma * lacg**2 + mp * (b**2 + e**2 + 2 * b * e * c_sq) + mw * (c**2 + d**2 + 2 * c * d * c_wq)
    m12 = iw + d * mw * (d + c * c_wq)
    m13 = e * mp * (e + b * c_sq)
    m22 = iw + mw * d**2
    m33 = mp * e**2
    r1 = (
        g * lacg * ma * s_aq
        + g * mp * (b * s_aq + e * jnp.sin(aq + sq))
        - g * mw * (c * s_aq + d * jnp.sin(aq + wq))
        - b * e * mp * s_sq * (aw**2 - (aw + sw) ** 2)
        - c * d * mw * s_wq * (aw**2 - (aw + ww) ** 2)
    )
    r2 = -d * mw * (g * jnp.sin(aq + wq) + c * s_wq * aw**2)
    r3 = e * mp * (g * jnp.sin(aq + sq) - b * s_sq * aw**2)
    # D = -det(M) of a positive-definite mass matrix: never 0 for positive masses and inertias.
    det = m13 * m22 * m13 - m33 * (m11 * m22 - m12 * m12)
    daw = -(r1 * m22 * m33 - r2 * m12 * m33 - r3 * m13 * m22) / det
    dww = (r1 * m12 * m33 - r2 * (m11 * m33 - m13 * m13) - r3 * m13 * m12) / det
    dsw = (r1 * m22 * m13 - r2 * m12 * m13 - r3 * (m11 * m22 - m12 * m12)) / det
    return jnp.stack([aw, ww, sw, daw, dww, dsw])


def _release_condition(p: TrebuchetParams, u: jax.Array, release_angle: jax.Array) -> jax.Array:
    """``sin(angle_of(v) - r)``, written without atan2: ``(vy cos r - vx sin r) / |v|``."""
    v = _sling_velocity(p, u)
    return (v[1] * jnp.cos(release_angle) - v[0] * jnp.sin(release_angle)) / _safe_norm(v[0], v[1])


def _fold_angle(angle_rad: jax.Array) -> jax.Array:
    """``asin(sin(angle))`` as Trebuchet.jl does, as a triangle wave (its slope is +-1, never inf).

    At exactly +-90 degrees (the fold) the gradient is 0, a valid subgradient of the kink.
    """
    return math.pi / 2 - jnp.abs(jnp.mod(angle_rad + math.pi / 2, 2 * math.pi) - math.pi)


def _crossing_fraction(before: jax.Array, after: jax.Array, crossed: jax.Array) -> jax.Array:
    """Where the straight line from ``before`` (at 0) to ``after`` (at 1) crosses zero."""
    return before / jnp.where(crossed, before - after, 1.0)


def _sign_change(before: jax.Array, after: jax.Array) -> jax.Array:
    return ((before > 0) & (after <= 0)) | ((before < 0) & (after >= 0))


def _refine_release(p, u0, u1, c0, c1, release_angle, crossed, iterations: int = 3):
    """Root of the release condition along the Euler step's linear interpolant ``u0 + t (u1 - u0)``.

    False position from the bracket ``[0, 1]``; the condition is nearly linear over one step, so
    three iterations reach float32 round-off. Returns the fraction ``t`` in [0, 1].
    """
    lo, hi, c_lo, c_hi = jnp.zeros_like(c0), jnp.ones_like(c0), c0, c1
    for _ in range(iterations):
        t = lo + (hi - lo) * _crossing_fraction(c_lo, c_hi, crossed)
        c_t = _release_condition(p, u0 + t * (u1 - u0), release_angle)
        same_side_as_lo = (c_t > 0) == (c_lo > 0)
        lo, c_lo = jnp.where(same_side_as_lo, t, lo), jnp.where(same_side_as_lo, c_t, c_lo)
        hi, c_hi = jnp.where(same_side_as_lo, hi, t), jnp.where(same_side_as_lo, c_hi, c_t)
        # A bracket end that lands on the root exactly would make the next denominator 0.
        crossed = crossed & (c_lo != c_hi)
    return lo + (hi - lo) * _crossing_fraction(c_lo, c_hi, crossed)


def _liftoff_condition(p: TrebuchetParams, u0: jax.Array, u1: jax.Array, t: jax.Array) -> jax.Array:
    """Lift-off condition ``mP g - Tn cos(phi)`` at the point ``t`` in (0, 1] of the step ``u0 -> u1``.

    As in Trebuchet.jl, the sling end's x-acceleration is the finite difference of its velocity
    from the step's start to that point, ``(vx(u(t)) - vx(u0)) / (t dt)``.
    """
    u_t = u0 + t * (u1 - u0)
    ax = (_sling_velocity(p, u_t)[0] - _sling_velocity(p, u0)[0]) / (jnp.maximum(t, 1e-6) * p.dt)
    phi = u_t[0] + u_t[2] - math.pi
    # mP g - Tn cos(phi) with Tn = -mP ax / sin(phi)
    return p.projectile_mass * (p.gravity + ax * jnp.cos(phi) / _nonzero(jnp.sin(phi)))


def _refine_liftoff(p, u0, u1, c1, crossed, iterations: int = 3):
    """Lift-off point ``t`` in [0, 1] of the step ``u0 -> u1`` in which the condition turned <= 0.

    Trebuchet.jl root-finds its condition along the Euler step's linear interpolant, with the
    acceleration a finite difference from the step's start (``_liftoff_condition``). That
    function's limit at the step's start, ``c(0+)``, uses the directional derivative of the
    velocity along the step and can already be negative (the finite-difference acceleration jumps
    from one step to the next): then the root is the step's start (``t = 0``, an event time locked
    to the step grid, with zero derivative). Otherwise false position between ``c(0+)`` and
    ``c(1)``. This reproduces the post's published gradient (0.112 m per kg); interpolating the
    condition linearly between the two step ends instead gives ~5 % more.
    """
    du = u1 - u0
    ax_start = jax.jvp(lambda u: _sling_velocity(p, u)[0], (u0,), (du,))[1] / p.dt
    phi0 = u0[0] + u0[2] - math.pi
    c0 = p.projectile_mass * (p.gravity + ax_start * jnp.cos(phi0) / _nonzero(jnp.sin(phi0)))
    interior = crossed & (c0 > 0)
    lo, hi, c_lo, c_hi = jnp.zeros_like(c0), jnp.ones_like(c0), c0, c1
    for _ in range(iterations):
        t = lo + (hi - lo) * _crossing_fraction(c_lo, c_hi, interior)
        c_t = _liftoff_condition(p, u0, u1, t)
        same_side_as_lo = c_t > 0
        lo, c_lo = jnp.where(same_side_as_lo, t, lo), jnp.where(same_side_as_lo, c_t, c_lo)
        hi, c_hi = jnp.where(same_side_as_lo, hi, t), jnp.where(same_side_as_lo, c_hi, c_t)
        interior = interior & (c_lo != c_hi)
    t = lo + (hi - lo) * _crossing_fraction(c_lo, c_hi, interior)
    return jnp.where(c0 > 0, t, 0.0)


# --------------------------------------------------------------------------------------------
# The three phases, each a fixed-length scan with an "alive" mask (reverse-mode friendly)
# --------------------------------------------------------------------------------------------
def _arm_state_ok(u: jax.Array) -> jax.Array:
    """Whether the arm state is finite and its angular speeds below ``ANGULAR_SPEED_LIMIT``."""
    return jnp.all(jnp.isfinite(u)) & jnp.all(jnp.abs(u[3:]) < ANGULAR_SPEED_LIMIT)


def _with_event_sample(samples, u_event, time_event, happened):
    """Put the event's state in the sample slot of the step it fell in (valid samples come first)."""
    states, times, valid = samples
    index = jnp.minimum(jnp.sum(valid), valid.shape[0] - 1)
    return (
        states.at[index].set(jnp.where(happened, u_event, states[index])),
        times.at[index].set(jnp.where(happened, time_event, times[index])),
        valid.at[index].set(valid[index] | happened),
    )


def _ground_phase(p: TrebuchetParams, mw: jax.Array, u0: jax.Array):
    mp, g, dt = p.projectile_mass, p.gravity, p.dt

    @jax.checkpoint
    def step(carry, _):
        u, u_after, condition_after, time, alive, lifted, too_light, diverged = carry
        diverging = alive & ~_arm_state_ok(u)
        alive = alive & ~diverging
        # Steps after the phase ended are computed on the (benign) initial state and discarded:
        # nothing there can overflow, so no inf or NaN reaches the gradient through jnp.where.
        u_eval = jnp.where(alive, u, u0)
        u_new = u_eval + dt * _ground_derivative(p, mw, u_eval)
        # The normal force on the projectile from the x-acceleration of the sling end over the
        # step (Trebuchet.jl's finite difference), and the lift-off condition mP g - Tn cos(phi).
        ax = (_sling_velocity(p, u_new)[0] - _sling_velocity(p, u_eval)[0]) / dt
        phi = u_new[0] + u_new[2] - math.pi
        normal_force = -mp * ax / _nonzero(jnp.sin(phi))
        condition_new = mp * g - normal_force * jnp.cos(phi)
        lifts = alive & (condition_new <= 0)
        light = alive & ~lifts & (normal_force < 0)
        # On lift-off keep the step's start; the point inside the step is found after the scan.
        advance = alive & ~lifts
        carry = (
            jnp.where(advance, u_new, u),
            jnp.where(lifts, u_new, u_after),
            jnp.where(lifts, condition_new, condition_after),
            jnp.where(advance, time + dt, time),
            advance & ~light,
            lifted | lifts,
            too_light | light,
            diverged | diverging,
        )
        return carry, (carry[0], carry[3], advance)

    zero = jnp.zeros_like(mp * g)
    init = (u0, u0, zero, zero, jnp.array(True), jnp.array(False), jnp.array(False), jnp.array(False))
    (u, u_after, condition_after, time, alive, lifted, too_light, diverged), samples = jax.lax.scan(
        step, init, None, length=MAX_GROUND_STEPS
    )
    frac = jnp.where(lifted, _refine_liftoff(p, u, u_after, condition_after, lifted), 0.0)
    u, time = u + frac * (u_after - u), time + frac * dt
    # Never lifting off within the limit counts as too light (the arm is barely moving).
    return u, time, too_light | alive, diverged, _with_event_sample(samples, u, time, lifted)


def _sling_phase(p: TrebuchetParams, mw: jax.Array, u0: jax.Array, time0: jax.Array, release_angle, active):
    dt = p.dt
    benign = _initial_arm_state(p, u0.dtype)

    @jax.checkpoint
    def step(carry, _):
        u, condition, u_after, condition_after, time, alive, released, diverged = carry
        diverging = alive & ~_arm_state_ok(u)
        alive = alive & ~diverging
        u_eval = jnp.where(alive, u, benign)
        u_new = u_eval + dt * _sling_derivative(p, mw, u_eval)
        condition_new = _release_condition(p, u_new, release_angle)
        releases = alive & _sign_change(condition, condition_new)
        advance = alive & ~releases
        carry = (
            jnp.where(advance, u_new, u),
            jnp.where(advance, condition_new, condition),
            jnp.where(releases, u_new, u_after),
            jnp.where(releases, condition_new, condition_after),
            jnp.where(advance, time + dt, time),
            advance,
            released | releases,
            diverged | diverging,
        )
        return carry, (carry[0], carry[4], advance)

    condition0 = _release_condition(p, u0, release_angle)
    init = (u0, condition0, u0, condition0, time0, active, jnp.array(False), jnp.array(False))
    (u, condition, u_after, condition_after, time, alive, released, diverged), samples = jax.lax.scan(
        step, init, None, length=MAX_SLING_STEPS
    )
    frac = jnp.where(
        released, _refine_release(p, u, u_after, condition, condition_after, release_angle, released), 0.0
    )
    u, time = u + frac * (u_after - u), time + frac * dt
    return u, time, alive, diverged, _with_event_sample(samples, u, time, released)


def _flight_phase(p: TrebuchetParams, wind: jax.Array, q0: jax.Array, time0: jax.Array, active):
    dt, g = p.dt, p.gravity
    drag = p.air_density * p.drag_coefficient * math.pi * p.projectile_radius**2 / (2 * p.projectile_mass)
    benign = jnp.zeros_like(q0).at[1].set(0.0 * q0[1] + p.pivot_height)

    @jax.checkpoint
    def step(carry, _):
        q, time, alive = carry
        q_eval = jnp.where(alive, q, benign)
        y, vx, vy = q_eval[1], q_eval[2], q_eval[3]
        airspeed = _safe_norm(vy, wind - vx)
        q_new = q_eval + dt * jnp.stack([vx, vy, -drag * (vx - wind) * airspeed, -g - drag * vy * airspeed])
        height, height_new = y + p.pivot_height, q_new[1] + p.pivot_height
        lands = alive & (height_new < 0)
        frac = jnp.where(lands, _crossing_fraction(height, height_new, lands), 1.0)
        q_next = jnp.where(alive, q_eval + frac * (q_new - q_eval), q)
        time_next = jnp.where(alive, time + frac * dt, time)
        return (q_next, time_next, alive & ~lands), (q_next, time_next, alive)

    (q, time, alive), samples = jax.lax.scan(step, (q0, time0, active), None, length=MAX_FLIGHT_STEPS)
    return q, time, alive, samples


def _initial_arm_state(p: TrebuchetParams, dtype) -> jax.Array:
    """Arm tip on the ground, sling horizontal along the ground, everything at rest."""
    theta0 = jnp.arcsin(p.pivot_height / p.long_arm_length)
    aq = math.pi / 2 + theta0
    zero = jnp.zeros((), dtype)
    return jnp.stack([aq, -aq, math.pi - theta0, zero, zero, zero]).astype(dtype)


def _check_inputs(wind, angle, counterweight):
    finite = jnp.isfinite(wind) & jnp.isfinite(angle) & jnp.isfinite(counterweight)
    return eqx.error_if(
        (wind, angle, counterweight),
        ~finite,
        "trebuchet.shoot got a non-finite input (wind m/s, angle deg, counterweight kg); "
        "all three must be finite numbers",
    )


def _simulate(wind, angle, counterweight, params, with_trajectory: bool):
    p = TrebuchetParams() if params is None else params
    dtype = jnp.result_type(wind, angle, counterweight, jnp.float32)
    wind, angle, counterweight = (jnp.asarray(v, dtype) for v in (wind, angle, counterweight))
    if wind.shape or angle.shape or counterweight.shape:
        raise ValueError(
            "shoot takes scalars (wind m/s, angle deg, counterweight kg); got shapes "
            f"{wind.shape}, {angle.shape}, {counterweight.shape}. Use jax.vmap for a batch of shots."
        )
    wind, angle, counterweight = _check_inputs(wind, angle, counterweight)
    wind = jnp.clip(wind, -WIND_CLIP, WIND_CLIP)
    has_weight = counterweight > 0
    # Trebuchet.jl returns the resting sling end's x for a weight <= 0; simulate a harmless 1 kg
    # instead so that nothing in the untaken branch divides by zero.
    mw = jnp.where(has_weight, counterweight, 1.0)
    release_angle = _fold_angle(jnp.deg2rad(angle))

    u0 = _initial_arm_state(p, dtype)
    u_lift, t_lift, too_light, diverged_ground, ground = _ground_phase(p, mw, u0)
    too_light = too_light | ~has_weight
    u_release, t_release, no_release, diverged_sling, sling = _sling_phase(
        p, mw, u_lift, t_lift, release_angle, ~too_light & ~diverged_ground
    )
    diverged = diverged_ground | diverged_sling
    position, velocity = _sling_end(p, u_release), _sling_velocity(p, u_release)
    below_ground = position[1] + p.pivot_height < 0
    flying = ~too_light & ~diverged & ~below_ground
    q, t_land, not_landed, flight = _flight_phase(
        p, wind, jnp.where(flying, jnp.concatenate([position, velocity]), 0.0), t_release, flying
    )

    ground_x = _sling_end(p, jnp.where(has_weight, u_lift, u0))[0]
    distance = jnp.select([too_light, diverged, ~flying], [ground_x, position[0], position[0]], q[0])
    status = jnp.select(
        [too_light, diverged, below_ground, not_landed, no_release],
        [TOO_LIGHT, DIVERGED, RELEASED_BELOW_GROUND, NOT_LANDED, NO_RELEASE],
        LANDED,
    )
    if not with_trajectory:
        return distance, status

    flight_arm = jnp.broadcast_to(u_release[:3], (MAX_FLIGHT_STEPS, 3))
    arm = jnp.concatenate([u0[None, :3], ground[0][:, :3], sling[0][:, :3], flight_arm])
    attached = jax.vmap(lambda u: _sling_end(p, u))(jnp.concatenate([u0[None], ground[0], sling[0]]))
    phase = [jnp.zeros(1 + MAX_GROUND_STEPS, jnp.int32), jnp.ones(MAX_SLING_STEPS, jnp.int32)]
    trajectory = ShotTrajectory(
        time=jnp.concatenate([jnp.zeros((1,), dtype), ground[1], sling[1], flight[1]]),
        phase=jnp.concatenate(phase + [jnp.full(MAX_FLIGHT_STEPS, 2, jnp.int32)]),
        valid=jnp.concatenate([jnp.ones((1,), bool), ground[2], sling[2], flight[2]]),
        arm_angles=arm,
        projectile=jnp.concatenate([attached, flight[0][:, :2]]),
        distance=distance,
        status=status,
        liftoff_time=t_lift,
        release_time=t_release,
        landing_time=t_land,
        release_velocity=velocity,
    )
    return distance, trajectory


def shoot(wind, angle, counterweight, params: TrebuchetParams | None = None) -> jax.Array:
    """Landing distance of one trebuchet shot, m, from the pivot (Trebuchet.jl's ``shoot``).

    Args:
        wind: horizontal wind speed, m/s, scalar (positive: tail wind, along +x). Clipped to
            ``+-WIND_CLIP`` (1000 m/s; gradient 0 beyond).
        angle: release angle, degrees, scalar: the projectile leaves the sling when its velocity
            points this far above the horizontal. As in Trebuchet.jl it is folded as
            ``asin(sin(angle))``, so 120 deg acts as 60 deg.
        counterweight: kg, scalar (Trebuchet.jl's ``weight 200`` lb is 90.718 kg).
        params: physical constants; ``TrebuchetParams()`` (Trebuchet.jl's) when None.

    Returns:
        a scalar in the inputs' floating dtype (float32 unless they are float64).

    Works under ``jit``, ``vmap``, ``grad`` (reverse mode, memory bounded by ``jax.checkpoint``
    on each Euler step) and ``jacfwd``; every phase is a fixed-length ``lax.scan`` with an alive
    mask, so the cost does not depend on the shot.

    **Where it is not smooth.** Each event (lift-off, release, landing) is located on the linear
    interpolant of the Euler step it falls in, so the distance is continuous and smooth inside
    regions where every event stays in the same step; when an event moves from one step to the
    next the derivative jumps (a kink, by a few percent of the gradient), and ``grad`` returns the
    one-sided derivative of the step the event is in. The gradient is used as is by the post and
    by ``agents.trebuchet``. Lift-off follows Trebuchet.jl's root finding (``_refine_liftoff``):
    when its finite-difference condition is already negative at the start of the step, lift-off
    is that step's start, an event time locked to the Euler grid that carries no derivative; this
    is what reproduces the published gradient (0.111 m/kg against 0.112; interpolating the
    condition instead gives 0.117). Other non-smooth places: the fold of ``angle`` at +-90 deg
    (gradient 0 there), the wind clip, and the degenerate outcomes below, where the distance jumps.
    Measured: ``grad`` matches float64 central finite differences to 1e-4 relative at random
    shots over the operating range (``tests/test_trebuchet.py``).

    **Degenerate inputs** give a finite, documented result (see ``shoot_trajectory``'s
    ``status``), never NaN:

    * counterweight <= 0, or too light to lift the projectile (the ground's normal force turns
      negative: below ~9 kg at the defaults): the sling end's x on the ground, where the
      shot ends (~0.7 m or less); gradient 0 for counterweight <= 0.
    * the release direction is never reached while the projectile swings (within
      ``MAX_SLING_STEPS``): it is released at that limit.
    * still airborne after ``MAX_FLIGHT_STEPS``: x at that time. Released below ground level:
      the release x.
    * counterweights so heavy that 60 Hz Euler blows up (above ~250 kg; an angular speed passes
      ``ANGULAR_SPEED_LIMIT``): status ``DIVERGED``, the sling end's x at that moment.
    * NaN or infinite inputs raise an error (``equinox.error_if``, also under ``jit``).
    """
    distance, _ = _simulate(wind, angle, counterweight, params, with_trajectory=False)
    return distance


def shoot_status(wind, angle, counterweight, params: TrebuchetParams | None = None) -> tuple[jax.Array, jax.Array]:
    """``(distance, status)``: ``shoot`` and the outcome code (``LANDED`` ... , see ``STATUS_NAMES``)."""
    return _simulate(wind, angle, counterweight, params, with_trajectory=False)


def shoot_trajectory(wind, angle, counterweight, params: TrebuchetParams | None = None) -> ShotTrajectory:
    """The shot of ``shoot`` with its whole trajectory (``ShotTrajectory``), for rendering and plots."""
    _, trajectory = _simulate(wind, angle, counterweight, params, with_trajectory=True)
    return trajectory


def linkage_points(arm_angles: jax.Array, params: TrebuchetParams | None = None) -> dict[str, jax.Array]:
    """Positions (m, pivot at the origin) of the trebuchet's parts for arm angles ``(..., 3)``.

    Returns a dict of ``(..., 2)`` arrays: ``pivot``, ``long_end`` (sling attachment),
    ``short_end`` (counterweight hinge), ``counterweight`` (its centre) and ``sling_end``.
    """
    p = TrebuchetParams() if params is None else params
    aq, wq, sq = arm_angles[..., 0], arm_angles[..., 1], arm_angles[..., 2]
    b, c, d, e = p.long_arm_length, p.short_arm_length, p.weight_arm_length, p.sling_length
    long_end = jnp.stack([-b * jnp.sin(aq), b * jnp.cos(aq)], -1)
    short_end = jnp.stack([c * jnp.sin(aq), -c * jnp.cos(aq)], -1)
    weight = short_end + jnp.stack([d * jnp.sin(aq + wq), -d * jnp.cos(aq + wq)], -1)
    sling_end = long_end + jnp.stack([-e * jnp.sin(aq + sq), e * jnp.cos(aq + sq)], -1)
    return {
        "pivot": jnp.zeros_like(long_end),
        "long_end": long_end,
        "short_end": short_end,
        "counterweight": weight,
        "sling_end": sling_end,
    }


# --------------------------------------------------------------------------------------------
# The environment: aim at a random target in a random wind, one shot per episode
# --------------------------------------------------------------------------------------------
@pytree_dataclass
class TrebuchetState(EnvState):
    target: jax.Array  # m, distance of the target from the pivot
    wind: jax.Array  # m/s, positive: tail wind
    release_angle_deg: jax.Array  # last action (0 before the shot), degrees
    counterweight_kg: jax.Array  # last action (0 before the shot), kg
    distance: jax.Array  # m, where the last shot landed (0 before the shot)
    time: jax.Array  # shots taken in this episode (0 or 1)


class Trebuchet(Environment[TrebuchetState, TrebuchetParams]):
    """Aim a trebuchet: choose the release angle and the counterweight to hit a target in the wind.

    The simulator is Trebuchet.jl's (the "Differentiable Control Problems" post, FluxML 2019), see
    :func:`shoot` and the module docstring; physics source: virtualtrebuchet.com's equations of
    motion. One shot per episode.

    **Action** — ``[release_angle_deg, counterweight_kg]`` (float32), clipped to the box:

    ===  ===========================  =====  =====
    idx  meaning                      min    max
    ===  ===========================  =====  =====
    0    release angle (degrees)      0      90
    1    counterweight (kg)           20     220
    ===  ===========================  =====  =====

    Above ~240 kg the 60 Hz Euler integration of Trebuchet.jl's arm degrades and then blows up,
    hence the upper bound; below ~9 kg the counterweight cannot lift the projectile.

    **Observation** — ``[target, wind]`` (float32): target distance in m, in
    ``[target_min, target_max]`` = [20, 100]; wind in m/s (positive: tail wind), in
    ``[-wind_limit, wind_limit]`` = [-15, 15].

    **Reward** — ``-|distance - target|`` in metres (0 is a perfect hit); ``info["distance"]`` is
    where the shot landed.

    **Starting state** — target ~ U(20, 100) m; wind ~ N(0, 5^2) m/s clipped to +-15 m/s (the
    post's distribution, clipped).

    **Episode end** — terminated after the one shot (``max_steps_in_episode = 1``).

    **Reach** — not every target is reachable in every wind: the longest throw within the action
    box is about 58, 70, 85, 102, 121 and 165 m at winds of -15, -10, -5, 0, +5 and +15 m/s (the
    small projectile's drag dominates in a head wind). For an unreachable target the best action
    throws as far as possible and the reward is the remaining miss. ``agents.trebuchet.aim``
    reports such targets.

    **Differentiability** — ``step_env`` is differentiable in the action (and in every physical
    parameter); the reward ``-|distance - target|`` has a kink at a perfect hit, so train on a
    smooth loss of ``info["distance"]`` such as ``(distance - target)^2``. Where the distance
    itself is not smooth is documented in :func:`shoot`. Clipping the action zeroes the gradient
    outside the box.

    **Version history** — v0: first version.
    """

    deterministic_transition = True
    observation_is_state_function = True

    @property
    def default_params(self) -> TrebuchetParams:
        return TrebuchetParams()

    def step_env(
        self, key: jax.Array, state: TrebuchetState, action, params: TrebuchetParams
    ) -> tuple[jax.Array, TrebuchetState, jax.Array, jax.Array, dict[str, Any]]:
        del key  # deterministic
        action = jnp.asarray(action)
        if action.shape != (2,):
            raise ValueError(
                "Trebuchet takes an action [release_angle_deg, counterweight_kg] of shape (2,); got shape "
                f"{action.shape}. Under vmap, the action of each env has shape (2,)."
            )
        action = action.astype(state.target.dtype)
        space = self.action_space(params)
        angle, counterweight = jnp.clip(action, space.low, space.high)
        distance = shoot(state.wind, angle, counterweight, params)
        next_state = TrebuchetState(
            target=state.target,
            wind=state.wind,
            release_angle_deg=angle,
            counterweight_kg=counterweight,
            distance=distance,
            time=state.time + 1,
        )
        reward = -jnp.abs(distance - state.target)
        terminated = self.is_terminated(next_state, params)
        info = {"distance": distance, "discount": self.discount(next_state, params)}
        return self.get_obs(next_state), next_state, reward, terminated, info

    def reset_env(self, key: jax.Array, params: TrebuchetParams) -> tuple[jax.Array, TrebuchetState]:
        key_target, key_wind = jax.random.split(key)
        target = jax.random.uniform(key_target, (), jnp.float32, params.target_min, params.target_max)
        wind = params.wind_std * jax.random.normal(key_wind, (), jnp.float32)
        wind = jnp.clip(wind, -params.wind_limit, params.wind_limit)
        zero = jnp.zeros((), jnp.float32)
        state = TrebuchetState(
            target=target,
            wind=wind,
            release_angle_deg=zero,
            counterweight_kg=zero,
            distance=zero,
            time=jnp.zeros((), jnp.int32),
        )
        return self.get_obs(state), state

    def get_obs(self, state: TrebuchetState, params=None, key=None) -> jax.Array:
        return jnp.stack([state.target, state.wind])

    def is_terminated(self, state: TrebuchetState, params: TrebuchetParams) -> jax.Array:
        return state.time >= 1

    def is_truncated(self, state: TrebuchetState, params: TrebuchetParams) -> jax.Array:
        # The shot terminates the episode; the one-step time limit never truncates it as well.
        return (state.time >= params.max_steps_in_episode) & ~self.is_terminated(state, params)

    @property
    def name(self) -> str:
        return "Trebuchet-v0"

    def action_space(self, params: TrebuchetParams | None = None) -> Box:
        params = self.default_params if params is None else params
        low = jnp.array([params.angle_min_deg, params.counterweight_min_kg], jnp.float32)
        high = jnp.array([params.angle_max_deg, params.counterweight_max_kg], jnp.float32)
        return Box(low, high, (2,), jnp.float32)

    def observation_space(self, params: TrebuchetParams | None = None) -> Box:
        params = self.default_params if params is None else params
        low = jnp.array([params.target_min, -params.wind_limit], jnp.float32)
        high = jnp.array([params.target_max, params.wind_limit], jnp.float32)
        return Box(low, high, (2,), jnp.float32)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrebuchetTask(Task):
    """Training an aiming controller through the simulator.

    The env's reward ``-|distance - target|`` has a kink at a perfect hit. The term offered:

    * ``relative_miss``: ``sqrt(rel^2 + 0.001^2)`` of the relative miss ``rel = (distance -
      target) / target``, a pseudo-Huber loss: quadratic below 0.1 % of the target, linear above,
      so targets out of reach (whose miss cannot vanish) pull with bounded force.

    Actions (angle, counterweight) relax through the ``tanh`` squash into the action box.
    """

    relative_miss: float = 0.0

    def terms(self, params, state, action, next_state: TrebuchetState) -> dict[str, jax.Array]:
        relative = (next_state.distance - next_state.target) / next_state.target
        return {"relative_miss": jnp.sqrt(relative**2 + 1e-6)}


#: The observation ``[target m, wind m/s]``: mean and standard deviation of the reset
#: distribution (target ~ U(20, 100) m, wind ~ N(0, 5^2) m/s clipped to +-15).
SPEC = EnvSpec(
    id="Trebuchet-v0",
    entry_point=Trebuchet,
    alias="trebuchet",
    reward_threshold=-1.0,  # a mean miss of 1 m; about 7 % of the tasks are out of reach
    eval_episodes=1000,
    obs_mean=(60.0, 0.0),
    obs_scale=(80.0 / math.sqrt(12.0), 5.0),
    task=TrebuchetTask,
    obs_format="target {obs[0]:.1f} m  wind {obs[1]:+.1f} m/s",
)
