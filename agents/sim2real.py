"""Sim-to-real, end to end: a controller meets a "real" system, the physics are identified from
what it logged there, and it is fine-tuned on the identified simulator.

The pipeline, as functions (each usable alone)::

    real = real_system("cartpole", {"masspole": 1.0, "length": 1.5})      # hidden from the rest
    policy = numpy_policy(load_policy_module(bundled)[0])
    before = evaluate_real(policy, real.make, episodes=20, seed=1)          # it degrades
    data = collect(policy, real.make, episodes=2, seed=0)                   # what a user logs
    fitted, report = identify_episodes("cartpole", data)                    # diffgym.identify
    tuned = fine_tune("cartpole", bundled, fitted)                          # BPTT from the weights
    after = evaluate_real(numpy_policy(tuned.policy), real.make, episodes=20, seed=1)

or all of it, with PPO on the real system beside it and a report written to a folder::

    report = run("cartpole", {"masspole": 1.0, "length": 1.5}, out="runs/sim2real-cartpole")

(``train-controller sim2real --env cartpole --real masspole=1.0 length=1.5 --out DIR`` from the
shell; ``train-controller identify --env ENV --data FILE --out DIR`` runs the identification
step alone on a logged ``.npz``.)

**The "real" system** (``RealSystem``) is a gymnasium env the pipeline only acts in and observes:

* ``backend="gymnasium"``: gymnasium's own numpy ``CartPoleEnv`` / ``PendulumEnv`` with the
  constants set on the env (diffgym's parameter names are gymnasium's attribute names), and
  CartPole's derived ``total_mass`` and ``polemass_length`` recomputed as its ``__init__`` does
  (leaving them stale is the bug ``tests/test_cartpole.py`` guards against);
* ``backend="diffgym"``: diffgym's gymnasium shell with the changed params hidden inside it,
  for any registered env (LotkaVolterra, Acrobot, ...); ``"auto"`` picks gymnasium where it has
  the env;
* ``obs_noise``: Gaussian sensor noise (standard deviation, every entry) on what the
  controller sees and what is logged, drawn from the reset seed.

**Accounting.** *Real steps* are the transitions collected on the real system and handed to the
identification (the data). Evaluation episodes on the real system measure the result and feed
no learner; they are reported apart. Fine-tuning runs in simulation only (its env steps are
*simulated*). The PPO baseline learns on the real system itself from the same number of real
steps: our PPO trains on functional envs, so its "real system" is diffgym with the real
constants (and the same observation noise), physically the same system as gymnasium's numpy env
(the parity tests step both side by side to 1e-4 in float32), evaluated like the others on the
real gymnasium env.

**What is fitted.** ``fit`` names the params to identify; by default ``DEFAULT_FIT``, sets the
data determine (``bench/results/identify.md``: CartPole's masses and force act only through
their ratios, so ``masscart`` and ``force_mag`` stay known; the Pendulum's ``m``, ``l``, ``g`` only
as ``g / l`` and ``m l^2``, so ``g`` stays known).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import gymnasium
import jax
import jax.numpy as jnp
import numpy as np

import diffgym
from diffgym.core import Environment
from diffgym.registry import did_you_mean

__all__ = [
    "DEFAULT_FIT",
    "Episodes",
    "NoisyObservations",
    "RealSystem",
    "collect",
    "evaluate_real",
    "fine_tune",
    "identify_episodes",
    "identify_json",
    "load_fitted_params",
    "parse_assignments",
    "ppo_on_real",
    "real_system",
    "run",
]

#: The parameters identified when ``fit`` is not given: what logged observations determine
#: (``bench/results/identify.md``). Other envs need ``fit`` named.
DEFAULT_FIT: dict[str, tuple[str, ...]] = {
    "CartPole-v1": ("masspole", "length"),
    "Pendulum-v1": ("m", "l"),
    "LotkaVolterra-v0": ("prey_growth_rate", "predation_rate", "predator_death_rate", "predator_growth_rate"),
}

#: gymnasium's own numpy implementation of an env (``backend="gymnasium"``), and the attributes
#: its ``__init__`` derives from the constants (recomputed after they are set).
_GYMNASIUM_CLASSES: dict[str, str] = {
    "CartPole-v1": "gymnasium.envs.classic_control.cartpole:CartPoleEnv",
    "Pendulum-v1": "gymnasium.envs.classic_control.pendulum:PendulumEnv",
}

#: Real-system evaluation episode ``k`` of a run with seed ``s`` resets with seed
#: ``EVAL_SEED_OFFSET + 1000 s + k`` (as ``agents.cli``); the logged episodes come from other seeds.
EVAL_SEED_OFFSET = 1_000_000
COLLECT_SEED_OFFSET = 2_000_000


# --------------------------------------------------------------------------------------------
# The real system
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class RealSystem:
    """A stand-in for a real system: an env whose constants differ from diffgym's defaults.

    Attributes:
        env_id: the diffgym id of the env it is a version of.
        physics: the constants that differ (diffgym parameter names), hidden from the pipeline.
        obs_noise: standard deviation of Gaussian noise on every observation entry (0: none).
        backend: ``"gymnasium"`` (gymnasium's numpy env) or ``"diffgym"`` (diffgym's shell).
    """

    env_id: str
    physics: Mapping[str, float]
    obs_noise: float = 0.0
    backend: str = "gymnasium"

    def params(self):
        """The diffgym params of the real system (the truth the identification aims at)."""
        return diffgym.make(self.env_id, **self.physics)[1]

    @property
    def max_steps(self) -> int:
        return int(self.params().max_steps_in_episode)

    def make(self):
        """A fresh gymnasium env of the real system, with gymnasium's time limit."""
        if self.backend == "gymnasium":
            module_name, _, class_name = _GYMNASIUM_CLASSES[self.env_id].partition(":")
            import importlib

            raw = getattr(importlib.import_module(module_name), class_name)()
            for name, value in self.physics.items():
                if name != "max_steps_in_episode":
                    setattr(raw, name, float(value))
            if hasattr(raw, "polemass_length"):  # CartPoleEnv's derived constants
                raw.total_mass = raw.masspole + raw.masscart
                raw.polemass_length = raw.masspole * raw.length
        else:
            from diffgym.gym import DiffgymEnv

            raw = DiffgymEnv(self.env_id, params=self.params())
        env = gymnasium.wrappers.TimeLimit(raw, max_episode_steps=self.max_steps)
        return _NoisyGymnasium(env, self.obs_noise) if self.obs_noise > 0 else env

    def describe(self) -> str:
        physics = ", ".join(f"{k} {v:g}" for k, v in self.physics.items())
        noise = f", observation noise {self.obs_noise:g}" if self.obs_noise else ""
        return f"{self.env_id} ({self.backend}) with {physics}{noise}"


