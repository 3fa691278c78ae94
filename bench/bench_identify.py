"""System identification, measured: ``diffgym.identify`` on gymnasium data, noise, identifiability,
the Lotka–Volterra seed example beside optimistix's published fit, and observed trebuchet shots.

Run ``python -m bench.bench_identify`` (``--quick``: fewer noisy repeats, no trebuchet). Writes
``bench/results/identify.md``.

* Noise-free recovery: 200 steps of gymnasium's own numpy CartPole-v1 (masspole 0.3, length 0.8
  set on ``env.unwrapped``, its derived ``total_mass`` and ``polemass_length`` recomputed) and
  Pendulum-v1 (m 1.3, l 0.7, g 9.0), random actions, from diffgym's defaults.
* Noise: Gaussian noise of standard deviation sigma added to every logged observation entry
  (the actions are exact), N repeats per level: the error of the fit against sigma, the standard
  errors the report gives, and how often the truth lies within 3 of them.
* Identifiability: fits of parameter sets the data cannot separate, and what the report says.
* Lotka–Volterra: the seed example (p = [2.2, 1.0, 2.0, 0.4], u0 = [1, 1], t in [0, 10]) fitted
  from samples of an independent scipy solution; the loss-driven fit of the original example
  (Adam 0.1, 100 iterations); optimistix's Lotka–Volterra example (published: Levenberg–Marquardt,
  55 steps, loss 8.9e-10) posed through the env.
* The trebuchet: observed shots ``(wind, angle, counterweight) -> distance`` through
  ``fit_function`` and ``shoot``.

Timings: ``report.solve_seconds`` is the compiled fit alone (a second call with new data of the
same shapes does not compile again); compile times are reported apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from bench.machine import cpu_model, load_average
from diffgym.identify import record_episodes

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "identify.md"
CARTPOLE_TRUE = {"masspole": 0.3, "length": 0.8}
PENDULUM_TRUE = {"m": 1.3, "l": 0.7, "g": 9.0}
LV_RATES = ("prey_growth_rate", "predation_rate", "predator_death_rate", "predator_growth_rate")
SEED_RATES = (2.2, 1.0, 2.0, 0.4)


# --------------------------------------------------------------------------------------------
# Data, logged from gymnasium's numpy envs as a user would
# --------------------------------------------------------------------------------------------
def gymnasium_cartpole_episodes(steps: int, seed: int, **physics):
    """``steps`` random-action steps of gymnasium's CartPole with ``physics`` set on the env (derived
    constants recomputed as its ``__init__`` does), reset after each termination: lists of episodes."""
    from gymnasium.envs.classic_control.cartpole import CartPoleEnv

    env = CartPoleEnv()
    for name, value in physics.items():
        setattr(env, name, value)
    env.total_mass = env.masspole + env.masscart
    env.polemass_length = env.masspole * env.length
    return record_episodes(env, lambda rng: int(rng.integers(2)), steps, seed=seed)


def gymnasium_pendulum_episodes(steps: int, seed: int, m: float, l: float, g: float):  # noqa: E741
    from gymnasium.envs.classic_control.pendulum import PendulumEnv

    env = PendulumEnv(g=g)
    env.m, env.l = m, l
    return record_episodes(env, lambda rng: rng.uniform(-2.0, 2.0, (1,)).astype(np.float32), steps, seed=seed)


def noisy(observations, sigma: float, rng):
    return [o + sigma * rng.standard_normal(o.shape) for o in observations]


def relative_errors(fitted, truth: dict) -> dict:
    return {name: getattr(fitted, name) / value - 1.0 for name, value in truth.items()}


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------
def noise_free(lines: list[str]) -> None:
    import diffgym

    cartpole, cartpole_params = diffgym.make("CartPole-v1")
    obs, act = gymnasium_cartpole_episodes(200, seed=0, **CARTPOLE_TRUE)
    pendulum, pendulum_params = diffgym.make("Pendulum-v1")
    pobs, pact = gymnasium_pendulum_episodes(200, seed=0, **PENDULUM_TRUE)
    lines += [
        "## Noise-free gymnasium data",
        "",
        f"200 steps of random actions in gymnasium's numpy env (CartPole: {len(obs)} episodes, its float32 "
        f"observations; Pendulum: {len(pobs)} episode), fitted from diffgym's defaults by one-step prediction "
        "errors. *error*: largest |fitted / true - 1|. *solve*: the compiled fit (second call; the whole "
        "second `identify` call, host work included, in brackets).",
        "",
        "| env | fit | true | fitted | error | steps | compile | solve |",
        "|---|---|---|---|---:|---:|---:|---:|",
    ]
    cases = [
        (cartpole, cartpole_params, obs, act, CARTPOLE_TRUE),
        (
            pendulum,
            dataclasses.replace(pendulum_params, g=PENDULUM_TRUE["g"]),
            pobs,
            pact,
            {"m": 1.3, "l": 0.7},
        ),
        (
            pendulum,
            dataclasses.replace(pendulum_params, l=PENDULUM_TRUE["l"]),
            pobs,
            pact,
            {"m": 1.3, "g": 9.0},
        ),
        (
            pendulum,
            dataclasses.replace(pendulum_params, m=PENDULUM_TRUE["m"]),
            pobs,
            pact,
            {"l": 0.7, "g": 9.0},
        ),
    ]
    for env, init, o, a, truth in cases:
        _, first = diffgym.identify(env, o, a, init, fit=tuple(truth))
        start = time.perf_counter()
        fitted, report = diffgym.identify(env, o, a, init, fit=tuple(truth))
        call_seconds = time.perf_counter() - start
        error = max(abs(v) for v in relative_errors(fitted, truth).values())
        lines.append(
            f"| {env.name} | {', '.join(truth)} | {', '.join(f'{v:g}' for v in truth.values())} | "
            f"{', '.join(f'{getattr(fitted, n):.7g}' for n in truth)} | {error:.1e} | {report.iterations} | "
            f"{first.compile_seconds:.1f} s | {report.solve_seconds * 1e3:.1f} ms ({call_seconds * 1e3:.0f} ms) |"
        )
        print(lines[-1], flush=True)
    lines.append("")


def noise_table(lines: list[str], repeats: int) -> None:
    import diffgym

    env, params = diffgym.make("CartPole-v1")
    obs, act = gymnasium_cartpole_episodes(200, seed=0, **CARTPOLE_TRUE)
    pendulum, pendulum_params = diffgym.make("Pendulum-v1")
    pendulum_params = dataclasses.replace(pendulum_params, g=PENDULUM_TRUE["g"])
    pobs, pact = gymnasium_pendulum_episodes(200, seed=0, **PENDULUM_TRUE)
    lines += [
        "## Error against observation noise",
        "",
        f"Gaussian noise of standard deviation sigma on every observation entry, {repeats} draws per "
        "level, the same 200 logged steps. *median error*: median over draws of |fitted / true - 1|; "
        "*reported SE*: median relative standard error from the report; *spread / SE*: the standard "
        "deviation of the estimates over the draws divided by the mean reported SE (1: calibrated, < 1: "
        "the SE is conservative); *bias*: mean error / its standard error over the draws; *coverage*: "
        "fraction of draws with |fitted - true| < 3 SE (nominal 99.7 %).",
        "",
        "| env | horizon | sigma | parameter | median error | reported SE | spread / SE | bias (z) | coverage |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    settings = [
        (env, params, obs, act, CARTPOLE_TRUE, 1, (1e-4, 1e-3, 3e-3, 1e-2)),
        (env, params, obs, act, CARTPOLE_TRUE, 5, (1e-3, 1e-2)),
        (pendulum, pendulum_params, pobs, pact, {"m": 1.3, "l": 0.7}, 1, (1e-4, 1e-3, 1e-2)),
    ]
    summary = {}  # horizon -> (spread / SE values, coverages, |bias z|)
    for env_, init, o, a, truth, horizon, sigmas in settings:
        for sigma in sigmas:
            rng = np.random.default_rng(int(sigma * 1e6) + horizon)
            errors, ses = {n: [] for n in truth}, {n: [] for n in truth}
            for _ in range(repeats):
                fitted, report = diffgym.identify(
                    env_, noisy(o, sigma, rng), a, init, fit=tuple(truth), horizon=horizon
                )
                for name, value in truth.items():
                    errors[name].append(getattr(fitted, name) - value)
                    ses[name].append(report.standard_errors[name])
            for name, value in truth.items():
                e, s = np.array(errors[name]), np.array(ses[name])
                spread, coverage = np.std(e) / np.mean(s), np.mean(np.abs(e) < 3 * s)
                bias = np.mean(e) / (np.std(e) / np.sqrt(len(e)))
                entry = summary.setdefault(horizon, ([], [], []))
                entry[0].append(spread)
                entry[1].append(coverage)
                entry[2].append(abs(bias))
                lines.append(
                    f"| {env_.name} | {horizon} | {sigma:g} | {name} | {np.median(np.abs(e)) / value:.1e} | "
                    f"{np.median(s) / value:.1e} | {np.std(e) / np.mean(s):.2f} | "
                    f"{np.mean(e) / (np.std(e) / np.sqrt(len(e))):+.1f} | {np.mean(np.abs(e) < 3 * s):.0%} |"
                )
                print(lines[-1], flush=True)
    lines.append("")
    for horizon, (spreads, coverages, biases) in sorted(summary.items()):
        lines.append(
            f"- horizon {horizon}: spread / SE {min(spreads):.2f}-{max(spreads):.2f}, coverage of 3 SE "
            f"{min(coverages):.0%}-{max(coverages):.0%}, largest |bias z| {max(biases):.1f}."
        )
    lines += [
        "",
        "The reported standard error assumes independent residuals. A one-step residual of noisy "
        "observations holds the noise of the observation it predicts and of the one it starts from, so "
        "consecutive residuals are anti-correlated and the estimate errs on the safe side for most "
        "parameters (spread / SE below 1); overlapping k-step windows share their noise positively, so "
        "there the SE is too small and the coverage below nominal, and a window started from a noisy "
        "observation carries a bias that grows with sigma (errors in the variables). Fit noisy logs with "
        "horizon 1, or read multi-step standard errors as lower bounds.",
        "",
    ]


def identifiability(lines: list[str], with_trebuchet: bool) -> None:
    import diffgym

    lines += [
        "## Identifiability: what the report says when the data cannot tell parameters apart",
        "",
        "*cond*: condition number of J^T J in relative coordinates (d residual / d log p). *flagged*: "
        "the directions (in log p) whose singular value is below 1e-8 of the largest; the fit still "
        "predicts the data (loss as low as an identifiable fit's), and the standard errors along them "
        "are inf.",
        "",
        "| env | fit | cond(J^T J) | flagged direction | loss |",
        "|---|---|---:|---|---:|",
    ]
    cartpole, cartpole_params = diffgym.make("CartPole-v1")
    obs, act = gymnasium_cartpole_episodes(200, seed=0, **CARTPOLE_TRUE)
    pendulum, pendulum_params = diffgym.make("Pendulum-v1")
    pobs, pact = gymnasium_pendulum_episodes(200, seed=0, **PENDULUM_TRUE)
    truth = dataclasses.replace(cartpole_params, **CARTPOLE_TRUE)
    cases = [
        (cartpole, truth, obs, act, ("masspole", "length")),
        (cartpole, truth, obs, act, ("masscart", "masspole", "force_mag")),
        (cartpole, truth, obs, act, ("masscart", "force_mag")),
        (cartpole, truth, obs, act, ("gravity", "length")),
        (pendulum, pendulum_params, pobs, pact, ("m", "l", "g")),
    ]
    for env, init, o, a, fit in cases:
        _, report = diffgym.identify(env, o, a, init, fit=fit)
        flagged = (
            "; ".join(
                " ".join(f"{v:+.3f} log {k}" for k, v in d.items() if abs(v) > 1e-3)
                for d in report.unidentifiable
            )
            or "none"
        )
        lines.append(
            f"| {env.name} | {', '.join(fit)} | {report.condition_number:.1e} | {flagged} | {report.loss:.1e} |"
        )
        print(lines[-1], flush=True)
    if with_trebuchet:
        shots = trebuchet_shots(24)
        init = dataclasses.replace(shots[2], drag_coefficient=1.0, air_density=1.0)  # mass known
        _, report = trebuchet_fit(shots, ("drag_coefficient", "air_density"), init)
        flagged = (
            "; ".join(
                " ".join(f"{v:+.3f} log {k}" for k, v in d.items() if abs(v) > 1e-3)
                for d in report.unidentifiable
            )
            or "none"
        )
        lines.append(
            f"| Trebuchet (shots) | drag_coefficient, air_density | {report.condition_number:.1e} | {flagged} | "
            f"{report.loss:.1e} |"
        )
    lines += [
        "",
        "CartPole's masscart, masspole and force_mag enter only through the ratios force / total mass "
        "and masspole / total mass, so scaling all three together changes nothing (an exact null "
        "direction, flagged). With masspole known, masscart and force_mag are separable only through "
        "the small masspole terms: cond is large but finite. Gravity and length are separable in "
        "CartPole (the force term sees the length alone). The Pendulum's m, l and g act only as "
        "g / l and m l^2: one exact null direction, so any two of them are recovered when the third "
        "is known, and none when all three are fitted. The trebuchet's drag depends on air_density "
        "times drag_coefficient only.",
        "",
    ]


def trebuchet_shots(count: int):
    from diffgym.envs.trebuchet import TrebuchetParams, shoot

    rng = np.random.default_rng(0)
    wind, angle, weight = rng.uniform(-10, 10, count), rng.uniform(20, 70, count), rng.uniform(60, 200, count)
    truth = TrebuchetParams(drag_coefficient=0.7, air_density=1.1, projectile_mass=0.2)
    with jax.enable_x64(True):
        distance = jax.jit(jax.vmap(lambda w, a, c: shoot(w, a, c, truth)))(
            jnp.asarray(wind), jnp.asarray(angle), jnp.asarray(weight)
        )
    return (wind, angle, weight), np.asarray(distance), truth


def _trebuchet_predict(params, shots):
    from diffgym.envs.trebuchet import shoot

    return jax.vmap(lambda w, a, c: shoot(w, a, c, params))(*shots)


def trebuchet_fit(shots, fit, init=None):
    from diffgym.envs.trebuchet import TrebuchetParams
    from diffgym.identify import fit_function

    inputs, distance, truth = shots
    init = TrebuchetParams(air_density=truth.air_density) if init is None else init
    return fit_function(_trebuchet_predict, inputs, distance, init, fit=fit)


def trebuchet_section(lines: list[str]) -> None:
    shots = trebuchet_shots(24)
    fitted, report = trebuchet_fit(shots, ("drag_coefficient", "projectile_mass"))
    truth = shots[2]
    errors = {n: getattr(fitted, n) / getattr(truth, n) - 1 for n in ("drag_coefficient", "projectile_mass")}
    lines += [
        "## The trebuchet: observed shots",
        "",
        "24 shots (wind U(-10, 10) m/s, angle U(20, 70) deg, counterweight U(60, 200) kg) simulated by "
        "`shoot` with drag_coefficient 0.7 and projectile_mass 0.2 kg (air density 1.1, known), fitted "
        "with `fit_function(predict, (wind, angle, counterweight), distance, ...)` from the defaults "
        "(1.0, 0.149 kg), forward-mode Jacobians through the three phases' scans.",
        "",
        "| parameter | true | fitted | error | std. error | steps | compile | solve |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, error in errors.items():
        lines.append(
            f"| {name} | {getattr(truth, name):g} | {getattr(fitted, name):.8g} | {error:.1e} | "
            f"{report.standard_errors[name]:.1e} | {report.iterations} | {report.compile_seconds:.1f} s | "
            f"{report.solve_seconds * 1e3:.0f} ms |"
        )
    lines.append("")
    print("\n".join(lines[-4:]), flush=True)


def lotka_volterra(lines: list[str]) -> None:
    import diffrax
    import optax
    from scipy.integrate import solve_ivp

    import diffgym
    from diffgym.envs.lotka_volterra import LotkaVolterra, LotkaVolterraParams

    def scipy_samples(rates, y0, times):
        alpha, beta, gamma, delta = rates

        def field(t, y):
            return [(alpha - beta * y[1]) * y[0], (delta * y[0] - gamma) * y[1]]

        return solve_ivp(
            field, (times[0], times[-1]), y0, t_eval=times, method="DOP853", rtol=1e-12, atol=1e-12
        ).y.T

    lines += [
        "## Lotka–Volterra",
        "",
        "### The seed example: p = [2.2, 1.0, 2.0, 0.4], u0 = [1, 1], t in [0, 10]",
        "",
        "Samples every 0.1 of an independent solution (scipy DOP853, rtol = atol = 1e-12), fitted by "
        "one-step prediction errors through the env (adaptive Tsit5, rtol 1e-6) from its default rates "
        "(1.5, 1, 3, 1). With the env's default adjoint the fit falls back to reverse-mode Jacobians "
        "(the checkpointed solve has no JVP); `adjoint=diffrax.ForwardMode()` gives forward mode.",
        "",
        "| adjoint | Jacobians | max rel. error | steps | loss | compile | solve |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    samples = scipy_samples(SEED_RATES, [1.0, 1.0], np.linspace(0.0, 10.0, 101))
    zeros = np.zeros((100, 2))
    for label, env in (
        ("ForwardMode", LotkaVolterra(adjoint=diffrax.ForwardMode())),
        ("default", LotkaVolterra()),
    ):
        # One call: the report times compilation and the compiled solve apart (the reverse-mode
        # fit takes tens of seconds, so it is not repeated).
        fitted, report = diffgym.identify(env, samples, zeros, LotkaVolterraParams(), fit=LV_RATES)
        first = report
        error = max(abs(getattr(fitted, n) / v - 1) for n, v in zip(LV_RATES, SEED_RATES))
        lines.append(
            f"| {label} | {report.jacobian} | {error:.1e} | {report.iterations} | {report.loss:.1e} | "
            f"{first.compile_seconds:.1f} s | {report.solve_seconds * 1e3:.0f} ms |"
        )
        print(lines[-1], flush=True)

    # The loss-driven fit of the original example.
    env = LotkaVolterra()
    base = dataclasses.replace(LotkaVolterraParams(), target_prey=1.0, target_predator=1.0)

    def loss(rates):
        params = dataclasses.replace(base, **{n: rates[i] for i, n in enumerate(LV_RATES)})
        state = env.state_from_obs(jnp.ones(2), params)

        def body(state, _):
            _, state, reward, _, _ = env.step_env(None, state, jnp.zeros(2), params)
            return state, reward

        return -jnp.sum(jax.lax.scan(body, state, None, length=100)[1])

    optimizer = optax.adam(0.1)

    @jax.jit
    def adam_fit(rates):
        def step(carry, _):
            rates, opt_state = carry
            value, gradient = jax.value_and_grad(loss)(rates)
            updates, opt_state = optimizer.update(gradient, opt_state, rates)
            return (optax.apply_updates(rates, updates), opt_state), value

        (rates, _), losses = jax.lax.scan(step, (rates, optimizer.init(rates)), None, length=100)
        return rates, losses, loss(rates)

    rates0 = jnp.asarray(SEED_RATES, jnp.float32)
    start = time.perf_counter()
    jax.block_until_ready(adam_fit(rates0))
    adam_compile = time.perf_counter() - start
    start = time.perf_counter()
    rates, losses, final = jax.block_until_ready(adam_fit(rates0))
    adam_seconds = time.perf_counter() - start
    losses = np.asarray(losses)
    lines += [
        "",
        "### The loss-driven fit of the original example",
        "",
        "Loss sum_t (x_t - 1)^2 + (y_t - 1)^2 over t = 0.1, 0.2, ..., 10 (the env's return with the "
        "target (1, 1), negated), Adam(0.1), 100 iterations from p = [2.2, 1.0, 2.0, 0.4], gradients by "
        "reverse mode through the env (default adjoint), float32, all 100 iterations in one compiled scan.",
        "",
        "| iteration | 0 | 10 | 25 | 50 | 75 | 99 | final |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        "| loss | "
        + " | ".join(f"{losses[i]:.3g}" for i in (0, 10, 25, 50, 75, 99))
        + f" | {float(final):.3g} |",
        "",
        f"Final p = [{', '.join(f'{v:.4f}' for v in np.asarray(rates))}] (alpha = beta and gamma = delta "
        f"make (1, 1) an equilibrium); 100 iterations in {adam_seconds:.2f} s after {adam_compile:.1f} s "
        "of compilation.",
        "",
    ]
    print("\n".join(lines[-6:]), flush=True)

    # optimistix's published example, posed through the env.
    true_rates = (0.1, 0.02, 0.4, 0.02)
    times = np.linspace(0.0, 30.0, 20)
    y0s = [[9.0, 9.0], [10.0, 10.0], [11.0, 11.0]]
    lines += [
        "### optimistix's Lotka–Volterra fit, through the env",
        "",
        "optimistix's example (docs: *Optimising a parameterised ODE*): rates (0.1, 0.02, 0.4, 0.02), "
        "three trajectories from (9, 9), (10, 10), (11, 11) sampled at 20 times in [0, 30], the fit started "
        "at all-zero rates, `LevenbergMarquardt(rtol=1e-8, atol=1e-8)`; published: 55 steps, final loss "
        "8.9e-10 (float32, fixed-step Tsit5 dt = 0.1, one solve per trajectory, `DirectAdjoint`). Here: "
        "the same data (from scipy at 1e-12), the env with dt = 30/19 per step and zero harvest, "
        "`identify(..., horizon=19, positive=False)` (single shooting from each first sample, as the "
        "example) and the one-step fit (horizon 1); *loss* as optimistix prints it, 0.5 sum r^2.",
        "",
        "| fit | dtype | Jacobians | max rel. error | steps | loss | compile | solve |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    observations = np.stack([scipy_samples(true_rates, y0, times) for y0 in y0s])
    actions = np.zeros((3, 19, 2))
    zero_init = LotkaVolterraParams(
        dt=30.0 / 19,
        prey_growth_rate=0.0,
        predation_rate=0.0,
        predator_death_rate=0.0,
        predator_growth_rate=0.0,
    )
    env = LotkaVolterra(adjoint=diffrax.ForwardMode())
    for horizon in (19, 1):
        for float64 in (True, False):
            kwargs = dict(fit=LV_RATES, horizon=horizon, positive=False, float64=float64)
            _, first = diffgym.identify(env, observations, actions, zero_init, **kwargs)
            fitted, report = diffgym.identify(env, observations, actions, zero_init, **kwargs)
            error = max(abs(getattr(fitted, n) / v - 1) for n, v in zip(LV_RATES, true_rates))
            lines.append(
                f"| horizon {horizon} | {'float64' if float64 else 'float32'} | {report.jacobian} | {error:.1e} | "
                f"{report.iterations} | {report.loss:.1e} | {first.compile_seconds:.1f} s | "
                f"{report.solve_seconds * 1e3:.0f} ms |"
            )
            print(lines[-1], flush=True)
    reference = optimistix_example()
    lines.append(
        f"| optimistix's example code, run here | float32 | fwd | {reference['error']:.1e} | {reference['steps']} | "
        f"{reference['loss']:.1e} | {reference['compile']:.1f} s | {reference['seconds'] * 1e3:.0f} ms |"
    )
    lines.append("")


def optimistix_example() -> dict:
    """optimistix's published example as its docs pose it (DirectAdjoint, fixed-step Tsit5 dt0 = 0.1,
    saveat 20 times in [0, 30], LM rtol = atol = 1e-8 from zeros, float32), timed on this machine."""
    import diffrax
    import optimistix as optx

    def field(t, y, rates):
        alpha, beta, gamma, delta = rates
        return jnp.stack([alpha * y[0] - beta * y[0] * y[1], -gamma * y[1] + delta * y[0] * y[1]])

    times = jnp.linspace(0.0, 30.0, 20)

    def solve(rates, y0):
        solution = diffrax.diffeqsolve(
            diffrax.ODETerm(field),
            diffrax.Tsit5(),
            times[0],
            times[-1],
            0.1,
            y0,
            args=rates,
            saveat=diffrax.SaveAt(ts=times),
            adjoint=diffrax.DirectAdjoint(),
        )
        return solution.ys

    y0s = jnp.array([[9.0, 9.0], [10.0, 10.0], [11.0, 11.0]])
    truth = jnp.array([0.1, 0.02, 0.4, 0.02])
    values = jax.jit(jax.vmap(solve, in_axes=(None, 0)))(truth, y0s)

    def residuals(rates, args):
        y0s, values = args
        return values - jax.vmap(solve, in_axes=(None, 0))(rates, y0s)

    solver = optx.LevenbergMarquardt(rtol=1e-8, atol=1e-8)

    @jax.jit
    def fit(init):
        solution = optx.least_squares(residuals, solver, init, args=(y0s, values), throw=False)
        r = residuals(solution.value, (y0s, values))
        return solution.value, solution.stats["num_steps"], 0.5 * jnp.sum(r**2)

    start = time.perf_counter()
    jax.block_until_ready(fit(jnp.zeros(4)))
    compile_seconds = time.perf_counter() - start
    start = time.perf_counter()
    rates, steps, loss = jax.block_until_ready(fit(jnp.zeros(4)))
    seconds = time.perf_counter() - start
    error = float(jnp.max(jnp.abs(rates / truth - 1)))
    return {
        "error": error,
        "steps": int(steps),
        "loss": float(loss),
        "compile": compile_seconds,
        "seconds": seconds,
    }


def machine() -> str:
    return (
        f"{cpu_model()}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}; "
        f"Python {platform.python_version()}, jax {jax.__version__} on {jax.devices()[0].platform}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10 noisy repeats per level, no trebuchet")
    parser.add_argument("--repeats", type=int, default=None, help="noisy repeats per level (default 50)")
    parser.add_argument(
        "--only",
        nargs="+",
        default=None,
        choices=["noise_free", "noise", "identifiability", "lotka_volterra", "trebuchet"],
    )
    args = parser.parse_args()
    repeats = args.repeats or (10 if args.quick else 50)
    sections = args.only or ["noise_free", "noise", "identifiability", "lotka_volterra"] + (
        [] if args.quick else ["trebuchet"]
    )
    load_start = load_average()
    import optimistix

    lines = [
        "# System identification: `diffgym.identify`",
        "",
        f"Machine: {machine()}; optimistix {optimistix.__version__}. Load average at the start {load_start}. "
        f"Written by `python -m bench.bench_identify{' --quick' if args.quick else ''}`. Everything in float64 "
        "unless a row says otherwise; Levenberg–Marquardt (optimistix) with rtol = atol = 1e-8.",
        "",
    ]
    if "noise_free" in sections:
        noise_free(lines)
    if "noise" in sections:
        noise_table(lines, repeats)
    if "identifiability" in sections:
        identifiability(lines, with_trebuchet="trebuchet" in sections)
    if "lotka_volterra" in sections:
        lotka_volterra(lines)
    if "trebuchet" in sections:
        trebuchet_section(lines)
    lines.append(f"Load average at the end {load_average()}.")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(lines) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
