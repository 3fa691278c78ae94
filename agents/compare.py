"""BPTT against the RL baselines, side by side: steps and seconds to a threshold, final returns.

One command per env (it prints how long each run took)::

    python -m agents.compare --env cartpole --seeds 3 --out bench/results
    train-controller compare --env pendulum --seeds 3 --out bench/results   # same, via the CLI

From Python: ``run_comparison("CartPole-v1", seeds=3, out_dir="bench/results")``.

Every algorithm trains with its own tuned defaults (``agents.bptt.default_config``,
``agents.ppo.default_config``, ``agents.sb3.default_config``) on seeds ``0 .. N-1``. Each run's
learning curve (``env_steps``, ``wall_seconds``, ``eval_return``) comes from its trainer; the
threshold is reached at the first evaluation after training started whose mean return is at
least the env's threshold (``THRESHOLDS``). The final policy of every run is then evaluated on the
gymnasium shell (``agents.common.evaluate_gymnasium``, deterministic actions, true reward), the
same episodes for every algorithm.

Outputs in ``out_dir``: ``compare_<env>.md`` (summary table, mean ± std over seeds, then one row
per run), ``compare_<env>.png`` (learning curves against env steps and against wall-clock
seconds, log x) and ``compare_<env>.json`` (every run's numbers and curve).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

import diffgym
from agents.common import TrainResult, evaluate_gymnasium
from agents.policy import atomic_write_text

#: Mean evaluation return that counts as solving the task.
#: Trebuchet-v0: -1 m, a mean absolute miss of at most 1 m over the evaluation shots. About 7 %
#: of the task distribution's targets are out of reach (far targets in head winds), and their
#: misses keep even a perfect aimer's mean near -0.7 m (agents.trebuchet's aiming network ends at
#: -0.78 m over 1000 shots), so -1 m asks for aiming within a few tens of centimetres on the
#: reachable targets; the aiming network's own goal is stricter still (median miss <= 0.3 % of
#: the target, ~0.2 m).
THRESHOLDS: dict[str, float] = {"CartPole-v1": 475.0, "Pendulum-v1": -200.0, "Trebuchet-v0": -1.0}

#: Episodes of the final evaluation on the gymnasium shell (as the CLI's metrics.json).
#: A Trebuchet episode is one shot: 500 shots at random targets and winds.
FINAL_EVAL_EPISODES: dict[str, int] = {"CartPole-v1": 20, "Pendulum-v1": 100, "Trebuchet-v0": 500}

#: Algorithms compared, in table order: our BPTT, our PPO, the Stable-Baselines3 peer.
ALGORITHMS: tuple[str, ...] = ("bptt", "ppo", "sb3")

_LABELS = {"bptt": "BPTT (diffgym)", "ppo": "PPO (diffgym, JAX)"}
_COLORS = {"bptt": "tab:red", "ppo": "tab:blue", "sb3": "tab:green"}


@dataclasses.dataclass
class RunRecord:
    """One training run and its evaluation."""

    algo: str
    label: str
    seed: int
    env_steps: int
    wall_seconds: float
    compile_seconds: float
    steps_to_threshold: int | None
    seconds_to_threshold: float | None
    final_return_mean: float
    final_return_std: float
    curve: list[dict]


def short_name(env_id: str) -> str:
    """``"CartPole-v1"`` -> ``"cartpole"`` (the file-name part of the outputs)."""
    return diffgym.spec(env_id).short_name


def time_to_threshold(curve: list[dict], threshold: float) -> tuple[int | None, float | None]:
    """``(env_steps, wall_seconds)`` of the first curve point after step 0 whose ``eval_return``
    reaches ``threshold``; ``(None, None)`` if none does."""
    for point in curve:
        if point["env_steps"] > 0 and point["eval_return"] >= threshold:
            return int(point["env_steps"]), float(point["wall_seconds"])
    return None, None


def _trainer(algo: str, env_id: str) -> tuple[str, Callable[[int, int | None], TrainResult]]:
    """``(label, train(seed, budget))`` for ``algo``; ImportError when its module is missing."""
    if algo == "bptt" and env_id == "Trebuchet-v0":
        # What `train-controller --env trebuchet --algo bptt` runs: the aiming network trained
        # through the simulator; every simulated shot is one env step.
        aiming = importlib.import_module("agents.trebuchet")

        def train_aiming(seed: int, budget: int | None) -> TrainResult:
            config = aiming.default_config(env_id)
            if budget is not None:
                config = dataclasses.replace(config, total_env_steps=int(budget))
            return aiming.train_aiming(config, seed=seed)

        return _LABELS["bptt"], train_aiming
    if algo in ("bptt", "ppo"):
        module = importlib.import_module(f"agents.{algo}")
        label = _LABELS[algo]
    elif algo == "sb3":
        module = importlib.import_module("agents.sb3")
        if not module.available():
            raise ImportError(f"Stable-Baselines3 is not installed: {module.INSTALL_HINT}")
        sb3_config = module.default_config(env_id)
        label = f"SB3 {sb3_config.algo.upper()} ({getattr(sb3_config, 'source', 'RL-Zoo')})"
    else:
        raise ValueError(f"unknown algorithm {algo!r}; choose from {', '.join(ALGORITHMS)}")

    def train(seed: int, budget: int | None) -> TrainResult:
        config = module.default_config(env_id)
        if budget is not None:
            config = dataclasses.replace(config, total_env_steps=int(budget))
        return module.train(env_id, config, seed=seed)

    return label, train


def _numpy_policy(policy) -> Callable[[np.ndarray], Any]:
    """A jitted ``obs -> action`` for an ``agents.policy.Policy``; SB3's callables pass through."""
    from agents.policy import Policy

    if not isinstance(policy, Policy):
        return policy
    import equinox as eqx
    import jax

    weights, static = eqx.partition(policy, eqx.is_array)
    act = jax.jit(lambda weights, obs: eqx.combine(weights, static)(obs))
    if policy.kind == "bernoulli":
        return lambda obs: int(act(weights, np.asarray(obs, np.float32)))
    return lambda obs: np.asarray(act(weights, np.asarray(obs, np.float32)), np.float32)


