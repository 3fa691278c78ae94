"""``train-controller``: train a controller, watch it play, compare trainers.

::

    train-controller --env cartpole --algo bptt --seed 0 --out runs/cartpole
    train-controller --env pendulum --algo ppo --config.lr 3e-4
    train-controller play --env pendulum [--policy DIR] [--record out.gif] [--episodes N]
    train-controller compare --env cartpole --seeds 3 --out runs/compare
    train-controller identify --env cartpole --data log.npz --out runs/fit [--fit masspole length]
    train-controller sim2real --env cartpole --real masspole=1.0 length=1.5 --out runs/sim2real

Training writes ``DIR/policy.json`` + ``DIR/policy.eqx`` (load with ``agents.load_policy(DIR)``)
and ``DIR/metrics.json``; the returns it reports come from the gymnasium env with hard actions
and the true reward. Every hyper-parameter lives in the algorithm's config dataclass
(``agents.bptt.BPTTConfig``, ``agents.ppo.PPOConfig``, ``agents.trebuchet.AimingConfig``), with the
env's tuned values as defaults; the CLI exposes each field as ``--config.<field>``, and
``run_training`` takes the same dataclass from Python. The trainers are found through
``agents.trainers`` and the envs through diffgym's registry: neither list is written here.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Generic, Literal, Sequence, TypeVar

import numpy as np

import diffgym

PROG = "train-controller"

#: ``--algo`` choices: the trainers of ``agents.trainers`` whose result is a diffgym checkpoint
#: (Stable-Baselines3's models run in ``compare`` only).
ALGORITHMS: tuple[str, ...] = ("bptt", "ppo", "aiming")

#: Evaluation episode ``k`` of a run with seed ``s`` resets with seed ``EVAL_SEED_OFFSET + 1000 s + k``:
#: episodes the trainer never drew its own starts from, and the same ones for every algorithm.
EVAL_SEED_OFFSET = 1_000_000

ConfigT = TypeVar("ConfigT")


class UsageError(Exception):
    """A bad flag or argument: reported as ``train-controller: error: ...`` with exit status 2."""


# --------------------------------------------------------------------------------------------
# Argument dataclasses (tyro turns each into a parser; their docstrings are the --help text)
# --------------------------------------------------------------------------------------------
def _env_list() -> str:
    return ", ".join(f"{spec.short_name} ({env_id})" for env_id in diffgym.registered_envs() for spec in [diffgym.spec(env_id)])


def _train_description() -> str:
    return f"""Train a controller; write DIR/policy.json, DIR/policy.eqx and DIR/metrics.json.

