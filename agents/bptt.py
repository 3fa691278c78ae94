"""Backpropagation through time (BPTT): train a controller by differentiating the simulated return.

No reinforcement learning here: the policy acts in diffgym's differentiable env, a surrogate cost
is summed along the rollout, and its gradient with respect to the network's weights comes straight
through the physics (``jax.grad`` of a ``lax.scan``). Optax applies the update.

**Online truncated BPTT.** A batch of ``num_envs`` rollouts runs on; every ``window`` steps the
cost of those last steps is backpropagated (through the policy and the dynamics of that window
only), the weights are updated, and the rollouts go on from where they were: the simulator state
is carried across window boundaries, the gradient is not. ``window = episode_length`` is
whole-episode BPTT. This gives one update per ``num_envs * window`` simulated steps, which is what
makes BPTT frugal: the FluxML "Differentiable Control Problems" post (2019) trains CartPole in
about five episodes this way.

**Surrogates.**

* CartPole-v1: the reward (1 per step until termination) has no gradient, so training minimises
  ``angle_weight (theta / 12°)^2 + position_weight (x / 2.4 m)^2
  + velocity_weight ((x_dot / 2)^2 + (theta_dot / 2)^2)`` per step. Actions go through the
  straight-through discretizer: exactly 0 or 1 forward (the env sees gymnasium's actions), the
  gradient of ``sigmoid(logit / temperature)`` backward. When a training rollout crosses
  gymnasium's termination thresholds it is reset at once, as ``Environment.step`` does: the cost of
  the failing step is counted, the gradient is cut at the reset.
* Pendulum-v1: the env's cost ``theta^2 + 0.1 theta_dot^2 + 0.001 u^2`` is smooth (bar the
  documented clips) but scored on the state the action leads to (the env scores the state before
  it, which a short window would not see move), plus ``energy_weight`` times the squared energy
  gap to upright-at-rest. A window of a few steps cannot see a swing-up pay off through the angle
  cost (the speed cost even discourages swinging): alone, it learns to push straight up and stall
  sideways. The energy gap shrinks at once when the torque pumps, so the pumping is learned in
  one window (the default trains on one-step windows, replayed). The torque is ``2 tanh(raw)``,
  inside ±2. Two training-time gradients differ from the plain ones (the forward pass is the
  env's and the policy's exactly): the squash's gradient does not vanish when the update brings a
  saturated torque back inside (``inward_tanh``), and the speed clip is straight-through.
  With the plain gradients a policy that pumps at full torque cannot learn to brake, and a
  pendulum spinning at the speed limit gets no gradient at all.

**Replay (``replay_updates > 0``; the Pendulum's default).** Online BPTT uses each simulated step
for one gradient and throws it away. With replay, every simulated step is stored with the
simulator's Jacobian of its next state with respect to the action (forward mode, one tangent per
action entry), and after each window the policy takes ``replay_updates`` Adam steps on minibatches
of ``replay_batch`` steps drawn from all those stored so far. A stored step ``(s, a, s', J)`` is
re-acted by the current policy: its cost is the surrogate of ``s' + J (policy(s) - a)``, and the
gradient flows through ``J`` and the policy. No env step is simulated for it, so none is counted:
this is the reuse an off-policy learner makes of its replay buffer, with the simulator's
derivative stored beside each transition. The linearised step is exact where the step is affine
in the action, as the Pendulum's (and CartPole's) are inside their clips; replay windows are
one step long, so it suits a one-step surrogate such as the Pendulum's energy-shaped one, not
CartPole's, whose cost needs a horizon. On the Pendulum it turns 4 000-13 000 steps to -200 into
500-750 (10 of 10 seeds).

**Optional critic (SHAC-style, ``critic_width > 0``).** A value network ``V(obs)`` learns the
discounted surrogate cost-to-go of the current policy; each window's loss becomes
``sum_t discount^t c_t + discount^(t+1) V(s_t+1)`` at the window's end (and at a truncation inside
it; not after CartPole's termination), so a short window is judged by what follows it too (Xu et
al. 2022, "Accelerated Policy Learning with Parallel Differentiable Simulation"). After each policy
update the critic takes ``critic_updates`` Adam steps towards the window's TD(lambda) targets,
computed from the states already simulated: no extra env step. Its output is in units of
``_cost_unit / (1 - discount)`` so that it stays of order 1; its output layer starts at zero (no
bootstrap before it has learned anything). Off by default: on Pendulum at 4 000 steps it did not
beat the plain trainer (see bench/results/bptt.md).

Evaluations (the learning curve) always use ``agents.common.evaluate``: hard actions, the true env
reward, gymnasium's reset distribution, fresh episodes each time.

**One compiled function.** Training runs in chunks of updates, each chunk a single jitted
``lax.scan`` over updates; between chunks the impure loop evaluates, reports progress and renders.
A partial last chunk reuses the same compiled function (the surplus updates are skipped by
``lax.cond``), so one train call compiles the chunk once, plus the cached evaluator. The random
numbers (initial weights, training start states) are drawn by numpy on the host and passed in:
compiling JAX's PRNG for them cost more than the whole training.

**NaN guard.** An update whose loss, gradient or simulated state is not finite is not applied; the
chunk freezes, and ``train`` raises ``FloatingPointError`` naming the update, the env step and what
went non-finite, instead of carrying on with corrupted weights.

**Measured** (``python -m bench.bench_bptt``, ``bench/results/bptt.md``, 2 CPU cores, quiet):
CartPole-v1 reaches 500 after 300-1 100 env steps (5 of 5 seeds) in 3.5-4.2 s of wall time in a
fresh process, nearly all of it compiling (training proper: 0.01-0.03 s). Pendulum-v1 with
replay reaches -200 after 500-750 steps (10 of 10 seeds in the tuning runs), and its whole
4 000-step budget trains in under a second after compiling. The critic did not help (its best
configuration, before the gradient fixes above: -982 on average over 5 seeds at 4 000 steps, the
plain trainer then -999).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import diffgym
from agents.common import ProgressFn, TrainResult, evaluate
from agents.policy import Policy
from diffgym.envs.cartpole import CartPoleState
from diffgym.envs.pendulum import PendulumState, angle_normalize

SUPPORTED_ENVS = ("CartPole-v1", "Pendulum-v1")


@dataclasses.dataclass
class BPTTConfig:
    """Hyper-parameters of BPTT training (defaults: see ``default_config`` for tuned per-env values)."""

    total_env_steps: int = 5_000
    """Training budget in simulated env steps (every step of every parallel rollout counts)."""
    num_envs: int = 1
    """Parallel rollouts per update (``vmap``); the gradient is their mean."""
    window: int = 10
    """Truncation window: simulated steps backpropagated per update. Equal to ``episode_length`` for
    whole-episode BPTT. The env state is carried across windows, the gradient is not."""
    episode_length: int = 500
    """Training rollouts restart from a fresh start state after this many steps (or at CartPole's
    termination)."""
    learning_rate: float = 1e-2
    """Adam step size at the first update."""
    final_learning_rate_fraction: float = 1.0
    """The step size decays linearly to ``learning_rate * final_learning_rate_fraction`` at the last
    update of the budget (1 = constant)."""
    max_grad_norm: float = 1.0
    """Global-norm gradient clipping threshold applied before Adam."""
    width: int = 32
    """Hidden layer width of the policy MLP."""
    depth: int = 1
    """Number of hidden layers of the policy MLP."""
    activation: str = "tanh"
    """Hidden activation: tanh, relu, elu or softplus."""
    output_scale: float = 0.1
    """The initial weights and bias of the output layer are multiplied by this (small first actions:
    a centred torque, logits near 0 where the straight-through gradient is largest)."""
    temperature: float = 1.0
    """Straight-through temperature (discrete envs): gradient of ``sigmoid(logit / temperature)``."""
    obs_scale: tuple[float, ...] = ()
    """Typical magnitude of each observation entry, used to scale the network's inputs while
    training (folded into the first layer of the returned policy). Empty: the env's default."""
    discount: float = 1.0
    """Per-step weight ``discount**t`` on the cost inside a window (1 = plain sum); with a critic,
    also the discount of the value it learns (then < 1: its horizon is about ``1 / (1 - discount)``
    steps)."""
    angle_weight: float = 1.0
    """CartPole surrogate: weight of ``(theta / theta_threshold)^2``."""
    position_weight: float = 0.1
    """CartPole surrogate: weight of ``(x / x_threshold)^2``."""
    velocity_weight: float = 0.0
    """CartPole surrogate: weight of ``(x_dot / 2 m/s)^2 + (theta_dot / 2 rad/s)^2``."""
    energy_weight: float = 0.0
    """Pendulum surrogate: weight of the squared energy gap to upright-at-rest (normalised to 1 for
    hanging at rest), added to the env's cost."""
    inward_squash_gradient: bool = True
    """Box actions (Pendulum): the torque's ``tanh`` squash passes its gradient at full slope where
    the update moves a saturated torque back inside the box (``agents.policy.inward_tanh``; the
    forward pass is unchanged). False: ``tanh``'s own gradient, which vanishes at saturation, so
    a policy that learnt to pump at full torque cannot learn to brake."""
    straight_through_speed_clip: bool = True
    """Pendulum: backpropagate through the env's speed clip (±``max_speed``) as if it were not
    there. The forward pass is the env's exactly; the backward pass is the gradient of the same
    step without the clip. The env's own gradient through a clipped speed is 0, so a pendulum
    spinning at the limit would get no signal to brake."""
    start_half_width: float = 0.05
    """CartPole training starts: every state variable uniform in ±this (gymnasium: 0.05)."""
    start_max_speed: float = 1.0
    """Pendulum training starts: ``theta`` uniform in [-pi, pi], ``theta_dot`` uniform in ±this rad/s
    (gymnasium: 1)."""
    eval_every: int = 500
    """Env steps between learning-curve evaluations (rounded to whole updates)."""
    eval_episodes: int = 20
    """Functional-env episodes per evaluation (hard actions, true reward)."""
    stop_at_return: float | None = None
    """Stop as soon as an evaluation's mean return reaches this; ``None`` trains the whole budget."""
    critic_width: int = 0
    """Hidden width of a learned value function that bootstraps each truncated window (SHAC, Xu et
    al. 2022): the window's loss becomes its discounted costs plus ``discount**window V(s_end)``.
    0: no critic (plain truncated BPTT)."""
    critic_depth: int = 2
    """Hidden layers of the critic MLP."""
    critic_learning_rate: float = 3e-3
    """Adam step size of the critic."""
    critic_updates: int = 4
    """Critic gradient steps per window (free: they reuse the window's simulated states)."""
    td_lambda: float = 0.95
    """TD(lambda) mixing of the critic's targets along the window."""
    replay_updates: int = 0
    """Replay (0: off, plain online truncated BPTT). Every simulated step is stored with its
    Jacobian with respect to the action; after each window, instead of the window's own gradient,
    the policy takes this many Adam steps, each on ``replay_batch`` stored steps drawn uniformly
    from all those simulated so far, replayed through their linearised dynamics (no new env step;
    see the module docstring)."""
    replay_batch: int = 64
    """Stored steps per replay update."""
    keep_best: bool = True
    """Return the policy of the best learning-curve evaluation rather than the last one. The pick is
    made on the curve's episodes, so judge the result on other episodes (``bench/bench_bptt.py``
    and the CLI evaluate on the gymnasium env with other seeds)."""

    def __post_init__(self):
        # A list (e.g. from JSON) would make the config unhashable as a compile-cache key.
        self.obs_scale = tuple(float(value) for value in self.obs_scale)


