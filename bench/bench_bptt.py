"""BPTT training benchmark: env steps and wall time to the goal, over seeds, on this machine.

    python -m bench.bench_bptt                  # 5 seeds, both envs, writes bench/results/bptt.md
    python -m bench.bench_bptt --seeds 2 --settings default

Every (XLA setting, run, seed) trains in a fresh Python process, so each wall time includes
everything a ``train-controller`` user pays after ``import``: compiling the training chunk and the
evaluator, training, and the learning-curve evaluations. Reported apart:

* ``compile`` -- compiling the chunk and (first use in the process) the evaluator;
* ``train`` -- running the compiled chunks (the simulated steps and the updates);
* ``eval`` -- the learning-curve evaluations on the functional env;
* ``cpu`` -- the process's CPU time over ``train()``: on a shared machine the wall time also
  counts waiting for a core, the CPU time less so.

Steps and seconds *to the goal* are read off the learning curve: the first evaluation (functional
env, fresh episodes, hard actions, true reward) whose mean reaches the threshold. The final
return is measured on the gymnasium env (``gymnasium.make("diffgym/<id>")``) with 20 (CartPole) or
100 (Pendulum) episodes of seeds never used in training; "solved" means that number reaches the
threshold.

XLA reads ``XLA_FLAGS`` when jax starts, hence one process per setting: ``default`` and
``one-thread`` (``--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1``).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from bench.machine import cpu_model

RESULTS = Path(__file__).parent / "results" / "bptt.md"
#: Hand-written notes appended to the generated tables: what was tried, where the time goes.
NOTES = """\
## Notes (hand-written; the generator appends them)

**Method.** Online truncated BPTT (`agents/bptt.py`): `num_envs` rollouts run on; every `window`
steps the surrogate cost of those steps is backpropagated through the policy and the physics,
Adam updates the weights (global-norm clipping at 1) and the rollouts carry on from where they
were. One update costs `num_envs * window` env steps, all counted. CartPole: 1 rollout, 20-step
windows, Adam 3e-2, straight-through hard actions, surrogate `(theta / 12°)^2 + 0.1 (x / 2.4 m)^2`,
reset at termination, a curve evaluation (20 functional episodes) every 100 steps, stop at the
first of 500. Pendulum: 1 rollout, 1-step windows with replay (below), the env's cost scored on
the next state plus 30 x the squared energy gap to upright-at-rest, learning rate 3e-3 decaying
linearly to 3e-4 over the 4 000-step budget, a curve evaluation (100 functional episodes) every
250 steps, the policy of the best one returned. Two training-time gradient fixes (forward passes unchanged): the torque's tanh squash passes its
gradient at full slope where the update brings a saturated torque back inside the box
(`agents.policy.inward_tanh`), and the speed clip at ±8 rad/s is straight-through.

**Replay: the Pendulum in 500-750 steps (2026-12-02).** Every simulated step is stored with the
simulator's Jacobian of its next state with respect to the torque (forward mode). After each
simulated step the policy takes 4 Adam steps, each on 64 stored steps drawn uniformly from all
those simulated so far, re-acted by the current policy through the linearised step
`s' + J (policy(s) - a)`. The Pendulum's step is affine in the torque inside its clips, so this
is the surrogate the simulator would give for the new torque, without simulating (and without
counting) a new step; the straight-through speed clip gives the unclipped step's Jacobian. The
online trainer fits the policy to two states per update and forgets; replay fits it to the whole
distribution of states seen so far, four times per step. Seeds 0-9, steps to -200 on the curve
(evaluations every 250 steps): energy weight 30 (the default) 500-750 on all 10 (mean 625);
energy 100: 750-1 750; energy 300 or 1000 with Adam 3e-3: slower and less stable (energy 1000:
2 of 5 seeds within 4 000 steps). One replay update per step at batch 32 or 128: 1 500-4 000 steps
on 2 of 3 seeds. Training for the whole 4 000-step budget (16 000 Adam steps on 64 stored steps
each) takes 0.6-0.9 s after compiling, with XLA's default backend optimisation (level 0, which the
plain trainer uses, made it 2.4 s). The previous session's replay attempt, which fell into the
spinning and stalling optima below, used the old energy weight of 1000 and replayed recent
windows only. The plain trainer's results are kept as the last section of the tables.