Environments: {_env_list()}.
Algorithms: {", ".join(ALGORITHMS)} (default: the env's gradient trainer, bptt or aiming).

The --config.* options below are those of the chosen --algo, with the defaults tuned for the
chosen --env (e.g. `train-controller --env pendulum --algo ppo --help`).

Other commands: `train-controller play --help` (watch a controller live, or record a GIF),
`train-controller compare --help` (BPTT against the RL baselines over several seeds),
`train-controller identify --help` (fit physical params to logged episodes) and
`train-controller sim2real --help` (identify a changed "real" system, fine-tune on the fit)."""


@dataclasses.dataclass
class TrainArgs(Generic[ConfigT]):
    env: str
    """Environment: an alias or id from the list above (cartpole, CartPole-v1, diffgym/CartPole-v1)."""
    config: ConfigT
    """Hyper-parameters of the chosen algorithm (defaults tuned per env)."""
    algo: str | None = None
    """Training algorithm: bptt (backpropagation through time), ppo or aiming (the trebuchet's
    aiming network); None: the env's gradient trainer."""
    seed: int = 0
    """Random seed (a non-negative integer): network initialisation and training rollouts."""
    out: Path | None = None
    """Output folder for the checkpoint and metrics.json; None: runs/<env>-<algo>-seed<seed>."""
    eval_episodes: int | None = None
    """Gymnasium episodes of the final evaluation; None: the env's (its EnvSpec's eval_episodes)."""
    render: bool = False
    """Show rollouts of the current policy in a pygame window while it trains."""
    progress: bool = True
    """Show a progress bar with the current loss and return."""


@dataclasses.dataclass
class PlayArgs:
    """Run a controller live in a pygame window, or record it headless to a GIF.

    Without --policy, plays the controller bundled in agents/assets/<env>/ (no training needed)."""

    env: str | None = None
    """Environment (an alias or id); optional when --policy is given."""
    policy: Path | None = None
    """Checkpoint folder written by `train-controller --out DIR`; None: the bundled controller."""
    record: Path | None = None
    """Record to this .gif (or .mp4 when imageio-ffmpeg is installed) instead of opening a window."""
    episodes: int | None = None
    """Episodes to play; None: until the window is closed (1 when recording)."""
    seed: int = 0
    """Episode k starts from the reset with seed (seed + k)."""
    max_steps: int | None = None
    """Cut each episode after this many steps; None: the env's own time limit."""


@dataclasses.dataclass
class CompareArgs:
    """Train BPTT and the RL baselines on one env over several seeds, each with its tuned defaults.

    Writes compare_<env>.md (steps and seconds to the threshold, final gymnasium returns),
    compare_<env>.png (learning curves against env steps and wall-clock seconds) and
    compare_<env>.json to --out."""

    env: str
    """Environment (an alias or id)."""
    seeds: int = 3
    """Number of seeds per algorithm (seeds 0 .. N-1)."""
    out: Path = Path("bench/results")
    """Output folder for the table, plot and JSON."""
    algos: tuple[Literal["bptt", "bptt-reward", "ppo", "ppo-shaped", "sb3"], ...] = (
        "bptt", "bptt-reward", "ppo", "ppo-shaped", "sb3"
    )  # fmt: skip
    """Rows to compare (bptt-reward: BPTT on the env's reward alone; ppo-shaped: PPO on BPTT's
    shaped cost; sb3 needs pip install 'diffgym[baselines]' and is skipped without it)."""
    budgets: dict[str, int] = dataclasses.field(default_factory=dict)
    """Env-step budget per algorithm overriding its default, e.g. --budgets ppo 20000."""
    eval_episodes: int | None = None
    """Gymnasium episodes of each final evaluation; None: the env's (its EnvSpec's eval_episodes)."""


@dataclasses.dataclass
class IdentifyArgs:
    """Fit an env's physical parameters to logged episodes (diffgym.identify, Levenberg-Marquardt
    on one-step prediction errors through the env's own step).

    Writes DIR/params.json: the fitted values, their standard errors, the identifiability report
    (condition number, unidentifiable directions, correlations) and the whole fitted params, and
    prints a summary. From Python: agents.sim2real.identify_episodes and identify_json."""

    env: str
    """Environment (an alias or id) whose params are fitted."""
    data: Path
    """An .npz of logged episodes as diffgym.identify.save_episodes writes it: observations
    (N, *obs), actions (N, ...) and episode_starts (N,) (True at each episode's first row)."""
    out: Path
    """Output folder for params.json."""
    fit: tuple[str, ...] = ()
    """Parameters to fit (names of the env's params fields); empty: the env's default set
    (agents.sim2real.DEFAULT_FIT: what logged observations determine)."""
    horizon: int = 1
    """Transitions per simulated window (1: one-step prediction errors, the right choice for
    noisy logs; see diffgym.identify)."""


@dataclasses.dataclass
class Sim2RealArgs:
    """The sim-to-real pipeline on a "real" system whose constants differ from diffgym's defaults.

    The controller (default: the bundled one) is evaluated on the real system, logs --episodes
    episodes there, the params are identified from them, and the controller is fine-tuned by BPTT
    on the fitted simulator and evaluated on the real system again, beside our PPO fine-tuned on
    the real system for the same number of real steps. Writes DIR/report.md, DIR/report.json,
    DIR/params.json, DIR/episodes.npz and the checkpoints DIR/fine_tuned (and DIR/ppo).
    From Python: agents.sim2real.run."""

    env: str
    """Environment (an alias or id)."""
    real: tuple[str, ...]
    """The real system's constants as PARAM=VALUE items (diffgym param names), e.g.
    --real masspole=1.0 length=1.5; unnamed ones keep diffgym's defaults."""
    out: Path
    """Output folder of the report, the data and the checkpoints."""
    fit: tuple[str, ...] = ()
    """Parameters to identify; empty: the env's default set (agents.sim2real.DEFAULT_FIT)."""
    policy: Path | None = None
    """Checkpoint folder of the controller to transfer; None: the bundled one."""
    obs_noise: float = 0.0
    """Standard deviation of Gaussian noise on every observation of the real system."""
    backend: Literal["auto", "gymnasium", "diffgym"] = "auto"
    """The real system: gymnasium's numpy env with the constants set (where gymnasium has the env:
    auto's choice), or diffgym's gymnasium shell with hidden params."""
    episodes: int = 2
    """Episodes logged on the real system for the identification (the real steps)."""
    exploration: float = 0.0
    """Probability of a random action in place of the controller's while logging."""
    fine_tune_steps: int | None = None
    """Simulated env steps of the fine-tuning; None: the env's tuned BPTT budget."""
    eval_episodes: int | None = None
    """Real-system episodes of each evaluation; None: the env's (its EnvSpec's eval_episodes)."""
    seed: int = 0
    """Seeds the logged episodes, the fine-tuning and PPO (evaluation episodes follow it too)."""
    ppo: bool = True
    """Also fine-tune our PPO on the real system for the same number of real steps."""


# --------------------------------------------------------------------------------------------
# Training, callable from Python
# --------------------------------------------------------------------------------------------
def algorithm_module(algo: str | None, env_id: str):
    """The trainer module for ``--algo`` (``agents.trainers``; None: the env's gradient trainer);
    UsageError for an unknown one or a missing extra."""
    from agents import trainers

    if algo is None:
        algo = trainers.gradient_trainer(env_id)
    if algo not in ALGORITHMS:
        raise UsageError(f"unknown --algo {algo!r}; choose one of: {', '.join(ALGORITHMS)}")
    try:
        return trainers.trainer(algo)
    except ImportError as error:
        raise UsageError(str(error)) from None


def default_config(env_id: str, algo: str | None = None):
    """The algorithm's config dataclass with its defaults for ``env_id``."""
    env_id = _resolve_env(env_id)
    return _default_config(algorithm_module(algo, env_id), env_id)


def _default_config(module, env_id: str):
    try:
        return module.default_config(env_id)
    except ValueError as error:  # the trainer does not handle this env
        raise UsageError(f"--algo {module.NAME} cannot train {env_id}: {error}") from None


def run_training(
    env: str,
    algo: str | None = None,
    *,
    seed: int = 0,
    out: str | os.PathLike | None = None,
    config: Any = None,
    eval_episodes: int | None = None,
    render: bool = False,
    progress: bool = True,
) -> dict:
    """Train, checkpoint, evaluate on gymnasium, write ``metrics.json``; returns the metrics.

    Args:
        env: env name or id.
        algo: ``"bptt"``, ``"ppo"`` or ``"aiming"``; None: the env's gradient trainer.
        seed: non-negative training seed.
        out: output folder (default ``runs/<env>-<algo>-seed<seed>``).
        config: the algorithm's config dataclass (default: ``default_config(env, algo)``).
        eval_episodes: gymnasium evaluation episodes (default: the env spec's ``eval_episodes``).
        render: show rollouts of the improving policy in a pygame window.
        progress: show a tqdm progress bar.

    Nothing is written until training has finished. Then the files of an earlier run in ``out``
    are removed (``metrics.json`` first), the checkpoint is written (``policy.json`` last) and
    ``metrics.json`` after the evaluation, each atomically: whatever interrupts it, a folder
    holding ``metrics.json`` holds one complete run, and one holding ``policy.json`` a complete
    checkpoint.
    """
    env_id = _resolve_env(env)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise UsageError(f"--seed must be a non-negative integer, got {seed!r}")
    episodes = diffgym.spec(env_id).eval_episodes if eval_episodes is None else eval_episodes
    if episodes < 1:
        raise UsageError(f"--eval-episodes must be at least 1, got {episodes}")
    module = algorithm_module(algo, env_id)
    algo = module.NAME
    if config is None:
        config = _default_config(module, env_id)
    out = Path(out) if out is not None else default_out_dir(env_id, algo, seed)

    from agents.common import evaluate_gymnasium
    from agents.policy import CHECKPOINT_SPEC, atomic_write_text, load_policy, save_policy

    viewer = None
    if render and not getattr(module, "supports_render", True):
        raise UsageError(f"--render is not available for {env_id}; watch the result with `{PROG} play`")
    if render:
        from agents.play import TrainingViewer

        try:
            viewer = TrainingViewer(env_id)
        except RuntimeError as error:
            raise UsageError(str(error)) from None
    bar = ProgressBar(env_id, algo, config, enabled=progress)
    render_fn = None if viewer is None else (lambda policy: viewer(policy, bar.last_info))
    try:
        result = module.train(env_id, config, seed=seed, progress_fn=bar, render_fn=render_fn)
    finally:
        bar.close()
        if viewer is not None:
            viewer.close()

    for stale in ("metrics.json", CHECKPOINT_SPEC):  # never pair a new file with an old run's
        (out / stale).unlink(missing_ok=True)
    save_policy(out, result.policy, result.spec, env_id=env_id, algo=algo, seed=seed)
    # Evaluate the checkpoint as written, so the numbers describe what load_policy gives a user.
    eval_seed = EVAL_SEED_OFFSET + 1000 * seed
    eval_start = time.perf_counter()
    returns = evaluate_gymnasium(load_policy(out), env_id, episodes=episodes, seed=eval_seed)
    metrics = {
        "env": env_id,
        "algo": algo,
        "seed": seed,
        "env_steps": int(result.env_steps),
        "wall_seconds": float(result.wall_seconds),
        "compile_seconds": float(result.compile_seconds),
        "eval_return_mean": float(np.mean(returns)),
        "eval_return_std": float(np.std(returns)),
        "eval_episodes": int(episodes),
        "eval_seed": eval_seed,
        "eval_wall_seconds": time.perf_counter() - eval_start,
        "eval_returns": [float(r) for r in returns],
        "curve": result.curve,
        "config": config,
        "config_class": f"{type(config).__module__}.{type(config).__qualname__}",
        "extra": result.extra,
    }
    metrics = to_jsonable(metrics)
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    return metrics


def default_out_dir(env_id: str, algo: str, seed: int) -> Path:
    return Path("runs") / f"{diffgym.spec(env_id).short_name}-{algo}-seed{seed}"


def to_jsonable(value: Any) -> Any:
    """``value`` with dataclasses, numpy/JAX numbers and arrays, paths and tuples made JSON-safe.

    Non-finite floats become ``None`` (strict JSON has no NaN).
    """
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, (str, bool)) or value is None:
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "shape") and hasattr(value, "dtype"):  # numpy and JAX arrays and scalars
        array = np.asarray(value)
        if array.dtype.kind in "biu":
            return array.tolist()
        if array.dtype.kind == "f":
            return to_jsonable(array.tolist()) if array.ndim else to_jsonable(float(array))
        return array.tolist()
    return repr(value)


