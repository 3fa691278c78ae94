"""A tiny environment with a random transition and a random reset, for key-safety tests.

``NoisyDrift`` is a point in the plane pushed by the action and by Gaussian noise drawn from the
step's key; its reset draws the start position from the reset's key. Both draws are exposed
(``NoisyDrift.noise``, ``NoisyDrift.start_position``) and the noise is returned in ``info``, so a
test can say exactly which key fed which draw (pytest puts ``tests/`` on ``sys.path``, so a test
module imports it as ``noisy_env``)::

    from noisy_env import NoisyDrift

    env = NoisyDrift()
    key_step, key_reset = jax.random.split(key)             # what Environment.step does
    _, state, _, _, _, info = env.step(key, state, action, env.default_params)
    info["noise"] == env.noise(key_step, env.default_params)

Anything that takes an ``Environment`` takes it: the functional API, the gymnasium shells
(``diffgym.gym.DiffgymEnv(NoisyDrift())``), and trainers and evaluators that accept an env
instance (its ``EnvSpec`` is the default one of an unregistered env: ``diffgym.spec(env)``).
The dynamics are smooth in state and action (a trainer can differentiate through them) and the
reward pulls the point to the origin, so a controller has something to learn.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from diffgym.core import Box, Environment, EnvParams, EnvState, pytree_dataclass

__all__ = ["NoisyDrift", "NoisyDriftParams", "NoisyDriftState"]

#: Dimensions of the position (and of the action and the noise).
DIM = 2


@pytree_dataclass
class NoisyDriftState(EnvState):
    position: jax.Array  # (DIM,) float
    time: jax.Array  # int32


@pytree_dataclass
class NoisyDriftParams(EnvParams):
    noise_std: float = 0.1
    """Standard deviation of the per-step Gaussian noise on each coordinate."""
    start_half_width: float = 1.0
    """The start position is uniform in ``[-start_half_width, start_half_width]^DIM``."""
    bound: float = 5.0
    """An episode terminates when a coordinate leaves ``[-bound, bound]``."""
    max_steps_in_episode: int = 50


class NoisyDrift(Environment[NoisyDriftState, NoisyDriftParams]):
    """``position' = position + action + noise_std * N(0, I)``, reward ``-|position'|^2``.

    **Action** — ``Box(-1, 1, (2,))``, added to the position.

    **Observation** — the position, ``Box(-bound, bound, (2,))``.

    **Randomness** — the transition draws ``noise(key)`` (``jax.random.normal``) from ``step_env``'s
    key and returns it as ``info["noise"]``; the reset draws ``start_position(key)``
    (``jax.random.uniform``) from ``reset_env``'s key. Same key, same draw: a test recomputes
    either from the key it expects.

    **Episode end** — terminated when ``|position_i| > bound``; truncated after
    ``max_steps_in_episode`` steps.
    """

    deterministic_transition = False
    observation_is_state_function = True

    @property
    def default_params(self) -> NoisyDriftParams:
        return NoisyDriftParams()

    @staticmethod
    def noise(key: jax.Array, params: NoisyDriftParams) -> jax.Array:
        """The transition's noise for ``key``: ``noise_std * jax.random.normal(key, (2,))``."""
        return params.noise_std * jax.random.normal(key, (DIM,))

    @staticmethod
    def start_position(key: jax.Array, params: NoisyDriftParams) -> jax.Array:
        """The reset's draw for ``key``: uniform in ``[-start_half_width, start_half_width]^2``."""
        return jax.random.uniform(key, (DIM,), minval=-params.start_half_width, maxval=params.start_half_width)

    def step_env(
        self, key: jax.Array, state: NoisyDriftState, action, params: NoisyDriftParams
    ) -> tuple[jax.Array, NoisyDriftState, jax.Array, jax.Array, dict[str, Any]]:
        noise = self.noise(key, params)
        position = state.position + jnp.reshape(jnp.asarray(action, state.position.dtype), (DIM,)) + noise
        next_state = NoisyDriftState(position=position, time=state.time + 1)
        terminated = self.is_terminated(next_state, params)
        info = {"noise": noise, "discount": self.discount(next_state, params)}
        return self.get_obs(next_state), next_state, -jnp.sum(position**2), terminated, info

    def reset_env(self, key: jax.Array, params: NoisyDriftParams) -> tuple[jax.Array, NoisyDriftState]:
        state = NoisyDriftState(position=self.start_position(key, params), time=jnp.zeros((), jnp.int32))
        return self.get_obs(state), state

    def get_obs(self, state: NoisyDriftState, params=None, key=None) -> jax.Array:
        return state.position

    def is_terminated(self, state: NoisyDriftState, params: NoisyDriftParams) -> jax.Array:
        return jnp.any(jnp.abs(state.position) > params.bound)

    @property
    def name(self) -> str:
        return "NoisyDrift-v0"

    @property
    def num_actions(self) -> int:
        return DIM

    def action_space(self, params: NoisyDriftParams | None = None) -> Box:
        return Box(-1.0, 1.0, (DIM,), jnp.float32)

    def observation_space(self, params: NoisyDriftParams | None = None) -> Box:
        bound = (params or self.default_params).bound
        return Box(-bound, bound, (DIM,), jnp.float32)