def default_config(env_id: str) -> BPTTConfig:
    """Tuned defaults for ``"CartPole-v1"`` or ``"Pendulum-v1"`` (short names accepted)."""
    env_id = _supported(env_id)
    if env_id == "CartPole-v1":
        # Tuned on seeds 0-9, checked on 10-19: 20-step windows at a step size of 3e-2 reach 475 on
        # the curve after 300-1 100 steps (mean 570); 10-step windows at 1e-2 after 500-2 200.
        return BPTTConfig(
            total_env_steps=5_000,
            num_envs=1,
            window=20,
            episode_length=500,
            learning_rate=3e-2,
            eval_every=100,
            eval_episodes=20,
            stop_at_return=500.0,
        )
    # Tuned on seeds 0-9: one rollout, each simulated step stored and replayed (4 Adam steps on
    # 64 stored steps per simulated step): -200 on the curve after 500-750 steps on all 10 seeds
    # (energy weight 100: 750-1 750; without replay, 2-step windows: 4 000-13 000 steps).
    return BPTTConfig(
        total_env_steps=4_000,
        num_envs=1,
        window=1,
        episode_length=200,
        learning_rate=3e-3,
        final_learning_rate_fraction=0.1,
        width=32,
        depth=2,
        energy_weight=30.0,
        replay_updates=4,
        replay_batch=64,
        eval_every=250,
        eval_episodes=100,
        stop_at_return=None,
    )