class ProgressBar:
    """A tqdm bar fed by a trainer's ``progress_fn(info)``.

    Advances to ``info["env_steps"]`` out of the config's step budget when both are known, else
    counts calls; shows the numeric entries of ``info`` (loss, returns) as the postfix.
    """

    _BUDGET_FIELDS = ("total_env_steps", "total_timesteps", "env_steps")
    _HIDDEN = {"env_steps", "wall_seconds", "compile_seconds", "step", "iteration", "update", "updates"}

    def __init__(self, env_id: str, algo: str, config: Any, *, enabled: bool = True):
        from tqdm.auto import tqdm

        total = next((getattr(config, f) for f in self._BUDGET_FIELDS if hasattr(config, f)), None)
        self._by_steps = isinstance(total, int)
        self._bar = tqdm(
            total=total if self._by_steps else None,
            desc=f"{algo} {env_id}",
            unit=" steps" if self._by_steps else " updates",
            unit_scale=self._by_steps,
            disable=not enabled,
            dynamic_ncols=True,
        )
        #: The latest report (shown in the --render window's caption).
        self.last_info: dict = {}

    def __call__(self, info: dict) -> None:
        self.last_info = dict(info)
        if self._by_steps and "env_steps" in info:
            self._bar.update(max(0, int(info["env_steps"]) - self._bar.n))
        elif not self._by_steps:
            self._bar.update(1)
        shown = {
            k: f"{float(v):.4g}"
            for k, v in info.items()
            if k not in self._HIDDEN and np.ndim(v) == 0 and isinstance(_scalar(v), (int, float))
        }
        if shown:
            self._bar.set_postfix(shown, refresh=False)

    def close(self) -> None:
        self._bar.close()


