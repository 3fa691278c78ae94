"""What every trainer returns, and the two evaluators.

``evaluate`` runs whole episodes on the functional env (jitted, vmapped, hard actions, true
reward): cheap enough for learning curves. ``evaluate_gymnasium`` runs the same policy on the
gymnasium shell, one episode after another, which is what ``metrics.json`` reports. The parity
tests make the two agree.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import diffgym
from agents.policy import Policy


@dataclasses.dataclass
class TrainResult:
    """A trained policy and how it got there.

    Attributes:
        policy: the trained network (``policy(obs)`` is the hard action).
        spec: ``Policy`` constructor arguments (for ``save_policy``).
        env_steps: simulated env steps consumed by training (every step of every parallel
            rollout counts; evaluation episodes do not).
        wall_seconds: training wall time, compilation included.
        compile_seconds: the part of ``wall_seconds`` spent compiling.
        curve: learning curve, one dict per evaluation point with at least ``env_steps``,
            ``wall_seconds`` and ``eval_return`` (mean over the functional evaluation episodes).
        extra: trainer-specific facts worth logging.
    """

    policy: Policy
    spec: dict
    env_steps: int
    wall_seconds: float
    compile_seconds: float
    curve: list[dict]
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


ProgressFn = Callable[[dict], None]


def evaluate(env_id: str, policy: Callable, *, key: jax.Array, episodes: int, params=None) -> np.ndarray:
    """Returns of ``episodes`` whole episodes on the functional env, in parallel.

    ``policy(obs)`` must return the hard action. An episode ends at the first termination or at
    the time limit; rewards after it are not counted.
    """
    env_id = diffgym.resolve_env_id(env_id)
    params = _env(env_id).default_params if params is None else params
    run = _evaluator(env_id, int(episodes), int(params.max_steps_in_episode))
    return np.asarray(run(policy, key, params))


@functools.lru_cache(maxsize=None)
def _env(env_id: str):
    return diffgym.make(env_id)[0]


# Cached per (env, episodes, horizon): a fresh jitted closure per call would recompile every
# evaluation (about 2 s each for CartPole), which dominates a learning curve's cost.
@functools.lru_cache(maxsize=None)
def _evaluator(env_id: str, episodes: int, max_steps: int):
    env = _env(env_id)

    @eqx.filter_jit
    def run(policy, key, params):
        def episode(key):
            obs, state = env.reset(key, params)

            def body(carry, _):
                obs, state, alive, total = carry
                obs, state, reward, terminated, _ = env.step_env(key, state, policy(obs), params)
                total = total + jnp.where(alive, reward, 0.0)
                alive = alive & ~terminated
                return (obs, state, alive, total), None

            init = (obs, state, jnp.array(True), jnp.zeros((), jnp.float32))
            (_, _, _, total), _ = jax.lax.scan(body, init, None, length=max_steps)
            return total

        return jax.vmap(episode)(jax.random.split(key, episodes))

    return run


def evaluate_gymnasium(
    policy: Callable[[np.ndarray], Any], env_id: str, *, episodes: int, seed: int
) -> np.ndarray:
    """Returns of ``episodes`` episodes of ``policy`` (numpy in, action out) on the gymnasium env."""
    import gymnasium

    env = gymnasium.make(f"diffgym/{diffgym.resolve_env_id(env_id)}")
    returns = []
    try:
        for episode in range(episodes):
            obs, _ = env.reset(seed=seed + episode)
            total, done = 0.0, False
            while not done:
                obs, reward, terminated, truncated, _ = env.step(policy(obs))
                total += float(reward)
                done = terminated or truncated
            returns.append(total)
    finally:
        env.close()
    return np.asarray(returns)