def _supported(env_id: str) -> str:
    env_id = diffgym.resolve_env_id(env_id)
    if env_id not in SUPPORTED_ENVS:
        raise ValueError(f"BPTT trains {', '.join(SUPPORTED_ENVS)}; got {env_id!r}")
    return env_id


# --------------------------------------------------------------------------------------------
# Per-env pieces: policy head, observation scale, training starts, surrogate cost
# --------------------------------------------------------------------------------------------
_DEFAULT_OBS_SCALE = {
    # x (m), x_dot (m/s), theta (rad: the 12° threshold), theta_dot (rad/s)
    "CartPole-v1": (2.4, 2.0, 0.21, 2.0),
    # cos, sin, theta_dot (rad/s, max_speed 8)
    "Pendulum-v1": (1.0, 1.0, 8.0),
}


def _policy_spec(env_id: str, env, params, config: BPTTConfig) -> dict:
    obs_size = int(env.observation_space(params).shape[0])
    common = dict(obs_size=obs_size, width=config.width, depth=config.depth, activation=config.activation)
    if env_id == "CartPole-v1":
        return dict(common, action_size=1, kind="bernoulli", low=(), high=())
    torque = float(params.max_torque)
    return dict(common, action_size=1, kind="box", low=(-torque,), high=(torque,))


#: Uniform draws in [0, 1) that make one training start state.
_START_DRAWS = {"CartPole-v1": 4, "Pendulum-v1": 2}


def _training_start(env_id: str, params, config: BPTTConfig, uniforms: jax.Array):
    """A training start state from ``_START_DRAWS[env_id]`` uniforms in [0, 1) (last axis).

    CartPole: ``x, x_dot, theta, theta_dot`` uniform in ±``start_half_width`` (gymnasium: ±0.05).
    Pendulum: ``theta`` uniform in [-pi, pi], ``theta_dot`` in ±``start_max_speed`` (gymnasium: ±1),
    which includes the hard starts hanging down at rest.

    The uniforms come from the host (numpy), so the compiled training step holds no PRNG: that
    keeps its compile time low. Works on any leading batch shape.
    """
    centred = 2.0 * uniforms - 1.0
    time_zero = jnp.zeros(uniforms.shape[:-1], jnp.int32)
    if env_id == "CartPole-v1":
        x, x_dot, theta, theta_dot = jnp.moveaxis(centred * config.start_half_width, -1, 0)
        return CartPoleState(x=x, x_dot=x_dot, theta=theta, theta_dot=theta_dot, time=time_zero)
    theta = centred[..., 0] * jnp.pi
    theta_dot = centred[..., 1] * config.start_max_speed
    return PendulumState(theta=theta, theta_dot=theta_dot, last_u=jnp.zeros_like(theta), time=time_zero)


def _surrogate_cost(env_id: str, params, config: BPTTConfig, next_state, reward) -> jax.Array:
    """Smooth per-step cost to minimise (see the module docstring)."""
    if env_id == "CartPole-v1":
        return (
            config.angle_weight * (next_state.theta / params.theta_threshold_radians) ** 2
            + config.position_weight * (next_state.x / params.x_threshold) ** 2
            + config.velocity_weight * ((next_state.x_dot / 2.0) ** 2 + (next_state.theta_dot / 2.0) ** 2)
        )
    # Pendulum: the env's own cost, plus the squared energy gap to upright-at-rest. Per unit
    # inertia, E = theta_dot^2 / 2 + k cos(theta) with k = 3 g / (2 l) is conserved without torque;
    # upright at rest has E = k, hanging at rest -k. A short window cannot see the swing-up pay off
    # through the angle cost alone (and the speed cost even discourages swinging), but it sees the
    # energy gap shrink at once: pumping energy is then a one-window lesson.
    # The env's reward scores the state *before* the step; scoring the state the action leads to
    # lets even a one-step window see the action's effect on the angle and speed.
    theta = angle_normalize(next_state.theta)
    cost = theta**2 + 0.1 * next_state.theta_dot**2 + 0.001 * next_state.last_u**2
    k = 3.0 * params.g / (2.0 * params.l)
    energy_gap = (0.5 * next_state.theta_dot**2 + k * jnp.cos(next_state.theta) - k) / (2.0 * k)
    return cost + config.energy_weight * energy_gap**2


def _transition(env_id: str, env, params, config: BPTTConfig, state, action):
    """``env.step_env`` as training sees it: ``(next_state, reward, terminated)``.

    The forward pass is the env's exactly. With ``config.straight_through_speed_clip`` the
    Pendulum's gradient is that of the same step without its speed clip.
    """
    # Both envs ignore the step key (deterministic_transition).
    _, next_state, reward, terminated, _ = env.step_env(None, state, action, params)
    if env_id == "Pendulum-v1" and config.straight_through_speed_clip:
        unclipped = dataclasses.replace(params, max_speed=jnp.inf)
        _, free, _, _, _ = env.step_env(None, state, action, unclipped)
        next_state = dataclasses.replace(
            next_state,
            theta=free.theta + jax.lax.stop_gradient(next_state.theta - free.theta),
            theta_dot=free.theta_dot + jax.lax.stop_gradient(next_state.theta_dot - free.theta_dot),
        )
    return next_state, reward, terminated


def _transition_with_jacobian(env_id: str, env, params, config: BPTTConfig, state, action):
    """``_transition``'s ``(next_state, reward, terminated)`` and the Jacobian of the next state's
    float leaves with respect to the action (forward mode: one tangent per action entry), as
    replay stores them."""

    def floats_and_all(action):
        outcome = _transition(env_id, env, params, config, state, action)
        return eqx.filter(outcome[0], eqx.is_inexact_array), outcome

    jacobian, outcome = jax.jacfwd(floats_and_all, has_aux=True)(action)
    return outcome, jacobian