def run_comparison(
    env_id: str,
    *,
    seeds: int | Sequence[int] = 3,
    out_dir: str | Path = "bench/results",
    algos: Sequence[str] = ALGORITHMS,
    budgets: dict[str, int] | None = None,
    final_eval_episodes: int | None = None,
    keep_other_algos: bool = False,
    log: Callable[[str], None] | None = print,
) -> list[RunRecord]:
    """Train every algorithm in ``algos`` on ``env_id`` with several seeds; write table and plot.

    Args:
        env_id: an id or short name (``"cartpole"``, ``"Pendulum-v1"``, ``"trebuchet"``).
        seeds: a number N (seeds ``0 .. N-1``) or the seeds themselves.
        out_dir: where ``compare_<env>.md``, ``.png`` and ``.json`` are written (created if needed).
        algos: any of ``"bptt"``, ``"ppo"``, ``"sb3"``. An algorithm whose module or extra is
            missing is skipped with a note in the table (SB3: ``pip install 'diffgym[baselines]'``).
        budgets: env-step budget per algorithm (``{"ppo": 20_000}``), overriding the default
            config's ``total_env_steps``; the others keep their defaults.
        final_eval_episodes: gymnasium episodes of the final evaluation (default
            ``FINAL_EVAL_EPISODES[env]``).
        keep_other_algos: re-run only ``algos`` and keep the other algorithms' runs from the
            existing ``compare_<env>.json`` in ``out_dir`` (e.g. after one trainer changed); the
            table says which rows were kept.
        log: called with one line per finished run (``None``: silent).

    Returns:
        One ``RunRecord`` per run, in the order trained.
    """
    env_id = diffgym.resolve_env_id(env_id)
    if env_id not in THRESHOLDS:
        raise ValueError(f"no comparison threshold for {env_id!r}; supported: {', '.join(THRESHOLDS)}")
    seed_list = list(range(seeds)) if isinstance(seeds, (int, np.integer)) else [int(s) for s in seeds]
    if not seed_list or min(seed_list) < 0:
        raise ValueError(f"seeds must be a positive count or non-negative seeds, got {seeds!r}")
    unknown = [algo for algo in algos if algo not in ALGORITHMS]
    if unknown:
        raise ValueError(f"unknown algorithms {unknown}; choose from {', '.join(ALGORITHMS)}")
    budgets = dict(budgets or {})
    threshold = THRESHOLDS[env_id]
    episodes = final_eval_episodes or FINAL_EVAL_EPISODES[env_id]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    say = log or (lambda line: None)

    records: list[RunRecord] = []
    skipped: dict[str, str] = {}
    started = time.perf_counter()
    load_before = _load_average()
    for algo in algos:
        try:
            label, train = _trainer(algo, env_id)
        except ImportError as error:
            skipped[algo] = str(error)
            say(f"[{algo}] skipped: {error}")
            continue
        for seed in seed_list:
            result = train(seed, budgets.get(algo))
            steps, seconds = time_to_threshold(result.curve, threshold)
            returns = evaluate_gymnasium(
                _numpy_policy(result.policy), env_id, episodes=episodes, seed=10_000 + seed
            )
            record = RunRecord(
                algo=algo, label=label, seed=seed, env_steps=int(result.env_steps),
                wall_seconds=float(result.wall_seconds), compile_seconds=float(result.compile_seconds),
                steps_to_threshold=steps, seconds_to_threshold=seconds,
                final_return_mean=float(np.mean(returns)), final_return_std=float(np.std(returns)),
                curve=[{k: float(v) for k, v in point.items()} for point in result.curve],
            )
            records.append(record)
            reached = "not reached" if steps is None else f"reached at {steps} steps, {seconds:.1f} s"
            say(
                f"[{label} seed {seed}] threshold {threshold:g} {reached}; "
                f"trained {record.env_steps} steps in "
                f"{record.wall_seconds:.1f} s (compile {record.compile_seconds:.1f} s); "
                f"final return {record.final_return_mean:.1f} ± {record.final_return_std:.1f}"
            )
    total_seconds = time.perf_counter() - started

    name = short_name(env_id)
    kept: dict[str, Any] = {}
    previous_path = out_dir / f"compare_{name}.json"
    if keep_other_algos and previous_path.exists():
        previous = json.loads(previous_path.read_text())
        old = [RunRecord(**run) for run in previous["runs"] if run["algo"] not in algos]
        records = sorted(old + records, key=lambda r: ALGORITHMS.index(r.algo))
        kept = {"algos": sorted({r.algo for r in old}, key=ALGORITHMS.index),
                "load_average": previous.get("load_average"), "total_seconds": previous.get("total_seconds")}
    meta = {
        "env_id": env_id, "threshold": threshold, "seeds": seed_list, "final_eval_episodes": episodes,
        "budgets": budgets, "skipped": skipped, "total_seconds": total_seconds, "machine": _machine(),
        "load_average": [load_before, _load_average()], "kept_from_previous_run": kept,
    }
    atomic_write_text(out_dir / f"compare_{name}.md", _markdown(records, meta))
    atomic_write_text(
        out_dir / f"compare_{name}.json",
        json.dumps({**meta, "runs": [dataclasses.asdict(r) for r in records]}, indent=1),
    )
    _plot(records, meta, out_dir / f"compare_{name}.png")
    say(f"wrote {out_dir / f'compare_{name}.md'} and .png, .json ({total_seconds:.0f} s in all)")
    return records


