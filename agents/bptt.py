"""Backpropagation through time (BPTT): train a controller by differentiating the simulated return.

No reinforcement learning here: the policy acts in diffgym's differentiable env, the env task's
training cost is summed along the rollout, and its gradient with respect to the network's weights
comes straight through the physics (``jax.grad`` of a ``lax.scan``). Optax applies the update.
Nothing here knows an environment: the policy head comes from the action space, the cost, the
relaxed actions and the training transition from the env's ``diffgym.task.Task``, the
observation scale from its ``EnvSpec``, and the tuned settings from its bundled
``hyperparams.toml``. Any ``Environment`` trains, a user's own included::

    result = train("CartPole-v1")                      # the tuned defaults
    result = train(MyEnv(), BPTTConfig(cost={"reward": 1.0}))

**Online truncated BPTT.** A batch of ``num_envs`` rollouts runs on; every ``window`` steps the
cost of those last steps is backpropagated (through the policy and the dynamics of that window
only), the weights are updated, and the rollouts go on from where they were: the simulator state
is carried across window boundaries, the gradient is not. ``window = episode_length`` is
whole-episode BPTT. This gives one update per ``num_envs * window`` simulated steps, which is what
makes BPTT frugal: the FluxML "Differentiable Control Problems" post (2019) trains CartPole in
about five episodes this way. A rollout that terminates (or reaches ``episode_length``) restarts
from a fresh reset state at once, as ``Environment.step`` does: the cost of the failing step is
counted, the gradient is cut at the reset.

**The cost.** ``BPTTConfig.cost`` holds the weights of the env task's terms: ``{"reward": 1}``
(the default) is minus the env's own reward; the tuned settings add the task's documented
surrogate terms where the reward alone gives no gradient (CartPole's termination penalty, the
Pendulum's energy gap; see each env's task).

**Replay (``replay_updates > 0``; the Pendulum's tuned setting).** Online BPTT uses each simulated
step for one gradient and throws it away. With replay, every simulated step is stored with the
simulator's Jacobians of its next state and reward with respect to the action (forward mode, one
tangent per action entry), and after each window the policy takes ``replay_updates`` Adam steps
on minibatches of ``replay_batch`` steps drawn from all those stored so far. A stored step
``(s, a, s', r, J)`` is re-acted by the current policy: its cost is the task's cost of
``s' + J_s (policy(s) - a)`` and ``r + J_r (policy(s) - a)``, and the gradient flows through the
Jacobians and the policy. No env step is simulated for it, so none is counted: this is the reuse
an off-policy learner makes of its replay buffer, with the simulator's derivative stored beside
each transition. The linearised step is exact where the step is affine in the action, as the
Pendulum's and CartPole's are inside their clips; replay windows are one step long, so it suits a
one-step cost such as the Pendulum's energy-shaped one, not CartPole's, which needs a horizon. On
the Pendulum it turns 4 000-13 000 steps to -200 into 500-750 (10 of 10 seeds).

**Estimators (``estimator``).** ``"straight_through"`` (the default) trains a deterministic
policy: the hard action (the argmax, exactly the env's 0/1) forward and, backward, the gradient of
the task's straight-through surrogate (``Task.relaxed_action``), ``jax.grad`` through the window.
``"triples"`` trains a stochastic policy of a discrete action space: every step's action is drawn
from the policy's Bernoulli (or categorical) head with ``diffgym.stochastic`` (``sampled_action``),
and the window's gradient is ``diffgym.stochastic.derivative_estimate`` of the window's cost
with respect to the weights: the stochastic-triple estimate of the derivative of the *expected*
window cost, unbiased where the straight-through one is not, one per rollout (``vmap`` of the
estimator, never of a sampler inside it), averaged over the rollouts. Each step key is split in
two, one for the policy's draw and one for the transition (one key per draw). A random
transition's own draws (KickedCartPole's kicks) are replayed exactly by the estimator's second
pass, which reuses the keys; they are constants here, whose parameters do not depend on the
weights. The loss reported and the states carried to the next window come from one more plain
run of the window with the same keys, the draws of the estimator's primal pass. The price: the
estimator runs in forward mode, one tangent per weight (193 for a 32-unit CartPole policy,
batched) and one alternative run each. Refused with replay (its stored Jacobians differentiate
the deterministic action) and for a box action space (nothing discrete to sample).

Evaluations (the learning curve) always use ``agents.common.evaluate``: hard actions, the true env
reward, the env's reset distribution, fresh episodes each time. A policy trained with
``"triples"`` is evaluated at its mode (``logit > 0``, the argmax), not sampled.

**One compiled function.** Training runs in chunks of updates, each chunk a single jitted
``lax.scan`` over updates on a named ``TrainState``; between chunks the impure loop evaluates,
reports progress and renders. A partial last chunk reuses the same compiled function (the surplus
updates are skipped by ``lax.cond``), so one train call compiles the chunk once, plus the cached
evaluator. The chunk holds no PRNG: the reset states a rollout may restart from, and the step keys
of a random env, are made outside it, from numpy-drawn key data (initial weights are drawn by
numpy too), and passed in.

**NaN guard.** An update whose loss, gradient or simulated state is not finite is not applied; the
chunk freezes, and ``train`` raises ``FloatingPointError`` naming the update, the env step and what
went non-finite, instead of carrying on with corrupted weights.

**Discrete heads and replay.** A straight-through softmax saturates as the logits grow (their
scale never matters forward: the action is the argmax), and then its gradient vanishes; a
one-step replayed cost on Acrobot drives every logit there within a few hundred Adam steps.
``logit_penalty`` keeps the logits small (see the field).

**Measured** (``python -m bench.bench_bptt``, ``bench/results/bptt.md``, 2 CPU cores, quiet):
CartPole-v1 reaches 500 after 300-1 100 env steps (5 of 5 seeds), nearly all of the wall time
compiling. Pendulum-v1 with replay reaches -200 after 500-750 steps, and its whole 4 000-step
budget trains in under a second after compiling. With one-step replay and ``logit_penalty``
(the tuned settings, seeds 0-9): Acrobot-v1 reaches -100 after 50 env steps, MountainCar-v0
-110 after 100-400 (its task's ``speed`` and ``position`` terms).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any, Callable, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import diffgym
from agents.common import (
    BoundedCache,
    ProgressFn,
    RenderFn,
    TrainResult,
    env_cache_key,
    evaluator,
    make_task,
    resolve_env,
    tuned_config,
    tuned_settings,
)
from agents.policy import Policy, fold_standardisation, load_policy_module, policy_spec
from diffgym import stochastic
from diffgym.registry import did_you_mean

NAME = "bptt"

#: The values of ``BPTTConfig.estimator``.
ESTIMATORS: tuple[str, ...] = ("straight_through", "triples")


@dataclasses.dataclass
class BPTTConfig:
    """Hyper-parameters of BPTT training (``default_config(env)``: the env's tuned values)."""

    total_env_steps: int = 10_000
    """Training budget in simulated env steps (every step of every parallel rollout counts)."""
    num_envs: int = 1
    """Parallel rollouts per update (``vmap``); the gradient is their mean."""
    window: int = 10
    """Truncation window: simulated steps backpropagated per update. Equal to ``episode_length`` for
    whole-episode BPTT. The env state is carried across windows, the gradient is not."""
    episode_length: int | None = None
    """Training rollouts restart from a fresh reset state after this many steps (or at a
    termination). None: the env's own time limit."""
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
    """Temperature of discrete actions: of the straight-through surrogate
    (``diffgym.task.Task.relaxed_action``), or with ``estimator="triples"`` of the sampled policy
    (``sigmoid(logit / temperature)``, ``softmax(logits / temperature)``)."""
    estimator: str = "straight_through"
    """How a window's gradient is estimated (see the module docstring, "Estimators").
    ``"straight_through"``: the deterministic hard action (the argmax) forward and the task's
    straight-through surrogate gradient backward (``Task.relaxed_action``). ``"triples"``: the
    policy is stochastic (its Bernoulli or categorical head is sampled with ``diffgym.stochastic``),
    and the gradient is the stochastic-triple estimate of the derivative of the window's *expected*
    cost (``diffgym.stochastic.derivative_estimate``), unbiased, averaged over the rollouts.
    Discrete action spaces only, without replay. Evaluations use the hard action either way."""
    logit_penalty: float = 0.0
    """Weight of the mean square of the policy's raw output (the logits of a discrete head, the
    pre-``tanh`` output of a box), added to every step's training cost, replayed steps included
    (0: off). A discrete hard action is the argmax (or the logit's sign), which no rescaling of the
    logits changes, so the penalty costs the hard policy nothing; it keeps the straight-through
    softmax from saturating, where its gradient vanishes and a policy that has committed to one
    action everywhere stops learning. Measured with one-step replay (4 x 64) on Acrobot-v1: off,
    the logits grow to about ±5 and the policy collapses to one torque (-500, seeds 0-2); 1e-3
    (1e-2 and 1e-1 as well): -100 on the curve after 50-250 env steps (seeds 0-9). On
    MountainCar-v0 it halves the steps to -110 (100-400 instead of 750-1 500, seeds 0-4)."""
    cost: dict[str, float] = dataclasses.field(default_factory=dict)
    """Weights of the env task's cost terms by name (``reward``: minus the env's reward; the
    others: the task's documented surrogates). Empty: the task's defaults, the env's reward only."""
    obs_scale: tuple[float, ...] = ()
    """Typical magnitude of each observation entry: the network sees ``(obs - mean) / scale``
    while training (folded into the first layer of the returned policy). Empty: the env spec's."""
    discount: float = 1.0
    """Per-step weight ``discount**t`` on the cost inside a window (1 = plain sum)."""
    inward_squash_gradient: bool = True
    """Box actions: the ``tanh`` squash passes its gradient at full slope where the update moves a
    saturated action back inside the box (``diffgym.task.inward_tanh``; the forward pass is
    unchanged). False: ``tanh``'s own gradient, which vanishes at saturation, so a policy that
    learnt to push at full torque cannot learn to brake."""
    eval_every: int = 500
    """Env steps between learning-curve evaluations (rounded to whole updates)."""
    eval_episodes: int = 20
    """Functional-env episodes per evaluation (hard actions, true reward)."""
    stop_at_return: float | None = None
    """Stop as soon as an evaluation's mean return reaches this; ``None`` trains the whole budget."""
    replay_updates: int = 0
    """Replay (0: off, plain online truncated BPTT). Every simulated step is stored with its
    Jacobians with respect to the action; after each window, instead of the window's own gradient,
    the policy takes this many Adam steps, each on ``replay_batch`` stored steps drawn uniformly
    from all those simulated so far, replayed through their linearised dynamics (no new env step;
    see the module docstring)."""
    replay_batch: int = 64
    """Stored steps per replay update."""
    keep_best: bool = True
    """Return the policy of the best learning-curve evaluation rather than the last one. The pick is
    made on the curve's episodes, so judge the result on other episodes (``bench/bench_bptt.py``
    and the CLI evaluate on the gymnasium env with other seeds)."""
    init_policy: str | None = None
    """A checkpoint folder (``train-controller --out DIR``, or a bundled ``agents/assets/<env>``)
    whose weights training starts from instead of a fresh initialisation: fine-tuning, e.g. on
    identified physics (``agents.sim2real``). None: fresh weights. Its network must be this config's
    (head, ``width``, ``depth``, ``activation``). The starting policy is evaluated before the first
    update (a curve point at 0 env steps) and, with ``keep_best``, returned if no later evaluation
    beats it; the seed's other draws (training starts, step keys, curve episodes) are those of a
    fresh run."""

    def __post_init__(self):
        # A list (e.g. from JSON) would make the config unhashable as a compile-cache key.
        self.obs_scale = tuple(float(value) for value in self.obs_scale)
        self.cost = {str(name): float(weight) for name, weight in dict(self.cost).items()}
        if self.init_policy is not None:
            self.init_policy = os.fspath(self.init_policy)  # a Path from Python, a str from the CLI


def default_config(env) -> BPTTConfig:
    """The env's tuned settings (``[bptt]`` of its bundled ``hyperparams.toml``), else generic
    defaults: a 10-step window (shorter for shorter episodes) and a stop at the spec's threshold."""
    instance, params, spec = resolve_env(env)
    if tuned_settings(instance, NAME) is not None:
        return tuned_config(BPTTConfig, instance, NAME)
    return BPTTConfig(window=min(10, int(params.max_steps_in_episode)), stop_at_return=spec.reward_threshold)


# --------------------------------------------------------------------------------------------
# The named train state
# --------------------------------------------------------------------------------------------
class Failure(NamedTuple):
    """Where the first non-finite update happened (``code`` 0: none)."""

    code: jax.Array  # bits: _NONFINITE_STATE | _NONFINITE_LOSS | _NONFINITE_GRAD
    update: jax.Array  # index of the failed update, -1 if none
    step: jax.Array  # first window step whose simulated state is non-finite, -1 if none


class Replay(NamedTuple):
    """Every simulated step so far (rows ``0 .. count-1``): see ``StepRecord``."""

    steps: Any  # a StepRecord whose leaves have a leading axis of the whole budget's steps
    count: jax.Array


class StepRecord(NamedTuple):
    """What replay keeps of one simulated step."""

    state: Any
    obs: jax.Array
    action: jax.Array
    next_state: Any
    reward: jax.Array
    next_state_jacobian: Any  # d(float leaves of next_state) / d action
    reward_jacobian: jax.Array  # d reward / d action


class TrainState(NamedTuple):
    """The carry of the compiled chunk."""

    weights: Any  # the policy's arrays (eqx.partition)
    opt_state: Any
    env_states: Any  # one per rollout: leading axis num_envs
    update: jax.Array  # updates made so far
    failure: Failure
    replay: Replay | tuple  # () without replay


class ChunkInputs(NamedTuple):
    """What a chunk consumes, made outside it (no PRNG inside the compiled function)."""

    starts: Any  # reset states, leaves (updates, num_envs, window, ...): the state a rollout restarts from after that step
    keys: jax.Array  # (updates, num_envs, window) step keys of the transition
    replay_uniforms: jax.Array | None  # (updates, replay_updates, replay_batch) in [0, 1): the stored steps replayed


# --------------------------------------------------------------------------------------------
# The impure loop
# --------------------------------------------------------------------------------------------
def train(
    env,
    config: BPTTConfig | None = None,
    *,
    seed: int = 0,
    env_params=None,
    progress_fn: ProgressFn | None = None,
    render_fn: RenderFn | None = None,
) -> TrainResult:
    """Train a policy on ``env`` by truncated BPTT through the differentiable env.

    Args:
        env: an id or alias (``"CartPole-v1"``, ``"pendulum"``) or an ``Environment`` instance.
        config: hyper-parameters; None: ``default_config(env)``, the tuned ones.
        seed: seeds the initial weights, the training starts and the evaluation episodes.
        env_params: env parameters to train and evaluate in (default: the env's own).
        progress_fn: called after every chunk of updates (every ``config.eval_every`` env steps)
            with ``env_steps``, ``updates``, ``wall_seconds``, ``loss`` (the cost per step of the
            chunk's last update), ``grad_norm`` (before clipping) and ``eval_return``.
        render_fn: called with the current policy (``policy(obs)`` is the hard action) after every
            chunk, e.g. to show a rollout for the CLI's ``--render``.

    Returns:
        ``TrainResult``: ``env_steps`` counts every simulated training step of every rollout
        (evaluation episodes excluded); ``compile_seconds`` is the part of ``wall_seconds`` spent
        compiling the training chunk and, on its first use in this process, the evaluator.

    Raises:
        FloatingPointError: the loss, gradient or simulated state became NaN/Inf; the message names
            the update and env step. The update is not applied.
    """
    start_time = time.perf_counter()
    setup = _setup(env, default_config(env) if config is None else config, seed, env_params)
    config, rng = setup.config, setup.rng
    steps_per_update = _steps_per_update(config)
    total_updates = config.total_env_steps // steps_per_update
    updates_per_chunk = min(_updates_per_chunk(config), total_updates)
    compile_seconds = train_seconds = eval_seconds = 0.0
    curve: list[dict] = []
    state, compiled = setup.state, None
    best: tuple[float, Policy] | None = None  # (eval return, policy)
    run_eval, eval_cached = evaluator(setup.env, episodes=config.eval_episodes, params=setup.params)

    if config.init_policy is not None:
        # The starting point of a fine-tuning is a candidate too: training on other physics may
        # not improve it. Its episodes come from a stream of their own, so that every later draw
        # is the one a fresh run with this seed makes.
        eval_start = time.perf_counter()
        policy = setup.policy(state.weights)
        initial_key = jax.random.key(int(np.random.default_rng([seed, 1]).integers(2**31)))
        returns = np.asarray(run_eval(policy, initial_key))
        compile_seconds += 0.0 if eval_cached else time.perf_counter() - eval_start
        eval_cached = True
        point = {
            "env_steps": 0,
            "updates": 0,
            "wall_seconds": time.perf_counter() - start_time,
            "eval_return": float(returns.mean()),
            "eval_return_std": float(returns.std()),
        }
        curve.append(point)
        best = (point["eval_return"], policy)

    while int(state.update) < total_updates:
        num_active = min(updates_per_chunk, total_updates - int(state.update))
        inputs = setup.draw_inputs(updates_per_chunk)
        if compiled is None:
            compile_start = time.perf_counter()
            # Seeds of one config share the compiled chunk: it depends on the env, its parameters
            # and the config only (the seed is in the state and the inputs).
            compiled, _ = _CHUNKS.get(
                (setup.cache_key, updates_per_chunk),
                lambda: setup.run_chunk.lower(state, inputs, jnp.int32(num_active)).compile(),
            )
            compile_seconds += time.perf_counter() - compile_start
        run_start = time.perf_counter()
        state, (losses, grad_norms) = compiled(state, inputs, jnp.int32(num_active))
        failure = jax.tree.map(int, state.failure)  # waits for the chunk to finish
        train_seconds += time.perf_counter() - run_start
        if failure.code:
            _raise_nonfinite(setup.env.name, config, failure)
        updates_done = int(state.update)
        policy = setup.policy(state.weights)

        eval_start = time.perf_counter()
        returns = np.asarray(run_eval(policy, jax.random.key(int(rng.integers(2**31)))))
        if not eval_cached:  # the evaluator's first call in this process compiles it
            compile_seconds += time.perf_counter() - eval_start
            eval_cached = True
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
        spec=setup.spec,
        env_steps=int(state.update) * steps_per_update,
        wall_seconds=time.perf_counter() - start_time,
        compile_seconds=compile_seconds,
        curve=curve,
        extra={
            "algo": NAME,
            "env_id": setup.env.name,
            "updates": int(state.update),
            "steps_per_update": steps_per_update,
            "returned_eval_return": best[0],
            "train_seconds": train_seconds,  # running the compiled chunks
            "eval_seconds": eval_seconds,  # learning-curve evaluations, compile excluded
            "task": setup.task.weights(),
            "config": dataclasses.asdict(config),
        },
    )