def _linearised_next_state(next_state, jacobian, action_change: jax.Array):
    """A stored step's next state, moved to first order by ``action_change``: ``s' + J (u - a)``.

    Exact where the step is affine in the action: the Pendulum's torque and CartPole's force
    enter the Euler step linearly, inside the torque clip and (Pendulum) the speed clip."""
    floats, rest = eqx.partition(next_state, eqx.is_inexact_array)
    axes = action_change.ndim
    moved = jax.tree.map(lambda x, j: x + jnp.tensordot(j, action_change, axes=axes), floats, jacobian)
    return eqx.combine(moved, rest)


def _cost_unit(env_id: str, config: BPTTConfig) -> float:
    """A typical bad per-step surrogate cost (the critic predicts values in units of it over the
    discount's horizon, so its outputs stay of order 1): CartPole at the thresholds, Pendulum
    hanging at rest (angle cost pi^2, energy gap 1)."""
    if env_id == "CartPole-v1":
        return config.angle_weight + config.position_weight + config.velocity_weight
    return math.pi**2 + config.energy_weight


# --------------------------------------------------------------------------------------------
# Observation scaling: trained on scaled inputs, returned with the scale folded into layer 0
# --------------------------------------------------------------------------------------------
def _fold_obs_scale(policy: Policy, obs_scale: jax.Array) -> Policy:
    """The policy acting on raw observations: ``W0 @ (obs / scale) == (W0 / scale) @ obs``."""
    folded = np.asarray(policy.mlp.layers[0].weight) / np.asarray(obs_scale)  # numpy: no kernel to compile
    return eqx.tree_at(lambda p: p.mlp.layers[0].weight, policy, jnp.asarray(folded))


# --------------------------------------------------------------------------------------------
# The pure training step
# --------------------------------------------------------------------------------------------
# Bits of the non-finite report
_NONFINITE_STATE, _NONFINITE_LOSS, _NONFINITE_GRAD = 1, 2, 4


