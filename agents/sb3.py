"""Stable-Baselines3 peers for the comparison: SB3's PPO (CartPole) and SAC (Pendulum, Trebuchet).

They train on diffgym's gymnasium shells (``diffgym.gym.DiffgymEnv`` behind gymnasium's
``TimeLimit``, any registered or user env) with RL-Zoo's tuned hyper-parameters, and a callback records the same learning curve as our
trainers (``env_steps``, ``wall_seconds``, ``eval_return``) and stops at the target return or at
the end of the budget. Needs the optional extra: ``pip install 'diffgym[baselines]'``.

Differences to keep in mind when reading the numbers:

* SB3 runs episodes through torch one vectorised step at a time; its evaluations (the
  deterministic policy, ``eval_episodes`` episodes on a vector of gymnasium envs) are therefore
  not free, and their time is *excluded* from ``wall_seconds`` (our JAX trainers' evaluations take
  milliseconds and are included).
* There is no compilation: ``compile_seconds`` is 0.
* torch runs with one intra-op thread during training (see ``train``).
* ``TrainResult.policy`` is a numpy ``policy(obs) -> action`` (SB3's deterministic
  ``predict``), not an ``agents.policy.Policy``; ``spec`` describes the SB3 model.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import numpy as np

from agents.common import TrainResult, resolve_env, tuned_config

NAME = "sb3"
#: SB3 trains on gymnasium shells; it hands out no snapshots to show while training.
supports_render = False
INSTALL_HINT = "pip install 'diffgym[baselines]'"


def available() -> bool:
    """Whether Stable-Baselines3 (and torch) can be imported."""
    try:
        import stable_baselines3  # noqa: F401
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def _require() -> None:
    if not available():
        raise ImportError(f"the Stable-Baselines3 peers need the 'baselines' extra: {INSTALL_HINT}")


@dataclasses.dataclass
class SB3Config:
    """One SB3 peer run."""

    algo: str = "ppo"
    """``"ppo"``, ``"sac"`` or ``"dqn"``."""
    total_env_steps: int = 100_000
    """Budget in env steps (every step of every parallel env counts)."""
    hyperparams: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Keyword arguments of the SB3 algorithm's constructor (RL-Zoo's), plus ``n_envs``.
    Learning-rate / clip-range values given as ``"lin_X"`` are linear schedules from X to 0."""
    eval_every_env_steps: int = 2048
    """Env steps between two evaluations of the deterministic policy."""
    eval_episodes: int = 32
    """Episodes per evaluation."""
    target_return: float | None = None
    """Stop once the evaluation mean reaches this; ``None`` spends the whole budget
    (``default_config`` sets the env spec's threshold)."""
    source: str = "RL-Zoo"
    """Where the hyper-parameters come from (shown in the comparison's labels)."""


def default_config(env) -> SB3Config:
    """RL-Zoo's tuned settings for the env (``[sb3]`` of its bundled ``hyperparams.toml``, which
    says where each comes from: rl-baselines3-zoo ``hyperparams/ppo.yml`` and ``sac.yml``), else
    SB3's PPO defaults; both stop at the env spec's ``reward_threshold``."""
    instance, _, spec = resolve_env(env)
    return tuned_config(SB3Config, instance, NAME, target_return=spec.reward_threshold)


def make_env_fn(env, params) -> Callable:
    """``() -> gymnasium.Env``: the diffgym gymnasium shell of ``env`` with ``params``, behind
    gymnasium's ``TimeLimit`` (what SB3 trains and evaluates on)."""
    import gymnasium

    from diffgym.gym import DiffgymEnv

    return lambda: gymnasium.wrappers.TimeLimit(
        DiffgymEnv(env, params=params), max_episode_steps=int(params.max_steps_in_episode)
    )


def _schedule(value):
    if isinstance(value, str) and value.startswith("lin_"):
        start = float(value.removeprefix("lin_"))
        return lambda progress_remaining: progress_remaining * start
    return value