#: Compiled training chunks of this process, by (env, params, config, updates per chunk).
_CHUNKS = BoundedCache(8)


@dataclasses.dataclass
class _Setup:
    """Everything a training run starts from (shared by ``train`` and the tests)."""

    env: diffgym.Environment
    params: Any  # the env's params (evaluation); training uses them with max_steps = episode_length
    config: BPTTConfig  # with episode_length and obs_scale filled in
    task: diffgym.Task
    spec: dict  # Policy constructor arguments
    static: Any  # the policy's non-array part
    obs_mean: np.ndarray
    obs_scale: np.ndarray
    rng: np.random.Generator
    state: TrainState
    run_chunk: Callable  # jitted (TrainState, ChunkInputs, num_active) -> (TrainState, (losses, grad_norms))
    draw_starts: Callable  # jitted key data (..., 2) -> reset states of that batch shape
    cache_key: tuple

    def policy(self, weights) -> Policy:
        """The policy on raw observations (the standardisation folded into its first layer)."""
        return fold_standardisation(eqx.combine(weights, self.static), self.obs_mean, self.obs_scale)

    def draw_inputs(self, updates: int) -> ChunkInputs:
        """Fresh reset states, step keys and replay picks for a chunk of ``updates`` updates."""
        shape = (updates, self.config.num_envs, self.config.window)
        starts = self.draw_starts(_key_data(self.rng, shape))
        keys = jax.random.wrap_key_data(_key_data(self.rng, shape))
        replay_uniforms = None
        if self.config.replay_updates:
            picks = (updates, self.config.replay_updates, self.config.replay_batch)
            replay_uniforms = jnp.asarray(self.rng.random(picks, np.float32))
        return ChunkInputs(starts, keys, replay_uniforms)


