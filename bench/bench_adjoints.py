"""Adjoints for LotkaVolterra-v0, measured: gradient accuracy, peak memory and time at long horizons.

Run ``python -m bench.bench_adjoints`` (``--quick``: horizons 100 and 1000 only). Writes
``bench/results/adjoints.md``.

The gradient is that of a rollout's return (the env's reward summed over ``T`` steps from
``(1, 1)``, a constant harvest ``[0.05, 0.02]``) with respect to the four rates, in float64, by:

* ``RecursiveCheckpointAdjoint`` — reverse mode through diffrax's adaptive Tsit5 solve of every
  step, with binomial checkpointing (discretise-then-optimise): diffrax's default number of
  checkpoints (log2 of ``max_steps``), and 2 (the env's default, chosen from these numbers).
* ``BacksolveAdjoint`` — reverse mode by solving the adjoint ODE backwards in time with the same
  solver and tolerances (optimise-then-discretise, O(1) memory inside one solve).
* ``DirectAdjoint`` — reverse mode through diffrax's bounded loop (supports forward mode too).
* ``ForwardMode`` — ``jax.jacfwd`` (four JVPs), for comparison: forward mode keeps no trajectory.
* ``fixed-step scan`` — direct BPTT through a ``lax.scan`` of fixed Tsit5 steps (``dt / 4``, no
  diffrax loop), plain JAX autodiff.

Accuracy: against central finite differences of the same rollout solved at ``rtol = atol =
1e-12`` (relative step 1e-6), the true gradient to ~1e-9; "forward error" is each method's return
against that tight solve (what the solve itself gets wrong), at the env's default tolerances and
at tight ones. Memory: the temporaries of XLA's compiled gradient (``memory_analysis()``; its
``peak_memory_in_bytes`` on CPU comes out below the temporaries and is not used). Time: median of
7 calls after compilation, the methods of one horizon called in turn (a busy machine slows them
alike).
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

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "adjoints.md"
RATES = ("prey_growth_rate", "predation_rate", "predator_death_rate", "predator_growth_rate")
HARVEST = (0.05, 0.02)
FIXED_SUBSTEPS = 4


def rollout_return(env, params, rates, steps: int):
    """The return of ``steps`` env steps from (1, 1) under the constant harvest, as a function of the rates."""
    params = dataclasses.replace(params, **{n: rates[i] for i, n in enumerate(RATES)})
    state = env.state_from_obs(jnp.ones(2, rates.dtype), params)
    action = jnp.asarray(HARVEST, rates.dtype)

    def body(state, _):
        _, state, reward, _, _ = env.step_env(None, state, action, params)
        return state, reward

    _, rewards = jax.lax.scan(body, state, None, length=steps)
    return jnp.sum(rewards)


def fixed_step_return(params, rates, steps: int):
    """The same return through a ``lax.scan`` of fixed Tsit5 steps (``FIXED_SUBSTEPS`` per env step)."""
    import diffrax

    from diffgym.envs.lotka_volterra import vector_field

    params = dataclasses.replace(params, **{n: rates[i] for i, n in enumerate(RATES)})
    solver, term = diffrax.Tsit5(), diffrax.ODETerm(vector_field)
    args = tuple(rates)
    h = params.dt / FIXED_SUBSTEPS
    action = jnp.asarray(HARVEST, rates.dtype)

    def substep(carry, _):
        y, solver_state = carry
        y, _, _, solver_state, _ = solver.step(term, 0.0, h, y, args, solver_state, made_jump=False)
        return (y, solver_state), None

    def env_step(y, _):
        y = y * (1.0 - action)  # the harvest: a jump, so the solver state starts afresh
        carry = (y, solver.init(term, 0.0, h, y, args))
        (y, _), _ = jax.lax.scan(substep, carry, None, length=FIXED_SUBSTEPS)
        reward = -((y[0] - params.target_prey) ** 2 + (y[1] - params.target_predator) ** 2)
        return y, reward

    _, rewards = jax.lax.scan(env_step, jnp.ones(2, rates.dtype), None, length=steps)
    return jnp.sum(rewards)


def reference_gradient(params, rates, steps: int) -> tuple[np.ndarray, float]:
    """Central finite differences of the tight-tolerance rollout, and its return."""
    from diffgym.envs.lotka_volterra import LotkaVolterra

    tight = LotkaVolterra(rtol=1e-12, atol=1e-12, max_solver_steps=4096)
    value = jax.jit(lambda r: rollout_return(tight, params, r, steps))
    base = np.asarray(rates)
    gradient = np.zeros(len(base))
    for i in range(len(base)):
        h = 1e-6 * abs(base[i])
        up, down = base.copy(), base.copy()
        up[i] += h
        down[i] -= h
        gradient[i] = (float(value(jnp.asarray(up))) - float(value(jnp.asarray(down)))) / (2 * h)
    return gradient, float(value(jnp.asarray(base)))


def measure(cases: dict, rates, reference: np.ndarray, exact_value: float, repeats: int = 7) -> list[dict]:
    """Compile every case (name -> (gradient function, value function)), then time them with their
    calls interleaved (so that a busy machine slows them alike); median per case."""
    compiled, rows = {}, {}
    for name, (gradient_fn, value_fn) in cases.items():
        start = time.perf_counter()
        compiled[name] = jax.jit(gradient_fn).lower(rates).compile()
        compile_seconds = time.perf_counter() - start
        gradient = np.asarray(compiled[name](rates))
        value = float(jax.jit(value_fn)(rates))
        rows[name] = {
            "method": name,
            "gradient": gradient,
            "gradient_error": float(np.max(np.abs(gradient - reference) / np.abs(reference))),
            "forward_error": abs(value - exact_value) / abs(exact_value),
            "temp_bytes": int(compiled[name].memory_analysis().temp_size_in_bytes),
            "compile_seconds": compile_seconds,
        }
    samples = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in compiled.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(rates))
            samples[name].append(time.perf_counter() - start)
    for name in cases:
        rows[name]["seconds"] = float(np.median(samples[name]))
    return list(rows.values())


#: (rtol, atol) of the env's solves: its defaults, and tight enough that the solver's own error
#: stops hiding the adjoint's.
TOLERANCES = {"default": (1e-6, 1e-8), "tight": (1e-9, 1e-11)}


def methods(rtol: float, atol: float) -> dict:
    """name -> (env or None for the fixed-step scan, gradient transform)."""
    import diffrax

    from diffgym.envs.lotka_volterra import LotkaVolterra

    def env(adjoint=None):
        return LotkaVolterra(rtol=rtol, atol=atol, adjoint=adjoint)

    return {
        "RecursiveCheckpointAdjoint(checkpoints=None: log2(max_steps) = 8)": (
            env(diffrax.RecursiveCheckpointAdjoint()),
            jax.grad,
        ),
        "RecursiveCheckpointAdjoint(checkpoints=2), the env's default": (
            env(diffrax.RecursiveCheckpointAdjoint(checkpoints=2)),
            jax.grad,
        ),
        "BacksolveAdjoint": (env(diffrax.BacksolveAdjoint()), jax.grad),
        "DirectAdjoint": (env(diffrax.DirectAdjoint()), jax.grad),
        "ForwardMode (jax.jacfwd, 4 JVPs)": (env(diffrax.ForwardMode()), jax.jacfwd),
    }


def run(horizons, tight_horizons) -> list[dict]:
    from diffgym.envs.lotka_volterra import LotkaVolterra

    rows = []
    with jax.enable_x64(True):
        params = LotkaVolterra().default_params
        rates = jnp.asarray([getattr(params, n) for n in RATES], jnp.float64)
        for steps in sorted(set(horizons) | set(tight_horizons)):
            reference, exact_value = reference_gradient(params, rates, steps)
            for tolerance, (rtol, atol) in TOLERANCES.items():
                if steps not in (horizons if tolerance == "default" else tight_horizons):
                    continue
                cases = {}
                for name, (env, transform) in methods(rtol, atol).items():
                    fn = (lambda env: lambda r: rollout_return(env, params, r, steps))(env)
                    cases[name] = (transform(fn), fn)
                if tolerance == "default":
                    fn = lambda r: fixed_step_return(params, r, steps)  # noqa: E731
                    cases[f"fixed-step lax.scan (Tsit5, dt/{FIXED_SUBSTEPS}), plain BPTT"] = (
                        jax.grad(fn),
                        fn,
                    )
                for row in measure(cases, rates, reference, exact_value):
                    fixed = row["method"].startswith("fixed-step")
                    rows.append({"steps": steps, "tolerance": "fixed step" if fixed else tolerance, **row})
                    print({k: v for k, v in rows[-1].items() if k != "gradient"}, flush=True)
    return rows


def machine() -> str:
    return (
        f"{cpu_model()}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}; "
        f"Python {platform.python_version()}, jax {jax.__version__} on {jax.devices()[0].platform}"
    )


def write_report(rows: list[dict], load_start: str) -> None:
    import diffrax

    lines = [
        "# Adjoints of LotkaVolterra-v0: accuracy, memory, time",
        "",
        f"Machine: {machine()}; diffrax {diffrax.__version__}. Load average at the start {load_start}, "
        f"at the end {load_average()}. Written by `python -m bench.bench_adjoints`.",
        "",
        "Gradient of a rollout's return (T env steps of dt = 0.1 from (1, 1), constant harvest "
        f"{list(HARVEST)}) with respect to the four rates, float64, "
        "adaptive Tsit5 at the env's default tolerances (rtol = 1e-6, atol = 1e-8) or tight ones (1e-9, 1e-11). "
        "*gradient error*: max over the rates of |g - g_ref| / |g_ref|, g_ref = central finite differences "
        "(relative step 1e-6) of the rollout solved at rtol = atol = 1e-12. *forward error*: the return's "
        "relative error against that tight solve (the solve's own error, which bounds what any adjoint of it "
        "can reach). *XLA temporaries*: `memory_analysis().temp_size_in_bytes` of the compiled gradient, one "
        "trajectory (a batch of B envs needs B times as much); *per step*: the same divided by T. *time*: "
        "median of 7 calls after compilation, one trajectory, the methods' calls interleaved.",
        "",
        "| T (steps) | tolerances | method | gradient error | forward error | XLA temporaries | per step | time | compile |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['steps']} | {row['tolerance']} | {row['method']} | {row['gradient_error']:.1e} | "
            f"{row['forward_error']:.1e} | {row['temp_bytes'] / 1024:.0f} KiB | {row['temp_bytes'] / row['steps']:.0f} B | "
            f"{row['seconds'] * 1e3:.1f} ms | {row['compile_seconds']:.1f} s |"
        )
    lines += ["", "## Reading", ""] + reading(rows)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(lines) + "\n")
    print(f"wrote {RESULTS}")


DEFAULT = "RecursiveCheckpointAdjoint(checkpoints=2), the env's default"
DIFFRAX_DEFAULT = "RecursiveCheckpointAdjoint(checkpoints=None: log2(max_steps) = 8)"


def reading(rows: list[dict]) -> list[str]:
    """The comparisons the env's choice of default rests on, computed from the rows above."""
    by = {(r["steps"], r["tolerance"], r["method"]): r for r in rows}
    lines = []
    for (steps, tolerance, method), row in sorted(by.items()):
        if method != DEFAULT:
            continue
        exact = [
            m
            for (t, tol, m) in by
            if t == steps and tol == tolerance and m not in (DEFAULT, "BacksolveAdjoint")
        ]
        spread = max(
            float(
                np.max(
                    np.abs(by[(steps, tolerance, m)]["gradient"] - row["gradient"]) / np.abs(row["gradient"])
                )
            )
            for m in exact
        )
        backsolve = by[(steps, tolerance, "BacksolveAdjoint")]
        diffrax_default = by[(steps, tolerance, DIFFRAX_DEFAULT)]
        lines.append(
            f"- T = {steps}, {tolerance} tolerances: the exact-discrete adjoints (checkpointed with 2 or 8 "
            f"checkpoints, DirectAdjoint, ForwardMode) agree to {spread:.0e}; their error against the true gradient "
            f"is {row['gradient_error']:.1e}, BacksolveAdjoint's {backsolve['gradient_error']:.1e} "
            f"({backsolve['gradient_error'] / row['gradient_error']:.1f}x). Memory per step: 2 checkpoints "
            f"{row['temp_bytes'] / steps:.0f} B, 8 checkpoints {diffrax_default['temp_bytes'] / steps:.0f} B "
            f"({diffrax_default['temp_bytes'] / row['temp_bytes']:.1f}x), Backsolve {backsolve['temp_bytes'] / steps:.0f} B; "
            f"time {row['seconds'] * 1e3:.1f} ms vs {diffrax_default['seconds'] * 1e3:.1f} ms (8 checkpoints) and "
            f"{backsolve['seconds'] * 1e3:.1f} ms (Backsolve)."
        )
    lines += [
        "",
        (
            "The default: `RecursiveCheckpointAdjoint(checkpoints=2)`. It is the exact derivative of what the"
            " env computes (the same gradient as forward mode and DirectAdjoint to round-off, so gradient "
            "checks and line searches see one consistent function); its error is the forward solve's own and "
            "shrinks with the tolerances. Two checkpoints take a tenth of the memory of diffrax's default of "
            "eight at about the same speed (one env step of dt = 0.1 is a few solver steps, cheap to "
            "recompute; at tight tolerances, with more steps to recompute, compare the times in the bullets)."
            " BacksolveAdjoint stores least, but its gradient is not the derivative of the forward solve: it "
            "carries the error of its own backward solve (less accurate than the exact gradient at T <= 1000 "
            "and at tight tolerances here; at T = 10000 the forward solve's error dominates every method). "
            "Every reverse-mode adjoint's memory grows linearly in T here, because the scan over env steps "
            "keeps each step's residuals. For a few parameters (the four rates) forward mode is faster and "
            "smaller still: construct the env with `adjoint=diffrax.ForwardMode()` (what `diffgym.identify` "
            "wants)."
        ),
    ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="horizons 100 and 1000 only")
    args = parser.parse_args()
    load_start = load_average()
    horizons = (100, 1000) if args.quick else (100, 1000, 10000)
    write_report(run(horizons, tight_horizons=(1000,)), load_start)


if __name__ == "__main__":
    main()
