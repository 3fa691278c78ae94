"""Per-step time of diffgym's gymnasium shells beside gymnasium's own envs.

    python -m bench.bench_shell            # writes bench/results/shell.md

Times, in one run and one process per XLA setting: gymnasium's numpy CartPole-v1 and Pendulum-v1,
the diffgym shells of both, gymnasium's own JAX ``phys2d/CartPole-v1`` (needs flax, part of
``pip install 'diffgym[bench]'``), each raw (``env.unwrapped``) and as ``gymnasium.make`` returns
it (TimeLimit, OrderEnforcing, PassiveEnvChecker), so like is compared with like; plus the vector
envs. Only ``step`` calls are timed (each call on its own clock; resets are left out). Actions are
numpy scalars / float32 arrays, what Stable-Baselines3's DummyVecEnv hands an env. The repeats of
all rows are interleaved (every row once per round), so a change in the machine's load moves a
column's rows together. The whole table is measured under three process-wide settings (``CONFIGS``: XLA's default threading, XLA pinned to
one thread, and that plus synchronous CPU dispatch); the numpy rows, which these settings do not
touch, show the run-to-run noise.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from bench.machine import cpu_model, load_average

SINGLE_THREAD_XLA = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
#: The process-wide settings compared, as environment variables of a fresh process each.
CONFIGS = {
    "default": {},
    "XLA one thread": {"XLA_FLAGS": SINGLE_THREAD_XLA},
    "XLA one thread, sync dispatch": {
        "XLA_FLAGS": SINGLE_THREAD_XLA,
        "JAX_CPU_ENABLE_ASYNC_DISPATCH": "false",
    },
}
RESULTS = Path(__file__).parent / "results" / "shell.md"


def _actions(env, steps: int, seed: int = 0):
    space = env.action_space
    rng = np.random.default_rng(seed)
    if hasattr(space, "n"):
        return list(rng.integers(0, space.n, size=steps))  # np.int64 scalars, as SB3 passes them
    return list(rng.uniform(space.low, space.high, size=(steps,) + space.shape).astype(np.float32))


def _step_repeat(env, steps: int):
    """``(warm_up, one_repeat)`` for ``env``: one repeat is the mean time of one ``step`` call over
    ``steps`` calls (each on its own clock, resets untimed), in microseconds."""
    actions = _actions(env, steps)
    clock = time.perf_counter

    def warm_up():
        env.reset(seed=0)
        for action in actions[: min(500, steps)]:  # compilation, caches
            if any(env.step(action)[2:4]):
                env.reset()

    def one_repeat() -> float:
        total = 0.0
        env.reset(seed=1)
        for action in actions:
            started = clock()
            _, _, terminated, truncated, _ = env.step(action)
            total += clock() - started
            if terminated or truncated:
                env.reset()
        return total / steps * 1e6

    return warm_up, one_repeat


def _vector_step_repeat(envs, steps: int):
    """``(warm_up, one_repeat)`` for a vector env: the mean time of one vector ``step``, in us."""
    envs.action_space.seed(0)
    actions = [envs.action_space.sample() for _ in range(min(steps, 64))]

    def warm_up():
        envs.reset(seed=0)
        for action in actions:
            envs.step(action)

    def one_repeat() -> float:
        started = time.perf_counter()
        for i in range(steps):
            envs.step(actions[i % len(actions)])
        return (time.perf_counter() - started) / steps * 1e6

    return warm_up, one_repeat


def time_interleaved(cases: dict, repeats: int) -> dict:
    """Median and min over ``repeats`` of every case's repeat, in microseconds per step.

    The repeats are interleaved (every case once per round, as ``bench.throughput`` does) so that a
    change in the machine's load during the run moves all rows together and the ratios of one
    column stay meaningful."""
    for warm_up, _ in cases.values():
        warm_up()
    per_step: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, (_, one_repeat) in cases.items():
            per_step[name].append(one_repeat())
    return {name: {"median_us": statistics.median(v), "min_us": min(v)} for name, v in per_step.items()}


def measure(steps: int, repeats: int, num_envs: int) -> dict:
    """Every row of the table under the current process's XLA settings."""
    import gymnasium

    import diffgym  # noqa: F401 -- registers diffgym/*
    from diffgym.gym import DiffgymEnv

    rows, cases, envs = {}, {}, []

    def add(name, make_env, steps=steps):
        try:
            env = make_env()
        except Exception as error:  # an optional baseline that is not installed
            rows[name] = {"error": f"{type(error).__name__}: {error}".splitlines()[0][:120]}
            return
        rows[name] = None  # keeps the table's row order
        cases[name] = _step_repeat(env, steps)
        envs.append(env)

    # Compilation on the first reset+step of a fresh shell (nothing cached in this process yet).
    for env_id in ("CartPole-v1", "Pendulum-v1"):
        started = time.perf_counter()
        env = DiffgymEnv(env_id)
        env.reset(seed=0)
        env.step(env.action_space.sample())
        elapsed_ms = (time.perf_counter() - started) * 1e3
        rows[f"first reset+step (compile), diffgym/{env_id}"] = {"once_ms": elapsed_ms}

    for env_id in ("CartPole-v1", "Pendulum-v1"):
        add(f"gymnasium {env_id} (numpy), raw", lambda: gymnasium.make(env_id).unwrapped)
        add(f"diffgym/{env_id} shell, raw", lambda: gymnasium.make(f"diffgym/{env_id}").unwrapped)
        add(f"gymnasium {env_id} (numpy), gymnasium.make", lambda: gymnasium.make(env_id))
        add(f"diffgym/{env_id} shell, gymnasium.make", lambda: gymnasium.make(f"diffgym/{env_id}"))
    # gymnasium's own JAX shell is ~20x slower: fewer steps keep the run short.
    jax_cartpole = "phys2d/CartPole-v1"
    add(f"gymnasium {jax_cartpole} (JAX), raw", lambda: gymnasium.make(jax_cartpole).unwrapped, steps // 10)
    add(f"gymnasium {jax_cartpole} (JAX), gymnasium.make", lambda: gymnasium.make(jax_cartpole), steps // 10)

    from gymnasium.envs.classic_control.cartpole import CartPoleVectorEnv

    vector_steps = max(steps // 10, 100)
    for name, make_vector in (
        (f"gymnasium CartPoleVectorEnv (numpy), {num_envs} envs, per vector step",
         lambda: CartPoleVectorEnv(num_envs=num_envs)),
        (f"diffgym/CartPole-v1 make_vec, {num_envs} envs, per vector step",
         lambda: gymnasium.make_vec("diffgym/CartPole-v1", num_envs=num_envs)),
    ):
        vector = make_vector()
        rows[name] = None
        cases[name] = _vector_step_repeat(vector, vector_steps)
        envs.append(vector)

    rows.update(time_interleaved(cases, repeats))
    for env in envs:
        env.close()
    return rows


def _child(settings: dict[str, str], args) -> dict:
    """Run ``measure`` in a fresh process (XLA flags and the dispatch mode are read at jax's start)."""
    env = {**os.environ, **settings}
    command = [sys.executable, "-m", "bench.bench_shell", "--child", "--steps", str(args.steps),
               "--repeats", str(args.repeats), "--num-envs", str(args.num_envs)]
    output = subprocess.run(command, env=env, check=True, capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parent.parent).stdout
    return json.loads(output.strip().splitlines()[-1])


def _machine(load_at_start: str) -> str:
    import gymnasium
    import jax

    cpu = cpu_model()
    load = load_average()
    return (
        f"- CPU: {cpu}, {os.cpu_count()} cores visible; load average (1/5/15 min) at the start: "
        f"{load_at_start}; at the end: {load}\n"
        f"- Python {platform.python_version()} ({sys.prefix}), jax {jax.__version__} "
        f"({jax.default_backend()}), gymnasium {gymnasium.__version__}, numpy {np.__version__}\n"
        f"- {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    )


def _cell(row: dict | None) -> str:
    if row is None:
        return "-"
    if "error" in row:
        return f"n/a ({row['error']})"
    if "once_ms" in row:
        return f"{row['once_ms']:.0f} ms"
    return f"{row['median_us']:.1f} (min {row['min_us']:.1f})"


def report(results: dict[str, dict], args) -> str:
    lines = [
        "# Gymnasium shell: time per `step` call",
        "",
        "Produced by `python -m bench.bench_shell` "
        f"(`--steps {args.steps} --repeats {args.repeats} --num-envs {args.num_envs}`).",
        "",
        _machine(args.load_at_start),
        "",
        "Microseconds per `step` call: median over the repeats (min in brackets); only `step` is timed.",
        "\"raw\" is `env.unwrapped`; \"gymnasium.make\" adds TimeLimit, OrderEnforcing and",
        "PassiveEnvChecker. Columns: process-wide settings, each measured in a fresh process --",
        f"\"XLA one thread\": `XLA_FLAGS=\"{SINGLE_THREAD_XLA}\"`; \"sync dispatch\": also",
        "`JAX_CPU_ENABLE_ASYNC_DISPATCH=false` (jax runs each CPU computation inline). diffgym sets",
        "neither: they are the user's choice for a process.",
        "",
        "| case | " + " | ".join(results) + " |",
        "|---|" + "---|" * len(results),
    ]
    first = next(iter(results.values()))
    for name in first:
        lines.append(f"| {name} | " + " | ".join(_cell(rows.get(name)) for rows in results.values()) + " |")
    lines += ["", "Ratios diffgym shell / gymnasium numpy (medians of the same column):", ""]
    for env_id in ("CartPole-v1", "Pendulum-v1"):
        for variant in ("raw", "gymnasium.make"):
            ratios = []
            for config, rows in results.items():
                ours = rows.get(f"diffgym/{env_id} shell, {variant}", {})
                theirs = rows.get(f"gymnasium {env_id} (numpy), {variant}", {})
                if "median_us" in ours and "median_us" in theirs:
                    ratios.append(f"{config}: {ours['median_us'] / theirs['median_us']:.2f}x")
            lines.append(f"- {env_id}, {variant}: " + "; ".join(ratios))
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10_000, help="timed steps per repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--num-envs", type=int, default=64, help="envs in the vector rows")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.steps, args.repeats, args.num_envs)))
        return
    args.load_at_start = load_average()
    results = {name: _child(settings, args) for name, settings in CONFIGS.items()}
    text = report(results, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
