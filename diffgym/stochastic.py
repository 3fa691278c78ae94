"""Unbiased derivatives of programs with discrete randomness: stochastic triples in JAX.

A program ``f(p, key)`` that draws Bernoulli, categorical, binomial, geometric or Poisson variables
whose parameters depend on ``p`` has an expectation ``E[f(p)]`` that is smooth in ``p`` even though
every sample is piecewise constant, so ``jax.grad`` of a sample is zero (or undefined) and says
nothing about ``d E[f(p)] / dp``. This module gives one-sample estimators of that derivative::

    from diffgym import stochastic as st

    def f(p, key):                                   # any JAX code around the samplers
        return st.binomial(key, 20, p) ** 2

    st.derivative_estimate(f, 0.3, key)              # one unbiased sample of d E[f] / dp
    jnp.mean(st.derivative_estimates(f, 0.3, key, 10_000))   # ~ d/dp (20 p (1-p) + 400 p^2) = 248

The default estimator is the stochastic-triple method of Arya, Schauer, Schäfer & Rackauckas,
"Automatic Differentiation of Programs with Discrete Randomness" (NeurIPS 2022, arXiv 2210.08572;
the Julia package StochasticAD.jl). For comparison, the same interface gives the straight-through
estimator, Gumbel-softmax (relaxed or straight-through) and the score function (REINFORCE).

How the triple estimator works here
-----------------------------------
Every sampler draws one uniform ``u`` per variable and returns the inverse CDF ``x = F^-1(u; θ)``.
Moving ``θ`` by ``ε dθ`` moves the CDF's steps, and with probability ``ε · rate + O(ε²)`` the
value jumps to a neighbour (``x ± 1`` for counts, the next category with mass for a categorical);
``rate`` is the speed of the step that ``u`` sits next to divided by ``pmf(x)`` (for a Bernoulli
at ``x = 0``: ``dθ / (1 - θ)``). With ``dy`` the forward-mode derivative of ``f`` along the run with
every discrete value held fixed (the continuous part, the triple's "dual number"), the derivative
is ``d E[f] = E[dy + Σ_jumps rate · (f(run with that jump) - f(run))]``: the weighted
finite differences are the triple's "finite perturbation" part. :func:`derivative_estimate` computes
one sample of it in two passes of ``f`` with the same key:

1. the primal pass, ``jax.jvp(f)``: each sampler reads the tangent ``dθ`` of its parameter (a
   ``custom_jvp`` whose primal output under ``jvp`` is that tangent), computes the rates of its
   up and down jumps, and offers them to a reservoir that keeps one jump with probability
   ``rate / W`` (an exponential race), ``W`` the total rate of every jump offered in the run. This
   is the paper's unbiased pruning of many carried perturbations to one, applied over all draws.
2. the alternative pass, plain ``f``: the samplers replay the primal draws, the kept one returns
   its jumped value, and every later draw reuses its own uniform with the now different
   parameters (the inverse-CDF coupling). The alternative value is the output of this run.

The estimate is ``dy + W · (f_alternative - f_primal)``. The reservoir and the draw counter that
finds the kept draw in the second pass live in ``jax.new_ref`` array references, so that ``f``
stays ordinary JAX: ``jit``, ``lax.scan``, ``lax.fori_loop``, ``lax.while_loop``, indexing with a
drawn value, comparisons and branches on it all work, and ``vmap`` of the estimator over keys (or
over ``p``) works. Since the alternative run is the program itself re-run, anything ``f`` does
with a discrete value (``steps[x]``, ``x > 0``, a loop whose length is a draw, a binomial whose
number of trials is an earlier draw) has its exact effect. ``f`` may return an array: the result
is then the Jacobian of the expectation (``jacfwd``'s layout), all outputs sharing one kept jump.

How it differs from StochasticAD.jl
-----------------------------------
StochasticAD.jl carries the perturbation inside every value and prunes two perturbations when they
meet in an operation; one whose alternative path has rejoined the primal one (its difference is
0) drops out there and frees the slot for later jumps. A plain JAX ``f`` gives no such view of its
values, so here the race runs over every jump of the run, dead or alive. Both are unbiased; the
price here is variance when many alternative paths rejoin: on the tutorial's random walk (n = 100)
the per-sample standard deviation is 8.5 against StochasticAD.jl's 6.5 (``bench/results/
stochastic.md``). ``alternatives=k`` keeps ``k`` jumps in independent races, each with its own
alternative run (batched), sharing the primal pass: it removes the part of the variance that the
choice of jump adds, not the part that comes from the primal run.

Where the program is a Markov chain, :func:`chain_derivative_estimate` takes its step function and
so sees the state: it carries one alternative state beside the primal one and drops it once the
two are equal, as StochasticAD.jl does; on the walk its standard deviation is StochasticAD.jl's
(6.50 against 6.54 at n = 100).

Limits (as StochasticAD.jl documents its own)
---------------------------------------------
- **First derivatives only**, in forward mode: for a ``p`` with ``D`` entries the two passes run
  once per entry (batched by ``vmap``), as ``jacfwd`` would. ``jax.grad`` of an estimate is not
  a second-derivative estimator.
- **One key per draw**, as for ``jax.random``: two draws from the same key are one uniform, and
  every estimator here (triples, score, relaxations) then differentiates the wrong program.
- **No ``vmap`` around a sampler inside ``f``.** The samplers write to the estimator's reservoir
  and an unbatched reference cannot take one write per batch member. Draw a batch with one call
  on an array of parameters instead (every sampler is elementwise over its parameter's shape), or
  ``vmap`` the estimator itself. ``vmap`` over the physics (no sampler inside) is fine. Refused
  with an error that says so.
- **A sampler inside a ``lax.cond``/``lax.switch`` branch** works only when nothing batches the
  estimator: a scalar ``p``, ``alternatives=1``, and no ``vmap`` over it (``lax.map`` is fine).
  JAX does not batch state effects inside ``cond``. Otherwise write the branch with ``jnp.where``
  or draw outside it (refused with an error that says so). ``lax.while_loop`` is fine.
- **No separately transformed function with samplers inside ``f``** (``jax.jit``,
  ``jax.checkpoint``): it keeps the trace it was first made with, which does not talk to the
  estimator. ``jit`` the estimator instead. Detected when the two passes trace different numbers of
  samplers, and an ``f`` in which no sampler was traced is refused; a function traced (and cached)
  before the estimator ran could still hide its samplers, which then act as plain draws.
- **The parameters' tangents reach the samplers only through ``jax.numpy`` and ``lax``**:
  ``f`` must not call ``jax.jvp``/``jax.grad`` around a sampler itself (the samplers would read
  that inner tangent), and ``stop_gradient`` on a parameter cuts the derivative through it as
  everywhere in JAX.
- **The alternative run replays the primal run** bit for bit up to the kept draw (tested on a
  compiled CartPole rollout). It does as long as XLA computes ``f``'s ops the same way in both
  compiled passes; a difference could flip a draw only for a uniform within rounding of a CDF step
  (about 1e-7 relative), and would cost an unbiasedness error of that order.
- Valid parameters are the user's to ensure (no checks inside ``jit``): probabilities in [0, 1]
  (``categorical``: along the last axis, summing to 1; use ``jax.nn.softmax`` on logits),
  ``rate >= 0``, integer ``n >= 0``. The derivative is that of the expectation at an interior
  parameter; at ``p = 0`` or ``1`` the one-sided jump rates are infinite.
- Cost per estimate: the primal pass costs a ``jvp`` of ``f``, the alternative pass one more run.
  The binomial and Poisson inverse CDFs search upward from 0, so a draw costs about ``mean + 20 sd``
  steps at most (fine for counts up to a few hundred); the geometric one is closed form.

The other estimators
--------------------
- ``"straight_through"``: the hard sample forward, and backward the derivative of the
  distribution's mean (``x + m(θ) - stop_gradient(m(θ))``). For a Bernoulli this is the
  identity gradient of :func:`diffgym.discrete.straight_through_threshold`. Biased when ``f`` is
  not linear in ``x``.
- ``"gumbel_softmax"``: the Gumbel-softmax / concrete relaxation at ``temperature``: over the
  categories, or over the support ``0 … support_size - 1`` of a count distribution (the
  binomial's support is exact when ``n < support_size``; geometric and Poisson are truncated
  there). ``hard=False`` evaluates ``f`` at the relaxed value (``Σ k y_k`` for an index, ``y`` for
  a one-hot); ``hard=True`` is the straight-through Gumbel-softmax: the exact sample forward, the
  relaxed gradient backward. Biased at any temperature > 0.
- ``"score"``: the score function (REINFORCE), ``dy + (f - baseline) · Σ d log pmf(x_i; θ_i)``,
  unbiased, usually with a much larger variance. :func:`derivative_estimates` uses the
  leave-one-out batch mean of ``f`` as the baseline (each estimate stays unbiased).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import threading
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
from jax.scipy.special import gammaln, xlog1py, xlogy

from diffgym.discrete import _straight_through

__all__ = [
    "ESTIMATORS",
    "bernoulli",
    "binomial",
    "categorical",
    "chain_derivative_estimate",
    "derivative_estimate",
    "derivative_estimates",
    "geometric",
    "poisson",
]

Estimator = Literal["triples", "straight_through", "gumbel_softmax", "score"]
ESTIMATORS: tuple[str, ...] = ("triples", "straight_through", "gumbel_softmax", "score")


# --------------------------------------------------------------------------------------------
# Reading a tangent from inside jax.jvp
# --------------------------------------------------------------------------------------------
@jax.custom_jvp
def _tangent_of(theta: jax.Array) -> jax.Array:
    """Zero outside ``jax.jvp``; under ``jax.jvp``, the tangent of ``theta`` as a primal value.

    The rule deliberately returns the tangent as the primal output: a sampler needs its
    parameter's tangent ``dθ`` as an ordinary number to compute its jump rates. Where ``theta``
    does not depend on the differentiated input, ``jvp`` never calls the rule and the result is 0,
    which is the right tangent.
    """
    return jnp.zeros_like(theta)


@_tangent_of.defjvp
def _tangent_of_jvp(primals, tangents):
    (dtheta,) = tangents
    return dtheta, jnp.zeros_like(dtheta)


def _read_tangent(theta: jax.Array) -> jax.Array:
    # stop_gradient: the tangent is data for the reservoir, not a differentiated value (a
    # reference created outside jvp refuses writes of differentiated values).
    return jax.lax.stop_gradient(_tangent_of(theta))


# --------------------------------------------------------------------------------------------
# Distributions: inverse CDF, jump rates, log pmf, mean
# --------------------------------------------------------------------------------------------
def _float(x) -> jax.Array:
    x = jnp.asarray(x)
    return x if jnp.issubdtype(x.dtype, jnp.floating) else x.astype(jnp.result_type(float))


@dataclasses.dataclass(frozen=True)
class _Jumps:
    """Per variable: rate and target of the jump up and of the jump down (rate 0: none)."""

    up_rate: jax.Array
    up_target: jax.Array
    down_rate: jax.Array
    down_target: jax.Array


def _safe_div(num, den):
    # num / den where den > 0, else 0; no NaN in either branch (the where-gradient trap).
    ok = den > 0
    return jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0)


class _Bernoulli:
    name = "bernoulli"

    @staticmethod
    def quantile(u, p, n=None):
        # F(0) = 1 - p: x = 1 exactly when u >= 1 - p.
        return (u >= 1.0 - p).astype(p.dtype)

    @staticmethod
    def jumps(x, p, dp, target_uniform, n=None):
        # Up (0 -> 1) when p grows: the step at 1 - p falls past u, rate dp / (1 - p).
        # Down (1 -> 0) when p shrinks: rate -dp / p.
        up = jnp.where(x == 0, _safe_div(jnp.maximum(dp, 0.0), 1.0 - p), 0.0)
        down = jnp.where(x == 1, _safe_div(jnp.maximum(-dp, 0.0), p), 0.0)
        return _Jumps(up, x + 1, down, x - 1)

    @staticmethod
    def logpmf(x, p, n=None):
        return xlogy(x, p) + xlog1py(1.0 - x, -p)

    @staticmethod
    def mean(p, n=None):
        return p


class _Binomial:
    name = "binomial"

    @staticmethod
    def quantile(u, p, n):
        # Sequential search from 0 in log space (no underflow of pmf(0) = (1 - p)^n).
        log_odds = jnp.log(p) - jnp.log1p(-p)

        def cond(state):
            k, _, cdf = state
            return jnp.any((u >= cdf) & (k < n))

        def body(state):
            k, log_pmf, cdf = state
            move = (u >= cdf) & (k < n)
            log_pmf_next = log_pmf + jnp.log(jnp.maximum(n - k, 1.0)) - jnp.log(k + 1.0) + log_odds
            cdf_next = cdf + jnp.exp(log_pmf_next)
            return (
                jnp.where(move, k + 1.0, k),
                jnp.where(move, log_pmf_next, log_pmf),
                jnp.where(move, cdf_next, cdf),
            )

        log_pmf0 = jnp.broadcast_to(xlog1py(n, -p), u.shape)
        k0 = jnp.zeros_like(u)
        k, _, _ = jax.lax.while_loop(cond, body, (k0, log_pmf0, jnp.exp(log_pmf0)))
        return jnp.where(p >= 1.0, n, jnp.where(p <= 0.0, 0.0, k))

    @staticmethod
    def jumps(x, p, dp, target_uniform, n):
        up = jnp.where(x < n, _safe_div(jnp.maximum(dp, 0.0) * (n - x), 1.0 - p), 0.0)
        down = jnp.where(x > 0, _safe_div(jnp.maximum(-dp, 0.0) * x, p), 0.0)
        return _Jumps(up, x + 1, down, x - 1)

    @staticmethod
    def logpmf(x, p, n):
        log_choose = gammaln(n + 1.0) - gammaln(x + 1.0) - gammaln(jnp.maximum(n - x, 0.0) + 1.0)
        return jnp.where((x >= 0) & (x <= n), log_choose + xlogy(x, p) + xlog1py(n - x, -p), -jnp.inf)

    @staticmethod
    def mean(p, n):
        return n * p


class _Geometric:
    """Failures before the first success: pmf(k) = p (1 - p)^k, k = 0, 1, … (Distributions.jl's)."""

    name = "geometric"

    @staticmethod
    def quantile(u, p, n=None):
        # F(k) = 1 - (1 - p)^(k + 1) > u  <=>  k > log(1 - u) / log(1 - p) - 1.
        ratio = jnp.log1p(-u) / jnp.log1p(-jnp.minimum(p, 1.0))
        return jnp.where(p >= 1.0, 0.0, jnp.floor(ratio))

    @staticmethod
    def jumps(x, p, dp, target_uniform, n=None):
        # Every step F(k) rises with p: down when p grows (rate dp x / (p (1 - p))), up when it
        # shrinks (rate -dp (x + 1) / p).
        up = _safe_div(jnp.maximum(-dp, 0.0) * (x + 1.0), p)
        down = jnp.where(x > 0, _safe_div(jnp.maximum(dp, 0.0) * x, p * (1.0 - p)), 0.0)
        return _Jumps(up, x + 1, down, x - 1)

    @staticmethod
    def logpmf(x, p, n=None):
        return jnp.log(p) + xlog1py(x, -p)

    @staticmethod
    def mean(p, n=None):
        return (1.0 - p) / p


class _Poisson:
    name = "poisson"

    @staticmethod
    def quantile(u, rate, n=None):
        log_rate = jnp.log(rate)
        # The tail past mean + 20 sd + 20 is far below float resolution: stop there.
        k_max = jnp.floor(rate + 20.0 * jnp.sqrt(rate) + 20.0)

        def cond(state):
            k, _, cdf = state
            return jnp.any((u >= cdf) & (k < k_max))

        def body(state):
            k, log_pmf, cdf = state
            move = (u >= cdf) & (k < k_max)
            log_pmf_next = log_pmf + log_rate - jnp.log(k + 1.0)
            return (
                jnp.where(move, k + 1.0, k),
                jnp.where(move, log_pmf_next, log_pmf),
                jnp.where(move, cdf + jnp.exp(log_pmf_next), cdf),
            )

        k0 = jnp.zeros_like(u)
        log_pmf0 = jnp.broadcast_to(-rate, u.shape)
        k, _, _ = jax.lax.while_loop(cond, body, (k0, log_pmf0, jnp.exp(log_pmf0)))
        return jnp.where(rate <= 0.0, 0.0, k)

    @staticmethod
    def jumps(x, rate, drate, target_uniform, n=None):
        # dF(k)/dλ = -pmf(k): up at rate dλ when λ grows; down at rate -dλ x / λ when it shrinks.
        up = jnp.maximum(drate, 0.0)
        down = jnp.where(x > 0, _safe_div(jnp.maximum(-drate, 0.0) * x, rate), 0.0)
        return _Jumps(up, x + 1, down, x - 1)

    @staticmethod
    def logpmf(x, rate, n=None):
        return xlogy(x, rate) - rate - gammaln(x + 1.0)

    @staticmethod
    def mean(rate, n=None):
        return rate


class _Categorical:
    """Index in 0 … K-1 with probabilities ``probs[..., k]`` (last axis)."""

    name = "categorical"

    @staticmethod
    def quantile(u, probs, n=None):
        num = probs.shape[-1]
        cdf = jnp.cumsum(probs, axis=-1)
        index = jnp.sum(cdf[..., :-1] <= u[..., None], axis=-1)
        # Rounding can leave cdf[K-2] a hair below a u close to 1 when the last categories have
        # no mass: never return a category without mass.
        last = num - 1 - jnp.argmax(jnp.flip(probs > 0, axis=-1), axis=-1)
        return jnp.minimum(index, last).astype(probs.dtype)

    @staticmethod
    def jumps(x, probs, dprobs, target_uniform, n=None):
        num = probs.shape[-1]
        k = jnp.arange(num)
        xi = x.astype(jnp.int32)[..., None]
        p_x = jnp.take_along_axis(probs, xi, axis=-1)[..., 0]
        dcdf = jnp.cumsum(dprobs, axis=-1)
        # Down: the step F(x - 1) rises past u when Σ_{j<x} dπ_j > 0.
        below = jnp.where(k < xi, dprobs, 0.0).sum(-1)
        # Up: the step F(x) falls past u when Σ_{j>x} dπ_j > 0 (this form does not rely on Σ dπ
        # being exactly 0 in floating point).
        above = jnp.where(k > xi, dprobs, 0.0).sum(-1)
        # One uniform serves both targets: only one of the two jumps is ever kept.
        s_down = s_up = target_uniform
        # Target: the nearest category with mass; a massless one whose mass grows takes the part
        # of the moved region it now covers (StochasticAD.jl's walk, measured from the step).
        dcdf_before = jnp.concatenate([jnp.zeros_like(dcdf[..., :1]), dcdf[..., :-1]], axis=-1)
        dcdf_x_minus_1 = jnp.take_along_axis(dcdf_before, xi, axis=-1)  # Σ_{j<x} dπ_j
        from_top = dcdf_x_minus_1 - dcdf_before  # Σ_{j=k}^{x-1} dπ_j for k < x
        down_ok = (k < xi) & ((probs > 0) | (from_top > (s_down * below)[..., None]))
        down_target = jnp.max(jnp.where(down_ok, k, -1), axis=-1)
        dcdf_x = jnp.take_along_axis(dcdf, xi, axis=-1)
        from_bottom = dcdf - dcdf_x  # Σ_{j=x+1}^{k} dπ_j for k > x
        up_ok = (k > xi) & ((probs > 0) | (from_bottom > (s_up * above)[..., None]))
        up_target = jnp.min(jnp.where(up_ok, k, num), axis=-1)
        down_rate = jnp.where((below > 0) & (down_target >= 0), _safe_div(below, p_x), 0.0)
        up_rate = jnp.where((above > 0) & (up_target < num), _safe_div(above, p_x), 0.0)
        return _Jumps(up_rate, up_target.astype(x.dtype), down_rate, down_target.astype(x.dtype))

    @staticmethod
    def logpmf(x, probs, n=None):
        return jnp.log(jnp.take_along_axis(probs, x.astype(jnp.int32)[..., None], axis=-1)[..., 0])

    @staticmethod
    def mean(probs, n=None):
        return jnp.sum(probs * jnp.arange(probs.shape[-1], dtype=probs.dtype), axis=-1)


# --------------------------------------------------------------------------------------------
# Estimator contexts (trace-time): what a sampler does depends on the estimator being traced
# --------------------------------------------------------------------------------------------
_LOCAL = threading.local()


def _contexts() -> list:
    if not hasattr(_LOCAL, "stack"):
        _LOCAL.stack = []
    return _LOCAL.stack


class _Context:
    traced_samplers = 0

    def extra_uniforms(self, dist) -> int:
        return 0

    def __enter__(self):
        _contexts().append(self)
        return self

    def __exit__(self, *exc):
        _contexts().pop()


@dataclasses.dataclass
class _Draw:
    """One sampler call, everything its estimator may need."""

    dist: Any
    theta: jax.Array  # the parameter, as passed (carries the tangent under jvp)
    theta_value: jax.Array  # stop_gradient(theta)
    n: jax.Array | None  # binomial trials (discrete, no tangent)
    u: jax.Array  # the uniforms, shape of x
    extra: jax.Array  # (k, *x.shape) more uniforms, independent of u, for the estimator
    aux_key: jax.Array  # the sampler's key, for estimators that need more randomness
    x: jax.Array  # the sample (float), shape of u


def _extra_uniforms(dist, races: int) -> int:
    """Uniforms per variable that the triple estimator draws besides ``u`` (see ``_Record.draw``)."""
    # A count's up and down jumps exclude each other (their rates need opposite signs of dθ): one
    # exponential clock per race. A categorical may have both: a clock and a direction per race,
    # and one uniform for the target.
    return 2 * races + 1 if dist is _Categorical else races


class _Record(_Context):
    """Primal pass of the triple estimator: offer every jump to ``races`` one-slot reservoirs."""

    def __init__(self, dtype, races: int):
        self.races = races
        self.refs = {
            "total_rate": jax.new_ref(jnp.zeros((), dtype)),
            "best_race": jax.new_ref(jnp.full((races,), jnp.inf, dtype)),
            "best_call": jax.new_ref(jnp.full((races,), -1, jnp.int32)),
            "best_index": jax.new_ref(jnp.full((races,), -1, jnp.int32)),
            "best_target": jax.new_ref(jnp.zeros((races,), dtype)),
            "calls": jax.new_ref(jnp.int32(0)),
        }

    def extra_uniforms(self, dist) -> int:
        return _extra_uniforms(dist, self.races)

    def draw(self, d: _Draw) -> jax.Array:
        r, m = self.refs, self.races
        size = d.x.size
        dtype = r["total_rate"].dtype
        extra = d.extra.reshape(-1, size)  # independent of u (other Threefry counters)
        categorical = d.dist is _Categorical
        target_uniform = extra[2 * m].reshape(d.x.shape) if categorical else None
        jumps = d.dist.jumps(d.x, d.theta_value, _read_tangent(d.theta), target_uniform, d.n)
        up = jumps.up_rate.reshape(-1).astype(dtype)
        down = jumps.down_rate.reshape(-1).astype(dtype)
        rate = up + down
        # Exponential race: the smallest E / rate wins with probability rate / Σ rates, and
        # keeping the smallest over the whole run keeps one jump with probability rate / W, W the
        # total rate: the paper's pruning of many perturbations to one (here, one per race).
        clocks = -jnp.log1p(-extra[:m])
        race = jnp.where(rate > 0, clocks / jnp.where(rate > 0, rate, 1.0), jnp.inf)  # (m, size)
        winner = jnp.argmin(race, axis=1)
        # Picks by masked sums, not gathers: under vmap a gather is the costly op here.
        is_winner = jnp.arange(size) == winner[:, None]  # (m, size)

        def pick(values):
            return jnp.sum(jnp.where(is_winner, values, 0), axis=-1)

        winning_race = jnp.min(race, axis=1)
        if categorical:  # up with probability up / rate
            goes_up = pick(extra[m : 2 * m]) * pick(rate) < pick(up)
        else:  # at most one of the two is not 0
            goes_up = pick(up) > 0
        up_target = pick(jumps.up_target.reshape(-1).astype(dtype))
        target = jnp.where(goes_up, up_target, pick(jumps.down_target.reshape(-1).astype(dtype)))
        call = r["calls"][...]
        better = winning_race < r["best_race"][...]
        r["total_rate"][...] = r["total_rate"][...] + jnp.sum(rate)
        r["best_race"][...] = jnp.where(better, winning_race, r["best_race"][...])
        r["best_call"][...] = jnp.where(better, call, r["best_call"][...])
        r["best_index"][...] = jnp.where(better, winner.astype(jnp.int32), r["best_index"][...])
        r["best_target"][...] = jnp.where(better, target, r["best_target"][...])
        r["calls"][...] = call + 1
        return d.x

    def read(self):
        return {name: ref[...] for name, ref in self.refs.items()}


class _Replay(_Context):
    """Alternative pass: the same draws, the kept one jumped, later ones with their own uniforms."""

    def __init__(self, best_call, best_index, best_target, races: int):
        self.calls = jax.new_ref(jnp.int32(0))
        self.best_call, self.best_index, self.best_target = best_call, best_index, best_target
        self.races = races

    def extra_uniforms(self, dist) -> int:
        # The same draw of uniforms as the primal pass, so that u is the same in every layout.
        return _extra_uniforms(dist, self.races)

    def draw(self, d: _Draw) -> jax.Array:
        call = self.calls[...]
        self.calls[...] = call + 1
        flat = d.x.reshape(-1)
        # An elementwise select, not a scatter (the cheaper op under vmap).
        jumped = (call == self.best_call) & (jnp.arange(flat.size) == self.best_index)
        return jnp.where(jumped, self.best_target.astype(flat.dtype), flat).reshape(d.x.shape)


class _Score(_Context):
    """Score function: accumulate d log pmf(x; θ) along the tangent of every draw."""

    def __init__(self, dtype):
        self.dlogp = jax.new_ref(jnp.zeros((), dtype))

    def draw(self, d: _Draw) -> jax.Array:
        dtheta = _read_tangent(d.theta)
        _, dlogp = jax.jvp(lambda t: d.dist.logpmf(d.x, t, d.n), (d.theta_value,), (dtheta,))
        self.dlogp[...] = self.dlogp[...] + jnp.sum(dlogp).astype(self.dlogp.dtype)
        return d.x


class _StraightThrough(_Context):
    """The hard sample forward; backward, the derivative of the distribution's mean."""

    def draw(self, d: _Draw) -> jax.Array:
        # For a Bernoulli the mean is p: the identity gradient of discrete.straight_through_threshold.
        return _straight_through(d.x, d.dist.mean(d.theta, d.n))

    def draw_one_hot(self, d: _Draw) -> jax.Array:
        hard = jax.nn.one_hot(d.x.astype(jnp.int32), d.theta.shape[-1], dtype=d.theta.dtype)
        return _straight_through(hard, d.theta)


class _Gumbel(_Context):
    """Gumbel-softmax (concrete) relaxation at ``temperature``; ``hard``: straight-through."""

    def __init__(self, temperature: float, hard: bool, support_size: int):
        self.temperature, self.hard, self.support_size = temperature, hard, support_size

    def draw(self, d: _Draw, one_hot: bool = False) -> jax.Array:
        theta = d.theta
        if d.dist is _Bernoulli:
            # Binary concrete on the sampler's own uniform: its hard value is the sample x.
            noisy_logit = jnp.log(theta) - jnp.log1p(-theta) + jnp.log(d.u) - jnp.log1p(-d.u)
            soft = jax.nn.sigmoid(noisy_logit / self.temperature)
            return _straight_through(d.x, soft) if self.hard else soft
        if d.dist is _Categorical:
            # log 0 = -inf, without the NaN its gradient would bring (the where-gradient trap).
            positive = theta > 0
            logits = jnp.where(positive, jnp.log(jnp.where(positive, theta, 1.0)), -jnp.inf)
            values = jnp.arange(theta.shape[-1], dtype=theta.dtype)
        else:
            values = jnp.arange(self.support_size, dtype=theta.dtype)
            logits = d.dist.logpmf(values, theta[..., None], None if d.n is None else d.n[..., None])
        gumbel = jax.random.gumbel(jax.random.fold_in(d.aux_key, 2), logits.shape, logits.dtype)
        soft = jax.nn.softmax((logits + gumbel) / self.temperature, axis=-1)
        hard = jax.nn.one_hot(jnp.argmax(logits + gumbel, axis=-1), logits.shape[-1], dtype=soft.dtype)
        if not one_hot:
            soft, hard = soft @ values, hard @ values
        return _straight_through(hard, soft) if self.hard else soft


def _active():
    stack = _contexts()
    return stack[-1] if stack else None


# --------------------------------------------------------------------------------------------
# Samplers
# --------------------------------------------------------------------------------------------
def _uint(dtype):
    return {2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}[jnp.dtype(dtype).itemsize]


def _uniform_from_bits(bits: jax.Array, dtype) -> jax.Array:
    """jax.random.uniform's map of random bits to [0, 1): the top mantissa bits under exponent 0."""
    info = jnp.finfo(dtype)
    mantissa = jax.lax.shift_right_logical(bits, jnp.array(info.bits - info.nmant, bits.dtype))
    one = jnp.array(1.0, dtype).view(bits.dtype)
    return jax.lax.bitcast_convert_type(mantissa | one, dtype) - jnp.array(1.0, dtype)


def _sample(dist, key, theta, shape, n=None, *, one_hot: bool = False) -> jax.Array:
    theta = _float(theta)
    is_categorical = dist is _Categorical
    batch_shape = theta.shape[:-1] if is_categorical else theta.shape
    if n is not None:
        n = jax.lax.stop_gradient(_float(n)).astype(theta.dtype)
        batch_shape = jnp.broadcast_shapes(batch_shape, n.shape)
    shape = batch_shape if shape is None else tuple(shape)
    if n is not None:
        n = jnp.broadcast_to(n, shape)
    context = _active()
    # One draw of uniforms: u, and what the estimator needs besides (other counters of the same
    # Threefry call, the cheapest independent randomness). Under JAX's default (partitionable)
    # Threefry, u is exactly jax.random.uniform(key, shape) whatever the estimator, so the
    # triple's two passes, the surrogates and plain sampling see the same draws.
    extra = 0 if context is None else context.extra_uniforms(dist)
    uniforms = _uniform_from_bits(jax.random.bits(key, (1 + extra,) + shape, _uint(theta.dtype)), theta.dtype)
    u = uniforms[0]
    # The inverse CDF takes the parameter before broadcasting (a constant one then costs no
    # constant folding of a broadcast array).
    x = jax.lax.stop_gradient(dist.quantile(u, jax.lax.stop_gradient(theta), n))
    theta = jnp.broadcast_to(theta, shape + theta.shape[-1:] if is_categorical else shape)
    theta_value = jax.lax.stop_gradient(theta)
    if context is not None:
        context.traced_samplers += 1
        draw = _Draw(dist, theta, theta_value, n, u, uniforms[1:], key, x)
        if isinstance(context, _Gumbel):
            return context.draw(draw, one_hot)
        if one_hot and isinstance(context, _StraightThrough):
            return context.draw_one_hot(draw)
        x = context.draw(draw)
    if one_hot:
        return jax.nn.one_hot(x.astype(jnp.int32), theta.shape[-1], dtype=theta.dtype)
    return x


def bernoulli(key: jax.Array, p, shape: tuple[int, ...] | None = None) -> jax.Array:
    """A Bernoulli(``p``) draw, 0.0 or 1.0, that carries a derivative in ``p``.

    Args:
        key: a JAX PRNG key; one key per draw (reusing one correlates the draws).
        p: probability of 1, any shape, in [0, 1].
        shape: output shape, ``p`` broadcast to it (default ``p``'s shape).

    Returns:
        float array of 0.0/1.0 (``p``'s float dtype), ``1[u >= 1 - p]`` with
        ``u = jax.random.uniform(key, shape)``. Outside an estimator, a plain sample (gradient
        zero); inside :func:`derivative_estimate`, what the estimator needs.
    """
    return _sample(_Bernoulli, key, p, shape)


def binomial(key: jax.Array, n, p, shape: tuple[int, ...] | None = None) -> jax.Array:
    """A Binomial(``n``, ``p``) count (float) that carries a derivative in ``p``.

    Args:
        key: a JAX PRNG key.
        n: number of trials, an integer >= 0 or an array of them; may itself be a draw (the
            nested ``binomial(k2, binomial(k1, 10, p), p)`` is handled exactly). Treated as
            discrete: a derivative through ``n`` comes only from the draws that made it.
        p: success probability in [0, 1], any shape broadcastable with ``n``.
        shape: output shape (default: the broadcast shape of ``n`` and ``p``).
    """
    return _sample(_Binomial, key, p, shape, n)


def geometric(key: jax.Array, p, shape: tuple[int, ...] | None = None) -> jax.Array:
    """The number of failures before the first success, ``pmf(k) = p (1 - p)^k`` for k = 0, 1, …

    (Distributions.jl's ``Geometric``; ``jax.random.geometric`` counts trials, one more.) Float,
    carries a derivative in ``p`` (in (0, 1]).
    """
    return _sample(_Geometric, key, p, shape)


def poisson(key: jax.Array, rate, shape: tuple[int, ...] | None = None) -> jax.Array:
    """A Poisson(``rate``) count (float) that carries a derivative in ``rate`` (>= 0)."""
    return _sample(_Poisson, key, rate, shape)


def categorical(
    key: jax.Array, probs, shape: tuple[int, ...] | None = None, *, one_hot: bool = False
) -> jax.Array:
    """A category index in 0 … K-1 drawn with probabilities ``probs`` (last axis, summing to 1).

    Args:
        key: a JAX PRNG key.
        probs: shape ``(..., K)``; for logits pass ``jax.nn.softmax(logits)``. A category
            with probability 0 is never drawn.
        shape: batch shape of the output (default ``probs.shape[:-1]``).
        one_hot: return the one-hot vector (``shape + (K,)``) instead of the index; the form the
            Gumbel-softmax estimator relaxes (``values @ onehot`` picks a value).

    Returns:
        the index as a float (``probs``' dtype): ``steps[x.astype(int)]`` indexes with it, and the
        triple and score estimators see through the cast; the straight-through and relaxed
        estimators differentiate only arithmetic on ``x`` (or on the one-hot).
    """
    return _sample(_Categorical, key, probs, shape, one_hot=one_hot)


# --------------------------------------------------------------------------------------------
# Estimators
# --------------------------------------------------------------------------------------------
def _output(y) -> jax.Array:
    leaves = jax.tree.leaves(y)
    if not (len(leaves) == 1 and leaves[0] is y and jnp.issubdtype(jnp.result_type(y), jnp.inexact)):
        raise ValueError(
            f"f(p, key) must return one float array (a scalar for d E[f]/dp, any shape for its "
            f"Jacobian), got {type(y).__name__}"
            + (f" of dtype {jnp.result_type(y)}" if len(leaves) == 1 and leaves[0] is y else "")
        )
    return y


def _check_traced(context: _Context):
    if context.traced_samplers == 0:
        raise ValueError(
            "f(p, key) called no sampler of diffgym.stochastic while it was traced, so its "
            "derivative has no discrete part to estimate. If f's samplers sit inside a function "
            "compiled with jax.jit, that function replays its first trace: jit the estimator "
            "instead (jax.jit(lambda p, k: derivative_estimate(f, p, k)))."
        )


_VMAP_HINT = (
    "A sampler of diffgym.stochastic ran under a jax.vmap inside f, or inside a lax.cond branch of "
    "a vmapped estimator: the estimator's reservoir takes one write per draw. Draw the batch with "
    "one call on an array of parameters (the samplers are elementwise), write the branch with "
    "jnp.where, or vmap the estimator itself."
)


_JIT_HINT = (
    "A sampler of diffgym.stochastic ran inside a function transformed on its own inside f (jax.jit, "
    "jax.custom_jvp, jax.checkpoint, ...), which cannot reach the estimator's reservoir: call the "
    "samplers in f directly and jit the estimator instead."
)


def _call(fn):
    try:
        return fn()
    except Exception as error:
        message = str(error)
        if "unbatched array reference" in message or "vmap-of-cond" in message:
            raise type(error)(f"{_VMAP_HINT}\n(JAX said: {message.splitlines()[0]})") from error
        if "corresponding jaxpr input" in message or "No constant handler" in message:
            raise type(error)(f"{_JIT_HINT}\n(JAX said: {message.splitlines()[0]})") from error
        raise


def _triple_direction(f_flat, p_flat, direction, key, alternatives: int):
    record = _Record(p_flat.dtype, alternatives)
    with record:
        y, dy = _call(lambda: jax.jvp(lambda q: _output(f_flat(q, key)), (p_flat,), (direction,)))
    _check_traced(record)
    chosen = record.read()

    def alternative_run(best_call, best_index, best_target):
        replay = _Replay(best_call, best_index, best_target, alternatives)
        with replay:
            y_alternative = _call(lambda: f_flat(p_flat, key))
        if replay.traced_samplers != record.traced_samplers:
            # The same Python program traced twice traces the same samplers, unless a function
            # compiled on its own (jax.jit) replayed its earlier trace: it would not replay.
            raise RuntimeError(
                f"{_JIT_HINT} (the alternative run traced {replay.traced_samplers} sampler calls, "
                f"the primal run {record.traced_samplers})"
            )
        return y_alternative

    if alternatives == 1:  # no vmap: a sampler inside lax.cond then works (see the limits)
        y_alternative = alternative_run(
            chosen["best_call"][0], chosen["best_index"][0], chosen["best_target"][0]
        )
    else:
        runs = jax.vmap(alternative_run)(chosen["best_call"], chosen["best_index"], chosen["best_target"])
        y_alternative = jnp.mean(runs, axis=0)
    return dy + chosen["total_rate"] * (y_alternative - y)


def _score_direction(f_flat, p_flat, direction, key):
    score = _Score(p_flat.dtype)
    with score:
        y, dy = _call(lambda: jax.jvp(lambda q: _output(f_flat(q, key)), (p_flat,), (direction,)))
    _check_traced(score)
    return y, dy, score.dlogp[...]


def _flat(f, p):
    p_flat, unravel = ravel_pytree(p)
    if not jnp.issubdtype(p_flat.dtype, jnp.floating):
        p_flat = p_flat.astype(jnp.result_type(float))
    return p_flat, unravel, (lambda q, key: f(unravel(q), key))


def _unravel_jacobian(unravel, jacobian: jax.Array):
    """``(*y_shape, D)`` -> ``p``'s structure with leaves ``(*y_shape, *leaf_shape)`` (jacfwd's)."""
    y_shape, size = jacobian.shape[:-1], jacobian.shape[-1]
    rows = jax.vmap(unravel)(jacobian.reshape(-1, size))
    return jax.tree.map(lambda leaf: leaf.reshape(y_shape + leaf.shape[1:]), rows)


def _per_direction(f, p, key, direction_fn):
    """``direction_fn(f_flat, p_flat, v, key)`` for every basis direction ``v`` of the flat ``p``.

    ``vmap`` over the directions: the primal computations do not depend on the direction and stay
    unbatched, as in ``jacfwd``.
    """
    p_flat, unravel, f_flat = _flat(f, p)
    basis = jnp.eye(p_flat.size, dtype=p_flat.dtype)
    if p_flat.size == 1:  # no vmap: a sampler inside lax.cond then works (see the limits)
        return unravel, jax.tree.map(lambda leaf: leaf[None], direction_fn(f_flat, p_flat, basis[0], key))
    return unravel, jax.vmap(lambda v: direction_fn(f_flat, p_flat, v, key))(basis)


def _direction_last(x: jax.Array) -> jax.Array:
    return jnp.moveaxis(x, 0, -1)


def _surrogate_jacobian(f, p, key, context):
    p_flat, unravel, f_flat = _flat(f, p)
    with context:
        jacobian = _call(lambda: jax.jacrev(lambda q: _output(f_flat(q, key)))(p_flat))
    _check_traced(context)
    return _unravel_jacobian(unravel, jacobian)


def _check_options(estimator, temperature, support_size, alternatives):
    if estimator not in ESTIMATORS:
        close = difflib.get_close_matches(str(estimator), ESTIMATORS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"unknown estimator {estimator!r} ({type(estimator).__name__}); expected one of {ESTIMATORS}{hint}"
        )
    if not (isinstance(temperature, (int, float)) and not isinstance(temperature, bool) and temperature > 0):
        raise ValueError(
            f"temperature must be a number > 0, got {temperature!r} ({type(temperature).__name__})"
        )
    if not (isinstance(support_size, int) and support_size >= 2):
        raise ValueError(
            f"support_size must be an int >= 2, got {support_size!r} ({type(support_size).__name__})"
        )
    if not (isinstance(alternatives, int) and alternatives >= 1):
        raise ValueError(
            f"alternatives must be an int >= 1, got {alternatives!r} ({type(alternatives).__name__})"
        )


def derivative_estimate(
    f: Callable[[Any, jax.Array], jax.Array],
    p,
    key: jax.Array,
    *,
    estimator: Estimator = "triples",
    alternatives: int = 1,
    temperature: float = 1.0,
    hard: bool = False,
    support_size: int = 64,
    baseline=0.0,
):
    """One sample of an estimator of ``d E[f(p, key)] / dp``.

    Args:
        f: ``f(p, key) -> float array``, ordinary JAX code that draws with this module's samplers
            (see the module docstring for what it may and may not do around them). A scalar for
            ``d E[f] / dp``; any shape for the Jacobian of ``E[f]``.
        p: the parameter: a float scalar, an array, or a pytree of them (policy weights).
        key: a JAX PRNG key; ``f`` receives it as is. ``vmap`` over keys for many samples, or use
            :func:`derivative_estimates`.
        estimator: ``"triples"`` (unbiased, the default), ``"straight_through"``,
            ``"gumbel_softmax"`` or ``"score"`` (unbiased).
        alternatives: triples only: the number of jumps kept (independent reservoirs), each with
            its own alternative run, averaged. 1 is the paper's single carried perturbation; more
            share one primal pass, so they cut the variance for less than that many estimates.
        temperature: Gumbel-softmax temperature (> 0).
        hard: Gumbel-softmax only: the exact sample forward and the relaxed gradient backward
            (straight-through Gumbel-softmax) instead of the relaxed value in both.
        support_size: Gumbel-softmax only: count distributions are relaxed over 0 … support_size-1.
        baseline: score only: a constant subtracted from ``f`` (0: plain REINFORCE).

    Returns:
        the estimate, with ``p``'s structure; each leaf of shape ``f``'s output shape followed by
        the leaf's shape (``jacfwd``'s layout; for a scalar ``f``, exactly ``p``'s shapes). A JAX
        value: jittable, ``vmap``-able, ready for optax.
    """
    _check_options(estimator, temperature, support_size, alternatives)
    if estimator == "triples":
        direction_fn = functools.partial(_triple_direction, alternatives=alternatives)
        unravel, estimates = _per_direction(f, p, key, direction_fn)
        return _unravel_jacobian(unravel, _direction_last(estimates))
    if estimator == "score":
        unravel, (y, dy, dlogp) = _per_direction(f, p, key, _score_direction)
        dlogp = dlogp.reshape(dlogp.shape + (1,) * (y.ndim - 1))
        return _unravel_jacobian(unravel, _direction_last(dy + (y - baseline) * dlogp))
    if estimator == "straight_through":
        return _surrogate_jacobian(f, p, key, _StraightThrough())
    return _surrogate_jacobian(f, p, key, _Gumbel(float(temperature), bool(hard), support_size))


# --------------------------------------------------------------------------------------------
# Markov chains: StochasticAD.jl's pruning, with the state in view
# --------------------------------------------------------------------------------------------
def _where_tree(condition, a, b):
    return jax.tree.map(lambda x, y: jnp.where(condition, x, y), a, b)


def _equal_tree(a, b) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(x == y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))]))