def _scalar(value):
    try:
        return np.asarray(value).item()
    except (TypeError, ValueError):
        return None


def _resolve_env(env: str) -> str:
    try:
        return diffgym.resolve_env_id(env)
    except (ValueError, TypeError) as error:
        raise UsageError(str(error)) from None


# --------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------
def _train_command(argv: list[str]) -> int:
    import tyro

    # --env and --algo decide which config dataclass (and defaults) --config.* refers to, so
    # they are read first; tyro then parses everything, --help included.
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--env")
    pre.add_argument("--algo", default=None)
    known, _ = pre.parse_known_args(argv)
    wants_help = any(a in ("-h", "--help") for a in argv)
    if known.env is None and not wants_help:
        raise UsageError(f"--env is required: one of {_env_list()}; see `{PROG} --help`")
    # `--help` without --env shows the first registered env's defaults.
    env_id = _resolve_env(known.env) if known.env is not None else diffgym.registered_envs()[0]
    module = algorithm_module(known.algo, env_id)
    config = _default_config(module, env_id)
    env_default = known.env if known.env is not None else tyro.MISSING
    defaults = TrainArgs(env=env_default, config=config, algo=module.NAME)
    try:
        args = tyro.cli(
            TrainArgs[type(config)],
            args=argv,
            default=defaults,
            prog=PROG,
            description=_train_description(),
        )
    except ValueError as error:  # a config's own validation (__post_init__) rejected a value
        raise UsageError(str(error)) from None
    metrics = run_training(
        args.env,
        args.algo,
        seed=args.seed,
        out=args.out,
        config=args.config,
        eval_episodes=args.eval_episodes,
        render=args.render,
        progress=args.progress,
    )
    out = args.out if args.out is not None else default_out_dir(metrics["env"], metrics["algo"], args.seed)
    print(
        f"{metrics['env']} {metrics['algo']} seed {args.seed}: eval return "
        f"{metrics['eval_return_mean']:.2f} ± {metrics['eval_return_std']:.2f} over "
        f"{metrics['eval_episodes']} gymnasium episodes; {metrics['env_steps']} env steps in "
        f"{metrics['wall_seconds']:.1f} s ({metrics['compile_seconds']:.1f} s compiling); saved to {out}"
    )
    return 0