def _setup(env, config: BPTTConfig, seed: int, env_params=None, optimizer=None) -> _Setup:
    env, params, env_spec = resolve_env(env, env_params)
    episode_length = int(params.max_steps_in_episode) if config.episode_length is None else config.episode_length
    obs_size = int(np.prod(env.observation_space(params).shape))
    config = dataclasses.replace(
        config,
        episode_length=episode_length,
        obs_scale=config.obs_scale or env_spec.obs_scale or (1.0,) * obs_size,
    )
    _validate(config)
    task = make_task(env_spec, config.cost, field="BPTTConfig.cost")
    spec = policy_spec(env, params, width=config.width, depth=config.depth, activation=config.activation)
    if config.estimator == "triples" and spec["kind"] == "box":
        raise ValueError(
            f"BPTTConfig.estimator 'triples' samples a discrete action (Bernoulli or categorical head); "
            f"{env.name} has the continuous action space {env.action_space(params)}. Use "
            "estimator = 'straight_through' (the pathwise gradient) there."
        )
    obs_scale = np.asarray(config.obs_scale, np.float32)
    obs_mean = np.asarray(env_spec.obs_mean or (0.0,) * obs_size, np.float32)
    if obs_scale.shape != (obs_size,):
        raise ValueError(f"BPTTConfig.obs_scale needs {obs_size} entries for {env.name}, got {config.obs_scale!r}")
    # Host-side randomness (numpy): no PRNG kernels to compile, and reproducible per seed.
    rng = np.random.default_rng(seed)
    initial = _init_policy(spec, config.output_scale, rng)  # drawn even when replaced: same streams
    if config.init_policy is not None:
        initial = starting_policy(config.init_policy, spec, obs_mean, obs_scale, where="BPTTConfig")
    weights, static = eqx.partition(initial, eqx.is_array)
    total_updates = config.total_env_steps // _steps_per_update(config)
    if optimizer is None:
        schedule = optax.linear_schedule(
            config.learning_rate,
            config.learning_rate * config.final_learning_rate_fraction,
            total_updates * max(1, config.replay_updates),  # Adam steps
        )
        optimizer = optax.chain(optax.clip_by_global_norm(config.max_grad_norm), optax.adam(schedule))
    train_params = dataclasses.replace(params, max_steps_in_episode=episode_length)
    draw_starts = _starts_drawer(env, train_params)
    env_states = draw_starts(_key_data(rng, (config.num_envs,)))
    run_chunk, empty_replay = _make_chunk_runner(
        env, train_params, config, task, static, optimizer, jnp.asarray(obs_mean), jnp.asarray(obs_scale)
    )
    state = TrainState(
        weights=weights,
        opt_state=_zeros_like_state(optimizer, weights),
        env_states=env_states,
        update=jnp.int32(0),
        failure=Failure(jnp.int32(0), jnp.int32(-1), jnp.int32(-1)),
        replay=empty_replay(weights, env_states, total_updates * _steps_per_update(config)),
    )
    # The starting weights are an input of the compiled chunk, not part of it.
    config_key = tuple(
        (f.name, repr(getattr(config, f.name))) for f in dataclasses.fields(config) if f.name != "init_policy"
    )
    cache_key = (env_cache_key(env, train_params), config_key, repr(task))
    return _Setup(
        env, params, config, task, spec, static, obs_mean, obs_scale, rng, state, run_chunk, draw_starts, cache_key
    )