def _make_chunk_runner(env_id: str, params, config: BPTTConfig, static, optimizer, obs_scale, critic=None):
    """Build ``run_chunk(carry, start_uniforms, num_active[, replay_uniforms]) -> (carry, (losses,
    grad_norms))`` and ``empty_replay(weights, states, capacity)``, the initial replay carry.

    One call makes ``_updates_per_chunk(config)`` updates, of which the first ``num_active`` run and
    the rest are skipped (``lax.cond``: nothing simulated). ``start_uniforms`` has shape
    ``(updates, num_envs, window, _START_DRAWS[env_id])``: the start state used if a rollout resets
    at that step. ``carry`` is ``(weights, opt_state, states, update_index, failed_code,
    failed_update, failed_window_step, critic_weights, critic_opt_state, replay)``; the critic's are
    ``()`` without a critic, ``replay`` is ``()`` without replay, else ``(stored steps, count)``.
    With replay (``config.replay_updates > 0``), ``replay_uniforms`` has shape ``(updates,
    replay_updates, replay_batch)``: uniforms in [0, 1) that pick the stored steps of each
    minibatch, and ``losses`` are the mean surrogate cost of each update's simulated window.
    ``critic`` is ``(critic_static, critic_optimizer)`` when ``config.critic_width > 0``.
    """
    env, _ = diffgym.make(env_id)
    train_params = dataclasses.replace(params, max_steps_in_episode=config.episode_length)
    discount = config.discount
    step_weights = discount ** jnp.arange(config.window, dtype=jnp.float32)
    value_scale = _cost_unit(env_id, config) / (1.0 - discount) if critic is not None else 1.0
    is_last = jnp.arange(config.window) == config.window - 1
    replay = config.replay_updates > 0

    def act(weights, obs):
        # Straight-through 0./1. (CartPole: hard forward, sigmoid gradient) or the squashed torque.
        return eqx.combine(weights, static).relaxed(
            obs / obs_scale, config.temperature, inward_gradient=config.inward_squash_gradient
        )

    def transition(state, action):
        return _transition(env_id, env, train_params, config, state, action)

    def value(critic_weights, obs):
        """The critic's discounted cost-to-go from one observation, in cost units."""
        return value_scale * eqx.combine(critic_weights, critic[0])(obs / obs_scale)[0]

    def env_step(weights, state, start_uniforms, record=False):
        """One training step of one rollout, reset at termination or at the episode's end.

        ``record``: also return what replay stores of the step (observation, action, next state
        and its action Jacobian)."""
        obs = env.get_obs(state, train_params)
        action = act(weights, obs)
        if record:
            (next_state, reward, terminated), jacobian = _transition_with_jacobian(
                env_id, env, train_params, config, state, action
            )
        else:
            next_state, reward, terminated = transition(state, action)
        cost = _surrogate_cost(env_id, train_params, config, next_state, reward)
        done = terminated | env.is_truncated(next_state, train_params)
        fresh = _training_start(env_id, train_params, config, start_uniforms)
        # The reset state is a constant: the gradient is cut there, as Environment.step does.
        carried = jax.tree.map(lambda r, s: jnp.where(done, r, s), fresh, next_state)
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(next_state)]))
        # The state reached before any reset: where a critic bootstraps a cut-off episode.
        next_obs = env.get_obs(next_state, train_params)
        records = (obs, action, next_state, jacobian) if record else ()
        return carried, (cost, finite, next_obs, done, terminated, records)

    def simulate_window(weights, states, start_uniforms, record=False):
        """``env_step`` over one window of every rollout: ``(states, per-step outputs)``, each
        output shaped ``(num_envs, window, ...)``."""

        def one_rollout(state, uniforms):
            return jax.lax.scan(lambda state, u: env_step(weights, state, u, record), state, uniforms)

        return jax.vmap(one_rollout)(states, start_uniforms)

    def window_loss(weights, critic_weights, states, start_uniforms):
        """Discount-weighted mean cost per step of one window, averaged over the rollouts.

        With a critic, the discounted value of where each episode piece ends (the window's end, or
        a truncation inside it) is added: the window is then judged by what follows it too.
        """
        states, outputs = simulate_window(weights, states, start_uniforms)
        costs, finite, next_obs, done, terminated, _ = outputs
        total = costs @ step_weights
        if critic is not None:
            bootstrap = (done | is_last) & ~terminated
            values = jax.vmap(jax.vmap(lambda obs: value(critic_weights, obs)))(next_obs)
            total = total + jnp.sum(jnp.where(bootstrap, values, 0.0) * discount * step_weights, axis=-1)
        loss = jnp.mean(total) / jnp.sum(step_weights)
        return loss, (states, finite, (costs, next_obs, done, terminated))

    grad_fn = jax.value_and_grad(window_loss, has_aux=True)

    def critic_targets(critic_weights, costs, next_obs, done, terminated):
        """TD(lambda) returns of one rollout's window, ``(window,)``, reading the critic's values."""
        next_values = jax.vmap(lambda obs: value(critic_weights, obs))(next_obs)
        next_values = jnp.where(terminated, 0.0, next_values)
        # The lambda-chain stops where an episode piece ends (reset or the window's end).
        chained = ~(done | is_last)

        def backward(later_return, xs):
            cost, next_value, chain = xs
            mixed = (1 - config.td_lambda) * next_value + config.td_lambda * later_return
            blended = jnp.where(chain, mixed, next_value)
            target = cost + discount * blended
            return target, target

        _, targets = jax.lax.scan(backward, jnp.float32(0.0), (costs, next_values, chained), reverse=True)
        return targets

    def train_critic(critic_weights, critic_opt_state, obs, costs, next_obs, done, terminated):
        """``critic_updates`` Adam steps towards the window's TD(lambda) targets (no env step)."""
        targets = jax.vmap(critic_targets, in_axes=(None, 0, 0, 0, 0))(
            critic_weights, costs, next_obs, done, terminated
        )
        targets = jax.lax.stop_gradient(targets) / value_scale

        def critic_loss(critic_weights):
            predicted = jax.vmap(jax.vmap(lambda o: value(critic_weights, o)))(obs) / value_scale
            return jnp.mean((predicted - targets) ** 2)

        def critic_step(carry, _):
            critic_weights, critic_opt_state = carry
            grads = jax.grad(critic_loss)(critic_weights)
            updates, critic_opt_state = critic[1].update(grads, critic_opt_state, critic_weights)
            return (optax.apply_updates(critic_weights, updates), critic_opt_state), None

        (critic_weights, critic_opt_state), _ = jax.lax.scan(
            critic_step, (critic_weights, critic_opt_state), None, length=config.critic_updates
        )
        return critic_weights, critic_opt_state

    def replayed_cost(weights, obs, action, next_state, jacobian):
        """The surrogate cost of a stored step re-acted by the current policy: its next state moved
        by the action Jacobian times the change of action (exact where the step is affine in the
        action, as the Pendulum's and CartPole's are inside their clips)."""
        moved = _linearised_next_state(next_state, jacobian, act(weights, obs) - action)
        return _surrogate_cost(env_id, train_params, config, moved, None)

    def replay_loss(weights, batch):
        return jnp.mean(jax.vmap(lambda *record: replayed_cost(weights, *record))(*batch))

    replay_grad_fn = jax.value_and_grad(replay_loss)

    def replay_update(carry, start_uniforms, replay_uniforms):
        """Simulate one window with the current policy, store its steps, then take
        ``config.replay_updates`` Adam steps on minibatches of all the steps stored so far."""
        weights, opt_state, states = carry[:3]
        buffer, count = carry[9]
        new_states, outputs = simulate_window(weights, states, start_uniforms, record=True)
        costs, finite, _, _, _, records = outputs
        # (num_envs, window, ...) -> one row per simulated step, appended at `count`.
        records = jax.tree.map(lambda leaf: leaf.reshape((-1, *leaf.shape[2:])), records)
        new_buffer = jax.tree.map(
            lambda old, new: jax.lax.dynamic_update_slice_in_dim(old, new.astype(old.dtype), count, 0),
            buffer,
            records,
        )
        new_count = count + _steps_per_update(config)

        def replay_step(inner, uniforms):
            weights, opt_state = inner
            rows = jnp.minimum((uniforms * new_count).astype(jnp.int32), new_count - 1)
            loss, grads = replay_grad_fn(weights, jax.tree.map(lambda leaf: leaf[rows], new_buffer))
            updates, opt_state = optimizer.update(grads, opt_state, weights)
            return (optax.apply_updates(weights, updates), opt_state), (loss, optax.tree.norm(grads))

        (new_weights, new_opt_state), (replay_losses, grad_norms) = jax.lax.scan(
            replay_step, (weights, opt_state), replay_uniforms
        )
        new_carry = guarded(
            carry, finite, replay_losses, grad_norms,
            (new_weights, new_opt_state, new_states, *carry[7:9], (new_buffer, new_count)),
        )  # fmt: skip
        return new_carry, (jnp.mean(costs), grad_norms[-1])

    def guarded(carry, finite, losses, grad_norms, new):
        """The carry after an update: ``new`` = (weights, opt_state, states, critic_weights,
        critic_opt_state, replay), or, where the simulated states, a loss or a gradient norm went
        non-finite, the old ones: the update is dropped whole, and the failure is recorded."""
        update_index, _, failed_update, failed_step = carry[3:7]
        state_ok = jnp.all(finite)
        code = (
            jnp.where(state_ok, 0, _NONFINITE_STATE)
            | jnp.where(jnp.all(jnp.isfinite(losses)), 0, _NONFINITE_LOSS)
            | jnp.where(jnp.all(jnp.isfinite(grad_norms)), 0, _NONFINITE_GRAD)
        )
        ok = code == 0
        kept = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, (*carry[:3], *carry[7:]))
        return (
            *kept[:3],
            update_index + 1,
            code,
            jnp.where(ok, failed_update, update_index),
            # The first simulated step of the window (any rollout) whose state is non-finite.
            jnp.where(ok, failed_step, jnp.where(state_ok, -1, jnp.argmin(jnp.all(finite, axis=0)))),
            *kept[3:],
        )

    def update(carry, start_uniforms):
        weights, opt_state, states = carry[:3]
        critic_weights, critic_opt_state = carry[7:9]
        (loss, (new_states, finite, window)), grads = grad_fn(weights, critic_weights, states, start_uniforms)
        grad_norm = optax.tree.norm(grads)
        updates, new_opt_state = optimizer.update(grads, opt_state, weights)
        new_weights = optax.apply_updates(weights, updates)
        new_critic = (critic_weights, critic_opt_state)
        if critic is not None:
            costs, next_obs, done, terminated = window
            # The observations the window acted on: its start, then each next state (after resets).
            start_obs = jax.vmap(lambda s: env.get_obs(s, train_params))(states)
            later_obs = _after_reset_obs(next_obs, done, start_uniforms)
            acted_obs = jnp.concatenate([start_obs[:, None], later_obs], axis=1)
            new_critic = train_critic(
                critic_weights, critic_opt_state, acted_obs, costs, next_obs, done, terminated
            )
        new = (new_weights, new_opt_state, new_states, *new_critic, carry[9])
        new_carry = guarded(carry, finite, loss, grad_norm, new)
        return new_carry, (loss, grad_norm)

    def _after_reset_obs(next_obs, done, start_uniforms):
        """Observations at steps 1..window-1 of the window: the next state, or the fresh start."""
        fresh = _training_start(env_id, train_params, config, start_uniforms)
        fresh_obs = jax.vmap(jax.vmap(lambda s: env.get_obs(s, train_params)))(fresh)
        return jnp.where(done[..., None], fresh_obs, next_obs)[:, :-1]

    def skip(carry, *uniforms):
        return carry, (jnp.float32(jnp.nan), jnp.float32(jnp.nan))

    def run_chunk(carry, start_uniforms, num_active, replay_uniforms=None):
        def body(carry, xs):
            index, uniforms = xs[0], xs[1:]
            healthy = carry[4] == 0
            return jax.lax.cond(
                (index < num_active) & healthy, replay_update if replay else update, skip, carry, *uniforms
            )

        indices = jnp.arange(start_uniforms.shape[0])
        xs = (indices, start_uniforms) + ((replay_uniforms,) if replay else ())
        return jax.lax.scan(body, carry, xs)

    def empty_replay(weights, states, capacity: int):
        """The replay carry: zeroed storage for ``capacity`` steps and a count of 0 (``()`` off)."""
        if not replay:
            return ()
        one_state = jax.tree.map(lambda leaf: leaf[0], states)
        step = lambda: env_step(weights, one_state, jnp.zeros(_START_DRAWS[env_id]), record=True)[1][-1]
        shapes = jax.eval_shape(step)
        zeros = jax.tree.map(lambda leaf: jnp.asarray(np.zeros((capacity, *leaf.shape), leaf.dtype)), shapes)
        return zeros, jnp.int32(0)

    return jax.jit(run_chunk, compiler_options=None if replay else _COMPILER_OPTIONS), empty_replay