def _play_command(argv: list[str]) -> int:
    import tyro

    from agents.play import play

    args = tyro.cli(PlayArgs, args=argv, prog=f"{PROG} play")
    if args.env is not None:
        _resolve_env(args.env)
    if args.episodes is not None and args.episodes < 1:
        raise UsageError(f"--episodes must be at least 1, got {args.episodes}")
    if args.max_steps is not None and args.max_steps < 1:
        raise UsageError(f"--max-steps must be at least 1, got {args.max_steps}")
    if args.seed < 0:
        raise UsageError(f"--seed must be a non-negative integer, got {args.seed}")
    try:
        play(
            args.env,
            policy_dir=args.policy,
            episodes=args.episodes,
            record=args.record,
            seed=args.seed,
            max_steps=args.max_steps,
        )
    except (FileNotFoundError, ValueError) as error:
        raise UsageError(str(error)) from None
    return 0


def _compare_command(argv: list[str]) -> int:
    import tyro

    args = tyro.cli(CompareArgs, args=argv, prog=f"{PROG} compare")
    env_id = _resolve_env(args.env)
    if args.seeds < 1:
        raise UsageError(f"--seeds must be at least 1, got {args.seeds}")
    try:
        from agents.compare import run_comparison
    except ModuleNotFoundError as error:
        if error.name != "agents.compare":
            raise
        raise UsageError("compare is not available in this checkout (agents.compare is missing)") from None
    unknown = sorted(set(args.budgets) - set(args.algos))
    if unknown:
        raise UsageError(f"--budgets names {unknown}, which are not among --algos {list(args.algos)}")
    if any(steps < 1 for steps in args.budgets.values()):
        raise UsageError(f"--budgets must be positive step counts, got {args.budgets}")
    if args.eval_episodes is not None and args.eval_episodes < 1:
        raise UsageError(f"--eval-episodes must be at least 1, got {args.eval_episodes}")
    try:
        run_comparison(
            env_id,
            seeds=args.seeds,
            out_dir=args.out,
            algos=args.algos,
            budgets=args.budgets,
            final_eval_episodes=args.eval_episodes,
        )
    except ValueError as error:  # e.g. an env the comparison has no threshold for
        raise UsageError(str(error)) from None
    return 0


def _fit_names(env_id: str, fit: Sequence[str]) -> tuple[str, ...]:
    """``--fit`` checked against the env's params (the closest name for a typo); empty: the
    env's default set."""
    from agents import sim2real
    from diffgym.registry import did_you_mean

    params = diffgym.make(env_id)[1]
    fields = [f.name for f in dataclasses.fields(params)]
    real_valued = [name for name in fields if isinstance(getattr(params, name), float)]
    for name in fit:
        if name not in fields:
            raise UsageError(
                f"--fit {name!r}: {env_id} has no parameter {name!r}.{did_you_mean(name, fields)} "
                f"Parameters: {', '.join(fields)}."
            )
        if name not in real_valued:
            raise UsageError(
                f"--fit {name!r}: {name} = {getattr(params, name)!r} is not a real-valued parameter of {env_id} "
                f"and cannot be fitted; these can: {', '.join(real_valued)}."
            )
    try:
        return sim2real._fit_names(env_id, fit)
    except ValueError as error:
        raise UsageError(str(error)) from None