_STARTS = BoundedCache(16)


def _key_data(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Random key data for a batch of keys of the default PRNG implementation, drawn by numpy."""
    words = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0))).shape
    return rng.integers(0, 2**32, (*shape, *words), dtype=np.uint32)


def _starts_drawer(env, params) -> Callable:
    """A jitted ``key data -> reset states`` (any batch shape), cached per env."""

    def build():
        def draw(key_data):
            keys = jax.random.wrap_key_data(key_data)
            flat = keys.reshape(-1)
            states = jax.vmap(lambda key: env.reset_env(key, params)[1])(flat)
            return jax.tree.map(lambda leaf: leaf.reshape((*keys.shape, *leaf.shape[1:])), states)

        return jax.jit(draw)

    return _STARTS.get(env_cache_key(env, params), build)[0]


def _init_policy(spec: dict, output_scale: float, rng: np.random.Generator) -> Policy:
    """A ``Policy`` with equinox's default initialisation drawn by numpy: every ``Linear`` layer
    gets weights and bias uniform in ±1/sqrt(fan_in), as ``eqx.nn.Linear``; the output layer is
    then scaled by ``output_scale``. Drawing on the host avoids compiling JAX's PRNG for a few
    hundred numbers."""
    skeleton = eqx.filter_eval_shape(Policy, **spec, key=jax.random.key(0))
    layers = skeleton.mlp.layers
    new_leaves = []
    for index, layer in enumerate(layers):
        bound = 1.0 / math.sqrt(layer.in_features)
        scale = output_scale if index == len(layers) - 1 else 1.0
        weight = rng.uniform(-bound, bound, layer.weight.shape).astype(np.float32) * scale
        bias = rng.uniform(-bound, bound, layer.bias.shape).astype(np.float32) * scale
        new_leaves += [jnp.asarray(weight), jnp.asarray(bias)]
    leaves = lambda policy: [leaf for layer in policy.mlp.layers for leaf in (layer.weight, layer.bias)]  # noqa: E731
    return eqx.tree_at(leaves, skeleton, new_leaves)


def starting_policy(directory, spec: dict, obs_mean=None, obs_scale=None, *, where: str) -> Policy:
    """The checkpoint in ``directory`` as the network a trainer starts from: checked against the
    ``Policy`` that ``spec`` describes, and, where the trainer feeds its network ``(obs - obs_mean)
    / obs_scale``, with that standardisation taken out of its first layer again (a checkpoint acts
    on raw observations: ``fold_standardisation`` put it there). ``where`` names the config in
    errors. Shared by BPTT and PPO (``init_policy``)."""
    try:
        policy, header = load_policy_module(directory)
    except FileNotFoundError as error:
        raise ValueError(f"{where}.init_policy: {error}") from None
    def arrays_and_rest(module):
        is_array = lambda x: isinstance(x, (jax.Array, jax.ShapeDtypeStruct))  # noqa: E731
        arrays, rest = eqx.partition(module, is_array)
        return [leaf.shape for leaf in jax.tree.leaves(arrays)], rest

    shapes, rest = arrays_and_rest(policy)
    expected_shapes, expected_rest = arrays_and_rest(eqx.filter_eval_shape(Policy, **spec, key=jax.random.key(0)))
    if shapes != expected_shapes or not eqx.tree_equal(rest, expected_rest):
        saved = dict(header.get("spec", {}))
        describe = lambda s: ", ".join(  # noqa: E731
            f"{k} {s.get(k)!r}" for k in ("kind", "obs_size", "action_size", "width", "depth", "activation")
        )
        raise ValueError(
            f"{where}.init_policy {os.fspath(directory)!r} (trained for {header.get('env_id')}) is not the "
            f"network this config trains: it has {describe(saved)}; the config and env ask for "
            f"{describe(spec)}. Set {where}'s width, depth and activation to the checkpoint's."
        )
    if obs_scale is None:
        return policy
    # fold(p, m', s') computes W / s' and b - (W / s') m'; with s' = 1 / s and m' = -m / s that is
    # W s and b + W m: the first layer of the network on standardised observations.
    scale = np.asarray(obs_scale, np.float32)
    mean = np.zeros_like(scale) if obs_mean is None else np.asarray(obs_mean, np.float32)
    return fold_standardisation(policy, -mean / scale, 1.0 / scale)


def _zeros_like_state(optimizer, weights):
    """``optimizer.init(weights)`` built on the host (Adam's zero moments): nothing to compile."""
    return jax.tree.map(
        lambda leaf: jnp.asarray(np.zeros(leaf.shape, leaf.dtype)), jax.eval_shape(optimizer.init, weights)
    )


# --------------------------------------------------------------------------------------------
# The pure training step
# --------------------------------------------------------------------------------------------
# Bits of Failure.code
_NONFINITE_STATE, _NONFINITE_LOSS, _NONFINITE_GRAD = 1, 2, 4


def linearised_step(record: StepRecord, action_change: jax.Array) -> tuple[Any, jax.Array]:
    """A stored step's next state and reward moved to first order by ``action_change``:
    ``s' + J_s (u - a)`` and ``r + J_r (u - a)``. Exact where the step is affine in the action
    (the Pendulum's torque and CartPole's force enter the Euler step linearly, inside the clips)."""
    floats, rest = eqx.partition(record.next_state, eqx.is_inexact_array)
    axes = action_change.ndim
    moved = jax.tree.map(
        lambda x, j: x + jnp.tensordot(j, action_change, axes=axes), floats, record.next_state_jacobian
    )
    reward = record.reward + jnp.tensordot(record.reward_jacobian, action_change, axes=axes)
    return eqx.combine(moved, rest), reward


def sampled_action(raw: jax.Array, space, key: jax.Array, *, temperature: float = 1.0) -> jax.Array:
    """A draw from the stochastic policy of a discrete head, through ``diffgym.stochastic`` (so that
    the triple estimator sees it): for ``Discrete(2)``, ``raw`` is the logit of action 1 and the
    draw is ``Bernoulli(sigmoid(raw[0] / temperature))`` as 0.0 or 1.0; for ``Discrete(n)``, the
    index drawn from ``softmax(raw / temperature)``, as a float. Its mode is the hard action of
    ``agents.policy.Policy`` (``logit > 0``, the argmax)."""
    if not isinstance(space, diffgym.Discrete):
        raise TypeError(f"a sampled action needs a Discrete action space, got {space!r}")
    if space.n == 2:
        return stochastic.bernoulli(key, jax.nn.sigmoid(raw[0] / temperature))
    return stochastic.categorical(key, jax.nn.softmax(raw / temperature))


def absorbing_costs(costs: jax.Array, terminated: jax.Array) -> jax.Array:
    """Per-step costs (last axis: the window's steps) with every step after a rollout's first
    termination costing what the terminating step cost: the triple estimator's window cost.

    Training rollouts restart at a termination, and a fresh start costs little (CartPole's is
    upright and centred), so in the plain window cost a fall is forgiven at once. The
    straight-through gradient never sees that (the reset cuts it); the triple estimator, which
    compares whole runs with one action changed, would, and it learns that falling early is cheap
    (measured on KickedCartPole: the policy collapses to pushing one way, 9-step episodes). Held at
    the terminating step's cost (about 1 at CartPole's thresholds, its largest), a fall is paid for
    until the window ends."""
    terminated = terminated.astype(costs.dtype)
    dead = (jnp.cumsum(terminated, axis=-1) - terminated) > 0  # a termination before this step
    first = jnp.argmax(terminated, axis=-1)[..., None]
    absorbed = jnp.take_along_axis(costs, first, axis=-1)
    return jnp.where(dead, absorbed, costs)


def transition_with_jacobian(task, env, key, state, action, params):
    """``task.transition``'s ``(next_state, reward, terminated)`` and the Jacobians of the next
    state's float leaves and of the reward with respect to the action (forward mode: one tangent
    per action entry), as replay stores them."""

    def floats_and_all(action):
        outcome = task.transition(env, key, state, action, params)
        return (eqx.filter(outcome[0], eqx.is_inexact_array), outcome[1]), outcome

    (state_jacobian, reward_jacobian), outcome = jax.jacfwd(floats_and_all, has_aux=True)(action)
    return outcome, (state_jacobian, reward_jacobian)


def _make_chunk_runner(env, params, config: BPTTConfig, task, static, optimizer, obs_mean, obs_scale):
    """Build ``run_chunk(state, inputs, num_active) -> (state, (losses, grad_norms))`` (jitted)
    and ``empty_replay(weights, env_states, capacity)``, the initial ``TrainState.replay``.

    One call makes ``_updates_per_chunk(config)`` updates, of which the first ``num_active`` run and
    the rest are skipped (``lax.cond``: nothing simulated). ``params`` are the training params
    (their time limit is ``config.episode_length``). With replay, ``losses`` are the mean cost of
    each update's simulated window.
    """
    step_weights = config.discount ** jnp.arange(config.window, dtype=jnp.float32)
    space = env.action_space(params)
    replay = config.replay_updates > 0
    triples = config.estimator == "triples"

    def act(weights, obs, key=None):
        """The action and the ``logit_penalty`` cost of the raw output it comes from: the relaxed
        (straight-through) action, or with ``estimator="triples"`` a draw of the policy's head
        from ``key``."""
        raw = eqx.combine(weights, static).raw((obs - obs_mean) / obs_scale)
        if triples:
            action = sampled_action(raw, space, key, temperature=config.temperature)
        else:
            action = task.relaxed_action(
                raw, space, temperature=config.temperature, inward_gradient=config.inward_squash_gradient
            )
        penalty = config.logit_penalty * jnp.mean(raw**2) if config.logit_penalty else jnp.float32(0.0)
        return action, penalty

    def env_step(weights, state, start, key, record=False):
        """One training step of one rollout, restarted from ``start`` at a termination or at the
        episode's end. ``record``: also return what replay stores of the step."""
        obs = env.get_obs(state, params)
        if triples:
            # One key per draw: the policy's draw and the transition's each get their own.
            key, key_action = jax.random.split(key)
            action, penalty = act(weights, obs, key_action)
        else:
            action, penalty = act(weights, obs)
        if record:
            (next_state, reward, terminated), jacobians = transition_with_jacobian(
                task, env, key, state, action, params
            )
        else:
            next_state, reward, terminated = task.transition(env, key, state, action, params)
        cost = task.cost(params, state, action, next_state, reward) + penalty
        done = terminated | env.is_truncated(next_state, params)
        # The reset state is a constant: the gradient is cut there, as Environment.step does.
        carried = jax.tree.map(lambda r, s: jnp.where(done, r, s), start, next_state)
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(next_state)]))
        records = StepRecord(state, obs, action, next_state, reward, *jacobians) if record else ()
        return carried, (cost, finite, records, terminated)

    def simulate_window(weights, env_states, starts, keys, record=False):
        """``env_step`` over one window of every rollout: ``(env_states, per-step outputs)``, each
        output shaped ``(num_envs, window, ...)``."""

        def one_rollout(state, starts, keys):
            def body(state, xs):
                return env_step(weights, state, *xs, record)

            return jax.lax.scan(body, state, (starts, keys))

        return jax.vmap(one_rollout)(env_states, starts, keys)

    def window_loss(weights, env_states, starts, keys):
        """Discount-weighted mean cost per step of one window, averaged over the rollouts."""
        env_states, (costs, finite, _, _) = simulate_window(weights, env_states, starts, keys)
        loss = jnp.mean(costs @ step_weights) / jnp.sum(step_weights)
        return loss, (env_states, finite)

    grad_fn = jax.value_and_grad(window_loss, has_aux=True)

    def rollout_window_cost(weights, env_state, starts, keys):
        """One rollout's discount-weighted mean cost per step over a window, a termination
        absorbing (``absorbing_costs``): the ``f`` whose expectation the triple estimator
        differentiates (samplers called directly, no vmap)."""

        def body(state, xs):
            state, (cost, _, _, terminated) = env_step(weights, state, *xs)
            return state, (cost, terminated)

        _, (costs, terminated) = jax.lax.scan(body, env_state, (starts, keys))
        return absorbing_costs(costs, terminated) @ step_weights / jnp.sum(step_weights)

    def triple_gradient(weights, env_states, starts, keys):
        """The stochastic-triple estimate of the window's expected-cost gradient, one per rollout
        (``vmap`` of the estimator, never of a sampler inside it), averaged over the rollouts. Each
        rollout's step keys are the estimator's ``key``: both of its passes draw from them."""

        def one_rollout(env_state, starts, keys):
            def cost(weights, keys):
                return rollout_window_cost(weights, env_state, starts, keys)

            return stochastic.derivative_estimate(cost, weights, keys, estimator="triples")

        per_rollout = jax.vmap(one_rollout)(env_states, starts, keys)
        return jax.tree.map(lambda leaf: jnp.mean(leaf, axis=0), per_rollout)

    def replay_loss(weights, batch: StepRecord):
        def replayed_cost(record: StepRecord):
            action, penalty = act(weights, record.obs)
            next_state, reward = linearised_step(record, action - record.action)
            return task.cost(params, record.state, action, next_state, reward) + penalty

        return jnp.mean(jax.vmap(replayed_cost)(batch))

    replay_grad_fn = jax.value_and_grad(replay_loss)

    def guarded(state: TrainState, finite, losses, grad_norms, new: TrainState) -> TrainState:
        """``new``, or, where the simulated states, a loss or a gradient norm went non-finite, the
        old state: the update is dropped whole, and the failure is recorded."""
        state_ok = jnp.all(finite)
        code = (
            jnp.where(state_ok, 0, _NONFINITE_STATE)
            | jnp.where(jnp.all(jnp.isfinite(losses)), 0, _NONFINITE_LOSS)
            | jnp.where(jnp.all(jnp.isfinite(grad_norms)), 0, _NONFINITE_GRAD)
        )
        ok = code == 0
        kept = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, state)
        failure = Failure(
            code=code,
            update=jnp.where(ok, state.failure.update, state.update),
            # The first simulated step of the window (any rollout) whose state is non-finite.
            step=jnp.where(ok, state.failure.step, jnp.where(state_ok, -1, jnp.argmin(jnp.all(finite, axis=0)))),
        )
        return kept._replace(update=state.update + 1, failure=failure)

    def update(state: TrainState, starts, keys, _):
        if triples:
            # The window as sampled, for the loss and the carried states: the same draws (the same
            # keys) as the estimator's primal pass.
            env_states, (costs, finite, _, terminated) = simulate_window(
                state.weights, state.env_states, starts, keys
            )
            loss = jnp.mean(absorbing_costs(costs, terminated) @ step_weights) / jnp.sum(step_weights)
            grads = triple_gradient(state.weights, state.env_states, starts, keys)
        else:
            (loss, (env_states, finite)), grads = grad_fn(state.weights, state.env_states, starts, keys)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.weights)
        new = state._replace(
            weights=optax.apply_updates(state.weights, updates), opt_state=opt_state, env_states=env_states
        )
        return guarded(state, finite, loss, grad_norm, new), (loss, grad_norm)

    def replay_update(state: TrainState, starts, keys, replay_uniforms):
        """Simulate one window with the current policy, store its steps, then take
        ``config.replay_updates`` Adam steps on minibatches of all the steps stored so far."""
        env_states, (costs, finite, records, _) = simulate_window(state.weights, state.env_states, starts, keys, True)
        # (num_envs, window, ...) -> one row per simulated step, appended at `count`.
        records = jax.tree.map(lambda leaf: leaf.reshape((-1, *leaf.shape[2:])), records)
        count = state.replay.count
        stored = jax.tree.map(
            lambda old, new: jax.lax.dynamic_update_slice_in_dim(old, new.astype(old.dtype), count, 0),
            state.replay.steps,
            records,
        )
        count = count + _steps_per_update(config)

        def replay_step(inner, uniforms):
            weights, opt_state = inner
            rows = jnp.minimum((uniforms * count).astype(jnp.int32), count - 1)
            loss, grads = replay_grad_fn(weights, jax.tree.map(lambda leaf: leaf[rows], stored))
            updates, opt_state = optimizer.update(grads, opt_state, weights)
            return (optax.apply_updates(weights, updates), opt_state), (loss, optax.tree.norm(grads))

        (weights, opt_state), (replay_losses, grad_norms) = jax.lax.scan(
            replay_step, (state.weights, state.opt_state), replay_uniforms
        )
        new = state._replace(weights=weights, opt_state=opt_state, env_states=env_states, replay=Replay(stored, count))
        return guarded(state, finite, replay_losses, grad_norms, new), (jnp.mean(costs), grad_norms[-1])

    def skip(state, *_):
        return state, (jnp.float32(jnp.nan), jnp.float32(jnp.nan))

    def run_chunk(state: TrainState, inputs: ChunkInputs, num_active):
        def body(state, xs):
            index, starts, keys, replay_uniforms = xs
            healthy = state.failure.code == 0
            return jax.lax.cond(
                (index < num_active) & healthy,
                replay_update if replay else update,
                skip,
                state,
                starts,
                keys,
                replay_uniforms,
            )

        indices = jnp.arange(inputs.keys.shape[0])
        return jax.lax.scan(body, state, (indices, inputs.starts, inputs.keys, inputs.replay_uniforms))

    def empty_replay(weights, env_states, capacity: int):
        """Zeroed storage for ``capacity`` steps and a count of 0 (``()`` without replay)."""
        if not replay:
            return ()
        one_state = jax.tree.map(lambda leaf: leaf[0], env_states)
        one_key = jax.random.key(0)
        shapes = jax.eval_shape(lambda: env_step(weights, one_state, one_state, one_key, record=True)[1][2])
        zeros = jax.tree.map(lambda leaf: jnp.asarray(np.zeros((capacity, *leaf.shape), leaf.dtype)), shapes)
        return Replay(zeros, jnp.int32(0))

    return jax.jit(run_chunk), empty_replay


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
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"BPTTConfig.{name} must be a positive integer, got {value!r}")
    for name, lowest, kind in (("replay_updates", 0, "non-negative"), ("replay_batch", 1, "positive")):
        value = getattr(config, name)
        if not isinstance(value, int) or value < lowest:
            raise ValueError(f"BPTTConfig.{name} must be a {kind} integer, got {value!r}")
    if config.depth < 0:
        raise ValueError(f"BPTTConfig.depth must be >= 0, got {config.depth!r}")
    if not config.logit_penalty >= 0:
        raise ValueError(f"BPTTConfig.logit_penalty must be >= 0, got {config.logit_penalty!r}")
    for name in ("learning_rate", "max_grad_norm", "temperature"):
        value = getattr(config, name)
        if not value > 0:
            raise ValueError(f"BPTTConfig.{name} must be > 0, got {value!r}")
    if not 0 <= config.final_learning_rate_fraction <= 1:
        raise ValueError(
            "BPTTConfig.final_learning_rate_fraction must be in [0, 1], "
            f"got {config.final_learning_rate_fraction!r}"
        )
    if config.estimator not in ESTIMATORS:
        raise ValueError(
            f"BPTTConfig.estimator must be one of {ESTIMATORS}, got {config.estimator!r}."
            + did_you_mean(str(config.estimator), list(ESTIMATORS))
        )
    if config.estimator == "triples" and config.replay_updates:
        raise ValueError(
            f"BPTTConfig.estimator 'triples' cannot be combined with replay (replay_updates = "
            f"{config.replay_updates}): replay re-acts stored steps through their action Jacobians, "
            "a gradient of the deterministic straight-through action, while the triple estimator "
            "differentiates the expected cost of a sampled policy by re-running the window. Set "
            "replay_updates = 0 or estimator = 'straight_through'."
        )
    if not 0 < config.discount <= 1:
        raise ValueError(f"BPTTConfig.discount must be in (0, 1], got {config.discount!r}")
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


def _raise_nonfinite(env_name: str, config: BPTTConfig, failure: Failure) -> None:
    what = [
        name
        for bit, name in (
            (_NONFINITE_STATE, "the simulated state"),
            (_NONFINITE_LOSS, "the loss"),
            (_NONFINITE_GRAD, "the gradient"),
        )
        if failure.code & bit
    ]
    first_env_step = failure.update * _steps_per_update(config)
    where = f"update {failure.update} (env steps {first_env_step}..{first_env_step + _steps_per_update(config)})"
    if failure.step >= 0:
        where += f", first at step {failure.step} of its {config.window}-step window"
    raise FloatingPointError(
        f"BPTT on {env_name} stopped at {where}: {' and '.join(what)} became non-finite (NaN or Inf). "
        "That update was not applied, so the weights are those from before it. Check the env parameters "
        f"and try a smaller learning_rate (now {config.learning_rate}) or max_grad_norm "
        f"(now {config.max_grad_norm})."
    )