def _steps_per_update(config: BPTTConfig) -> int:
    return config.num_envs * config.window


def _updates_per_chunk(config: BPTTConfig) -> int:
    return max(1, round(config.eval_every / _steps_per_update(config)))


def _validate(config: BPTTConfig) -> None:
    positive = (
        "total_env_steps", "num_envs", "window", "episode_length", "width", "eval_every", "eval_episodes"
    )  # fmt: skip
    for name in positive:
        value = getattr(config, name)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"BPTTConfig.{name} must be a positive integer, got {value!r}")
    for name, lowest, kind in (("replay_updates", 0, "non-negative"), ("replay_batch", 1, "positive")):
        value = getattr(config, name)
        if not isinstance(value, int) or value < lowest:
            raise ValueError(f"BPTTConfig.{name} must be a {kind} integer, got {value!r}")
    if config.depth < 0:
        raise ValueError(f"BPTTConfig.depth must be >= 0, got {config.depth!r}")
    for name in ("learning_rate", "max_grad_norm", "temperature"):
        value = getattr(config, name)
        if not value > 0:
            raise ValueError(f"BPTTConfig.{name} must be > 0, got {value!r}")
    if not 0 <= config.final_learning_rate_fraction <= 1:
        raise ValueError(
            "BPTTConfig.final_learning_rate_fraction must be in [0, 1], "
            f"got {config.final_learning_rate_fraction!r}"
        )
    if not 0 < config.discount <= 1:
        raise ValueError(f"BPTTConfig.discount must be in (0, 1], got {config.discount!r}")
    if config.critic_width > 0:
        if config.discount == 1:
            raise ValueError(
                "a critic (critic_width > 0) learns a discounted value: set BPTTConfig.discount below 1 "
                "(e.g. 0.97), got 1.0"
            )
        if not (isinstance(config.critic_updates, int) and config.critic_updates >= 1):
            raise ValueError(
                f"BPTTConfig.critic_updates must be a positive integer, got {config.critic_updates!r}"
            )
        if not 0 <= config.td_lambda <= 1:
            raise ValueError(f"BPTTConfig.td_lambda must be in [0, 1], got {config.td_lambda!r}")
        if not config.critic_learning_rate > 0:
            raise ValueError(
                f"BPTTConfig.critic_learning_rate must be > 0, got {config.critic_learning_rate!r}"
            )
        if config.replay_updates:
            raise ValueError(
                "BPTTConfig: a critic (critic_width > 0) and replay (replay_updates > 0) do not combine; "
                "set one of them to 0"
            )
    elif config.critic_width < 0:
        raise ValueError(f"BPTTConfig.critic_width must be >= 0 (0: no critic), got {config.critic_width!r}")
    if config.window > config.episode_length:
        raise ValueError(
            f"BPTTConfig.window ({config.window}) is longer than episode_length ({config.episode_length}); "
            "use window == episode_length for whole-episode BPTT"
        )
    if _steps_per_update(config) > config.total_env_steps:
        raise ValueError(
            f"one update simulates num_envs * window = {_steps_per_update(config)} steps, more than "
            f"total_env_steps = {config.total_env_steps}"
        )