def _is_float(leaf) -> bool:
    return jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)


def _replay_step(step, state, p_flat, key, best_call, best_index, best_target, traced: int):
    replay = _Replay(best_call, best_index, best_target, 1)
    with replay:
        next_state = _call(lambda: step(state, p_flat, key))
    if replay.traced_samplers != traced:
        raise RuntimeError(
            f"{_JIT_HINT} (a replayed step traced {replay.traced_samplers} sampler calls, the primal step {traced})"
        )
    return next_state


def _chain_direction(step, output, state, p_flat, direction, keys, coins):
    """One direction of ``chain_derivative_estimate``: a ``lax.scan`` carrying the primal state,
    the tangent of its float leaves, one alternative state, whether it is alive, and its weight."""
    leaves, treedef = jax.tree.flatten(state)
    floats = [_is_float(leaf) for leaf in leaves]

    def split(tree):
        tree_leaves = jax.tree.leaves(tree)
        return [x for x, f in zip(tree_leaves, floats) if f], [x for x, f in zip(tree_leaves, floats) if not f]

    def join(float_leaves, other_leaves):
        float_iter, other_iter = iter(float_leaves), iter(other_leaves)
        return jax.tree.unflatten(treedef, [next(float_iter) if f else next(other_iter) for f in floats])

    def body(carry, xs):
        x, dx, alternative, alive, weight = carry
        key, coin = xs
        x_floats, x_others = split(x)
        record = _Record(p_flat.dtype, 1)

        def primal(float_leaves, q):
            next_state = step(join(float_leaves, x_others), q, key)
            next_floats, next_others = split(next_state)
            return next_floats, next_others

        with record:
            (next_floats, next_others), (next_dx, _) = _call(
                lambda: jax.jvp(primal, (x_floats, p_flat), (dx, direction))
            )
        _check_traced(record)
        chosen = record.read()
        x_next = join(next_floats, next_others)
        jumped = _replay_step(step, x, p_flat, key, chosen["best_call"][0], chosen["best_index"][0],
                              chosen["best_target"][0], record.traced_samplers)  # fmt: skip
        # The carried alternative goes on with the same uniforms (the inverse-CDF coupling), and
        # drops out once it has rejoined the primal chain: from equal states the two runs agree.
        continued = _replay_step(step, alternative, p_flat, key, jnp.int32(-1), jnp.int32(-1),
                                 jnp.zeros((), p_flat.dtype), record.traced_samplers)  # fmt: skip
        alive = alive & ~_equal_tree(continued, x_next)
        rate = chosen["total_rate"]
        total = jnp.where(alive, weight, 0.0) + rate
        take_new = (rate > 0) & (coin * total < rate)  # the paper's pruning of two perturbations
        keep = alive & ~take_new
        alternative = _where_tree(take_new, jumped, _where_tree(keep, continued, x_next))
        weight = jnp.where(take_new | keep, total, 0.0)
        return (x_next, next_dx, alternative, take_new | keep, weight), None

    dx = [jnp.zeros_like(leaf) for leaf, f in zip(leaves, floats) if f]
    init = (state, dx, state, jnp.array(False), jnp.zeros((), p_flat.dtype))
    (x, dx, alternative, alive, weight), _ = jax.lax.scan(body, init, (keys, coins))
    x_floats, x_others = split(x)
    y, dy = jax.jvp(lambda float_leaves: _output(output(join(float_leaves, x_others))), (x_floats,), (dx,))
    if jnp.ndim(y) != 0:
        raise ValueError(f"output(state) must return a float scalar, got shape {jnp.shape(y)}")
    return dy + jnp.where(alive, weight * (output(alternative) - y), 0.0)


