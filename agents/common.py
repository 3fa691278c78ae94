"""What every trainer shares: the result type, env resolution, compile caches and the evaluators.

``evaluate`` runs whole episodes on the functional env (jitted, vmapped, hard actions, true
reward): cheap enough for learning curves. ``evaluate_gymnasium`` runs the same policy on the
gymnasium shell, one episode after another, which is what ``metrics.json`` reports. The parity
tests make the two agree.
"""

from __future__ import annotations

import collections
import dataclasses
import tomllib
from pathlib import Path
from typing import Any, Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import diffgym
from diffgym.registry import did_you_mean

#: Bundled per-env files (controllers, tuned hyper-parameters): ``assets/<alias>/``.
ASSETS_DIR = Path(__file__).resolve().parent / "assets"
HYPERPARAMS_FILE = "hyperparams.toml"


@dataclasses.dataclass
class TrainResult:
    """What every trainer returns: a trained policy and how it got there.

    Attributes:
        policy: the trained controller; ``policy(obs)`` is the hard action (an
            ``agents.policy.Policy``, or a numpy callable for Stable-Baselines3's).
        spec: ``Policy`` constructor arguments (for ``save_policy``).
        env_steps: simulated env steps consumed by training (every step of every parallel
            rollout counts; evaluation episodes do not).
        wall_seconds: training wall time, compilation included.
        compile_seconds: the part of ``wall_seconds`` spent compiling.
        curve: learning curve, one dict per evaluation point with at least ``env_steps``,
            ``wall_seconds`` and ``eval_return`` (mean over the evaluation episodes).
        extra: trainer-specific facts worth logging (always ``algo`` and ``config``).
    """

    policy: Any
    spec: dict
    env_steps: int
    wall_seconds: float
    compile_seconds: float
    curve: list[dict]
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_threshold(self, threshold: float) -> tuple[int | None, float | None]:
        """``(env_steps, wall_seconds)`` of the first curve point after training started whose
        ``eval_return`` reaches ``threshold``; ``(None, None)`` if none does."""
        for point in self.curve:
            if point["env_steps"] > 0 and point["eval_return"] >= threshold:
                return int(point["env_steps"]), float(point["wall_seconds"])
        return None, None


ProgressFn = Callable[[dict], None]
RenderFn = Callable[[Any], None]


# --------------------------------------------------------------------------------------------
# Environments and their tuned settings
# --------------------------------------------------------------------------------------------
def resolve_env(env, env_params=None) -> tuple[diffgym.Environment, Any, diffgym.EnvSpec]:
    """``(env, params, spec)`` for an id, an alias or an ``Environment`` instance (a user's own or
    wrapped env trains too); ``params`` default to the env's own."""
    if isinstance(env, diffgym.Environment):
        instance, params = env, env.default_params
    else:
        instance, params = diffgym.make(env)
    return instance, params if env_params is None else env_params, diffgym.spec(instance)


def tuned_settings(env, algo: str) -> dict | None:
    """The ``[algo]`` table of the env's bundled ``hyperparams.toml`` (``assets/<alias>/``), or
    None when the env has no tuned settings for that trainer.

    A file may start with ``based_on = "<alias>"`` (a variant of another env, such as the kicked
    CartPole of CartPole): a table it lacks is read from that env's file, and a table it has is
    laid key by key over that env's table of the same name."""
    return _hyperparams(diffgym.spec(env).short_name, algo, seen=())


def _hyperparams(alias: str, algo: str, *, seen: tuple[str, ...]) -> dict | None:
    path = ASSETS_DIR / alias / HYPERPARAMS_FILE
    if not path.exists():
        return None
    with path.open("rb") as file:
        tables = tomllib.load(file)
    base_alias = tables.get("based_on")
    if base_alias is None:
        return tables.get(algo)
    if base_alias in (alias, *seen) or not (ASSETS_DIR / base_alias / HYPERPARAMS_FILE).exists():
        raise ValueError(f"{path}: based_on = {base_alias!r} names no other env's {HYPERPARAMS_FILE}")
    base = _hyperparams(base_alias, algo, seen=(*seen, alias))
    own = tables.get(algo)
    if base is None or own is None:
        return own if base is None else base
    return {**base, **own}


def tuned_config(config_type: type, env, name: str, **defaults):
    """``config_type`` with the env's tuned ``[name]`` settings over ``defaults`` (just
    ``defaults`` when the env has none)."""
    spec = diffgym.spec(env)
    settings = {**defaults, **(tuned_settings(env, name) or {})}
    return config_from_settings(config_type, settings, where=f"[{name}] of {spec.short_name}'s hyperparams")


def config_from_settings(config_type: type, settings: dict, *, where: str):
    """``config_type(**settings)``; an unknown key is an error naming the file and the closest field."""
    fields = [f.name for f in dataclasses.fields(config_type)]
    unknown = [k for k in settings if k not in fields]
    if unknown:
        hints = "".join(did_you_mean(k, fields) for k in unknown)
        raise ValueError(f"{where}: {config_type.__name__} has no field {', '.join(map(repr, unknown))}.{hints}")
    return config_type(**settings)