# --------------------------------------------------------------------------------------------
# The impure loop
# --------------------------------------------------------------------------------------------
def train(
    env_id: str,
    config: BPTTConfig,
    *,
    seed: int = 0,
    progress_fn: ProgressFn | None = None,
    render_fn: Callable[[Policy], Any] | None = None,
    env_params=None,
) -> TrainResult:
    """Train a policy on ``env_id`` by truncated BPTT through the differentiable env.

    Args:
        env_id: ``"CartPole-v1"`` or ``"Pendulum-v1"`` (short names accepted).
        config: hyper-parameters; ``default_config(env_id)`` holds tuned ones.
        seed: seeds the initial weights, the training starts and the evaluation episodes.
        progress_fn: called after every chunk of updates (every ``config.eval_every`` env steps)
            with ``env_steps``, ``updates``, ``wall_seconds``, ``loss`` (the surrogate cost per
            step of the chunk's last update), ``grad_norm`` (before clipping) and ``eval_return``.
        render_fn: called with the current policy (``policy(obs)`` is the hard action) after every
            chunk, e.g. to show a rollout for the CLI's ``--render``.
        env_params: env parameters to train and evaluate in (default: the env's own).

    Returns:
        ``TrainResult``: ``env_steps`` counts every simulated training step of every rollout
        (evaluation episodes excluded); ``compile_seconds`` is the part of ``wall_seconds`` spent
        compiling the training chunk and, on its first use in this process, the evaluator.

    Raises:
        FloatingPointError: the loss, gradient or simulated state became NaN/Inf; the message names
            the update and env step. The update is not applied.
    """
    env_id = _supported(env_id)
    _validate(config)
    start_time = time.perf_counter()
    setup = _setup(env_id, config, seed, env_params)
    params, spec, static, obs_scale, rng = setup.params, setup.spec, setup.static, setup.obs_scale, setup.rng
    carry, run_chunk, draws = setup.carry, setup.run_chunk, _START_DRAWS[env_id]

    steps_per_update = _steps_per_update(config)
    total_updates = config.total_env_steps // steps_per_update
    updates_per_chunk = min(_updates_per_chunk(config), total_updates)
    uniforms_shape = (updates_per_chunk, config.num_envs, config.window, draws)
    compile_seconds = train_seconds = eval_seconds = 0.0
    curve: list[dict] = []
    updates_done = 0
    compiled = None
    best: tuple[float, Policy] | None = None  # (eval return, policy)

    def current_policy(weights) -> Policy:
        return _fold_obs_scale(eqx.combine(weights, static), obs_scale)

    while updates_done < total_updates:
        num_active = min(updates_per_chunk, total_updates - updates_done)
        start_uniforms = jnp.asarray(rng.random(uniforms_shape, np.float32))
        replay_shape = (updates_per_chunk, config.replay_updates, config.replay_batch)
        replay_uniforms = jnp.asarray(rng.random(replay_shape, np.float32)) if config.replay_updates else None
        if compiled is None:
            compile_start = time.perf_counter()
            # Seeds of one config share the compiled chunk: it depends on the env, its parameters
            # and the config only (the seed is in the carry and the uniforms).
            cache_key = (env_id, dataclasses.astuple(config), repr(params), updates_per_chunk)
            compiled = _COMPILED_CHUNKS.get(cache_key)
            if compiled is None:
                lowered = run_chunk.lower(carry, start_uniforms, jnp.int32(num_active), replay_uniforms)
                compiled = lowered.compile()
                _COMPILED_CHUNKS[cache_key] = compiled
            compile_seconds += time.perf_counter() - compile_start
        run_start = time.perf_counter()
        carry, (losses, grad_norms) = compiled(carry, start_uniforms, jnp.int32(num_active), replay_uniforms)
        failed_code = int(carry[4])  # waits for the chunk to finish
        train_seconds += time.perf_counter() - run_start
        if failed_code:
            _raise_nonfinite(env_id, config, int(carry[5]), int(carry[6]), failed_code)
        updates_done += num_active
        policy = current_policy(carry[0])

        eval_start = time.perf_counter()
        eval_key = jax.random.key(int(rng.integers(2**31)))
        returns = evaluate(env_id, policy, key=eval_key, episodes=config.eval_episodes, params=params)
        if not curve and _first_evaluation(env_id, config):
            # The evaluator's first call in this process compiles it (cached afterwards).
            compile_seconds += time.perf_counter() - eval_start
        else:
            eval_seconds += time.perf_counter() - eval_start
        point = {
            "env_steps": updates_done * steps_per_update,
            "updates": updates_done,
            "wall_seconds": time.perf_counter() - start_time,
            "loss": float(np.asarray(losses)[num_active - 1]),
            "grad_norm": float(np.asarray(grad_norms)[num_active - 1]),
            "eval_return": float(returns.mean()),
            "eval_return_std": float(returns.std()),
        }
        curve.append(point)
        if best is None or point["eval_return"] > best[0] or not config.keep_best:
            best = (point["eval_return"], policy)
        if progress_fn is not None:
            progress_fn(dict(point))
        if render_fn is not None:
            render_fn(policy)
        if config.stop_at_return is not None and point["eval_return"] >= config.stop_at_return:
            break

    return TrainResult(
        policy=best[1],
        spec=spec,
        env_steps=updates_done * steps_per_update,
        wall_seconds=time.perf_counter() - start_time,
        compile_seconds=compile_seconds,
        curve=curve,
        extra={
            "algorithm": "bptt",
            "updates": updates_done,
            "steps_per_update": steps_per_update,
            "returned_eval_return": best[0],
            "train_seconds": train_seconds,  # running the compiled chunks
            "eval_seconds": eval_seconds,  # learning-curve evaluations, compile excluded
            "config": dataclasses.asdict(config),
        },
    )


#: XLA options of the training chunk's compile. Without replay the chunk is tiny and runs for
#: well under a second in all, so a cheaper backend optimisation trades ~2x slower steps for ~25%
#: less compile time (measured on the 2-core CI machine; see bench/results/bptt.md). Replay's
#: minibatch updates are heavier: there XLA's default optimisation pays for itself (Pendulum's
#: default, 4 000 steps: 0.6 s of training instead of 2.4 s, for 0.8 s more compiling).
_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}

_EVALUATED: set[tuple[str, int]] = set()
#: Compiled training chunks of this process, by (env id, config, env params, updates per chunk).
_COMPILED_CHUNKS: dict[tuple, Any] = {}


def _first_evaluation(env_id: str, config: BPTTConfig) -> bool:
    """Whether this process evaluates ``env_id`` with this many episodes for the first time."""
    signature = (env_id, config.eval_episodes)
    first = signature not in _EVALUATED
    _EVALUATED.add(signature)
    return first