def train(
    env,
    config: SB3Config | None = None,
    *,
    seed: int = 0,
    env_params=None,
    progress_fn: Callable[[dict], None] | None = None,
    render_fn=None,
) -> TrainResult:
    """Train the SB3 peer ``config.algo`` on ``env``'s gymnasium shell; see the module docstring.

    ``env`` is an id or an ``Environment`` instance; ``config`` None: ``default_config(env)``.
    ``extra`` has ``solved``, ``env_steps_to_target``, ``wall_seconds_to_target`` and
    ``eval_seconds`` (time spent evaluating, excluded from the clock).
    """
    _require()
    import torch
    from stable_baselines3 import DQN, PPO, SAC
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.evaluation import evaluate_policy

    start = time.perf_counter()
    if render_fn is not None:
        raise ValueError("the Stable-Baselines3 peers show no rollouts while training; use `train-controller play`")
    env, params, _ = resolve_env(env, env_params)
    config = default_config(env) if config is None else config
    algos = {"ppo": PPO, "sac": SAC, "dqn": DQN}
    if config.algo not in algos:
        raise ValueError(f"SB3Config.algo must be one of {sorted(algos)}, got {config.algo!r}")
    env_fn = make_env_fn(env, params)
    hyperparams = dict(config.hyperparams)
    n_envs = int(hyperparams.pop("n_envs", 1))
    for name in ("learning_rate", "clip_range"):
        if name in hyperparams:
            hyperparams[name] = _schedule(hyperparams[name])

    torch.manual_seed(seed)
    # One intra-op thread: SB3's 64-unit networks are dominated by per-call overhead, and a second
    # thread only adds contention (measured here: 6 s against 41 s for 4096 CartPole steps on a
    # busy 2-core machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    train_env = make_vec_env(env_fn, n_envs=n_envs, seed=seed)
    # Evaluation episodes run side by side, in at most 16 envs.
    eval_env = make_vec_env(env_fn, n_envs=min(16, config.eval_episodes), seed=seed + 10_000)
    model = algos[config.algo]("MlpPolicy", train_env, seed=seed, verbose=0, device="cpu", **hyperparams)

    curve: list[dict] = []
    clock = {"eval_seconds": 0.0}

    def evaluate_now() -> float:
        eval_start = time.perf_counter()
        returns, _ = evaluate_policy(
            model, eval_env, n_eval_episodes=config.eval_episodes, deterministic=True,
            return_episode_rewards=True,
        )
        clock["eval_seconds"] += time.perf_counter() - eval_start
        return float(np.mean(returns))

    def wall() -> float:
        return time.perf_counter() - start - clock["eval_seconds"]

    first = evaluate_now()
    curve.append({"env_steps": 0, "wall_seconds": wall(), "eval_return": first})

    class CurveCallback(BaseCallback):
        """Evaluates every ``eval_every_env_steps``; returning False stops ``learn``."""

        def __init__(self):
            super().__init__()
            self.next_eval = config.eval_every_env_steps
            self.to_target: dict | None = None

        def _on_step(self) -> bool:
            if self.num_timesteps < self.next_eval:
                return True
            self.next_eval += config.eval_every_env_steps
            point = {
                "env_steps": int(self.num_timesteps), "wall_seconds": wall(), "eval_return": evaluate_now()
            }
            curve.append(point)
            if progress_fn is not None:
                progress_fn(dict(point))
            if config.target_return is not None and point["eval_return"] >= config.target_return:
                self.to_target = point
                return False
            return True

    callback = CurveCallback()
    try:
        model.learn(total_timesteps=config.total_env_steps, callback=callback)
    finally:
        train_env.close()
        eval_env.close()
        torch.set_num_threads(threads)

    discrete = hasattr(train_env.action_space, "n")

    def policy(obs: np.ndarray):
        action, _ = model.predict(np.asarray(obs, np.float32), deterministic=True)
        return int(action) if discrete else np.asarray(action, np.float32)

    policy.model = model
    to_target = callback.to_target
    return TrainResult(
        policy=policy,
        spec={"sb3_algo": config.algo, "policy": "MlpPolicy"},
        env_steps=int(model.num_timesteps),
        wall_seconds=wall(),
        compile_seconds=0.0,
        curve=curve,
        extra={
            "algo": NAME,
            "sb3_algo": config.algo,
            "env_id": env.name,
            "solved": to_target is not None,
            "env_steps_to_target": None if to_target is None else to_target["env_steps"],
            "wall_seconds_to_target": None if to_target is None else to_target["wall_seconds"],
            "target_return": config.target_return,
            "eval_seconds": clock["eval_seconds"],
            "config": dataclasses.asdict(config),
        },
    )