**What changed the Pendulum (2026-11-22, seeds 0-9, steps to -200 on the curve).** A one-step
look-ahead that picks the torque minimising the surrogate of the next state (a grid search, not
a trainer) scores -140 over 100 episodes: the surrogate is right, the learning was slow. Two
traps made it so. With `tanh`'s own gradient, a policy that learnt to pump at full torque could
not learn to brake (the gradient through a saturated tanh vanishes): it spun for ever at about
-1 600. Through the env's speed clip the gradient is 0, so a pendulum spinning at the limit got
no signal to brake either. With both fixed, 2 x 4-step windows (the old default) still needed
16 000-19 000 steps (3 of 5 seeds), but 2-step windows on one rollout reached -200 after 4 000 to
13 000 steps on all 10 seeds (mean 7 800; 4 000 steps on one seed, 5 000 on three). Without the
fixes the same windows reached it on 4 of 5 seeds after 4 000-13 000 steps. Tried and not
better: 1-step windows (9 of 10 seeds) or 3-step ones (mean 8 600), learning rates 5e-3 and 2e-2, energy
weight 300, width 64, a 10 000-step budget (9 of 10 seeds), an odd (mirror-symmetric) policy,
short training episodes (50-100 steps), wide training starts (±8 rad/s), Adam's beta1 at 0.5 or
0 (mean 7 700 / 11 600). Replaying stored
windows through the simulator's Jacobians (extra updates from steps already simulated, no new
ones) fell into the same spinning and sideways-stall optima and was dropped.

**Where the time goes.** Training itself is tiny: CartPole well under 0.1 s for its few hundred
steps, Pendulum about 1-2 s for 20 000 steps (10 000 updates). The wall time is compilation and setup:
measured with `time.process_time` in one fresh process, about 2.1 s of CPU to compile the
training chunk (with `xla_backend_optimization_level=0`: ~25% less than the default level, for
~2x slower steps that do not matter at this size), 1.3 s for the first call of
`agents.common.evaluate` (its compile) and 0.5 s of setup. While these ran, other engineers' jobs
kept the load average at 6-12 on the 2 cores, so the wall times are 1.5-2.5x the CPU times; the
`cpu` column (3.7-4.0 s for CartPole, all included) is the better guide to an idle machine.
Pinning XLA to one thread made no measurable difference here (the kernels are tiny; one rollout).

**Pendulum in 4 000 steps, before the gradient fixes (earlier sessions).** Tried at 4 000 steps, seeds 0-1: the env's own cost
alone, windows of 10-50 steps, 1-4 rollouts, Adam 3e-3 to 3e-2 (best -690; most runs -1 000 to
-1 300: a few-step window learns to push straight up and stalls sideways, a local optimum);
whole-episode BPTT (200-step windows, 16 rollouts, even 320 000 steps) only -950. Adding the
energy-gap term (weights 10-3 000, with and without fading it out near the top), windows of 1-16
steps, 1-32 rollouts, wider training starts (theta_dot in ±4 rad/s), short training episodes
(32-64 steps) and learning-rate decay: one run at -226, the rest -600 to -1 500. (The first of
these sweeps scored the env's cost on the state *before* each step, as the env's reward does;
a 1-step window then sees no effect of its action. Scoring the next state is what made the
20 000-step configuration work.) That configuration (2 rollouts, 4-step windows) needed
14 000-16 000 steps for -200 (4 of 5 seeds; seed 3 stalled at -343).

**A learned critic (SHAC-style, `critic_width > 0`; off by default).** A value network learns the
discounted surrogate cost-to-go by TD(lambda) on the windows already simulated (free critic
steps), and each window's loss adds `discount^H V(s_H)`. The critic itself learns what it should:
with the policy frozen it predicts a rollout's discounted cost within 11-17% RMS of the costs'
spread (`tests/test_bptt.py` asserts 25%). It did not bring the 4 000-step goal (mean of the
final 100-episode returns on the functional env, seeds 0-1 unless said; plain trainer, from the
tables above: -1 106 on seeds 0-2, -999 on seeds 0-4):