def chain_derivative_estimate(
    step: Callable[[Any, jax.Array, jax.Array], Any],
    state,
    p,
    key: jax.Array,
    num_steps: int,
    output: Callable[[Any], jax.Array],
):
    """One stochastic-triple sample of ``d E[output(X_T)] / dp`` for a Markov chain
    ``X_{t+1} = step(X_t, p, key_t)``, with StochasticAD.jl's pruning: lower variance than
    :func:`derivative_estimate` of the same program where alternative paths rejoin.

    ``derivative_estimate`` sees only ``f``'s output, so its race for the one kept jump runs over
    every jump of the run, including those whose alternative path later rejoins the primal one
    (and so contribute 0). Here the state is in view: one alternative state is carried beside the
    primal one, stepped with the same uniforms; when it equals the primal state it is dropped with
    its weight (from equal states the chain's futures agree); a new jump competes with it, kept
    with probability ``rate / (weight + rate)`` and carrying the summed weight, only while it is
    alive. Unbiased as the other estimator, measured on StochasticAD.jl's random walk
    (``bench/results/stochastic.md``).

    Args:
        step: ``step(state, p, key) -> state``, ordinary JAX with this module's samplers (the same
            limits as ``f`` of :func:`derivative_estimate`). The state is any pytree; its float
            leaves carry the continuous derivative (forward mode), the others are discrete.
        state: the initial state ``X_0`` (not differentiated).
        p: the parameter: a float scalar, an array or a pytree (one forward pass per entry).
        key: step ``t`` receives ``jax.random.split(key, num_steps)[t]``; the pruning's coins come
            from ``jax.random.fold_in(key, ...)``, a separate stream.
        num_steps: ``T``, a Python int.
        output: ``output(X_T) -> float scalar``, differentiable in the float leaves. To
            differentiate a sum over the steps (a return), accumulate it in the state.

    Returns:
        the estimate, with ``p``'s structure. A JAX value: jittable, ``vmap``-able over keys.
    """
    if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive Python int, got {num_steps!r}")
    p_flat, unravel = ravel_pytree(p)
    if not jnp.issubdtype(p_flat.dtype, jnp.floating):
        p_flat = p_flat.astype(jnp.result_type(float))

    def step_flat(x, q, k):
        return step(x, unravel(q), k)

    keys = jax.random.split(key, num_steps)
    coins = jax.random.uniform(jax.random.fold_in(key, 0x636F696E), (num_steps,), p_flat.dtype)
    basis = jnp.eye(p_flat.size, dtype=p_flat.dtype)

    def one(direction):
        return _chain_direction(step_flat, output, state, p_flat, direction, keys, coins)

    estimates = one(basis[0])[None] if p_flat.size == 1 else jax.vmap(one)(basis)
    return unravel(estimates)