#: Lines added to the table's "How to read it" for one env.
_ENV_NOTES: dict[str, list[str]] = {
    "Trebuchet-v0": [
        "- Trebuchet: an episode is one shot and its return is minus the miss |distance - target| "
        "in m, so the evaluation return is minus the mean miss. One env step is one simulated shot "
        "for every algorithm: BPTT (agents.trebuchet.train_aiming, the aiming network trained by "
        "gradients through the simulator) counts each shot it simulates; the updates it replays "
        "from recent shots through their linearised distances (AimingConfig.replay_updates) "
        "simulate none and count none. Its learning curve is measured on 1000 fixed random tasks "
        "every AimingConfig.eval_every shots and it spends its whole budget (no early stop). PPO "
        "evaluates on 1000 shots, SAC on 200.",
        "- Threshold -1 m: about 7 % of the targets are out of reach in their wind, so even a "
        "perfect aimer's mean miss is about 0.7 m; see THRESHOLDS in agents/compare.py.",
    ],
}


# --------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------
def _load_average() -> float | None:
    """The 1-minute load average (runnable processes): above the core count, timings are inflated."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _machine() -> str:
    import jax

    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
        f"Python {platform.python_version()}, jax {jax.__version__} ({jax.default_backend()})"
    )


def _mean_std(values: list[float], fmt: str) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{format(float(np.mean(values)), fmt)} ± {format(float(np.std(values)), fmt)}"


def _markdown(records: list[RunRecord], meta: dict) -> str:
    env_id, threshold = meta["env_id"], meta["threshold"]
    lines = [
        f"# {env_id}: BPTT against the RL baselines",
        "",
        f"Threshold: mean evaluation return ≥ {threshold:g}. Seeds: {', '.join(map(str, meta['seeds']))}. "
        f"Mean ± std over the seeds that reached it (steps, seconds) or over all seeds (final return).",
        "",
        "| algorithm | reached | env steps to threshold | wall s to threshold | compile s | "
        f"final return ({meta['final_eval_episodes']} gymnasium episodes) | env steps trained |",
        "|---|---|---|---|---|---|---|",
    ]
    for label in dict.fromkeys(r.label for r in records):
        runs = [r for r in records if r.label == label]
        solved = [r for r in runs if r.steps_to_threshold is not None]
        lines.append(
            f"| {label} | {len(solved)}/{len(runs)} "
            f"| {_mean_std([r.steps_to_threshold for r in solved], ',.0f')} "
            f"| {_mean_std([r.seconds_to_threshold for r in solved], '.1f')} "
            f"| {_mean_std([r.compile_seconds for r in runs], '.1f')} "
            f"| {_mean_std([r.final_return_mean for r in runs], '.1f')} "
            f"| {_mean_std([r.env_steps for r in runs], ',.0f')} |"
        )
    for algo, why in meta["skipped"].items():
        lines.append(f"| {algo} | skipped: {why} | | | | | |")
    lines += [
        "",
        "Per run:",
        "",
        "| algorithm | seed | env steps to threshold | wall s to threshold | wall s in all | compile s "
        "| final return | env steps trained |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        to_steps = "—" if r.steps_to_threshold is None else f"{r.steps_to_threshold:,}"
        to_seconds = "—" if r.seconds_to_threshold is None else f"{r.seconds_to_threshold:.1f}"
        lines.append(
            f"| {r.label} | {r.seed} | {to_steps} | {to_seconds} | {r.wall_seconds:.1f} "
            f"| {r.compile_seconds:.1f} "
            f"| {r.final_return_mean:.1f} ± {r.final_return_std:.1f} | {r.env_steps:,} |"
        )
    lines += [
        "",
        "How to read it:",
        "",
        "- Env steps count every step of every parallel env during training; evaluation episodes do "
        "not count.",
        "- Wall seconds run from the start of the trainer call and include JAX compilation (the compile "
        "column is the part spent compiling). SB3's evaluation time is excluded from its clock (its "
        "evaluations step gymnasium envs through torch and are not free); ours take milliseconds and are "
        "included.",
        "- The threshold is checked at each trainer's own evaluation points: BPTT's and PPO's on the "
        "functional env (agents.common.evaluate), SB3's on the gymnasium shell, each with its "
        "default number of episodes; a run stops at the first evaluation that reaches its trainer's "
        "default stop target (PPO and SB3: the threshold; BPTT: its default_config's stop_at_return, "
        "500 on CartPole when this was written) or at the end of its budget.",
        "- The final return is every final policy on the same gymnasium episodes (seeds 10000 + seed ...).",
        "- All seeds of one algorithm run in one process: BPTT's and PPO's later seeds reuse the first "
        "seed's compiled training function (same env and config), so their compile column is near 0 "
        "and their wall seconds are training only; seed 0's row is what a fresh process pays.",
        *_ENV_NOTES.get(env_id, []),
        "",
        f"Machine: {meta['machine']}. Total time of this comparison: {meta['total_seconds']:.0f} s.",
        _load_note(meta),
        _kept_note(meta),
        "",
        f"Command: `python -m agents.compare --env {short_name(env_id)} --seeds {len(meta['seeds'])} "
        "--out DIR`",
        "",
    ]
    return "\n".join(lines)


def _load_note(meta: dict) -> str:
    loads = [v for v in meta.get("load_average", []) if v is not None]
    if not loads:
        return ""
    cores = os.cpu_count() or 1
    loads_text = " and ".join(f"{v:g}" for v in loads)
    note = f"1-minute load average at the start and end: {loads_text} on {cores} cores"
    if max(loads) > cores:
        note += (
            " — the machine was shared while this ran, so wall-clock and compile times are inflated "
            "and noisy"
        )
    return note + "."


def _kept_note(meta: dict) -> str:
    kept = meta.get("kept_from_previous_run") or {}
    if not kept.get("algos"):
        return ""
    loads = " and ".join(f"{v:g}" for v in (kept.get("load_average") or []) if v is not None)
    return (
        f"The rows of {', '.join(kept['algos'])} were kept from a previous run of this comparison "
        f"(`--keep-other-algos`; that run's load average: {loads or 'not recorded'}); the total time "
        "above is this invocation's only."
    )


def _plot(records: list[RunRecord], meta: dict, path: Path) -> None:
    """Two panels: eval return against env steps and against wall seconds, log x, one line per run."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4.2), dpi=110)
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, 2, sharey=True)
    labelled: set[str] = set()
    for r in records:
        color = _COLORS.get(r.algo, "tab:gray")
        label = None if r.label in labelled else r.label
        labelled.add(r.label)
        steps = np.array([p["env_steps"] for p in r.curve])
        seconds = np.array([p["wall_seconds"] for p in r.curve])
        returns = np.array([p["eval_return"] for p in r.curve])
        keep = steps > 0  # log axis: the untrained point sits at 0 steps
        style = {"color": color, "alpha": 0.8, "lw": 1.4, "marker": ".", "ms": 3}
        axes[0].plot(steps[keep], returns[keep], label=label, **style)
        axes[1].plot(seconds, returns, **style)
    for ax, xlabel in zip(axes, ("env steps (training)", "wall-clock seconds (compilation included)")):
        ax.axhline(meta["threshold"], color="black", ls="--", lw=1)
        ax.set_xscale("log")
        if meta["env_id"] == "Trebuchet-v0":
            # Misses fall from tens of metres to under one: linear below 1 m, logarithmic above.
            ax.set_yscale("symlog", linthresh=1.0)
            ax.set_ylim(top=0.0)  # a return is minus a miss: never positive
        ax.set_xlabel(xlabel)
        ax.grid(True, which="both", alpha=0.25)
    axes[0].set_ylabel("evaluation return (deterministic policy)")
    if records:
        axes[0].legend(loc="best", fontsize=8)
    figure.suptitle(
        f"{meta['env_id']}: learning curves, {len(meta['seeds'])} seeds each "
        f"(dashed: threshold {meta['threshold']:g})"
    )
    figure.tight_layout()
    figure.savefig(path)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agents.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--env", required=True, help="cartpole, pendulum, trebuchet (or an id)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0 .. N-1 per algorithm (default 3)")
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="output folder")
    parser.add_argument(
        "--algos", nargs="+", default=list(ALGORITHMS), choices=ALGORITHMS, help="algorithms to run"
    )
    parser.add_argument(
        "--keep-other-algos", action="store_true",
        help="re-run only --algos; keep the other algorithms' runs from the existing compare_<env>.json",
    )
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error(f"--seeds must be at least 1, got {args.seeds}")
    try:
        env_id = diffgym.resolve_env_id(args.env)
    except ValueError as error:
        parser.error(str(error))
    if env_id not in THRESHOLDS:
        parser.error(f"no comparison for {env_id}; supported: {', '.join(THRESHOLDS)}")
    run_comparison(
        env_id, seeds=args.seeds, out_dir=args.out, algos=args.algos, keep_other_algos=args.keep_other_algos
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