def _identify_command(argv: list[str]) -> int:
    import tyro

    from agents import sim2real
    from agents.policy import atomic_write_text
    from diffgym.identify import load_episodes

    args = tyro.cli(IdentifyArgs, args=argv, prog=f"{PROG} identify")
    env_id = _resolve_env(args.env)
    names = _fit_names(env_id, args.fit)
    if args.horizon < 1:
        raise UsageError(f"--horizon must be at least 1, got {args.horizon}")
    if not args.data.is_file():
        raise UsageError(f"--data {str(args.data)!r}: no such file (an .npz of logged episodes, as save_episodes writes)")
    try:
        data = load_episodes(args.data)
        fitted, report = sim2real.identify_episodes(env_id, data, fit=names, horizon=args.horizon)
    except (ValueError, TypeError, OSError) as error:  # a bad log, a param that cannot be fitted
        raise UsageError(f"--data {str(args.data)!r}: {error}") from None
    record = sim2real.identify_json(env_id, fitted, report, data=os.fspath(args.data), horizon=args.horizon)
    atomic_write_text(args.out / "params.json", json.dumps(record, indent=2))
    print(f"{env_id}: fitted {', '.join(names)} to {args.data}")
    print(report.summary())
    print(f"wrote {args.out / 'params.json'}")
    return 0


def _sim2real_command(argv: list[str]) -> int:
    import tyro

    from agents import sim2real

    args = tyro.cli(Sim2RealArgs, args=argv, prog=f"{PROG} sim2real")
    env_id = _resolve_env(args.env)
    names = _fit_names(env_id, args.fit)
    try:
        physics = sim2real.parse_assignments(args.real, flag="--real")
        sim2real.real_system(env_id, physics, obs_noise=args.obs_noise, backend=args.backend)
    except ValueError as error:
        raise UsageError(f"--real: {error}" if "--real" not in str(error) else str(error)) from None
    for flag, value in (("--episodes", args.episodes), ("--eval-episodes", args.eval_episodes),
                        ("--fine-tune-steps", args.fine_tune_steps)):  # fmt: skip
        if value is not None and value < 1:
            raise UsageError(f"{flag} must be at least 1, got {value}")
    if not 0 <= args.exploration <= 1:
        raise UsageError(f"--exploration must be a probability in [0, 1], got {args.exploration}")
    if args.seed < 0:
        raise UsageError(f"--seed must be a non-negative integer, got {args.seed}")
    if args.policy is not None:
        from agents.policy import CHECKPOINT_SPEC

        if not (args.policy / CHECKPOINT_SPEC).is_file():
            raise UsageError(f"no policy checkpoint in {str(args.policy)!r}: expected {CHECKPOINT_SPEC} (train-controller --out DIR)")
    sim2real.run(
        env_id,
        physics,
        out=args.out,
        policy_dir=args.policy,
        fit=names,
        obs_noise=args.obs_noise,
        backend=args.backend,
        collect_episodes=args.episodes,
        exploration=args.exploration,
        fine_tune_steps=args.fine_tune_steps,
        eval_episodes=args.eval_episodes,
        ppo=args.ppo,
        seed=args.seed,
        log=print,
    )
    print(f"wrote {args.out / 'report.md'}")
    return 0


_COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "train": _train_command,
    "play": _play_command,
    "compare": _compare_command,
    "identify": _identify_command,
    "sim2real": _sim2real_command,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``train-controller``; returns (and, as a script, exits with) the status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = _train_command
    if argv and argv[0] in _COMMANDS:
        command = _COMMANDS[argv.pop(0)]
    try:
        return command(argv)
    except SystemExit as exit_request:  # tyro's --help and its parse errors: a status, not an exit
        code = exit_request.code
        return code if isinstance(code, int) else (0 if code is None else 2)
    except UsageError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as error:  # tyro, tqdm, matplotlib: the train extra, not core deps
        if (error.name or "").partition(".")[0] not in ("tyro", "tqdm", "matplotlib"):
            raise
        print(f"{PROG}: error: {error.name} is not installed: pip install 'diffgym[train]'", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; nothing half-written was left behind", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