def real_system(
    env, physics: Mapping[str, float], *, obs_noise: float = 0.0, backend: str = "auto"
) -> RealSystem:
    """A ``RealSystem`` of ``env`` (an id or alias) with ``physics`` changed; names are checked
    against the env's params (an unknown name gets the closest), values must be finite numbers."""
    env_id = diffgym.resolve_env_id(env)
    defaults = diffgym.make(env_id)[1]
    fields = [f.name for f in dataclasses.fields(defaults)]
    checked = {}
    for name, value in dict(physics).items():
        if name not in fields:
            raise ValueError(
                f"{env_id} has no parameter {name!r}.{did_you_mean(name, fields)} Parameters: {', '.join(fields)}."
            )
        default = getattr(defaults, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
        checked[name] = (
            int(value) if isinstance(default, int) and not isinstance(default, bool) else float(value)
        )
    if not (isinstance(obs_noise, (int, float)) and obs_noise >= 0):
        raise ValueError(f"obs_noise must be a non-negative number (a standard deviation), got {obs_noise!r}")
    if backend == "auto":
        backend = "gymnasium" if env_id in _GYMNASIUM_CLASSES else "diffgym"
    if backend not in ("gymnasium", "diffgym"):
        raise ValueError(f"backend must be 'auto', 'gymnasium' or 'diffgym', got {backend!r}")
    if backend == "gymnasium" and env_id not in _GYMNASIUM_CLASSES:
        raise ValueError(
            f"gymnasium has no numpy {env_id} here (it has {', '.join(_GYMNASIUM_CLASSES)}); use backend='diffgym'"
        )
    return RealSystem(env_id, checked, float(obs_noise), backend)


def parse_assignments(items: Sequence[str], *, flag: str = "--real") -> dict[str, float]:
    """``["masspole=1.0", "length=1.5"]`` -> ``{"masspole": 1.0, "length": 1.5}``; a malformed
    item is a ValueError quoting it."""
    values = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or not name or not text:
            raise ValueError(f"{flag} takes PARAM=VALUE items (e.g. {flag} masspole=1.0), got {item!r}")
        try:
            values[name.strip()] = float(text)
        except ValueError:
            raise ValueError(f"{flag} {item!r}: {text!r} is not a number") from None
    return values


class _NoisyGymnasium(gymnasium.ObservationWrapper):
    """A gymnasium env whose observations carry Gaussian noise, seeded by ``reset(seed=...)``."""

    def __init__(self, env, std: float):
        super().__init__(env)
        self.std = std
        self._rng = np.random.default_rng()

    def observation(self, observation):
        noise = self.std * self._rng.standard_normal(np.shape(observation))
        return (observation + noise).astype(np.asarray(observation).dtype)

    def reset(self, *, seed=None, options=None):
        if seed is not None:
            self._rng = np.random.default_rng([seed, 17])
        return super().reset(seed=seed, options=options)


class NoisyObservations(Environment):
    """A functional env whose observations carry Gaussian noise of standard deviation ``std``:
    the observation noise of a ``RealSystem`` for trainers that run on functional envs (the PPO
    baseline). The dynamics, reward and termination are the wrapped env's; the noise is drawn from
    the step's and the reset's keys, so the transition is random (``deterministic_transition``
    False). Not for BPTT: the noise has no gradient to give."""

    deterministic_transition = False

    def __init__(self, env: Environment, std: float):
        self.env, self.std = env, float(std)

    @property
    def default_params(self):
        return self.env.default_params

    def _noise(self, key, obs):
        return obs + self.std * jax.random.normal(key, jnp.shape(obs), jnp.result_type(obs))

    def step_env(self, key, state, action, params):
        key_env, key_noise = jax.random.split(key)
        obs, state, reward, terminated, info = self.env.step_env(
            None if self.env.deterministic_transition else key_env, state, action, params
        )
        return self._noise(key_noise, obs), state, reward, terminated, info

    def reset_env(self, key, params):
        key_env, key_noise = jax.random.split(key)
        obs, state = self.env.reset_env(key_env, params)
        return self._noise(key_noise, obs), state

    def get_obs(self, state, params=None, key=None):
        obs = self.env.get_obs(state, params)
        return obs if key is None else self._noise(key, obs)

    def is_terminated(self, state, params):
        return self.env.is_terminated(state, params)

    def is_truncated(self, state, params):
        return self.env.is_truncated(state, params)

    def discount(self, state, params):
        return self.env.discount(state, params)

    @property
    def name(self) -> str:
        return f"{self.env.name}+noise{self.std:g}"

    @property
    def num_actions(self) -> int:
        return self.env.num_actions

    def action_space(self, params=None):
        return self.env.action_space(params)

    def observation_space(self, params=None):
        return self.env.observation_space(params)


# --------------------------------------------------------------------------------------------
# Data from the real system
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Episodes:
    """Logged episodes: ``observations[i]`` ``(T_i + 1, *obs)`` (the reset's, then one after each
    action), ``actions[i]`` ``(T_i, *action)`` as the env took them, ``returns[i]`` the episode's
    summed reward, ``seeds[i]`` its reset seed."""

    observations: list[np.ndarray]
    actions: list[np.ndarray]
    returns: list[float]
    seeds: list[int]

    @property
    def steps(self) -> int:
        """Transitions logged (env steps taken on the system)."""
        return int(sum(len(a) for a in self.actions))

    def save(self, path) -> None:
        """The flat ``.npz`` of ``diffgym.identify.save_episodes`` (observations, actions,
        episode_starts), what ``train-controller identify --data`` reads."""
        from diffgym.identify import save_episodes

        save_episodes(path, self.observations, self.actions)


def collect(
    policy: Callable[[np.ndarray], Any],
    real_env_fn: Callable[[], Any],
    *,
    episodes: int | None = None,
    steps: int | None = None,
    seed: int = 0,
    exploration: float = 0.0,
) -> Episodes:
    """Run ``policy`` on a system and log what it saw and did, as a user logs a real system.

    Args:
        policy: numpy observation -> gymnasium action (``agents.common.numpy_policy``,
            ``agents.load_policy``).
        real_env_fn: makes the gymnasium env (``RealSystem.make``); closed afterwards.
        episodes, steps: how much to log, exactly one of them: whole episodes, or transitions
            (the last episode is cut there; its transitions still count and are logged).
        seed: episode ``k`` resets with seed ``seed + k``; also seeds ``exploration``.
        exploration: the probability of a uniformly random action (from the action space) in
            place of the policy's at each step: richer data for the identification, at some cost
            to the logged returns.
    """
    if (episodes is None) == (steps is None):
        raise ValueError(
            f"collect takes episodes or steps, exactly one; got episodes={episodes!r}, steps={steps!r}"
        )
    limit = episodes if episodes is not None else steps
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise ValueError(
            f"{'episodes' if episodes is not None else 'steps'} must be a positive integer, got {limit!r}"
        )
    if not 0 <= exploration <= 1:
        raise ValueError(f"exploration must be a probability in [0, 1], got {exploration!r}")
    rng = np.random.default_rng([seed, 3])
    env = real_env_fn()
    env.action_space.seed(int(rng.integers(2**31)))
    logged = Episodes([], [], [], [])
    taken = 0
    try:
        while True:
            if episodes is not None and len(logged.returns) == episodes:
                break
            if steps is not None and taken == steps:
                break
            episode_seed = seed + len(logged.returns)
            obs, _ = env.reset(seed=episode_seed)
            observations, actions, total, done = [np.asarray(obs)], [], 0.0, False
            while not done and (steps is None or taken < steps):
                action = (
                    env.action_space.sample() if exploration and rng.random() < exploration else policy(obs)
                )
                obs, reward, terminated, truncated, _ = env.step(action)
                observations.append(np.asarray(obs))
                actions.append(np.asarray(action))
                total += float(reward)
                taken += 1
                done = terminated or truncated
            logged.observations.append(np.stack(observations))
            logged.actions.append(np.stack(actions) if actions else np.zeros((0,)))
            logged.returns.append(total)
            logged.seeds.append(episode_seed)
    finally:
        env.close()
    return logged


def evaluate_real(policy, real_env_fn: Callable[[], Any], *, episodes: int, seed: int) -> np.ndarray:
    """Returns of ``episodes`` whole episodes of ``policy`` on the system (episode ``k`` resets with
    seed ``seed + k``); a measurement, not data for a learner."""
    return np.asarray(collect(policy, real_env_fn, episodes=episodes, seed=seed).returns)


# --------------------------------------------------------------------------------------------
# Identification
# --------------------------------------------------------------------------------------------
def _fit_names(env_id: str, fit: Sequence[str] | None) -> tuple[str, ...]:
    if fit:
        return tuple(fit)
    if env_id not in DEFAULT_FIT:
        raise ValueError(
            f"name the parameters to fit for {env_id} (fit=... / --fit NAME ...): it has no default set"
        )
    return DEFAULT_FIT[env_id]


def identify_episodes(env, episodes, *, fit: Sequence[str] | None = None, init_params=None, **options):
    """``diffgym.identify`` on logged episodes (an ``Episodes``, or the dict ``load_episodes``
    returns) from ``init_params`` (default: the env's defaults): ``(fitted_params, report)``.
    ``fit`` defaults to ``DEFAULT_FIT[env]``; ``options`` go to ``identify`` (``horizon``, ...)."""
    env_id = diffgym.resolve_env_id(env) if isinstance(env, str) else env.name
    instance, defaults = diffgym.make(env_id) if isinstance(env, str) else (env, env.default_params)
    names = _fit_names(env_id, fit)
    if isinstance(episodes, Episodes):
        data = {"observations": episodes.observations, "actions": episodes.actions}
    else:
        data = dict(episodes)
    obs_shape = tuple(instance.observation_space(defaults).shape)
    observations = data["observations"]
    logged = (
        [np.shape(o)[1:] for o in observations]
        if isinstance(observations, (list, tuple))
        else [np.shape(observations)[1:]]
    )
    if any(shape != obs_shape for shape in logged):
        raise ValueError(
            f"the logged observations have shape {logged[0]} per row; {env_id}'s have {obs_shape}: "
            "a log of another env?"
        )
    return diffgym.identify(
        instance, init_params=defaults if init_params is None else init_params, fit=names, **data, **options
    )


def identify_json(env_id: str, fitted, report, **context) -> dict:
    """What ``train-controller identify`` writes to ``params.json``: the fitted values, their
    standard errors and the identifiability report, the whole fitted params, and ``context``."""
    from agents.cli import to_jsonable

    return to_jsonable(
        {
            "env": env_id,
            **context,
            "fit": list(report.names),
            "initial": report.initial,
            "values": report.values,
            "standard_errors": report.standard_errors,
            "relative_standard_errors": report.relative_standard_errors(),
            "params": dataclasses.asdict(fitted),
            "converged": report.converged,
            "message": report.message,
            "iterations": report.iterations,
            "loss": report.loss,
            "loss_history": report.loss_history,
            "residual_rms": report.residual_rms,
            "residual_std": report.residual_std,
            "num_residuals": report.num_residuals,
            "num_windows": report.num_windows,
            "num_episodes": report.num_episodes,
            "singular_values": report.singular_values,
            "condition_number": report.condition_number,
            "correlation": report.correlation,
            "unidentifiable": list(report.unidentifiable),
            "jacobian": report.jacobian,
            "compile_seconds": report.compile_seconds,
            "solve_seconds": report.solve_seconds,
            "summary": report.summary(),
        }
    )


def load_fitted_params(path, env=None):
    """The fitted params in a ``params.json`` (``train-controller identify --out DIR``) as the
    env's params dataclass, ready for ``env_params=``."""
    record = json.loads(Path(path).read_text())
    env_id = diffgym.resolve_env_id(env if env is not None else record["env"])
    defaults = diffgym.make(env_id)[1]
    fields = {f.name for f in dataclasses.fields(defaults)}
    return dataclasses.replace(defaults, **{k: v for k, v in record["params"].items() if k in fields})


# --------------------------------------------------------------------------------------------
# Fine-tuning and the real-system baseline
# --------------------------------------------------------------------------------------------
def _config_from_checkpoint(module, env, policy_dir, config=None, **changes):
    """``config`` (default: the trainer's tuned one for ``env``) starting from ``policy_dir``, with
    the checkpoint's network sizes."""
    from agents.policy import load_policy_module

    config = module.default_config(env) if config is None else config
    if "init_policy" not in {f.name for f in dataclasses.fields(config)}:
        raise ValueError(
            f"the {module.NAME} trainer cannot start from given weights (its config has no init_policy)"
        )
    _, header = load_policy_module(policy_dir)
    spec = header["spec"]
    return dataclasses.replace(
        config,
        init_policy=os.fspath(policy_dir),
        width=spec["width"],
        depth=spec["depth"],
        activation=spec.get("activation", "tanh"),
        **changes,
    )


def fine_tune(
    env,
    policy_dir,
    env_params,
    *,
    algo: str = "bptt",
    config=None,
    seed: int = 0,
    total_env_steps: int | None = None,
    progress_fn=None,
):
    """Continue training the checkpoint in ``policy_dir`` on ``env`` with ``env_params`` (the
    fitted physics), through the trainer interface: ``TrainResult``. ``config`` defaults to the
    trainer's tuned settings for the env, with the checkpoint's network sizes and
    ``init_policy=policy_dir``; ``total_env_steps`` overrides its budget (simulated steps)."""
    from agents.trainers import trainer

    module = trainer(algo)
    changes = {} if total_env_steps is None else {"total_env_steps": int(total_env_steps)}
    config = _config_from_checkpoint(module, env, policy_dir, config, **changes)
    return module.train(env, config, seed=seed, env_params=env_params, progress_fn=progress_fn)


def _ppo_config_for_budget(config, budget: int):
    """The tuned PPO config shrunk to a budget of ``budget`` env steps: at most its rollout per
    update (``num_envs * num_steps``), the minibatch count a divisor of the batch, an evaluation
    after every update, no early stop."""
    num_envs = min(config.num_envs, budget)
    num_steps = max(1, min(config.num_steps, budget // num_envs))
    batch = num_envs * num_steps
    minibatches = max(d for d in range(1, min(config.num_minibatches, batch) + 1) if batch % d == 0)
    return dataclasses.replace(
        config,
        num_envs=num_envs,
        num_steps=num_steps,
        num_minibatches=minibatches,
        total_env_steps=(budget // batch) * batch,
        eval_every_updates=1,
        target_return=None,
    )


def ppo_on_real(real: RealSystem, budget: int, *, policy_dir=None, seed: int = 0, config=None):
    """Our PPO trained on the real system for ``budget`` env steps (every one a real step): from
    the checkpoint in ``policy_dir`` (its network sizes; critic fresh) or, with None, from
    scratch with the tuned sizes. The real system for PPO is diffgym with the real constants and
    the same observation noise (see the module docstring). ``TrainResult``."""
    from agents import ppo

    env, _ = diffgym.make(real.env_id)
    if real.obs_noise > 0:
        env = NoisyObservations(env, real.obs_noise)
    if policy_dir is not None:
        config = _config_from_checkpoint(ppo, real.env_id, policy_dir, config)
    elif config is None:
        config = ppo.default_config(real.env_id)
    config = _ppo_config_for_budget(config, budget)
    return ppo.train(env, config, seed=seed, env_params=real.params())


# --------------------------------------------------------------------------------------------
# The whole pipeline
# --------------------------------------------------------------------------------------------
def _stats(returns) -> dict:
    returns = np.asarray(returns, np.float64)
    return {"mean": float(returns.mean()), "std": float(returns.std()), "episodes": len(returns)}


def run(
    env,
    real_params: Mapping[str, float],
    *,
    out=None,
    policy_dir=None,
    fit: Sequence[str] | None = None,
    obs_noise: float = 0.0,
    backend: str = "auto",
    collect_episodes: int = 2,
    exploration: float = 0.0,
    fine_tune_steps: int | None = None,
    eval_episodes: int | None = None,
    ppo: bool = True,
    ppo_from_scratch: bool = False,
    oracle: bool = False,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> dict:
    """The whole pipeline on one real system; returns the report (and writes it to ``out``).

    1. The controller in ``policy_dir`` (default: the env's bundled one) is evaluated on
       diffgym's default physics (gymnasium shell) and on the real system.
    2. ``collect_episodes`` episodes of it on the real system are logged (``exploration``: the
       fraction of random actions mixed in): the real steps.
    3. ``fit`` (default ``DEFAULT_FIT``) is identified from them, from diffgym's defaults.
    4. The controller is fine-tuned by BPTT on the fitted params (the trainer's tuned settings,
       ``fine_tune_steps`` simulated steps if given) and evaluated on the real system.
    5. ``ppo``: our PPO fine-tuned from the same controller on the real system for the same
       number of real steps, evaluated the same way (``ppo_from_scratch``: also PPO from fresh
       weights with that budget). ``oracle``: BPTT fine-tuned on the true params, the best the
       identification could give.

    Evaluations use ``eval_episodes`` episodes (default: the env spec's) with seeds
    ``EVAL_SEED_OFFSET + 1000 seed + k``; the logged episodes use ``COLLECT_SEED_OFFSET + 1000
    seed + k``. ``out`` receives ``episodes.npz``, ``params.json`` (as ``train-controller
    identify``), ``fine_tuned/`` (the checkpoint), ``ppo/`` (with ``ppo``), ``report.json`` and
    ``report.md``.
    """
    from agents.common import ASSETS_DIR, evaluate_gymnasium, numpy_policy
    from agents.policy import load_policy_module, save_policy

    say = log or (lambda message: None)
    start = time.perf_counter()
    real = real_system(env, real_params, obs_noise=obs_noise, backend=backend)
    env_id = real.env_id
    spec = diffgym.spec(env_id)
    policy_dir = Path(policy_dir) if policy_dir is not None else ASSETS_DIR / spec.short_name
    episodes = spec.eval_episodes if eval_episodes is None else int(eval_episodes)
    if episodes < 1:
        raise ValueError(f"eval_episodes must be at least 1, got {episodes}")
    names = _fit_names(env_id, fit)
    controller = numpy_policy(load_policy_module(policy_dir)[0])
    eval_seed = EVAL_SEED_OFFSET + 1000 * seed
    timings: dict[str, float] = {}

    def timed(stage, fn):
        stage_start = time.perf_counter()
        value = fn()
        timings[stage] = time.perf_counter() - stage_start
        return value

    say(f"real system: {real.describe()}; controller {policy_dir}")
    nominal = timed(
        "evaluate_nominal", lambda: evaluate_gymnasium(controller, env_id, episodes=episodes, seed=eval_seed)
    )
    before = timed(
        "evaluate_before", lambda: evaluate_real(controller, real.make, episodes=episodes, seed=eval_seed)
    )
    say(
        f"bundled controller: {nominal.mean():.1f} on diffgym's defaults, {before.mean():.1f} on the real system"
    )

    data = timed(
        "collect",
        lambda: collect(
            controller,
            real.make,
            episodes=collect_episodes,
            seed=COLLECT_SEED_OFFSET + 1000 * seed,
            exploration=exploration,
        ),
    )
    say(f"collected {len(data.returns)} episodes, {data.steps} real steps")
    fitted, report = timed("identify", lambda: identify_episodes(env_id, data, fit=names))
    truth = real.params()
    say(report.summary())

    tuned = timed(
        "fine_tune", lambda: fine_tune(env_id, policy_dir, fitted, seed=seed, total_env_steps=fine_tune_steps)
    )
    after = timed(
        "evaluate_after",
        lambda: evaluate_real(numpy_policy(tuned.policy), real.make, episodes=episodes, seed=eval_seed),
    )
    say(
        f"fine-tuned on the fitted sim ({tuned.env_steps} simulated steps): {after.mean():.1f} on the real system"
    )

    record: dict[str, Any] = {
        "env": env_id,
        "real": {"physics": dict(real.physics), "obs_noise": real.obs_noise, "backend": real.backend},
        "seed": seed,
        "policy_dir": os.fspath(policy_dir),
        "eval_episodes": episodes,
        "eval_seed": eval_seed,
        "nominal_return": _stats(nominal),
        "before": _stats(before),
        "real_steps": data.steps,
        "collect": {
            "episodes": len(data.returns),
            "exploration": exploration,
            "returns": data.returns,
            "seeds": data.seeds,
        },
        "identify": {
            "fit": list(names),
            "true": {n: float(getattr(truth, n)) for n in names},
            "initial": report.initial,
            "values": report.values,
            "standard_errors": report.standard_errors,
            "relative_error": {n: report.values[n] / float(getattr(truth, n)) - 1 for n in names},
            "converged": report.converged,
            "iterations": report.iterations,
            "residual_rms": report.residual_rms,
            "condition_number": report.condition_number,
            "unidentifiable": list(report.unidentifiable),
        },
        "fine_tune": {
            "algo": tuned.extra.get("algo", "bptt"),
            "sim_steps": int(tuned.env_steps),
            "wall_seconds": tuned.wall_seconds,
            "compile_seconds": tuned.compile_seconds,
            "fitted_sim_curve": [
                {"env_steps": p["env_steps"], "eval_return": p["eval_return"]} for p in tuned.curve
            ],
            "after": _stats(after),
        },
    }
    results = {"fine_tuned": tuned}
    if oracle:
        best = timed(
            "oracle", lambda: fine_tune(env_id, policy_dir, truth, seed=seed, total_env_steps=fine_tune_steps)
        )
        best_returns = evaluate_real(numpy_policy(best.policy), real.make, episodes=episodes, seed=eval_seed)
        record["oracle"] = {"sim_steps": int(best.env_steps), "after": _stats(best_returns)}
        say(f"fine-tuned on the true params: {best_returns.mean():.1f}")
    if ppo:
        baselines = [("ppo", policy_dir)] + ([("ppo_scratch", None)] if ppo_from_scratch else [])
        for name, start_dir in baselines:
            trained = timed(
                name,
                lambda start_dir=start_dir: ppo_on_real(real, data.steps, policy_dir=start_dir, seed=seed),
            )
            returns = evaluate_real(
                numpy_policy(trained.policy), real.make, episodes=episodes, seed=eval_seed
            )
            record[name] = {
                "from": None if start_dir is None else os.fspath(start_dir),
                "real_steps": int(trained.env_steps),
                "config": trained.extra["config"],
                "curve": [
                    {"env_steps": p["env_steps"], "eval_return": p["eval_return"]} for p in trained.curve
                ],
                "after": _stats(returns),
            }
            results[name] = trained
            say(f"{name} on the real system ({trained.env_steps} real steps): {returns.mean():.1f}")
    record["timings"] = timings
    record["wall_seconds"] = time.perf_counter() - start

    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        data.save(out / "episodes.npz")
        from agents.cli import to_jsonable
        from agents.policy import atomic_write_text

        atomic_write_text(
            out / "params.json",
            json.dumps(identify_json(env_id, fitted, report, data=os.fspath(out / "episodes.npz")), indent=2),
        )
        for name, trained in results.items():
            save_policy(out / name, trained.policy, trained.spec, env_id=env_id, algo=name, seed=seed)
        atomic_write_text(out / "report.json", json.dumps(to_jsonable(record), indent=2))
        atomic_write_text(out / "report.md", report_markdown(record))
    return record


def report_markdown(record: dict) -> str:
    """A one-run report (``report.md``) from ``run``'s record."""
    ident = record["identify"]
    physics = ", ".join(f"{k} = {v:g}" for k, v in record["real"]["physics"].items())
    noise = record["real"]["obs_noise"]
    lines = [
        f"# Sim-to-real: {record['env']}",
        "",
        f"Real system: {record['real']['backend']} {record['env']} with {physics}"
        + (f", observation noise {noise:g}" if noise else "")
        + f"; controller `{record['policy_dir']}`, seed {record['seed']}; returns over {record['eval_episodes']} "
        "real-system episodes (mean ± std).",
        "",
        "| | real steps | simulated steps | return on the real system |",
        "|---|---:|---:|---:|",
        f"| controller on diffgym's defaults (reference) | – | – | {_pm(record['nominal_return'])} |",
        f"| controller on the real system (before) | – | – | {_pm(record['before'])} |",
        (
            f"| fine-tuned by BPTT on the identified sim | {record['real_steps']} | "
            f"{record['fine_tune']['sim_steps']} | {_pm(record['fine_tune']['after'])} |"
        ),
    ]
    if "oracle" in record:
        lines.append(
            f"| fine-tuned by BPTT on the true params | – | {record['oracle']['sim_steps']} | {_pm(record['oracle']['after'])} |"
        )
    for name, label in (
        ("ppo", "PPO fine-tuned on the real system"),
        ("ppo_scratch", "PPO from scratch on the real system"),
    ):
        if name in record:
            lines.append(f"| {label} | {record[name]['real_steps']} | – | {_pm(record[name]['after'])} |")
    lines += [
        "",
        f"Identified from {record['collect']['episodes']} logged episodes ({record['real_steps']} steps):",
        "",
        "| parameter | default | true | fitted | std. error | error |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name in ident["fit"]:
        lines.append(
            f"| {name} | {ident['initial'][name]:.4g} | {ident['true'][name]:.4g} | {ident['values'][name]:.4g} | "
            f"{ident['standard_errors'][name]:.2g} | {ident['relative_error'][name]:+.1e} |"
        )
    lines.append("")
    return "\n".join(lines)


def _pm(stats: dict) -> str:
    return f"{stats['mean']:.1f} ± {stats['std']:.1f}"