| critic configuration (rest: the default) | mean at 4 000 steps |
|---|---|
| energy 1000, discount 0.97, window 4, 32 critic steps/update (lr 1e-2) | -1 137 |
| energy 1000, discount 0.9, window 4, 16 critic steps | -1 045 |
| energy 0, discount 0.9-0.98, windows 4-8, 16-32 critic steps | -1 004 to -1 206 |
| energy 30, discount 0.97, windows 4-16, 1-2 rollouts, lr 1e-2 to 2e-2, decay or not | -996 to -1 422 |
| energy 100, discount 0.95-0.97, window 4-8 | -1 197 to -1 279 |
| energy 30, discount 0.9, window 8, 2 rollouts, 32 critic steps (5 seeds) | -982 (-843, -1 087, -822, -1 024, -1 134) |
| the same with 64 critic steps, or 1 rollout, or energy 10 and lr 2e-2 (3 seeds) | -1 128 to -1 253 |

With the critic, the strong energy weight hurts: energy 1000 with discount 0.97 was still at
-1 420 after 16 000 steps (the plain trainer reaches -200 there). At 12 000 steps, energy 30 /
discount 0.97 / window 8 reached -229 at 6 000 steps and -162 at 12 000 on seed 0, but only -486,
-991 and -912 on seeds 1-3: not reliably faster than the plain trainer. Many runs stall near
-1 400 to -1 600 (hanging, or pushing one way: the tanh saturates and the gradient through it
vanishes). Not tried for lack of time: a replay buffer for the critic (it sees only the current
window's 16 states), a target network, bottom-heavy training starts with a critic. The critic also
adds 1-3 s of compile (4.5 s -> 5-8 s on the shared machine, up to 19 s when the load average
was 10). Within the noise of 5 seeds, the critic's best configuration equals the plain trainer at
4 000 steps, so the default stays without it.
"""
SETTINGS = {
    "default": "",
    "one-thread": "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1",
}
#: The Pendulum's default before replay (2026-11-22): online 2-step windows over 20 000 steps.
PLAIN_PENDULUM = {
    "total_env_steps": 20_000, "window": 2, "learning_rate": 1e-2,
    "cost": {"reward": 0.0, "next_state_cost": 1.0, "energy": 1000.0}, "replay_updates": 0, "eval_every": 1_000,
}  # fmt: skip
#: (label, env id, config overrides, goal threshold, goal env steps, goal wall seconds, final episodes)
RUNS = (
    ("CartPole-v1 default", "CartPole-v1", {}, 500.0, 5_000, 15.0, 20),
    ("Pendulum-v1 default (replay, 4 000 steps)", "Pendulum-v1", {}, -200.0, 4_000, 20.0, 100),
    (
        "Pendulum-v1 without replay (the previous default: 2-step windows, 20 000 steps)",
        "Pendulum-v1",
        PLAIN_PENDULUM,
        -200.0,
        4_000,
        20.0,
        100,
    ),
)


# --------------------------------------------------------------------------------------------
# Worker: one training run in this process
# --------------------------------------------------------------------------------------------
def _worker(run_index: int, seed: int) -> dict:
    import numpy as np

    from agents.bptt import default_config, train
    from agents.common import evaluate_gymnasium, numpy_policy

    label, env_id, overrides, threshold, *_rest, final_episodes = RUNS[run_index]
    config = dataclasses.replace(default_config(env_id), **overrides)
    cpu_start = time.process_time()
    result = train(env_id, config, seed=seed)
    cpu_seconds = time.process_time() - cpu_start

    reached = next((p for p in result.curve if p["eval_return"] >= threshold), None)
    returns = evaluate_gymnasium(numpy_policy(result.policy), env_id, episodes=final_episodes, seed=10_000 + 1_000 * seed)
    extra = result.extra
    return {
        "run": label,
        "env_id": env_id,
        "seed": seed,
        "env_steps": result.env_steps,
        "steps_to_goal": reached["env_steps"] if reached else None,
        "wall_to_goal": reached["wall_seconds"] if reached else None,
        "wall_seconds": result.wall_seconds,
        "compile_seconds": result.compile_seconds,
        "train_seconds": extra["train_seconds"],
        "eval_seconds": extra["eval_seconds"],
        "cpu_seconds": cpu_seconds,
        "best_curve_return": max(p["eval_return"] for p in result.curve),
        "final_return": float(np.mean(returns)),
        "final_return_std": float(np.std(returns)),
        "solved": bool(np.mean(returns) >= threshold),
    }


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------
def _run_in_subprocess(setting: str, run_index: int, seed: int) -> dict:
    env = dict(os.environ)
    if SETTINGS[setting]:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + SETTINGS[setting]).strip()
    command = [sys.executable, "-m", "bench.bench_bptt", "--worker", str(run_index), str(seed)]
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{out.stderr[-3000:]}")
    record = json.loads(out.stdout.strip().splitlines()[-1])
    record["setting"] = setting
    return record


def _machine() -> str:
    cpu = cpu_model()
    import jax

    return (
        f"- CPU: {cpu}, {os.cpu_count()} cores visible; load average (1/5/15 min) at the start: "
        f"{', '.join(f'{v:.2f}' for v in os.getloadavg())}\n"
        f"- Python {platform.python_version()}, jax {jax.__version__} ({jax.default_backend()}), "
        f"{platform.system()} {platform.release()}\n"
        f"- {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"
    )


def _fmt(value, digits=1, suffix=""):
    return "—" if value is None else f"{value:.{digits}f}{suffix}"


def _table(records: list[dict]) -> str:
    lines = [
        "| seed | steps to goal | wall to goal (s) | total wall (s) | compile (s) | train (s) | eval (s) "
        "| cpu (s) | best curve return | final return (gymnasium) | solved |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        lines.append(
            f"| {r['seed']} | {r['steps_to_goal'] if r['steps_to_goal'] is not None else '—'} "
            f"| {_fmt(r['wall_to_goal'])} | {_fmt(r['wall_seconds'])} | {_fmt(r['compile_seconds'])} "
            f"| {_fmt(r['train_seconds'], 2)} | {_fmt(r['eval_seconds'], 2)} | {_fmt(r['cpu_seconds'])} "
            f"| {_fmt(r['best_curve_return'])} | {_fmt(r['final_return'])} ± {_fmt(r['final_return_std'])} "
            f"| {'yes' if r['solved'] else 'no'} |"
        )
    return "\n".join(lines)


def _summary(records: list[dict], goal_steps: int, goal_wall: float) -> str:
    import statistics

    solved = sum(r["solved"] for r in records)
    in_budget = sum(
        r["steps_to_goal"] is not None and r["steps_to_goal"] <= goal_steps and r["wall_to_goal"] <= goal_wall
        for r in records
    )
    med = lambda key: statistics.median(r[key] for r in records)  # noqa: E731
    return (
        f"Solved on gymnasium: {solved}/{len(records)}; reached the goal on the curve within "
        f"{goal_steps} steps and {goal_wall:.0f} s: {in_budget}/{len(records)}. Median total wall "
        f"{med('wall_seconds'):.1f} s = compile {med('compile_seconds'):.1f} s + train "
        f"{med('train_seconds'):.2f} s + curve evaluations {med('eval_seconds'):.2f} s (+ setup)."
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--settings", default="default,one-thread", help="default,one-thread")
    all_runs = ",".join(str(i) for i in range(len(RUNS)))
    parser.add_argument("--runs", default=all_runs, help="comma-separated indices into RUNS")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--worker", nargs=2, type=int, metavar=("RUN", "SEED"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        print(json.dumps(_worker(*args.worker)))
        return

    settings = [s for s in args.settings.split(",") if s]
    unknown = set(settings) - set(SETTINGS)
    if unknown:
        raise SystemExit(f"unknown --settings {sorted(unknown)}; choose from {', '.join(SETTINGS)}")
    machine = _machine()
    sections = []
    for run_index in (int(i) for i in args.runs.split(",")):
        label, env_id, overrides, threshold, goal_steps, goal_wall, final_episodes = RUNS[run_index]
        for setting in settings:
            records = []
            for seed in range(args.seeds):
                record = _run_in_subprocess(setting, run_index, seed)
                print(json.dumps(record), flush=True)
                records.append(record)
            sections.append(
                f"### {label}, XLA {setting}\n\nConfig: `default_config({env_id!r})`"
                + (f" with `{overrides}`" if overrides else "")
                + f"; goal: {threshold:g} within {goal_steps} env steps and {goal_wall:.0f} s; final return "
                f"over {final_episodes} gymnasium episodes.\n\n{_table(records)}\n\n"
                f"{_summary(records, goal_steps, goal_wall)}\n"
            )
    text = (
        "# BPTT training benchmark\n\n"
        f"Produced by `python -m bench.bench_bptt --seeds {args.seeds} --settings {','.join(settings)}`; "
        "each row is a fresh process (see the module docstring for what each column times).\n\n"
        f"{machine}\n- load average (1/5/15 min) at the end: "
        f"{', '.join(f'{v:.2f}' for v in os.getloadavg())}\n\n" + "\n".join(sections)
    )
    text += "\n" + NOTES
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
