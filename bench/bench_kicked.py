"""Can BPTT balance the kicked CartPole? A sweep of its settings, both gradient estimators.

Run ``python -m bench.bench_kicked``. Writes ``bench/results/stochastic_training/kicked_sweep.md``.

With CartPole's tuned settings neither BPTT estimator reaches 475 on KickedCartPole-v1. This sweep
asks what the kicks need: more rollouts averaged per update, longer windows, other step sizes, a
decaying step size, other surrogate weights, budgets up to 100 000 steps, for the straight-through
and the stochastic-triple estimator alike, three seeds each. A row reports, per seed, the best and
the last evaluation return of the learning curve (mean over the env's 20 evaluation episodes, hard
action), the env steps at which the curve first reached 475, if it did, and how the first seed's
returned policy ends 64 fresh episodes: at the track's edge (|x| > 2.4), at the angle threshold,
or not at all (500 steps).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import diffgym
from agents.bptt import BPTTConfig, train
from agents.bptt import default_config as bptt_default_config
from bench.machine import cpu_model, load_average

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results" / "stochastic_training" / "kicked_sweep.md"
THRESHOLD = 475.0

#: A surrogate that pays for the cart's drift: the position 10x, the speeds (the tuned kicked setting).
FAR = {"reward": 0.0, "angle": 1.0, "position": 10.0, "speed": 1.0}

#: Settings laid over the tuned CartPole ones (total_env_steps 5 000, 1 rollout, window 20, 3e-2).
SWEEP: tuple[dict, ...] = (
    {"total_env_steps": 20_000},
    {"total_env_steps": 20_000, "num_envs": 8},
    {"total_env_steps": 20_000, "num_envs": 8, "window": 50},
    {"total_env_steps": 20_000, "num_envs": 8, "learning_rate": 1e-2},
    {"total_env_steps": 20_000, "num_envs": 8, "window": 50, "cost": {"reward": 0.0, "angle": 1.0, "position": 0.5}},
    {"total_env_steps": 20_000, "num_envs": 8, "window": 50,
     "cost": {"reward": 0.0, "angle": 1.0, "position": 1.0, "speed": 0.1}},
    {"total_env_steps": 20_000, "num_envs": 8, "window": 50,
     "cost": {"reward": 0.0, "angle": 1.0, "position": 0.3, "speed": 0.3}},
    {"total_env_steps": 100_000, "num_envs": 8, "window": 50, "learning_rate": 1e-2,
     "final_learning_rate_fraction": 0.05},
    {"total_env_steps": 100_000, "num_envs": 32, "window": 50, "learning_rate": 3e-3},
    {"total_env_steps": 20_000, "num_envs": 8, "window": 100, "cost": {"reward": 0.0, "angle": 1.0, "position": 1.0}},
    {"total_env_steps": 20_000, "num_envs": 8, "window": 50, "cost": FAR},
    {"total_env_steps": 20_000, "num_envs": 1, "window": 20, "cost": FAR},
    {"total_env_steps": 20_000, "num_envs": 1, "window": 50, "cost": FAR},
    {"total_env_steps": 20_000, "num_envs": 1, "window": 50, "cost": FAR, "learning_rate": 1e-2, "temperature": 0.3},
)  # fmt: skip


def run(estimator: str, overrides: dict, seeds: range) -> tuple[list[tuple[int | None, float, float, float]], dict]:
    """Per seed ``(steps to threshold, best, last, wall s)``; and how seed 0's policy ends episodes."""
    rows, endings = [], {}
    for seed in seeds:
        eval_every = 1_000 if overrides["total_env_steps"] <= 20_000 else 5_000
        settings = {**dataclasses.asdict(cartpole_config()), "estimator": estimator, "eval_every": eval_every, **overrides}
        result = train("kickedcartpole", BPTTConfig(**settings), seed=seed)
        returns = [point["eval_return"] for point in result.curve]
        rows.append((result.to_threshold(THRESHOLD)[0], max(returns), returns[-1], result.wall_seconds))
        if not endings:
            endings = episode_endings(result.policy)
    return rows, endings


def episode_endings(policy, episodes: int = 64) -> dict[str, int]:
    """How ``policy`` (hard action) ends fresh KickedCartPole episodes: counts of ``edge`` (the
    cart past x_threshold), ``angle`` (the pole past theta_threshold) and ``survived`` (500 steps)."""
    env, params = diffgym.make("kickedcartpole")

    def episode(key):
        reset_key, key = jax.random.split(key)
        _, state = env.reset(reset_key, params)

        def step(carry, step_key):
            state, ended, edge = carry
            action = policy(env.get_obs(state, params))
            _, next_state, _, terminated, _ = env.step_env(step_key, state, action, params)
            at_edge = jnp.abs(next_state.x) > params.x_threshold
            edge = jnp.where(ended, edge, terminated & at_edge)
            return (jax.tree.map(lambda a, b: jnp.where(ended, a, b), state, next_state), ended | terminated, edge), None

        (_, ended, edge), _ = jax.lax.scan(step, (state, jnp.array(False), jnp.array(False)),
                                           jax.random.split(key, int(params.max_steps_in_episode)))  # fmt: skip
        return ended, edge

    ended, edge = jax.jit(jax.vmap(episode))(jax.random.split(jax.random.key(12345), episodes))
    ended, edge = np.asarray(ended), np.asarray(edge)
    return {"edge": int(edge.sum()), "angle": int((ended & ~edge).sum()), "survived": int((~ended).sum())}


def cartpole_config() -> BPTTConfig:
    """CartPole's tuned BPTT settings, the sweep's base (the kicked env's own tuned ones are a row)."""
    return bptt_default_config("cartpole")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    load_at_start, start = load_average(), time.time()
    lines = [
        "# KickedCartPole-v1: BPTT settings swept, both estimators",
        "",
        f"Produced by `python -m bench.bench_kicked --seeds {args.seeds}`. Threshold {THRESHOLD:g}; per seed: "
        "best / last evaluation return on the learning curve (20 episodes, hard action), and the steps "
        "at which the curve reached the threshold (— if never).",
        "",
        "| estimator | settings over CartPole's tuned ones | reached | best return per seed | last return per seed | wall s per seed | seed 0's episodes: edge / angle / 500 steps |",
        "|---|---|---|---|---|---|---|",
    ]
    best_overall = 0.0
    for estimator in ("straight_through", "triples"):
        for overrides in SWEEP:
            rows, endings = run(estimator, overrides, range(args.seeds))
            reached = [steps for steps, *_ in rows if steps is not None]
            best_overall = max(best_overall, *(best for _, best, _, _ in rows))
            settings = ", ".join(f"{key} = {value}" for key, value in overrides.items())
            cells = [
                estimator, settings, f"{len(reached)}/{len(rows)}" + (f" ({', '.join(map(str, reached))})" if reached else ""),
                " / ".join(f"{best:.0f}" for _, best, _, _ in rows),
                " / ".join(f"{last:.0f}" for _, _, last, _ in rows),
                " / ".join(f"{seconds:.1f}" for *_, seconds in rows),
                f"{endings['edge']} / {endings['angle']} / {endings['survived']}",
            ]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
            print(lines[-1], flush=True)
    lines += [
        "",
        f"Best evaluation return anywhere in the sweep: {best_overall:.0f}.",
        "",
        f"- CPU: {cpu_model()}; load average (1/5/15 min) at the start: {load_at_start}; at the end: "
        f"{load_average()}; {time.time() - start:.0f} s in all; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
