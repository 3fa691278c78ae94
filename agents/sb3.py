"""Stable-Baselines3 peers for the comparison: SB3's PPO (CartPole) and SAC (Pendulum, Trebuchet).

They train on diffgym's gymnasium shells (``gymnasium.make("diffgym/CartPole-v1")``) with
RL-Zoo's tuned hyper-parameters, and a callback records the same learning curve as our
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

import diffgym
from agents.common import TrainResult

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
    """``"ppo"`` or ``"sac"``."""
    total_env_steps: int = 100_000
    """Budget in env steps (every step of every parallel env counts)."""
    hyperparams: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Keyword arguments of the SB3 algorithm's constructor (RL-Zoo's), plus ``n_envs``.
    Learning-rate / clip-range values given as ``"lin_X"`` are linear schedules from X to 0."""
    eval_every_env_steps: int = 2048
    """Env steps between two evaluations of the deterministic policy."""
    eval_episodes: int = 32
    """Episodes per evaluation."""
    target_return: float | None = 475.0
    """Stop once the evaluation mean reaches this; ``None`` spends the whole budget."""
    source: str = "RL-Zoo"
    """Where the hyper-parameters come from (shown in the comparison's labels)."""


def default_config(env_id: str) -> SB3Config:
    """RL-Zoo's tuned settings (rl-baselines3-zoo ``hyperparams/ppo.yml`` and ``sac.yml``).

    * CartPole-v1 — PPO: 8 envs, ``n_steps`` 32, batch 256, ``gae_lambda`` 0.8, ``gamma`` 0.98,
      20 epochs, no entropy bonus, learning rate ``lin_1e-3``, clip range ``lin_0.2``, 1e5 steps.
    * Pendulum-v1 — SAC: learning rate 1e-3 and SB3's defaults otherwise (one env, 256x256
      ReLU networks, batch 256, one gradient step per env step, automatic entropy), 2e4 steps.
    * Trebuchet-v0 — SAC. RL-Zoo has no trebuchet: Pendulum-v1's settings above (learning rate
      1e-3, SB3's SAC defaults otherwise; its default ``learning_starts`` of 100 random shots).
      SB3's SAC squashes its actions with tanh into the env's box, so the raw observation scale
      (target in m, wind in m/s) is the only thing it meets unscaled. One env step is one shot.
      Budget 1e4 shots: SAC makes one gradient step of two 256x256 critics per shot, about
      10-20 ms each on this 2-core machine, so that is minutes of wall time, the order of what
      PPO spends on its ~1e5 shots. Stop at a mean miss of 1 m; evaluation every 1000 shots on
      200 shots (the gymnasium shell, one shot per episode).
    """
    env_id = diffgym.resolve_env_id(env_id)
    if env_id == "CartPole-v1":
        return SB3Config(
            algo="ppo",
            total_env_steps=100_000,
            hyperparams={
                "n_envs": 8, "n_steps": 32, "batch_size": 256, "gae_lambda": 0.8, "gamma": 0.98,
                "n_epochs": 20, "ent_coef": 0.0, "learning_rate": "lin_1e-3", "clip_range": "lin_0.2",
            },
            eval_every_env_steps=2048,
            eval_episodes=32,
            target_return=475.0,
        )
    if env_id == "Pendulum-v1":
        return SB3Config(
            algo="sac",
            total_env_steps=20_000,
            hyperparams={"n_envs": 1, "learning_rate": 1e-3},
            eval_every_env_steps=1000,
            eval_episodes=64,
            target_return=-200.0,
        )
    if env_id == "Trebuchet-v0":
        return SB3Config(
            algo="sac",
            total_env_steps=10_000,
            hyperparams={"n_envs": 1, "learning_rate": 1e-3},
            eval_every_env_steps=1000,
            eval_episodes=200,
            target_return=-1.0,
            source="RL-Zoo's Pendulum settings",
        )
    raise ValueError(
        f"no RL-Zoo settings for {env_id!r} here; known: CartPole-v1, Pendulum-v1, Trebuchet-v0"
    )


def gymnasium_id(env_id: str) -> str:
    """The gymnasium id to train on: diffgym's shell when registered, else gymnasium's own env."""
    import gymnasium

    env_id = diffgym.resolve_env_id(env_id)
    shell = f"diffgym/{env_id}"
    if shell in gymnasium.registry:
        return shell
    if env_id in gymnasium.registry:
        return env_id  # diffgym.gym not there yet: gymnasium's own env, the one diffgym reproduces
    raise ValueError(f"no gymnasium env for {env_id!r}: neither {shell!r} nor {env_id!r} is registered")


def _schedule(value):
    if isinstance(value, str) and value.startswith("lin_"):
        start = float(value.removeprefix("lin_"))
        return lambda progress_remaining: progress_remaining * start
    return value


def train(
    env_id: str,
    config: SB3Config,
    *,
    seed: int = 0,
    progress_fn: Callable[[dict], None] | None = None,
) -> TrainResult:
    """Train the SB3 peer ``config.algo`` on ``env_id``'s gymnasium env; see the module docstring.

    ``extra`` has ``solved``, ``env_steps_to_target``, ``wall_seconds_to_target``,
    ``eval_seconds`` (time spent evaluating, excluded from the clock) and ``gym_env`` (the
    gymnasium id trained on).
    """
    _require()
    import torch
    from stable_baselines3 import PPO, SAC
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.evaluation import evaluate_policy

    start = time.perf_counter()
    algos = {"ppo": PPO, "sac": SAC}
    if config.algo not in algos:
        raise ValueError(f"SB3Config.algo must be one of {sorted(algos)}, got {config.algo!r}")
    gym_id = gymnasium_id(env_id)
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
    train_env = make_vec_env(gym_id, n_envs=n_envs, seed=seed)
    # Evaluation episodes run side by side, in at most 16 envs.
    eval_env = make_vec_env(gym_id, n_envs=min(16, config.eval_episodes), seed=seed + 10_000)
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

    discrete = config.algo == "ppo" and hasattr(train_env.action_space, "n")

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
            "algo": f"sb3-{config.algo}",
            "solved": to_target is not None,
            "env_steps_to_target": None if to_target is None else to_target["env_steps"],
            "wall_seconds_to_target": None if to_target is None else to_target["wall_seconds"],
            "target_return": config.target_return,
            "eval_seconds": clock["eval_seconds"],
            "gym_env": gym_id,
            "config": dataclasses.asdict(config),
        },
    )