def _init_policy(spec: dict, output_scale: float, rng: np.random.Generator) -> Policy:
    """A ``Policy`` with equinox's default initialisation drawn by numpy (see ``_init_mlp``)."""
    skeleton = eqx.filter_eval_shape(Policy, **spec, key=jax.random.key(0))
    return eqx.tree_at(lambda policy: policy.mlp, skeleton, _draw_mlp(skeleton.mlp, output_scale, rng))


def _init_mlp(spec: dict, output_scale: float, rng: np.random.Generator) -> eqx.nn.MLP:
    """An ``eqx.nn.MLP(**spec)`` with equinox's default initialisation drawn by numpy."""
    return _draw_mlp(eqx.filter_eval_shape(eqx.nn.MLP, **spec, key=jax.random.key(0)), output_scale, rng)


def _draw_mlp(skeleton: eqx.nn.MLP, output_scale: float, rng: np.random.Generator) -> eqx.nn.MLP:
    """Fill an MLP's shapes: every ``Linear`` layer gets weights and bias uniform in
    ±1/sqrt(fan_in), as ``eqx.nn.Linear``; the output layer is then scaled by ``output_scale``.
    Drawing on the host avoids compiling JAX's PRNG for a few hundred numbers."""
    new_leaves = []
    for index, layer in enumerate(skeleton.layers):
        bound = 1.0 / math.sqrt(layer.in_features)
        scale = output_scale if index == len(skeleton.layers) - 1 else 1.0
        weight = rng.uniform(-bound, bound, layer.weight.shape).astype(np.float32) * scale
        bias = rng.uniform(-bound, bound, layer.bias.shape).astype(np.float32) * scale
        new_leaves += [jnp.asarray(weight), jnp.asarray(bias)]

    def leaves(mlp):
        return [leaf for layer in mlp.layers for leaf in (layer.weight, layer.bias)]

    return eqx.tree_at(leaves, skeleton, new_leaves)


def _zeros_like_state(optimizer, weights):
    """``optimizer.init(weights)`` built on the host (Adam's zero moments): nothing to compile."""
    return jax.tree.map(
        lambda leaf: jnp.asarray(np.zeros(leaf.shape, leaf.dtype)), jax.eval_shape(optimizer.init, weights)
    )


@dataclasses.dataclass
class _Setup:
    """Everything a training run starts from (shared by ``train`` and the tests)."""

    params: Any
    spec: dict
    static: Any  # the policy's non-array part
    obs_scale: np.ndarray
    rng: np.random.Generator
    carry: tuple  # (weights, opt_state, states, update_index, failed_code, failed_update, failed_step,
    #               critic_weights, critic_opt_state, replay)
    run_chunk: Callable
    critic_static: Any = None  # the critic's non-array part (None without a critic)


def _setup(env_id: str, config: BPTTConfig, seed: int, env_params=None, optimizer=None) -> _Setup:
    env, default_params = diffgym.make(env_id)
    params = default_params if env_params is None else env_params
    spec = _policy_spec(env_id, env, params, config)
    obs_scale = np.asarray(config.obs_scale or _DEFAULT_OBS_SCALE[env_id], np.float32)
    if obs_scale.shape != (spec["obs_size"],):
        raise ValueError(
            f"BPTTConfig.obs_scale needs {spec['obs_size']} entries for {env_id}, got {config.obs_scale!r}"
        )
    # Host-side randomness (numpy): no PRNG kernels to compile, and reproducible per seed.
    rng = np.random.default_rng(seed)
    weights, static = eqx.partition(_init_policy(spec, config.output_scale, rng), eqx.is_array)
    if optimizer is None:
        total_updates = config.total_env_steps // _steps_per_update(config)
        schedule = optax.linear_schedule(
            config.learning_rate,
            config.learning_rate * config.final_learning_rate_fraction,
            total_updates * max(1, config.replay_updates),  # Adam steps
        )
        optimizer = optax.chain(optax.clip_by_global_norm(config.max_grad_norm), optax.adam(schedule))
    opt_state = _zeros_like_state(optimizer, weights)
    train_params = dataclasses.replace(params, max_steps_in_episode=config.episode_length)
    start_uniforms = rng.random((config.num_envs, _START_DRAWS[env_id]), np.float32)
    states = _training_start(env_id, train_params, config, jnp.asarray(start_uniforms))
    critic, critic_carry, critic_static = None, ((), ()), None
    if config.critic_width > 0:
        critic_spec = dict(
            in_size=spec["obs_size"], out_size=1, width_size=config.critic_width, depth=config.critic_depth,
            activation=jnp.tanh,
        )  # fmt: skip
        critic_weights, critic_static = eqx.partition(_init_mlp(critic_spec, 0.0, rng), eqx.is_array)
        critic_optimizer = optax.adam(config.critic_learning_rate)
        critic_opt_state = _zeros_like_state(critic_optimizer, critic_weights)
        critic, critic_carry = (critic_static, critic_optimizer), (critic_weights, critic_opt_state)
    flags = (jnp.int32(0), jnp.int32(0), jnp.int32(-1), jnp.int32(-1))
    carry = (weights, opt_state, states, *flags, *critic_carry)
    run_chunk, empty_replay = _make_chunk_runner(
        env_id, params, config, static, optimizer, jnp.asarray(obs_scale), critic
    )
    total_updates = config.total_env_steps // _steps_per_update(config)
    carry = (*carry, empty_replay(weights, states, total_updates * _steps_per_update(config)))
    return _Setup(params, spec, static, obs_scale, rng, carry, run_chunk, critic_static)


def _raise_nonfinite(env_id: str, config: BPTTConfig, update: int, window_step: int, code: int) -> None:
    what = [
        name
        for bit, name in (
            (_NONFINITE_STATE, "the simulated state"),
            (_NONFINITE_LOSS, "the loss"),
            (_NONFINITE_GRAD, "the gradient"),
        )
        if code & bit
    ]
    first_env_step = update * _steps_per_update(config)
    where = f"update {update} (env steps {first_env_step}..{first_env_step + _steps_per_update(config)})"
    if window_step >= 0:
        where += f", first at step {window_step} of its {config.window}-step window"
    raise FloatingPointError(
        f"BPTT on {env_id} stopped at {where}: {' and '.join(what)} became non-finite (NaN or Inf). "
        "That update was not applied, so the weights are those from before it. Check the env parameters "
        f"and try a smaller learning_rate (now {config.learning_rate}) or max_grad_norm "
        f"(now {config.max_grad_norm})."
    )