def derivative_estimates(
    f: Callable[[Any, jax.Array], jax.Array],
    p,
    key: jax.Array,
    num_samples: int,
    *,
    estimator: Estimator = "triples",
    alternatives: int = 1,
    temperature: float = 1.0,
    hard: bool = False,
    support_size: int = 64,
):
    """``num_samples`` estimates of ``d E[f(p, key)] / dp``, stacked on a leading axis.

    The same as ``vmap`` of :func:`derivative_estimate` over ``jax.random.split(key, num_samples)``,
    except for ``"score"``, whose baseline for sample ``i`` is the mean of ``f`` over the other
    samples (leave-one-out: each estimate stays unbiased; they are weakly correlated, so the
    standard error computed as if they were independent is slightly off).

    Returns:
        ``p``'s structure with a leading axis of ``num_samples``: ``jnp.mean(..., axis=0)`` is the
        batch estimate.
    """
    _check_options(estimator, temperature, support_size, alternatives)
    if not (isinstance(num_samples, int) and num_samples >= (2 if estimator == "score" else 1)):
        raise ValueError(f"num_samples must be an int >= 1 (>= 2 for 'score'), got {num_samples!r}")
    keys = jax.random.split(key, num_samples)
    if estimator != "score":
        options = {
            "estimator": estimator,
            "alternatives": alternatives,
            "temperature": temperature,
            "hard": hard,
            "support_size": support_size,
        }
        return jax.vmap(lambda k: derivative_estimate(f, p, k, **options))(keys)
    _, unravel, _ = _flat(f, p)
    y, dy, dlogp = jax.vmap(lambda k: _per_direction(f, p, k, _score_direction)[1])(keys)
    y = y[:, :1]  # (samples, 1, *y_shape): the same for every direction
    baseline = (jnp.sum(y, axis=0, keepdims=True) - y) / (num_samples - 1)
    dlogp = dlogp.reshape(dlogp.shape + (1,) * (y.ndim - 2))
    return jax.vmap(lambda e: _unravel_jacobian(unravel, _direction_last(e)))(dy + (y - baseline) * dlogp)