def make_task(env_spec: diffgym.EnvSpec, weights: dict[str, float], *, field: str) -> diffgym.Task:
    """The env's ``Task`` with ``weights`` (a config's ``field``, e.g. ``"BPTTConfig.cost"``); a
    name the task lacks is an error listing its terms, with the closest."""
    task_class = env_spec.task_class()
    known = ["reward", *task_class.term_names()]
    unknown = [name for name in weights if name not in known]
    if unknown:
        hints = "".join(did_you_mean(name, known) for name in unknown)
        raise ValueError(
            f"{field} names {unknown}, which {task_class.__name__} ({env_spec.id}'s task) does not have."
            f"{hints} Its terms: {', '.join(known)}."
        )
    return task_class(**weights)


def env_cache_key(env: diffgym.Environment, params) -> tuple:
    """A hashable identity of an env configuration and its params (compile-cache keys)."""
    return (type(env).__module__, type(env).__qualname__, repr(sorted(vars(env).items())), repr(params))


class BoundedCache:
    """A least-recently-used mapping of at most ``size`` entries: compiled functions of a sweep
    over many configs must not pile up for the whole process."""

    def __init__(self, size: int):
        self.size = size
        self._items: collections.OrderedDict = collections.OrderedDict()

    def get(self, key, build: Callable[[], Any]) -> tuple[Any, bool]:
        """``(value, was_cached)``; builds and stores the value on a miss."""
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key], True
        value = self._items[key] = build()
        while len(self._items) > self.size:
            self._items.popitem(last=False)
        return value, False

    def __len__(self) -> int:
        return len(self._items)


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------
_EVALUATORS = BoundedCache(16)


def evaluate(env, policy: Callable, *, key: jax.Array, episodes: int, params=None) -> np.ndarray:
    """Returns of ``episodes`` whole episodes on the functional env, in parallel.

    ``env`` is an id or an ``Environment``; ``policy(obs)`` must return the hard action. An
    episode ends at the first termination or at the time limit; rewards after it are not
    counted. Every episode's reset and every step get keys of their own (a noisy env draws
    independent noise on every step).
    """
    run, _ = evaluator(env, episodes=episodes, params=params)
    return np.asarray(run(policy, key))


def evaluator(env, *, episodes: int, params=None) -> tuple[Callable, bool]:
    """``(run(policy, key) -> returns, was_compiled_before)``: the cached evaluator of ``evaluate``.

    Cached per (env, params, episodes): a fresh jitted closure per call would recompile every
    evaluation (about 2 s each for CartPole), which dominates a learning curve's cost."""
    env, params, _ = resolve_env(env, params)
    episodes, max_steps = int(episodes), int(params.max_steps_in_episode)

    def build():
        @eqx.filter_jit
        def run(policy, key):
            def episode(key):
                key_reset, key_steps = jax.random.split(key)
                obs, state = env.reset(key_reset, params)

                def body(carry, step_key):
                    obs, state, alive, total = carry
                    obs, state, reward, terminated, _ = env.step_env(step_key, state, policy(obs), params)
                    total = total + jnp.where(alive, reward, 0.0)
                    alive = alive & ~terminated
                    return (obs, state, alive, total), None

                init = (obs, state, jnp.array(True), jnp.zeros((), jnp.float32))
                (_, _, _, total), _ = jax.lax.scan(body, init, jax.random.split(key_steps, max_steps))
                return total

            return jax.vmap(episode)(jax.random.split(key, episodes))

        return run

    return _EVALUATORS.get((env_cache_key(env, params), episodes), build)


def evaluate_gymnasium(policy: Callable[[np.ndarray], Any], env, *, episodes: int, seed: int, params=None) -> np.ndarray:
    """Returns of ``episodes`` episodes of ``policy`` (numpy in, action out) on the gymnasium
    shell of ``env`` (an id or an ``Environment``), with gymnasium's time limit."""
    import gymnasium

    from diffgym.gym import DiffgymEnv

    instance, params, _ = resolve_env(env, params)
    shell = gymnasium.wrappers.TimeLimit(
        DiffgymEnv(instance, params=params), max_episode_steps=int(params.max_steps_in_episode)
    )
    returns = []
    try:
        for episode in range(episodes):
            obs, _ = shell.reset(seed=seed + episode)
            total, done = 0.0, False
            while not done:
                obs, reward, terminated, truncated, _ = shell.step(policy(obs))
                total += float(reward)
                done = terminated or truncated
            returns.append(total)
    finally:
        shell.close()
    return np.asarray(returns)


def numpy_policy(policy) -> Callable[[np.ndarray], Any]:
    """A jitted ``numpy obs -> gymnasium action`` for an ``agents.policy.Policy`` (int for a
    discrete head, float32 array for a box); other callables (SB3's) pass through."""
    from agents.policy import Policy

    if not isinstance(policy, Policy):
        return policy
    weights, static = eqx.partition(policy, eqx.is_array)
    act = _act(static)
    if policy.discrete:
        return lambda obs: int(act(weights, np.asarray(obs, np.float32)))
    return lambda obs: np.asarray(act(weights, np.asarray(obs, np.float32)), np.float32)


_ACTORS = BoundedCache(16)


def _act(static):
    """The jitted hard action of a policy skeleton, shared by every policy of that shape."""
    return _ACTORS.get(static, lambda: jax.jit(lambda weights, obs: eqx.combine(weights, static)(obs)))[0]
