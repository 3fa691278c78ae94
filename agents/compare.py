"""BPTT against the RL baselines, side by side: steps and seconds to a threshold, final returns.

One command per env (it prints how long each run took)::

    python -m agents.compare --env cartpole --seeds 3 --out bench/results
    train-controller compare --env pendulum --seeds 3 --out bench/results   # same, via the CLI

From Python: ``run_comparison("CartPole-v1", seeds=3, out_dir="bench/results")``.

Every row is a trainer of ``agents.trainers`` with the env's tuned settings (its bundled
``hyperparams.toml``), on seeds ``0 .. N-1``; two rows only change one setting, to say what the
gradient owes to the surrogate cost (``ROWS``):

* ``bptt``: the env's gradient trainer (BPTT, or the trebuchet's aiming network), tuned;
* ``bptt-reward``: the same on the env's own reward, no surrogate term (``cost = {reward: 1}``);
* ``bptt-triples``: the same with a stochastic policy and the stochastic-triple gradient
  (``estimator = "triples"``, over the ``[bptt-triples]`` table of the env's hyperparams, if any);
  discrete-action envs trained by ``bptt`` only, so not among the default rows;
* ``ppo``: our PPO, tuned, on the env's reward;
* ``ppo-shaped``: the same PPO learning from BPTT's shaped cost (``shaped_cost``);
* ``sb3``: the Stable-Baselines3 peer (PPO or SAC, RL-Zoo's settings).

Each run's learning curve (``env_steps``, ``wall_seconds``, ``eval_return``) comes from its
trainer; the threshold (the env spec's ``reward_threshold``) is reached at the first evaluation
after training started whose mean return is at least it. The final policy of every run is then
evaluated on the gymnasium shell (``agents.common.evaluate_gymnasium``, deterministic actions,
true reward, the spec's ``eval_episodes``), the same episodes for every row.

Outputs in ``out_dir``: ``compare_<env>.md`` (summary table, mean ± std over seeds, then one row
per run), ``compare_<env>.png`` (learning curves against env steps and against wall-clock
seconds, log x) and ``compare_<env>.json`` (every run's numbers and curve).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

import diffgym
from agents.common import TrainResult, evaluate_gymnasium, numpy_policy, tuned_settings
from agents.policy import atomic_write_text
from agents.trainers import gradient_trainer, trainer

#: The rows of a comparison, in table order.
ALGORITHMS: tuple[str, ...] = ("bptt", "bptt-reward", "bptt-triples", "ppo", "ppo-shaped", "sb3")
#: The rows run when none are named: every row but ``bptt-triples``, which a box action space or
#: another gradient trainer (the trebuchet's aiming network) cannot run.
DEFAULT_ALGORITHMS: tuple[str, ...] = tuple(algo for algo in ALGORITHMS if algo != "bptt-triples")

_COLORS = {"bptt": "tab:red", "bptt-reward": "salmon", "bptt-triples": "tab:purple", "ppo": "tab:blue", "ppo-shaped": "lightblue", "sb3": "tab:green"}


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
    return TrainResult(None, {}, 0, 0.0, 0.0, curve).to_threshold(threshold)


@dataclasses.dataclass(frozen=True)
class Row:
    """One row of a comparison: a trainer of ``agents.trainers`` and the config it runs with."""

    label: str
    trainer: str
    config: Any

    def train(self, env_id: str, seed: int, budget: int | None = None) -> TrainResult:
        config = self.config if budget is None else dataclasses.replace(self.config, total_env_steps=int(budget))
        return trainer(self.trainer).train(env_id, config, seed=seed)


def comparison_row(row: str, env_id: str) -> Row:
    """The ``Row`` named ``row`` for ``env_id``; ImportError when its trainer's extra is missing.
    Every row goes through the one trainer interface; the two variants change one config field."""
    if row not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {row!r}; choose from {', '.join(ALGORITHMS)}")
    gradient = gradient_trainer(env_id)
    gradient_label = "BPTT (diffgym)" if gradient == "bptt" else f"BPTT {gradient} network (diffgym)"
    name = {"bptt": gradient, "bptt-reward": gradient, "bptt-triples": gradient, "ppo-shaped": "ppo"}.get(row, row)
    config = trainer(name).default_config(env_id)
    if row == "bptt":
        return Row(gradient_label, name, config)
    if row == "bptt-reward":
        return Row(f"{gradient_label}, env reward only", name, dataclasses.replace(config, cost={"reward": 1.0}))
    if row == "bptt-triples":
        env_spec = diffgym.spec(env_id)
        if name != "bptt" or env_spec.action_kind() != "discrete":
            raise ValueError(
                f"the bptt-triples row samples a discrete action and trains with BPTT; {env_spec.id} has "
                f"a {env_spec.action_kind()} action space and the gradient trainer {name!r}. Run it on a "
                "discrete-action env trained by bptt (CartPole-v1, KickedCartPole-v1, Acrobot-v1, ...)."
            )
        overrides = tuned_settings(env_id, "bptt-triples") or {}
        triples = dataclasses.replace(config, **{**overrides, "estimator": "triples"})
        return Row(f"{gradient_label}, stochastic triples", name, triples)
    if row == "ppo":
        return Row("PPO (diffgym, JAX)", name, config)
    if row == "ppo-shaped":
        shaped = trainer(gradient).default_config(env_id).cost
        return Row("PPO (diffgym, JAX), BPTT's shaped cost", name, dataclasses.replace(config, shaped_cost=shaped))
    return Row(f"SB3 {config.algo.upper()} ({config.source})", name, config)


def run_comparison(
    env_id: str,
    *,
    seeds: int | Sequence[int] = 3,
    out_dir: str | Path = "bench/results",
    algos: Sequence[str] = DEFAULT_ALGORITHMS,
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
        algos: rows of ``ALGORITHMS`` (default ``DEFAULT_ALGORITHMS``). A row whose trainer's extra is missing is skipped with a
            note in the table (SB3: ``pip install 'diffgym[baselines]'``).
        budgets: env-step budget per algorithm (``{"ppo": 20_000}``), overriding the default
            config's ``total_env_steps``; the others keep their defaults.
        final_eval_episodes: gymnasium episodes of the final evaluation (default: the env spec's
            ``eval_episodes``).
        keep_other_algos: re-run only ``algos`` and keep the other algorithms' runs from the
            existing ``compare_<env>.json`` in ``out_dir`` (e.g. after one trainer changed); the
            table says which rows were kept.
        log: called with one line per finished run (``None``: silent).

    Returns:
        One ``RunRecord`` per run, in the order trained.
    """
    env_spec = diffgym.spec(env_id)
    env_id = env_spec.id
    if env_spec.reward_threshold is None:
        raise ValueError(f"{env_id} has no reward_threshold in its EnvSpec: a comparison measures steps to it")
    seed_list = list(range(seeds)) if isinstance(seeds, (int, np.integer)) else [int(s) for s in seeds]
    if not seed_list or min(seed_list) < 0:
        raise ValueError(f"seeds must be a positive count or non-negative seeds, got {seeds!r}")
    unknown = [algo for algo in algos if algo not in ALGORITHMS]
    if unknown:
        raise ValueError(f"unknown algorithms {unknown}; choose from {', '.join(ALGORITHMS)}")
    budgets = dict(budgets or {})
    threshold = env_spec.reward_threshold
    episodes = final_eval_episodes or env_spec.eval_episodes
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    say = log or (lambda line: None)

    records: list[RunRecord] = []
    skipped: dict[str, str] = {}
    started = time.perf_counter()
    load_before = _load_average()
    for algo in algos:
        try:
            row = comparison_row(algo, env_id)
        except ImportError as error:
            skipped[algo] = str(error)
            say(f"[{algo}] skipped: {error}")
            continue
        for seed in seed_list:
            result = row.train(env_id, seed, budgets.get(algo))
            steps, seconds = time_to_threshold(result.curve, threshold)
            returns = evaluate_gymnasium(numpy_policy(result.policy), env_id, episodes=episodes, seed=10_000 + seed)
            record = RunRecord(
                algo=algo, label=row.label, seed=seed, env_steps=int(result.env_steps),
                wall_seconds=float(result.wall_seconds), compile_seconds=float(result.compile_seconds),
                steps_to_threshold=steps, seconds_to_threshold=seconds,
                final_return_mean=float(np.mean(returns)), final_return_std=float(np.std(returns)),
                curve=[{k: float(v) for k, v in point.items()} for point in result.curve],
            )
            records.append(record)
            reached = "not reached" if steps is None else f"reached at {steps} steps, {seconds:.1f} s"
            say(
                f"[{row.label} seed {seed}] threshold {threshold:g} {reached}; "
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
        # Kept runs (--keep-other-algos) may have other seeds than this invocation's.
        "env_id": env_id, "threshold": threshold, "seeds": sorted({r.seed for r in records} | set(seed_list)),
        "final_eval_episodes": episodes,
        "notes": list((tuned_settings(env_id, "compare") or {}).get("notes", [])),
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
        "- Rows: BPTT tuned; BPTT on the env's own reward with no surrogate term (cost {reward: 1}); "
        "our PPO on the env's reward; our PPO learning from BPTT's shaped cost instead (shaped_cost, "
        "the same weights BPTT uses); the Stable-Baselines3 peer. A claim \"BPTT needs N times fewer "
        "steps\" should say which PPO row it rests on.",
        *_triples_note(records),
        *meta.get("notes", []),
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


def _triples_note(records: list[RunRecord]) -> list[str]:
    if not any(r.algo == "bptt-triples" for r in records):
        return []
    return [
        (
            "- The stochastic-triples row trains a sampled (Bernoulli/categorical) policy, evaluated at its "
            "mode. Its env steps count the sampled rollouts only, as for every BPTT row; its gradient also "
            "re-simulates one alternative window per policy weight (forward mode), which the simulator does "
            "without an env step being taken, like the backward pass of the other BPTT rows: the wall "
            "seconds include that cost."
        )
    ]


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


def _spans_decades(records: list[RunRecord], threshold: float) -> bool:
    """Whether every return is negative and they span more than a factor 20 (a log axis reads better)."""
    returns = np.array([p["eval_return"] for r in records for p in r.curve])
    return bool(returns.size and np.all(returns < 0) and returns.min() / returns.max() > 20)


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
        if _spans_decades(records, meta["threshold"]):
            # Returns falling by orders of magnitude (misses from tens of metres to under one):
            # linear below the threshold's magnitude, logarithmic above.
            ax.set_yscale("symlog", linthresh=abs(meta["threshold"]) or 1.0)
            ax.set_ylim(top=0.0)
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
    parser.add_argument("--env", required=True, help=f"one of {', '.join(diffgym.registered_envs())} (or an alias)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0 .. N-1 per algorithm (default 3)")
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="output folder")
    parser.add_argument(
        "--algos", nargs="+", default=list(DEFAULT_ALGORITHMS), choices=ALGORITHMS,
        help="algorithms to run (default: all but bptt-triples)",
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
    if diffgym.spec(env_id).reward_threshold is None:
        parser.error(f"{env_id} has no reward_threshold in its EnvSpec; a comparison needs one")
    run_comparison(
        env_id, seeds=args.seeds, out_dir=args.out, algos=args.algos, keep_other_algos=args.keep_other_algos
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
