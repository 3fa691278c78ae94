"""Sim-to-real, measured: the bundled controllers on changed "real" systems, identified from what
they logged there and fine-tuned on the fit, beside PPO trained on the real system itself.

Run ``python -m bench.bench_sim2real`` (``--quick``: one seed, no noise). Writes
``bench/results/sim2real.md``.

For each case (env, real constants) and observation-noise level, seeds 0-2, ``agents.sim2real.run``:

1. the bundled controller (``agents/assets/<env>``) on gymnasium's own numpy env with the
   constants changed (its derived constants recomputed): the return before;
2. two episodes of it logged there: the *real steps*;
3. ``diffgym.identify`` of ``DEFAULT_FIT`` (CartPole: masspole, length; Pendulum: m, l) from
   diffgym's defaults, one-step prediction errors;
4. BPTT fine-tuned from the bundled weights on the fitted params (the tuned ``[bptt]`` settings,
   simulated steps only), evaluated on the real system; and, as the bound the identification can
   approach, the same fine-tuning on the true params (*oracle*);
5. our PPO on the real system with the same number of real steps (from the bundled weights, and
   from scratch), and from the bundled weights with ten times as many; PPO runs on diffgym with
   the real constants and the same noise (the parity tests make that gymnasium's physics);
6. what the real system allows: our PPO from scratch there with its whole tuned budget.

Every return is the mean over the env spec's evaluation episodes on the real gymnasium env, the
same episodes for every row of a seed. A robustness table first shows how far the bundled
controllers tolerate the constants the issue suggested.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "sim2real.md"

#: (env, real constants): the bundled controller degrades there (see the robustness table).
CASES = (
    ("CartPole-v1", {"masspole": 1.0, "length": 1.5}),
    ("Pendulum-v1", {"m": 1.2}),
)
#: What the bundled controllers meet under the constants first suggested, and around them.
ROBUSTNESS = (
    ("CartPole-v1", {"masspole": 0.3, "length": 0.8}),
    ("CartPole-v1", {"masspole": 1.0, "length": 1.5}),
    ("CartPole-v1", {"length": 2.0}),
    ("Pendulum-v1", {"m": 1.3, "l": 0.7}),
    ("Pendulum-v1", {"max_torque": 1.5}),
    ("Pendulum-v1", {"m": 1.15}),
    ("Pendulum-v1", {"m": 1.2}),
    ("Pendulum-v1", {"m": 1.3}),
    ("Pendulum-v1", {"m": 1.3, "l": 1.2}),
)
NOISE_LEVELS = (0.0, 0.01)
SEEDS = (0, 1, 2)
PPO_MULTIPLIER = 10


def _physics(physics: dict) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in physics.items())


def robustness(lines: list[str]) -> None:
    import diffgym
    from agents import sim2real
    from agents.common import ASSETS_DIR, evaluate_gymnasium, numpy_policy
    from agents.policy import load_policy_module

    lines += [
        "## How far the bundled controllers carry",
        "",
        "The bundled controller (`agents/assets/<env>`) on gymnasium's numpy env with the constants "
        "changed, and on diffgym's defaults (the spec's evaluation episodes, seeds 1 000 000 + k).",
        "",
        "| env | real constants | on diffgym's defaults | on the real system |",
        "|---|---|---:|---:|",
    ]
    nominal = {}
    for env_id, physics in ROBUSTNESS:
        episodes = diffgym.spec(env_id).eval_episodes
        policy = numpy_policy(load_policy_module(ASSETS_DIR / diffgym.spec(env_id).short_name)[0])
        if env_id not in nominal:
            nominal[env_id] = evaluate_gymnasium(
                policy, env_id, episodes=episodes, seed=sim2real.EVAL_SEED_OFFSET
            )
        real = sim2real.real_system(env_id, physics)
        returns = sim2real.evaluate_real(policy, real.make, episodes=episodes, seed=sim2real.EVAL_SEED_OFFSET)
        lines.append(f"| {env_id} | {_physics(physics)} | {_pm(nominal[env_id])} | {_pm(returns)} |")
    lines.append("")


def _pm(values) -> str:
    values = np.asarray(values, np.float64)
    return f"{values.mean():.1f} ± {values.std():.1f}"


def run_case(env_id: str, physics: dict, noise: float, seed: int, out: Path) -> dict:
    from agents import sim2real
    from agents.common import ASSETS_DIR, numpy_policy

    import diffgym

    start = time.perf_counter()
    record = sim2real.run(
        env_id,
        physics,
        out=out,
        obs_noise=noise,
        ppo=True,
        ppo_from_scratch=True,
        oracle=True,
        seed=seed,
    )
    # PPO from the bundled weights with ten times the real steps.
    real = sim2real.real_system(env_id, physics, obs_noise=noise)
    bundled = ASSETS_DIR / diffgym.spec(env_id).short_name
    budget = PPO_MULTIPLIER * record["real_steps"]
    trained = sim2real.ppo_on_real(real, budget, policy_dir=bundled, seed=seed)
    returns = sim2real.evaluate_real(
        numpy_policy(trained.policy), real.make, episodes=record["eval_episodes"], seed=record["eval_seed"]
    )
    record["ppo_more"] = {"real_steps": int(trained.env_steps), "after": sim2real._stats(returns)}
    # What the real system allows: PPO from scratch with its whole tuned budget there.
    from agents import ppo

    full = sim2real.ppo_on_real(real, ppo.default_config(env_id).total_env_steps, seed=seed)
    returns = sim2real.evaluate_real(
        numpy_policy(full.policy), real.make, episodes=record["eval_episodes"], seed=record["eval_seed"]
    )
    record["ppo_full"] = {"real_steps": int(full.env_steps), "after": sim2real._stats(returns)}
    record["bench_seconds"] = time.perf_counter() - start
    print(
        f"{env_id} {_physics(physics)} noise {noise:g} seed {seed}: before {record['before']['mean']:.1f}, "
        f"after {record['fine_tune']['after']['mean']:.1f}, oracle {record['oracle']['after']['mean']:.1f}, "
        f"ppo {record['ppo']['after']['mean']:.1f}, ppo x{PPO_MULTIPLIER} {record['ppo_more']['after']['mean']:.1f}, "
        f"ppo full budget {record['ppo_full']['after']['mean']:.1f} "
        f"({record['bench_seconds']:.0f} s)",
        flush=True,
    )
    return record


def _mean_sd(values, digits: int = 1) -> str:
    values = np.asarray(values, np.float64)
    return f"{values.mean():.{digits}f} ± {values.std():.{digits}f}"


def tables(records: list[dict], lines: list[str]) -> None:
    lines += [
        "## Identify, then fine-tune",
        "",
        "Means ± standard deviations over seeds 0-2 of each row's mean return on the real system "
        "(evaluation episodes: the spec's, 20 for CartPole, 100 for the Pendulum). *real steps*: the "
        "transitions logged by the bundled controller on the real system (two episodes) and handed to "
        "the identification; nothing else touches the real system but the evaluations. *BPTT, fitted "
        "sim*: fine-tuned from the bundled weights on the identified params, simulated steps in "
        "brackets. *oracle*: the same on the true params. *PPO*: our PPO trained on the real system "
        "with the same real steps (one update), from the bundled weights or from scratch, and from the "
        f"bundled weights with {PPO_MULTIPLIER}x as many. *PPO, full budget*: what the real system "
        "allows a learner given plenty of it: our PPO from scratch there with its whole tuned budget "
        "(real steps in brackets).",
        "",
        "| env | real constants | obs. noise | before | real steps | BPTT, fitted sim (sim steps) | oracle "
        f"| PPO, same steps | PPO from scratch, same steps | PPO, {PPO_MULTIPLIER}x steps | PPO, full budget |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    groups: dict[tuple, list[dict]] = {}
    for record in records:
        key = (record["env"], tuple(record["real"]["physics"].items()), record["real"]["obs_noise"])
        groups.setdefault(key, []).append(record)
    for (env_id, physics, noise), group in groups.items():
        get = lambda path: [_dig(r, path) for r in group]  # noqa: E731
        lines.append(
            f"| {env_id} | {_physics(dict(physics))} | {noise:g} | {_mean_sd(get('before.mean'))} | "
            f"{_mean_sd(get('real_steps'), 0)} | {_mean_sd(get('fine_tune.after.mean'))} "
            f"({_mean_sd(get('fine_tune.sim_steps'), 0)}) | {_mean_sd(get('oracle.after.mean'))} | "
            f"{_mean_sd(get('ppo.after.mean'))} | {_mean_sd(get('ppo_scratch.after.mean'))} | "
            f"{_mean_sd(get('ppo_more.after.mean'))} ({_mean_sd(get('ppo_more.real_steps'), 0)}) | "
            f"{_mean_sd(get('ppo_full.after.mean'))} ({_mean_sd(get('ppo_full.real_steps'), 0)}) |"
        )
    lines += [
        "",
        "### Identified parameters",
        "",
        "Fitted from diffgym's defaults (CartPole masspole 0.1, length 0.5; Pendulum m 1, l 1) on the "
        "logged episodes; *SE*: the report's standard error; *error*: fitted / true - 1.",
        "",
        "| env | obs. noise | seed | real steps | parameter | true | fitted | SE | error |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for record in records:
        ident = record["identify"]
        for name in ident["fit"]:
            lines.append(
                f"| {record['env']} | {record['real']['obs_noise']:g} | {record['seed']} | {record['real_steps']} | "
                f"{name} | {ident['true'][name]:.4g} | {ident['values'][name]:.5g} | "
                f"{ident['standard_errors'][name]:.2g} | {ident['relative_error'][name]:+.1e} |"
            )
    lines += [
        "",
        "### Every run",
        "",
        "| env | obs. noise | seed | before | after (BPTT, fitted) | oracle | PPO | PPO scratch "
        f"| PPO {PPO_MULTIPLIER}x | PPO full budget | fine-tune wall s | run wall s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        lines.append(
            f"| {r['env']} | {r['real']['obs_noise']:g} | {r['seed']} | {_pm_stats(r['before'])} | "
            f"{_pm_stats(r['fine_tune']['after'])} | {_pm_stats(r['oracle']['after'])} | {_pm_stats(r['ppo']['after'])} | "
            f"{_pm_stats(r['ppo_scratch']['after'])} | {_pm_stats(r['ppo_more']['after'])} | {_pm_stats(r['ppo_full']['after'])} | "
            f"{r['fine_tune']['wall_seconds']:.1f} | {r['bench_seconds']:.0f} |"
        )
    lines.append("")


def _pm_stats(stats: dict) -> str:
    return f"{stats['mean']:.1f} ± {stats['std']:.1f}"


def _dig(record: dict, path: str):
    value = record
    for part in path.split("."):
        value = value[part]
    return value


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one seed, no observation noise")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--runs", type=Path, default=Path("runs") / "bench-sim2real", help="per-run folders")
    args = parser.parse_args(argv)

    import jax

    from bench.machine import cpu_model, load_average

    seeds = SEEDS[:1] if args.quick else SEEDS
    noise_levels = NOISE_LEVELS[:1] if args.quick else NOISE_LEVELS
    start = time.perf_counter()
    lines = [
        "# Sim-to-real: identify, then fine-tune",
        "",
        f"Machine: {cpu_model()}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}; "
        f"Python {platform.python_version()}, jax {jax.__version__} on {jax.default_backend()}. "
        f"Load average at the start {load_average()} (a shared machine: wall times are indicative). "
        "Written by `python -m bench.bench_sim2real`.",
        "",
    ]
    robustness(lines)
    records = []
    for env_id, physics in CASES:
        for noise in noise_levels:
            for seed in seeds:
                folder = args.runs / f"{env_id.lower()}-noise{noise:g}-seed{seed}"
                records.append(run_case(env_id, physics, noise, seed, folder))
    tables(records, lines)
    lines.append(f"Load average at the end {load_average()}; {time.perf_counter() - start:.0f} s in all.")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
