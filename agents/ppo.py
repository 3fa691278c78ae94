"""Proximal Policy Optimisation (PPO) on diffgym's functional environments, fully jitted.

The RL baseline beside BPTT. Same interface as every trainer (``agents.trainers``)::

    result = train("CartPole-v1", seed=0)            # default_config(env): the tuned settings
    result.policy(obs)                               # the deterministic hard action

Any ``Environment`` trains, a user's own included; nothing here knows an env id (the tuned
settings are the env's bundled ``hyperparams.toml``, the stop target its spec's threshold).

Algorithm (Schulman et al. 2017, https://arxiv.org/abs/1707.06347), in the form of
Stable-Baselines3's PPO so that RL-Zoo's tuned hyper-parameters carry over:

* ``num_envs`` copies of the env step in parallel (``vmap``) for ``num_steps`` steps
  (``lax.scan``) with the env's own auto-reset (``env.step``);
* advantages by GAE(lambda) (``gae``), cut at every episode end; the value bootstrapped at a
  time-limit truncation is the critic's value of ``info["final_observation"]`` — the state the
  episode was cut in — and 0 only at a true termination (this matters for Pendulum, whose every
  episode is truncated, never terminated);
* ``num_epochs`` passes over the batch in ``num_minibatches`` shuffled minibatches of the clipped
  surrogate objective + ``vf_coef`` x value MSE - ``ent_coef`` x entropy, per-minibatch
  advantage normalisation, global-norm gradient clipping, Adam (eps 1e-5), optional linear
  annealing of the learning rate and of the clip range;
* orthogonal initialisation (gain sqrt(2) hidden, 0.01 policy head, 1 value head), separate
  actor and critic MLPs, as SB3's ``MlpPolicy``.

A chunk of ``eval_every_updates`` whole updates (collection + optimisation) is one compiled
``lax.scan``; between chunks the current policy is evaluated with ``agents.common.evaluate``
(deterministic hard actions, true env reward) for the learning curve, and training stops early
once ``target_return`` is reached.

Policies: the actor is an ``agents.policy.Policy`` so that checkpoints, ``load_policy`` and
evaluation are shared with BPTT.

* Discrete two-action envs (CartPole): ``kind="bernoulli"``; the raw output is the logit of
  action 1 and the behaviour policy is ``Bernoulli(sigmoid(logit))``. The deterministic action
  (``Policy.__call__``) is ``1[logit > 0]``, the distribution's mode.
* Discrete envs with more actions (Acrobot, MountainCar): ``kind="categorical"``, a softmax over
  the logits; the deterministic action is the argmax.
* Continuous envs (Pendulum, Trebuchet): ``kind="box"``; the Gaussian's mean is the Policy's
  squashed output (always inside the box) and its standard deviation is
  ``exp(log_std) * (high - low) / 2`` with a learned, state-independent ``log_std`` per action
  dimension (kept in ``TrainResult.extra["log_std"]``, not in the checkpoint). Sampled actions
  are clipped to the box before stepping; the log-probability is that of the unclipped sample
  (as SB3 and CleanRL do). The deterministic action is the mean.

The critic is not part of the returned policy.

**Shaped reward (``shaped_cost``).** PPO normally learns from the env's reward. With
``shaped_cost`` (the weights of the env task's terms, as ``BPTTConfig.cost``) it learns from minus
the task's training cost instead, the very surrogate BPTT differentiates, so that a comparison
can tell the surrogate's help from the gradient's. Evaluations always use the true reward.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import math
import os
import time
from typing import Any, Callable, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from agents.common import (
    BoundedCache,
    TrainResult,
    env_cache_key,
    evaluator,
    make_task,
    resolve_env,
    tuned_config,
)
from agents.bptt import starting_policy
from agents.policy import Policy, fold_standardisation, policy_spec

NAME = "ppo"


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class PPOConfig:
    """PPO hyper-parameters. The defaults are RL-Zoo's tuned CartPole-v1 settings; see
    ``default_config`` for each env's tuned values and where they come from."""

    total_env_steps: int = 100_000
    """Training budget in env steps (every step of every parallel env counts). Also the horizon
    of the linear annealing schedules."""
    num_envs: int = 8
    """Parallel environments stepped with ``vmap``."""
    num_steps: int = 32
    """Steps per environment per update (rollout length); one update consumes
    ``num_envs * num_steps`` env steps."""
    num_epochs: int = 20
    """Passes over each rollout batch."""
    num_minibatches: int = 1
    """Minibatches per epoch; must divide ``num_envs * num_steps``."""
    learning_rate: float = 1e-3
    """Adam step size (initial value when annealed)."""
    anneal_learning_rate: bool = True
    """Decay the learning rate linearly to 0 over ``total_env_steps`` (RL-Zoo's ``lin_``)."""
    clip_eps: float = 0.2
    """PPO clip range of the probability ratio (initial value when annealed)."""
    anneal_clip_eps: bool = True
    """Decay the clip range linearly to 0 over ``total_env_steps``."""
    gamma: float = 0.98
    """Discount factor."""
    gae_lambda: float = 0.8
    """GAE(lambda) bias/variance trade-off."""
    vf_coef: float = 0.5
    """Weight of the value-function mean squared error in the loss."""
    ent_coef: float = 0.0
    """Weight of the entropy bonus in the loss."""
    max_grad_norm: float = 0.5
    """Global gradient-norm clip."""
    normalize_advantages: bool = True
    """Standardise advantages within each minibatch."""
    init_log_std: float = 0.0
    """Continuous actions only: initial log of the Gaussian's std as a fraction of half the box
    width (0 gives std = half the box width)."""
    width: int = 64
    """Hidden-layer width of the actor and of the critic."""
    depth: int = 2
    """Number of hidden layers of the actor and of the critic."""
    activation: str = "tanh"
    """Hidden activation: ``tanh``, ``relu``, ``elu`` or ``softplus`` (``agents.policy``)."""
    standardise_obs: bool = False
    """Standardise observations ``(obs - mean) / scale`` with the env spec's ``obs_mean`` and
    ``obs_scale`` in front of the actor and the critic (False: raw observations). For envs whose
    observations are far from unit scale (the Trebuchet's target in metres). The returned policy
    has it folded into its first layer, so it acts on raw observations."""
    reward_scale: float = 1.0
    """Rewards are multiplied by this before the advantages and value targets (evaluation returns
    are not): keeps the critic's regression errors, hence its gradients, near unit scale so that
    they do not swamp the actor's in the shared global-norm clip."""
    eval_every_updates: int = 8
    """Updates between two evaluations of the deterministic policy (one learning-curve point).
    The budget is spent in whole chunks of this many updates (rounded down, at least one chunk;
    a budget of fewer updates makes the one chunk that short)."""
    eval_episodes: int = 64
    """Episodes per evaluation (functional env, run in parallel: milliseconds). Many, because
    training stops at the first evaluation that reaches ``target_return``: a noisy mean would
    stop on a lucky draw (Pendulum's episode returns spread by ~150)."""
    target_return: float | None = None
    """Stop as soon as the evaluation mean reaches this return; ``None`` spends the whole budget
    (``default_config`` sets the env spec's threshold)."""
    shaped_cost: dict[str, float] = dataclasses.field(default_factory=dict)
    """Learn from minus the env task's training cost with these term weights instead of the
    env's reward (see the module docstring); empty: the env's reward."""
    init_policy: str | None = None
    """A checkpoint folder (``train-controller --out DIR``, a bundled ``agents/assets/<env>``) whose
    weights the actor starts from instead of the orthogonal initialisation: fine-tuning (the critic
    and ``log_std`` start fresh, ``init_log_std`` sets the exploration). None: fresh weights. Its
    network must be the actor's (head, ``width``, ``depth``, ``activation``; the critic gets the same
    sizes). The first curve point (0 env steps) is then the checkpoint's return; the seed's other
    draws are those of a fresh run."""

    def __post_init__(self):
        self.shaped_cost = {str(name): float(weight) for name, weight in dict(self.shaped_cost).items()}
        if self.init_policy is not None:
            self.init_policy = os.fspath(self.init_policy)  # a Path from Python, a str from the CLI
        batch = self.num_envs * self.num_steps
        for name in ("total_env_steps", "num_envs", "num_steps", "num_epochs", "num_minibatches",
                     "eval_every_updates", "eval_episodes"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise ValueError(f"PPOConfig.{name} must be a positive integer, got {value!r}")
        if batch % self.num_minibatches:
            raise ValueError(
                f"PPOConfig.num_minibatches={self.num_minibatches} must divide the batch "
                f"num_envs * num_steps = {self.num_envs} * {self.num_steps} = {batch}"
            )
        if not self.reward_scale > 0:
            raise ValueError(f"PPOConfig.reward_scale must be positive, got {self.reward_scale!r}")
        if self.total_env_steps < batch:
            raise ValueError(
                f"PPOConfig.total_env_steps={self.total_env_steps} is less than one update "
                f"(num_envs * num_steps = {batch})"
            )

    @property
    def batch_size(self) -> int:
        """Env steps per update."""
        return self.num_envs * self.num_steps

    @property
    def num_updates(self) -> int:
        """Updates that fit in the budget."""
        return self.total_env_steps // self.batch_size


def default_config(env) -> PPOConfig:
    """The env's tuned settings (``[ppo]`` of its bundled ``hyperparams.toml``, which says where
    they come from: RL-Zoo for CartPole and the Pendulum), else ``PPOConfig``'s defaults (RL-Zoo's
    CartPole settings); both stop at the env spec's ``reward_threshold``."""
    instance, _, spec = resolve_env(env)
    return tuned_config(PPOConfig, instance, NAME, target_return=spec.reward_threshold)


# --------------------------------------------------------------------------------------------
# Generalised advantage estimation
# --------------------------------------------------------------------------------------------
def gae(
    rewards: jax.Array,
    values: jax.Array,
    next_values: jax.Array,
    terminated: jax.Array,
    truncated: jax.Array,
    *,
    gamma: float,
    gae_lambda: float,
) -> tuple[jax.Array, jax.Array]:
    """GAE(lambda) advantages and value targets of a time-major rollout.

    Args (all shape ``(T, ...)``, time first; any trailing batch shape):
        rewards: reward of step ``t``.
        values: critic's value of the observation step ``t`` acted on.
        next_values: critic's value of the observation step ``t`` led to, before any auto-reset
            (``info["final_observation"]``); at a truncation this is the value the episode is
            bootstrapped from.
        terminated: step ``t`` ended the episode in a terminal state (bootstrap value 0).
        truncated: step ``t`` ended the episode by the time limit (bootstrap from
            ``next_values``).
        gamma, gae_lambda: discount and GAE lambda.

    Returns:
        ``(advantages, returns)``, both shape ``(T, ...)``; ``returns = advantages + values``
        (the critic's regression targets). The recursion
        ``A_t = delta_t + gamma * lambda * (1 - done_t) * A_{t+1}``, with
        ``delta_t = r_t + gamma * (1 - terminated_t) * next_values_t - values_t`` and
        ``done_t = terminated_t or truncated_t``, stops at every episode end and at the end of
        the rollout (``A_T = 0``; the last step's bootstrap is in its ``delta``).
    """
    not_terminated = 1.0 - jnp.asarray(terminated, values.dtype)
    continues = 1.0 - jnp.logical_or(terminated, truncated).astype(values.dtype)
    deltas = rewards + gamma * not_terminated * next_values - values

    def backward(next_advantage, step):
        delta, cont = step
        advantage = delta + gamma * gae_lambda * cont * next_advantage
        return advantage, advantage

    _, advantages = jax.lax.scan(backward, jnp.zeros_like(deltas[0]), (deltas, continues), reverse=True)
    return advantages, advantages + values


# --------------------------------------------------------------------------------------------
# Actor-critic
# --------------------------------------------------------------------------------------------
class ActorCritic(eqx.Module):
    """The trained networks: the actor (a shared ``Policy``), a critic MLP and the log-std."""

    actor: Policy  # acts on standardised observations (see acting_policy)
    critic: eqx.nn.MLP
    log_std: jax.Array  # (action_size,), relative to half the box width; unused for bernoulli
    obs_mean: tuple[float, ...] | None = eqx.field(static=True, default=None)
    obs_std: tuple[float, ...] | None = eqx.field(static=True, default=None)

    def standardise(self, obs: jax.Array) -> jax.Array:
        """``(obs - obs_mean) / obs_std`` (identity without a standardisation)."""
        if self.obs_mean is None:
            return obs
        return (obs - jnp.asarray(self.obs_mean, obs.dtype)) / jnp.asarray(self.obs_std, obs.dtype)

    def acting_policy(self) -> Policy:
        """The actor as a ``Policy`` on raw observations: the standardisation folded into its first
        layer (``agents.policy.fold_standardisation``)."""
        if self.obs_mean is None:
            return self.actor
        return fold_standardisation(self.actor, self.obs_mean, self.obs_std)

    def log_prob_entropy(self, obs: jax.Array, action: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Log-probability of ``action`` (float, shape ``(action_size,)``; a discrete action is its
        index in ``action[0]``) at ``obs``, and the entropy."""
        obs = self.standardise(obs)
        raw = self.actor.raw(obs)
        if self.actor.kind == "bernoulli":
            logit = raw[0]
            log_p1, log_p0 = jax.nn.log_sigmoid(logit), jax.nn.log_sigmoid(-logit)
            log_prob = action[0] * log_p1 + (1.0 - action[0]) * log_p0
            p1 = jax.nn.sigmoid(logit)
            entropy = -(p1 * log_p1 + (1.0 - p1) * log_p0)
            return log_prob, entropy
        if self.actor.kind == "categorical":
            log_probs = jax.nn.log_softmax(raw)
            log_prob = log_probs[action[0].astype(jnp.int32)]
            entropy = -jnp.sum(jnp.exp(log_probs) * log_probs)
            return log_prob, entropy
        mean, std = self.actor.squash(raw), self._std()
        log_prob = jnp.sum(-0.5 * ((action - mean) / std) ** 2 - jnp.log(std) - 0.5 * math.log(2 * math.pi))
        entropy = jnp.sum(0.5 + 0.5 * math.log(2 * math.pi) + jnp.log(std))
        return log_prob, entropy

    def sample(self, key: jax.Array, obs: jax.Array) -> jax.Array:
        """A behaviour-policy action as floats: shape ``(action_size,)`` for a box, ``(1,)`` holding
        the index for a discrete head (0./1. for bernoulli)."""
        obs = self.standardise(obs)
        raw = self.actor.raw(obs)
        if self.actor.kind == "bernoulli":
            return jax.random.bernoulli(key, jax.nn.sigmoid(raw)).astype(raw.dtype)
        if self.actor.kind == "categorical":
            return jax.random.categorical(key, raw)[None].astype(raw.dtype)
        mean = self.actor.squash(raw)
        return mean + self._std() * jax.random.normal(key, mean.shape, mean.dtype)

    def value(self, obs: jax.Array) -> jax.Array:
        return self.critic(self.standardise(obs))

    def _std(self) -> jax.Array:
        half_width = (jnp.asarray(self.actor.high) - jnp.asarray(self.actor.low)) / 2.0
        return jnp.exp(self.log_std) * half_width


def _orthogonal(rng: np.random.Generator, shape: tuple[int, int], gain: float) -> np.ndarray:
    """A (semi-)orthogonal matrix times ``gain`` (Saxe et al. 2014), drawn with numpy: a jitted
    QR costs seconds of compilation for a once-per-run initialisation."""
    rows, cols = shape
    q, r = np.linalg.qr(rng.standard_normal((max(rows, cols), min(rows, cols))))
    q = q * np.sign(np.diag(r))
    q = q if rows >= cols else q.T
    return (gain * q[:rows, :cols]).astype(np.float32)


def _orthogonal_init(mlp: eqx.nn.MLP, key: jax.Array, head_gain: float) -> eqx.nn.MLP:
    """SB3's init: orthogonal weights (gain sqrt(2) hidden, ``head_gain`` last layer), zero biases."""
    rng = np.random.default_rng(np.asarray(jax.random.key_data(key)))
    weights, biases = [], []
    for i, layer in enumerate(mlp.layers):
        gain = head_gain if i == len(mlp.layers) - 1 else math.sqrt(2.0)
        weights.append(jnp.asarray(_orthogonal(rng, layer.weight.shape, gain)))
        biases.append(jnp.zeros(layer.bias.shape, jnp.float32))
    mlp = eqx.tree_at(lambda m: [layer.weight for layer in m.layers], mlp, weights)
    return eqx.tree_at(lambda m: [layer.bias for layer in m.layers], mlp, biases)


def init_actor_critic(
    spec: dict, config: PPOConfig, key: jax.Array, *, obs_mean=None, obs_std=None
) -> ActorCritic:
    """Fresh networks for the policy ``spec``, standardising observations with ``obs_mean`` and
    ``obs_std`` when given."""
    key_actor, key_critic, key_actor_init, key_critic_init = jax.random.split(key, 4)
    actor = Policy(**spec, key=key_actor)
    actor = eqx.tree_at(lambda p: p.mlp, actor, _orthogonal_init(actor.mlp, key_actor_init, 0.01))
    activation = {"tanh": jnp.tanh, "relu": jax.nn.relu, "elu": jax.nn.elu, "softplus": jax.nn.softplus}
    critic = eqx.nn.MLP(
        spec["obs_size"], "scalar", config.width, config.depth,
        activation=activation[config.activation], key=key_critic,
    )
    critic = _orthogonal_init(critic, key_critic_init, 1.0)
    log_std = jnp.full((spec["action_size"],), config.init_log_std, jnp.float32)
    standardisation = {}
    if obs_std is not None:
        mean = (0.0,) * spec["obs_size"] if obs_mean is None else obs_mean
        if not len(mean) == len(obs_std) == spec["obs_size"]:
            raise ValueError(
                f"observation standardisation of {len(mean)} / {len(obs_std)} entries; the observation has "
                f"{spec['obs_size']}"
            )
        standardisation = {"obs_mean": tuple(map(float, mean)), "obs_std": tuple(map(float, obs_std))}
    return ActorCritic(actor=actor, critic=critic, log_std=log_std, **standardisation)


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------
class Transition(NamedTuple):
    obs: jax.Array
    action: jax.Array  # float, (action_size,): 0./1. or the unclipped Gaussian sample
    log_prob: jax.Array
    value: jax.Array
    reward: jax.Array
    terminated: jax.Array
    truncated: jax.Array
    next_value: jax.Array  # value of info["final_observation"] (the pre-reset next observation)


class Runner(NamedTuple):
    weights: Any  # the ActorCritic's arrays (eqx.partition)
    opt_state: Any
    env_state: Any
    obs: jax.Array
    key: jax.Array
    update: jax.Array  # updates done so far


def _make_chunk(env, env_params, static, optimizer, config: PPOConfig, chunk_updates: int, task=None) -> Callable:
    """The jittable ``Runner -> (Runner, metrics)`` that performs ``chunk_updates`` updates; with a
    ``task`` (``config.shaped_cost``), the reward learnt from is minus its training cost."""
    num_envs, batch_size = config.num_envs, config.batch_size
    minibatch_size = batch_size // config.num_minibatches
    is_box = static.actor.kind == "box"
    low = jnp.asarray(static.actor.low) if is_box else None
    high = jnp.asarray(static.actor.high) if is_box else None
    step_envs = jax.vmap(env.step, in_axes=(0, 0, 0, None))

    def env_action(action):
        if is_box:
            return jnp.clip(action, low, high)
        return action[..., 0].astype(jnp.int32)

    def collect(model, carry, _):
        env_state, obs, key = carry
        previous_state = env_state
        key, key_action, key_env = jax.random.split(key, 3)
        action = jax.vmap(model.sample)(jax.random.split(key_action, num_envs), obs)
        log_prob, _ = jax.vmap(model.log_prob_entropy)(obs, action)
        value = jax.vmap(model.value)(obs)
        next_obs, env_state, reward, terminated, truncated, info = step_envs(
            jax.random.split(key_env, num_envs), env_state, env_action(action), env_params
        )
        next_value = jax.vmap(model.value)(info["final_observation"])
        if task is not None:
            cost = jax.vmap(task.cost, in_axes=(None, 0, 0, 0, 0))(
                env_params, previous_state, env_action(action), info["final_state"], reward
            )
            reward = -cost
        reward = config.reward_scale * reward.astype(jnp.float32)
        transition = Transition(obs, action, log_prob, value, reward,
                                terminated, truncated, next_value)
        return (env_state, next_obs, key), transition

    def loss_fn(weights, batch: Transition, advantages, returns, clip_eps):
        model = eqx.combine(weights, static)
        log_prob, entropy = jax.vmap(model.log_prob_entropy)(batch.obs, batch.action)
        value = jax.vmap(model.value)(batch.obs)
        if config.normalize_advantages:
            advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
        log_ratio = log_prob - batch.log_prob
        ratio = jnp.exp(log_ratio)
        policy_loss = -jnp.mean(
            jnp.minimum(ratio * advantages, jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * advantages)
        )
        value_loss = jnp.mean((value - returns) ** 2)
        entropy = jnp.mean(entropy)
        loss = policy_loss + config.vf_coef * value_loss - config.ent_coef * entropy
        approx_kl = jnp.mean((ratio - 1.0) - log_ratio)  # k3 estimator, non-negative
        return loss, {"loss": loss, "policy_loss": policy_loss, "value_loss": value_loss,
                      "entropy": entropy, "approx_kl": approx_kl}

    grad_fn = jax.grad(loss_fn, has_aux=True)

    def update(runner: Runner, _):
        model = eqx.combine(runner.weights, static)
        (env_state, obs, key), traj = jax.lax.scan(
            functools.partial(collect, model), (runner.env_state, runner.obs, runner.key), None,
            length=config.num_steps,
        )
        advantages, returns = gae(
            traj.reward, traj.value, traj.next_value, traj.terminated, traj.truncated,
            gamma=config.gamma, gae_lambda=config.gae_lambda,
        )
        # SB3 anneals by the fraction of the budget left after this update's collection.
        progress_left = 1.0 - (runner.update + 1).astype(jnp.float32) / config.num_updates
        clip_eps = config.clip_eps * (jnp.maximum(progress_left, 0.0) if config.anneal_clip_eps else 1.0)
        flat = jax.tree.map(lambda x: x.reshape((batch_size,) + x.shape[2:]), (traj, advantages, returns))

        def epoch(carry, key_perm):
            weights, opt_state = carry
            perm = jax.random.permutation(key_perm, batch_size)
            minibatches = jax.tree.map(
                lambda x: x[perm].reshape((config.num_minibatches, minibatch_size) + x.shape[1:]), flat
            )

            def minibatch_step(carry, minibatch):
                weights, opt_state = carry
                grads, metrics = grad_fn(weights, *minibatch, clip_eps)
                updates, opt_state = optimizer.update(grads, opt_state, weights)
                return (optax.apply_updates(weights, updates), opt_state), metrics

            return jax.lax.scan(minibatch_step, (weights, opt_state), minibatches)

        key, key_epochs = jax.random.split(key)
        (weights, opt_state), metrics = jax.lax.scan(
            epoch, (runner.weights, runner.opt_state), jax.random.split(key_epochs, config.num_epochs)
        )
        metrics = jax.tree.map(jnp.mean, metrics)
        metrics["clip_eps"] = clip_eps
        return Runner(weights, opt_state, env_state, obs, key, runner.update + 1), metrics

    def chunk(runner: Runner):
        runner, metrics = jax.lax.scan(update, runner, None, length=chunk_updates)
        return runner, jax.tree.map(lambda m: m[-1], metrics)

    return chunk


#: Compiled update chunks of this process, by (env, params, config, chunk length, policy spec).
_CHUNKS = BoundedCache(8)


def train(
    env,
    config: PPOConfig | None = None,
    *,
    seed: int = 0,
    env_params=None,
    progress_fn: Callable[[dict], None] | None = None,
    render_fn: Callable[[Policy], None] | None = None,
) -> TrainResult:
    """Train a policy on ``env`` with PPO.

    Args:
        env: an id or alias (``"CartPole-v1"``, ``"pendulum"``) or an ``Environment`` instance.
        config: hyper-parameters; None: ``default_config(env)``, the tuned ones.
        seed: seeds the networks, the rollouts and the evaluations.
        env_params: env parameters to train and evaluate in (default: the env's own).
        progress_fn: called after every evaluation with ``env_steps``, ``wall_seconds``,
            ``eval_return`` (mean over ``config.eval_episodes``), ``loss``, ``policy_loss``,
            ``value_loss``, ``entropy``, ``approx_kl`` (the last update's minibatch means).
        render_fn: called with the current ``Policy`` after every evaluation.

    Returns:
        ``TrainResult`` whose ``policy`` is the deterministic actor. ``env_steps`` counts every
        step of every parallel env (evaluation episodes excluded); ``wall_seconds`` is the whole
        call, compilation included; ``compile_seconds`` is the ahead-of-time compilation of the
        update chunk plus the first evaluation call (its compilation); a later call with the same
        env and config in the same process reuses the compiled chunk (its compile time is then
        the evaluation's only, near 0). ``curve`` has a point at 0
        steps and after every chunk of ``eval_every_updates`` updates. ``extra`` holds
        ``solved`` (target reached), ``env_steps_to_target`` / ``wall_seconds_to_target``
        (``None`` if not reached), ``log_std`` (continuous actions) and ``config``.
    """
    start = time.perf_counter()
    config = default_config(env) if config is None else config
    if not isinstance(config, PPOConfig):
        raise TypeError(f"config must be a PPOConfig, got {type(config).__name__}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    env, env_params, env_spec = resolve_env(env, env_params)
    spec = policy_spec(env, env_params, width=config.width, depth=config.depth, activation=config.activation)
    task = None
    if config.shaped_cost:
        task = make_task(env_spec, config.shaped_cost, field="PPOConfig.shaped_cost")

    key = jax.random.key(seed)
    key_model, key_reset, key_run, key_eval = jax.random.split(key, 4)
    standardisation = {}
    if config.standardise_obs:
        obs_size = spec["obs_size"]
        standardisation = {
            "obs_mean": env_spec.obs_mean or (0.0,) * obs_size,
            "obs_std": env_spec.obs_scale or (1.0,) * obs_size,
        }
    model = init_actor_critic(spec, config, key_model, **standardisation)
    if config.init_policy is not None:
        # The actor sees standardised observations when standardise_obs is set (obs_std not None).
        actor = starting_policy(config.init_policy, spec, model.obs_mean, model.obs_std, where="PPOConfig")
        model = eqx.tree_at(lambda m: m.actor, model, actor)
    weights, static = eqx.partition(model, eqx.is_inexact_array)

    num_optimizer_steps = config.num_updates * config.num_epochs * config.num_minibatches
    learning_rate = (
        optax.linear_schedule(config.learning_rate, 0.0, num_optimizer_steps)
        if config.anneal_learning_rate else config.learning_rate
    )
    optimizer = optax.chain(
        optax.clip_by_global_norm(config.max_grad_norm), optax.adam(learning_rate, eps=1e-5)
    )
    reset_keys = jax.random.split(key_reset, config.num_envs)
    obs, env_state = jax.vmap(env.reset, in_axes=(0, None))(reset_keys, env_params)
    runner = Runner(weights, optimizer.init(weights), env_state, obs, key_run, jnp.zeros((), jnp.int32))

    chunk_updates = min(config.eval_every_updates, config.num_updates)
    compile_start = time.perf_counter()
    # Seeds of one config share the compiled chunk: it depends on the config, the env and the
    # networks' structure only (the seed is in the runner). The Trebuchet's simulator makes a
    # chunk cost 30-60 s to compile, so a three-seed comparison saves minutes.
    # The starting weights (init_policy) are in the runner too, not in the compiled chunk.
    config_key = tuple(
        (f.name, repr(getattr(config, f.name))) for f in dataclasses.fields(config) if f.name != "init_policy"
    )
    cache_key = (env_cache_key(env, env_params), config_key, chunk_updates, repr(sorted(spec.items())))
    run_eval, _ = evaluator(env, episodes=config.eval_episodes, params=env_params)

    def evaluate_now(weights, index: int) -> float:
        actor = eqx.combine(weights, static).acting_policy()
        return float(np.mean(run_eval(actor, jax.random.fold_in(key_eval, index))))

    # The first evaluation (which compiles the evaluator on its first use in this process) runs
    # beside the chunk's compile: XLA compiles outside the GIL, so the two share the cores.
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        first_evaluation = pool.submit(evaluate_now, runner.weights, 0)
        chunk, _ = _CHUNKS.get(
            cache_key,
            lambda: jax.jit(_make_chunk(env, env_params, static, optimizer, config, chunk_updates, task))
            .lower(runner)
            .compile(),
        )
        first_return = first_evaluation.result()
    compile_seconds = time.perf_counter() - compile_start
    curve = [{"env_steps": 0, "wall_seconds": time.perf_counter() - start, "eval_return": first_return}]

    env_steps_per_chunk = chunk_updates * config.batch_size
    num_chunks = config.num_updates // chunk_updates
    env_steps, to_target = 0, None
    # The target is checked after training only: a freshly initialised deterministic policy can
    # already balance CartPole (random near-linear policies often do), which is no PPO result.
    for index in range(1, num_chunks + 1):
        if to_target is not None:
            break
        runner, metrics = chunk(runner)
        env_steps += env_steps_per_chunk
        eval_return = evaluate_now(runner.weights, index)
        point = {
            "env_steps": env_steps, "wall_seconds": time.perf_counter() - start, "eval_return": eval_return
        }
        curve.append(point)
        if progress_fn is not None:
            progress_fn({**point, **{name: float(value) for name, value in metrics.items()}})
        if render_fn is not None:
            render_fn(eqx.combine(runner.weights, static).acting_policy())
        if config.target_return is not None and eval_return >= config.target_return:
            to_target = point

    final = eqx.combine(runner.weights, static)
    extra = {
        "algo": NAME,
        "env_id": env.name,
        "solved": to_target is not None,
        "env_steps_to_target": None if to_target is None else to_target["env_steps"],
        "wall_seconds_to_target": None if to_target is None else to_target["wall_seconds"],
        "target_return": config.target_return,
        "config": dataclasses.asdict(config),
    }
    if spec["kind"] == "box":
        extra["log_std"] = [float(v) for v in np.asarray(final.log_std)]
    return TrainResult(
        policy=final.acting_policy(),
        spec=spec,
        env_steps=env_steps,
        wall_seconds=time.perf_counter() - start,
        compile_seconds=compile_seconds,
        curve=curve,
        extra=extra,
    )
