"""System identification: fit an environment's physical parameters to logged trajectories.

From data back to physics: given what a user logged from a real (or gymnasium) system, the
observations and the actions taken, ``identify`` finds the parameters under which the env's own
``step_env`` predicts the logged observations best, by nonlinear least squares (optimistix's
Levenberg–Marquardt), and reports how well each parameter is determined::

    env, params = diffgym.make("CartPole-v1")
    fitted, report = diffgym.identify(env, observations, actions, params, fit=("masspole", "length"))
    print(report.summary())           # values, standard errors, loss history, identifiability

* **Residuals** — ``horizon=1`` (the default): for every logged transition ``(o_t, a_t, o_t+1)``,
  the state is recovered from ``o_t`` (``env.state_from_obs``), stepped once with ``a_t`` and its
  observation compared with ``o_t+1``. ``horizon=k``: windows of ``k`` transitions simulated from
  their first observation (multiple shooting; ``k`` = an episode's length is single shooting).
* **Data** — numpy arrays as a user logs them from gymnasium: one episode ``(T+1, *obs)`` with
  ``(T, *action)``; a batch ``(B, T+1, *obs)`` with ``(B, T, *action)``; lists of episodes of
  different lengths; or flat logs ``(N, *obs)``, ``(N, *action)`` with ``episode_starts`` (``(N,)``
  bool, True where a new episode's first observation is, as stable-baselines3 records them; the
  action of an episode's last row is never used). No transition crosses an episode boundary.
  ``load_episodes`` reads such a log from an ``.npz``.
* **State from observation** — any ``Environment`` with a ``state_from_obs(obs, params)``
  method (CartPole, Pendulum, LotkaVolterra have one), or pass ``state_from_obs=`` for any other.
  Where no observation determines the state (the Trebuchet's is ``[target, wind]``; a shot's
  outcome is its landing distance), ``fit_function`` fits the params of any pure function to
  input/output data, e.g. observed shots ``(wind, action) -> distance`` through ``shoot``.
* **Parameters** — ``fit`` names float fields of the params dataclass; with ``positive=True``
  (the default) they are fitted as logarithms (positive by construction, relative steps), else
  as offsets scaled by the initial value. The result is the same dataclass with those fields
  replaced (Python floats).
* **Uncertainty** — standard errors from the Gauss–Newton approximation of the Hessian: the
  covariance is ``s^2 (J^T J)^-1`` at the fit, with ``J`` the Jacobian of the residuals with
  respect to the parameters and ``s^2 = sum(r^2) / (m - n)`` the residual variance (``m``
  residuals, ``n`` parameters). It assumes independent residuals of equal variance. Measured on
  noisy gymnasium logs (``bench/results/identify.md``, 50 noise draws per level): with one-step
  residuals the truth lay within 3 standard errors in every draw (the estimates' spread 0.4-1.2
  times the reported error: a one-step residual holds the noise of two observations, so
  consecutive ones anti-correlate); overlapping multi-step windows share their noise, and there
  the standard errors come out too small (spread 1.5-2x, coverage 86-96 %).
* **Identifiability** — where the data cannot tell parameters apart, ``J^T J`` is (near)
  singular. The report gives the singular values of the Jacobian in relative coordinates
  (``d residual / d log p``), the condition number of that ``J^T J``, and every direction whose
  singular value is below ``rcond`` times the largest as ``unidentifiable`` (a combination of
  parameters the data do not see: CartPole's masscart, masspole and force_mag scaled together;
  the Pendulum's ``m``, ``l``, ``g``, of which only ``g / l`` and ``m l^2`` act). Standard errors of
  the parameters in such a direction are ``inf``.
* **Jacobians** — forward mode (``jax.linearize``, one JVP per parameter) by default
  (``jac="auto"``); environments whose step has a ``custom_vjp`` and no JVP (a diffrax solve with
  its default ``RecursiveCheckpointAdjoint``) are detected when the fit is compiled and fitted
  with reverse-mode Jacobians instead (``report.jacobian``), one backward pass per residual:
  correct, and 9-25x slower on LotkaVolterra's seed example than with ``adjoint=ForwardMode()``.

Everything is computed in float64 (``float64=False``: in the default dtype). The solve is one
compiled program, cached by (env, configuration, data shapes): a second call with new data of
the same shape does not compile again; ``report.compile_seconds`` and ``report.solve_seconds``
separate the two.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import time
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from diffgym.registry import did_you_mean

if TYPE_CHECKING:
    from diffgym.core import Environment, EnvParams

__all__ = [
    "IdentifyReport", "fit_function", "identify", "load_episodes", "record_episodes", "save_episodes",
    "split_episodes",
]  # fmt: skip


# --------------------------------------------------------------------------------------------
# Logged episodes
# --------------------------------------------------------------------------------------------
def split_episodes(observations, actions, episode_starts=None, *, obs_shape: tuple[int, ...] | None = None):
    """Logged data as a list of episodes ``[(obs (L+1, *obs_shape), actions (L, ...)), ...]``.

    Accepts one episode ``(T+1, *obs)`` / ``(T, ...)``; a batch ``(B, T+1, *obs)`` / ``(B, T, ...)``
    (told apart from one episode by ``obs_shape``; without it a 3-D array is a batch); lists or
    tuples of episodes; or flat logs with ``episode_starts`` (see the module docstring). Arrays
    are returned as float64 numpy arrays.
    """
    if episode_starts is not None:
        obs = np.asarray(observations, np.float64)
        act = np.asarray(actions, np.float64)
        starts = np.asarray(episode_starts, bool).reshape(-1)
        if not (len(obs) == len(act) == len(starts)):
            raise ValueError(
                "flat logs need observations, actions and episode_starts of one length (one row per "
                f"step, the action taken at that observation); got {len(obs)}, {len(act)} and {len(starts)} rows"
            )
        boundaries = np.flatnonzero(starts)
        edges = [0, *[int(b) for b in boundaries if b > 0], len(obs)]
        return [(obs[a:b], act[a : b - 1]) for a, b in zip(edges[:-1], edges[1:]) if b - a >= 1]
    if isinstance(observations, (list, tuple)):
        if not isinstance(actions, (list, tuple)) or len(actions) != len(observations):
            raise ValueError(
                "a list of episodes needs a list of their actions of the same length; got "
                f"{len(observations)} observation arrays and {type(actions).__name__} "
                f"{len(actions) if hasattr(actions, '__len__') else ''}"
            )
        pairs = [
            (np.asarray(o, np.float64), np.asarray(a, np.float64)) for o, a in zip(observations, actions)
        ]
    else:
        obs = np.asarray(observations, np.float64)
        act = np.asarray(actions, np.float64)
        episode_ndim = 1 + (len(obs_shape) if obs_shape is not None else 1)
        if obs.ndim == episode_ndim + 1:
            pairs = list(zip(obs, act))
        elif obs.ndim == episode_ndim:
            pairs = [(obs, act)]
        else:
            raise ValueError(
                f"observations of shape {obs.shape}: expected (T+1, *obs) or (B, T+1, *obs) with obs shape "
                f"{obs_shape}, a list of episodes, or flat logs with episode_starts"
            )
    for i, (obs, act) in enumerate(pairs):
        if len(obs) != len(act) + 1:
            raise ValueError(
                f"episode {i}: {len(obs)} observations and {len(act)} actions; an episode of T steps has "
                "T+1 observations (the first, then one after each action) and T actions"
            )
        if obs_shape is not None and obs.shape[1:] != tuple(obs_shape):
            raise ValueError(
                f"episode {i}: observations of shape {obs.shape[1:]}, the env's are {tuple(obs_shape)}"
            )
    return pairs


def load_episodes(path) -> dict[str, np.ndarray]:
    """A logged ``.npz``: ``observations`` ``(N, *obs)``, ``actions`` ``(N, ...)`` and
    ``episode_starts`` ``(N,)`` (see the module docstring); returns them as a dict, ready for
    ``identify(env, **load_episodes(path), fit=...)``. Without ``episode_starts`` the file holds
    one episode: ``N+1`` observations and ``N`` actions."""
    with np.load(path) as data:
        missing = {"observations", "actions"} - set(data.files)
        if missing:
            raise ValueError(
                f"{path}: no {', '.join(sorted(missing))} array; a log of episodes holds 'observations', "
                f"'actions' and 'episode_starts' (found: {', '.join(data.files) or 'nothing'})"
            )
        episodes = {
            name: np.asarray(data[name])
            for name in ("observations", "actions", "episode_starts")
            if name in data
        }
    if "episode_starts" not in episodes:
        episodes["episode_starts"] = None
    return episodes


def record_episodes(env, policy, steps: int, *, seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Log ``steps`` steps of a gymnasium env as ``identify`` reads them: lists of ``(T+1, *obs)``
    observations and ``(T, ...)`` actions, one pair per episode, resetting after each episode's end
    (the first reset with ``seed``, later ones with seeds drawn from it). ``policy(rng)`` gives each
    action from a ``numpy.random.Generator`` (e.g. ``lambda rng: int(rng.integers(2))``, a random
    exciting input). A last, unfinished episode is kept."""
    rng = np.random.default_rng(seed)
    observations, actions = [], []
    obs, _ = env.reset(seed=seed)
    episode_obs, episode_actions = [obs], []
    for _ in range(steps):
        action = policy(rng)
        obs, _, terminated, truncated, _ = env.step(action)
        episode_obs.append(obs)
        episode_actions.append(action)
        if terminated or truncated:
            observations.append(np.array(episode_obs))
            actions.append(np.array(episode_actions))
            obs, _ = env.reset(seed=int(rng.integers(2**31)))
            episode_obs, episode_actions = [obs], []
    if episode_actions:
        observations.append(np.array(episode_obs))
        actions.append(np.array(episode_actions))
    return observations, actions


def save_episodes(path, observations: Sequence, actions: Sequence) -> None:
    """Write episodes (lists of ``(T+1, *obs)`` and ``(T, ...)`` arrays) as the flat log that
    ``load_episodes`` reads; each episode's last row gets a zero action (never used)."""
    episodes = split_episodes(list(observations), list(actions))
    rows_obs, rows_act, starts = [], [], []
    for obs, act in episodes:
        pad = np.zeros((1, *act.shape[1:]), act.dtype) if len(act) else np.zeros((1,), np.float64)
        rows_obs.append(obs)
        rows_act.append(np.concatenate([act, pad]) if len(act) else pad)
        starts.append(np.arange(len(obs)) == 0)
    np.savez(
        path,
        observations=np.concatenate(rows_obs),
        actions=np.concatenate(rows_act),
        episode_starts=np.concatenate(starts),
    )


def _windows(episodes, horizon: int):
    """Start observations ``(W, *obs)``, actions ``(W, k, ...)`` and targets ``(W, k, *obs)`` of
    every window of ``k = horizon`` consecutive transitions inside one episode."""
    starts, actions, targets = [], [], []
    for obs, act in episodes:
        steps = len(act)
        if steps < horizon:
            continue
        count = steps - horizon + 1
        index = np.arange(count)[:, None] + np.arange(horizon)[None, :]
        starts.append(obs[:count])
        actions.append(act[index])
        targets.append(obs[index + 1])
    if not starts:
        lengths = sorted({len(act) for _, act in episodes})
        raise ValueError(f"no episode has {horizon} steps (horizon={horizon}); episode lengths: {lengths}")
    return np.concatenate(starts), np.concatenate(actions), np.concatenate(targets)


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class IdentifyReport:
    """What a fit found and how well the data determine it.

    Attributes:
        names: the fitted parameters, in order.
        initial, values: their initial and fitted values.
        standard_errors: ``s * sqrt(diag((J^T J)^-1))`` per parameter (same units); ``inf`` for a
            parameter in an unidentifiable direction.
        correlation: ``(n, n)`` correlation matrix of the estimates (NaN rows where unidentifiable).
        loss_history: ``0.5 * sum(r^2)`` of the accepted iterate before each solver step and at
            the end (optimistix's "loss"), ``(iterations + 1,)``.
        iterations: solver steps taken (accepted or rejected, optimistix's ``num_steps``).
        converged: the solver met its tolerances within ``max_steps``; ``message`` says otherwise.
        loss: the final ``0.5 * sum(r^2)``.
        residual_rms: ``sqrt(mean(r^2))`` at the fit.
        residual_std: ``s = sqrt(sum(r^2) / (m - n))``, the residual standard deviation the
            standard errors are scaled by.
        num_residuals, num_windows, num_episodes: ``m``, the simulated windows, the episodes used.
        singular_values: of the Jacobian in relative coordinates (``d r / d log p``), descending.
        condition_number: ``(s_max / s_min)^2``, the condition number of that ``J^T J``.
        unidentifiable: one ``{name: component}`` unit vector (in ``log p``) per direction whose
            singular value is below ``rcond * s_max``: moving the parameters along it leaves the
            predictions unchanged to first order.
        jacobian: ``"fwd"`` or ``"bwd"``, the mode the Jacobians were computed in.
        compile_seconds, solve_seconds: time to trace and compile (0 when cached) and to run the
            compiled fit (the solve, the final Jacobian; host work excluded).
    """

    names: tuple[str, ...]
    initial: dict[str, float]
    values: dict[str, float]
    standard_errors: dict[str, float]
    correlation: np.ndarray
    loss_history: np.ndarray
    iterations: int
    converged: bool
    message: str
    loss: float
    residual_rms: float
    residual_std: float
    num_residuals: int
    num_windows: int
    num_episodes: int
    singular_values: np.ndarray
    condition_number: float
    unidentifiable: tuple[dict[str, float], ...]
    jacobian: str
    compile_seconds: float
    solve_seconds: float

    def relative_standard_errors(self) -> dict[str, float]:
        """``standard_error / |value|`` per parameter."""
        return {
            n: self.standard_errors[n] / abs(self.values[n]) if self.values[n] else math.inf
            for n in self.names
        }

    def summary(self) -> str:
        """A plain-text table of the fit and its diagnostics."""
        lines = [f"{'parameter':<24}{'initial':>14}{'fitted':>16}{'std. error':>14}"]
        for name in self.names:
            lines.append(
                f"{name:<24}{self.initial[name]:>14.6g}{self.values[name]:>16.8g}{self.standard_errors[name]:>14.3g}"
            )
        status = "converged" if self.converged else f"NOT converged ({self.message})"
        lines.append(
            f"{status} in {self.iterations} steps ({self.jacobian} Jacobians); loss {self.loss:.3e}, residual rms "
            f"{self.residual_rms:.3e} over {self.num_residuals} residuals ({self.num_windows} windows, "
            f"{self.num_episodes} episodes); cond(J^T J) {self.condition_number:.3e}"
        )
        for direction in self.unidentifiable:
            combo = " ".join(f"{v:+.3f}*log({k})" for k, v in direction.items() if abs(v) > 1e-3)
            lines.append(f"unidentifiable: the data do not see {combo} (standard errors inf)")
        lines.append(f"compile {self.compile_seconds:.2f} s, solve {self.solve_seconds * 1e3:.1f} ms")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# The fit
# --------------------------------------------------------------------------------------------
class _LossRecorder:
    """optimistix ``verbose`` hook: records each step's losses on the host (``jax.debug.callback``)."""

    def __init__(self):
        self.rows: list[tuple[int, float, float]] = []

    def __call__(self, **values):
        jax.debug.callback(
            self._record,
            values["num_steps"][1],
            values["loss_this_step"][1],
            values["loss_last_accepted_step"][1],
        )

    def _record(self, step, loss_this_step, loss_last_accepted):
        self.rows.append((int(step), float(loss_this_step), float(loss_last_accepted)))

    def history(self, final_loss: float) -> np.ndarray:
        rows = sorted(self.rows)
        if not rows:
            return np.array([final_loss])
        # Step 0 evaluates the initial point (always accepted); later steps report the loss of the
        # iterate accepted before them.
        return np.array([rows[0][1]] + [row[2] for row in rows[1:]] + [final_loss])


@dataclasses.dataclass(frozen=True)
class _Coordinates:
    """Fit coordinates ``theta`` of the parameters ``p``: ``log p`` where ``log_scale``, else
    ``(p - offset) / scale`` (offset: the initial value, scale: its magnitude, or 1 at 0). Only
    ``log_scale`` is static (part of the compiled program); offset and scale are its inputs."""

    log_scale: tuple[bool, ...]
    offset: tuple[float, ...]
    scale: tuple[float, ...]

    def arrays(self):
        return jnp.asarray(self.offset), jnp.asarray(self.scale)

    def to_params(self, theta, offset, scale):
        return jnp.where(jnp.asarray(self.log_scale), jnp.exp(theta), offset + scale * theta)

    def to_theta(self, values) -> np.ndarray:
        values = np.asarray(values, np.float64)
        log = np.asarray(self.log_scale)
        safe = np.where(log, values, 1.0)
        return np.where(log, np.log(safe), (values - np.asarray(self.offset)) / np.asarray(self.scale))


_COMPILED: collections.OrderedDict[Any, Any] = collections.OrderedDict()
_COMPILED_SIZE = 16


def _validate_fit(init_params, fit) -> tuple[str, ...]:
    if isinstance(fit, str) or not isinstance(fit, Iterable):
        raise TypeError(
            f"fit must be a sequence of parameter names, got {fit!r} of type {type(fit).__name__}"
        )
    names = tuple(fit)
    if not names:
        raise ValueError("fit names no parameter; give at least one, e.g. fit=('masspole', 'length')")
    if len(set(names)) != len(names):
        raise ValueError(f"fit names a parameter twice: {names}")
    if not dataclasses.is_dataclass(init_params):
        raise TypeError(
            f"init_params must be an env's params dataclass, got {init_params!r} of type {type(init_params).__name__}"
        )
    fields = [f.name for f in dataclasses.fields(init_params)]
    for name in names:
        if name not in fields:
            raise ValueError(
                f"{type(init_params).__name__} has no parameter {name!r}.{did_you_mean(name, fields)} "
                f"Fields: {', '.join(fields)}."
            )
        value = getattr(init_params, name)
        annotation = next(f.type for f in dataclasses.fields(init_params) if f.name == name)
        number = isinstance(value, (int, float, np.number, jax.Array, np.ndarray)) and not isinstance(
            value, bool
        )
        if not number or annotation in ("int", "bool", int, bool):
            raise TypeError(
                f"{name} = {value!r} ({type(value).__name__}, declared {annotation}) is not a real-valued "
                "parameter and cannot be fitted"
            )
        if np.ndim(value) != 0:
            raise TypeError(f"{name} has shape {np.shape(value)}; only scalar parameters can be fitted")
    return names


def _coordinates(init_params, names, positive) -> _Coordinates:
    values = np.array([float(getattr(init_params, n)) for n in names])
    if positive is True:
        log_names = set(names)
    elif positive is False or positive is None:
        log_names = set()
    else:
        log_names = set(positive)
        unknown = log_names - set(names)
        if unknown:
            raise ValueError(f"positive names {sorted(unknown)}, which fit does not ({names})")
    for name, value in zip(names, values):
        if name in log_names and not value > 0:
            raise ValueError(
                f"{name} = {value!r} is fitted in log space (positive=...) and must start positive; "
                "give a positive initial value or positive=False"
            )
    return _Coordinates(
        log_scale=tuple(n in log_names for n in names),
        offset=tuple(float(v) for v in values),
        scale=tuple(abs(float(v)) if v != 0 else 1.0 for v in values),
    )


def _with_values(params, names, values):
    return dataclasses.replace(params, **{n: values[i] for i, n in enumerate(names)})


def _no_forward_mode(error: Exception) -> bool:
    """Whether ``error`` is JAX refusing a JVP through a ``custom_vjp`` (raised when lowering)."""
    return isinstance(error, TypeError) and "custom_vjp" in str(error)


def _least_squares(
    residuals: Callable,
    original_params,
    init_params,
    names: tuple[str, ...],
    coords: _Coordinates,
    data,
    *,
    cache_key,
    jac: str,
    max_steps: int,
    rtol: float,
    atol: float,
    rcond: float,
    counts: tuple[int, int],
):
    """Solve ``min_theta 0.5 |residuals(params(theta), data)|^2`` and build the report."""
    import optimistix as optx

    theta0 = jnp.asarray(coords.to_theta([getattr(init_params, n) for n in names]))
    offset, scale = coords.arrays()

    def residuals_of_theta(theta, args):
        params, data, offset, scale = args
        return residuals(_with_values(params, names, coords.to_params(theta, offset, scale)), data)

    if jac not in ("auto", "fwd", "bwd"):
        raise ValueError(f"jac must be 'auto', 'fwd' or 'bwd', got {jac!r}")

    def build(mode: str):
        recorder = _LossRecorder()
        solver = optx.LevenbergMarquardt(rtol=rtol, atol=atol, verbose=recorder)

        def run(theta0, params, data, offset, scale):
            solution = optx.least_squares(
                residuals_of_theta,
                solver,
                theta0,
                args=(params, data, offset, scale),
                options={"jac": mode},
                max_steps=max_steps,
                throw=False,
            )
            values = coords.to_params(solution.value, offset, scale)

            def residuals_of_values(v):
                return jnp.ravel(residuals(_with_values(params, names, v), data))

            jacobian_fn = jax.jacfwd if mode == "fwd" else jax.jacrev
            jacobian = jacobian_fn(residuals_of_values)(values)
            final = residuals_of_values(values)
            return values, final, jacobian, solution.stats["num_steps"], solution.result

        return jax.jit(run).lower(theta0, init_params, data, offset, scale).compile(), recorder

    key = (
        cache_key,
        names,
        coords.log_scale,
        jac,
        max_steps,
        rtol,
        atol,
        jax.tree.structure((init_params, data)),
        tuple((np.shape(x), jnp.result_type(x)) for x in jax.tree.leaves((init_params, data))),
    )
    compile_seconds = 0.0
    if key in _COMPILED:
        _COMPILED.move_to_end(key)
        compiled, recorder, jac = _COMPILED[key]
    else:
        start = time.perf_counter()
        if jac == "auto":
            # Forward mode unless the residuals hold a custom_vjp (JAX refuses its JVP when lowering,
            # before anything is compiled); then reverse mode.
            try:
                (compiled, recorder), jac = build("fwd"), "fwd"
            except TypeError as error:
                if not _no_forward_mode(error):
                    raise
                (compiled, recorder), jac = build("bwd"), "bwd"
        else:
            compiled, recorder = build(jac)
        compile_seconds = time.perf_counter() - start
        _COMPILED[key] = (compiled, recorder, jac)
        if len(_COMPILED) > _COMPILED_SIZE:
            _COMPILED.popitem(last=False)

    recorder.rows = []
    start = time.perf_counter()
    outputs = compiled(theta0, init_params, data, offset, scale)
    jax.block_until_ready(outputs)
    jax.effects_barrier()
    solve_seconds = time.perf_counter() - start
    values, final, jacobian, num_steps, result = outputs

    values = np.asarray(values, np.float64)
    final = np.asarray(final, np.float64)
    jacobian = np.asarray(jacobian, np.float64).reshape(len(final), len(names))
    successful = bool(result == optx.RESULTS.successful)
    message = "" if successful else str(optx.RESULTS[result])
    loss = 0.5 * float(final @ final)
    m, n = len(final), len(names)
    dof = max(m - n, 1)
    residual_std = math.sqrt(2.0 * loss / dof)

    # Relative coordinates: column i is d r / d log p_i, so singular values compare parameters of
    # any units; a parameter at 0 keeps its own units.
    column_scale = np.where(values != 0, np.abs(values), 1.0)
    relative = jacobian * column_scale
    _, singular, vt = np.linalg.svd(relative, full_matrices=False) if m else (None, np.zeros(n), np.eye(n))
    largest = singular[0] if len(singular) and singular[0] > 0 else 1.0
    weak = singular <= rcond * largest
    condition = float((singular[0] / singular[-1]) ** 2) if singular[-1] > 0 else math.inf
    strong_inverse = np.where(weak, 0.0, 1.0 / np.where(weak, 1.0, singular) ** 2)
    covariance = residual_std**2 * (vt.T * strong_inverse) @ vt  # pseudo-inverse of J^T J, relative
    in_null = np.any(np.abs(vt[weak]) > 1e-6, axis=0) if weak.any() else np.zeros(n, bool)
    relative_se = np.sqrt(np.maximum(np.diag(covariance), 0.0))
    standard_errors = np.where(in_null, np.inf, relative_se * column_scale)
    with np.errstate(invalid="ignore", divide="ignore"):
        correlation = covariance / np.outer(relative_se, relative_se)
    correlation[in_null, :] = np.nan
    correlation[:, in_null] = np.nan
    unidentifiable = tuple(
        {name: float(v) for name, v in zip(names, np.sign(row[np.argmax(np.abs(row))]) * row)}
        for row in vt[weak]
    )
    report = IdentifyReport(
        names=names,
        initial={n_: float(getattr(original_params, n_)) for n_ in names},
        values={n_: float(v) for n_, v in zip(names, values)},
        standard_errors={n_: float(v) for n_, v in zip(names, standard_errors)},
        correlation=correlation,
        loss_history=recorder.history(loss),
        iterations=int(num_steps),
        converged=successful,
        message=message,
        loss=loss,
        residual_rms=math.sqrt(2.0 * loss / max(m, 1)),
        residual_std=residual_std,
        num_residuals=m,
        num_windows=counts[0],
        num_episodes=counts[1],
        singular_values=singular,
        condition_number=condition,
        unidentifiable=unidentifiable,
        jacobian=jac,
        compile_seconds=compile_seconds,
        solve_seconds=solve_seconds,
    )
    fitted = _with_values(original_params, names, [float(v) for v in values])
    return fitted, report


def fit_function(
    predict: Callable[[Any, Any], Any],
    inputs,
    targets,
    init_params,
    *,
    fit: Sequence[str],
    positive: bool | Iterable[str] = True,
    weights=None,
    jac: str = "auto",
    max_steps: int = 256,
    rtol: float = 1e-8,
    atol: float = 1e-8,
    rcond: float = 1e-8,
    float64: bool = True,
):
    """Fit the parameters of any pure function to input/output data: the generic path.

    Minimises ``0.5 * sum((weights * (predict(params, inputs) - targets))^2)`` over the ``fit``
    fields of ``params`` (same options and report as ``identify``). ``predict`` takes the params
    dataclass and the whole ``inputs`` pytree (``vmap`` inside it for a batch of rows) and
    returns an array of ``targets``' shape. Compilations are cached by ``predict`` (the same
    function object) and the data's shapes.

    Example: observed trebuchet shots ``(wind, angle, counterweight) -> distance``::

        def predict(params, shots):
            return jax.vmap(lambda w, a, c: shoot(w, a, c, params))(*shots)
        fitted, report = fit_function(predict, (wind, angle, counterweight), distance,
                                      TrebuchetParams(), fit=("drag_coefficient", "projectile_mass"))
    """
    names = _validate_fit(init_params, fit)
    coords = _coordinates(init_params, names, positive)
    with jax.enable_x64(float64):
        dtype = jnp.float64 if float64 else jnp.float32
        inputs = jax.tree.map(
            lambda x: (
                jnp.asarray(x, dtype) if jnp.issubdtype(jnp.result_type(x), jnp.floating) else jnp.asarray(x)
            ),
            inputs,
        )
        targets = jnp.asarray(targets, dtype)
        weights = (
            jnp.ones_like(targets)
            if weights is None
            else jnp.broadcast_to(jnp.asarray(weights, dtype), targets.shape)
        )

        def residuals(params, data):
            inputs, targets, weights = data
            return weights * (jnp.asarray(predict(params, inputs)) - targets)

        return _least_squares(
            residuals,
            init_params,
            _cast_params(init_params, dtype),
            names,
            coords,
            (inputs, targets, weights),
            cache_key=("function", predict),
            jac=jac,
            max_steps=max_steps,
            rtol=rtol,
            atol=atol,
            rcond=rcond,
            counts=(int(np.prod(targets.shape[:1])) if targets.ndim else 1, 0),
        )


def identify(
    env: Environment,
    observations,
    actions,
    init_params: EnvParams | None = None,
    *,
    fit: Sequence[str],
    episode_starts=None,
    horizon: int = 1,
    positive: bool | Iterable[str] = True,
    weights=None,
    state_from_obs: Callable | None = None,
    key: jax.Array | None = None,
    jac: str = "auto",
    max_steps: int = 256,
    rtol: float = 1e-8,
    atol: float = 1e-8,
    rcond: float = 1e-8,
    float64: bool = True,
) -> tuple[EnvParams, IdentifyReport]:
    """Fit ``env``'s parameters to logged trajectories by least squares on prediction errors.

    Args:
        env: any ``Environment``; it needs ``state_from_obs(obs, params)`` (or pass
            ``state_from_obs=``) to start a prediction from a logged observation.
        observations, actions: numpy arrays or lists of them (see the module docstring for the
            accepted layouts); actions as the env's ``step_env`` takes them (CartPole: 0/1).
        init_params: the starting point, and the values of every parameter not fitted
            (default: ``env.default_params``).
        fit: names of the float fields of the params to fit, e.g. ``("masspole", "length")``.
        episode_starts: ``(N,)`` bool for flat logs (True at each episode's first observation).
        horizon: transitions per simulated window (1: one-step prediction errors).
        positive: True (default) fits every parameter as its logarithm (stays positive); False
            fits them as they are; or the names of those to keep positive.
        weights: per observation entry, shape ``obs_shape``, multiplying the residuals (give
            ``1 / noise_std`` when entries have different noise levels). Default 1.
        state_from_obs: ``(obs, params) -> state``; default ``env.state_from_obs``.
        key: for envs with random transitions (``deterministic_transition`` False): the windows'
            step keys are drawn from it (fixed draws: fitting only makes sense for small noise).
        jac: ``"auto"`` (forward mode unless the step has no JVP), ``"fwd"`` or ``"bwd"``.
        max_steps, rtol, atol: the Levenberg–Marquardt solver's step limit and tolerances (on the
            fit coordinates and the residuals, optimistix's Cauchy termination).
        rcond: singular values of the relative Jacobian below ``rcond`` times the largest mark
            unidentifiable directions.
        float64: compute in float64 (default; logged float32 observations are widened).

    Returns:
        ``(fitted_params, report)``: ``init_params`` with the fitted fields replaced (floats), and
        an ``IdentifyReport`` (loss history, iterations, residuals, standard errors, identifiability).
    """
    if not isinstance(horizon, int) or isinstance(horizon, bool) or horizon < 1:
        raise ValueError(f"horizon must be a positive integer (transitions per window), got {horizon!r}")
    params = env.default_params if init_params is None else init_params
    names = _validate_fit(params, fit)
    coords = _coordinates(params, names, positive)
    if state_from_obs is None:
        state_from_obs = getattr(env, "state_from_obs", None)
        if state_from_obs is None:
            raise TypeError(
                f"{env.name} has no state_from_obs(obs, params) method, so a prediction cannot start from a "
                "logged observation; pass state_from_obs=(obs, params) -> state, or fit observed "
                "input/output data with diffgym.fit_function"
            )
    obs_shape = tuple(env.observation_space(params).shape)
    episodes = split_episodes(observations, actions, episode_starts, obs_shape=obs_shape)
    starts, window_actions, targets = _windows(episodes, horizon)
    deterministic = env.deterministic_transition

    with jax.enable_x64(float64):
        dtype = jnp.float64 if float64 else jnp.float32
        weights = (
            jnp.ones(obs_shape, dtype)
            if weights is None
            else jnp.broadcast_to(jnp.asarray(weights, dtype), obs_shape)
        )
        step_keys = None
        if not deterministic:
            base = jax.random.key(0) if key is None else key
            step_keys = jax.random.split(base, (len(starts), horizon))
        data = (
            jnp.asarray(starts, dtype),
            jnp.asarray(window_actions, dtype),
            jnp.asarray(targets, dtype),
            weights,
            step_keys,
        )

        def residuals(params, data):
            starts, window_actions, targets, weights, step_keys = data

            def window(obs0, acts, keys):
                def body(state, xs):
                    action, step_key = xs if keys is not None else (xs, None)
                    obs, state, _, _, _ = env.step_env(step_key, state, action, params)
                    return state, obs

                state = state_from_obs(obs0, params)
                _, predicted = jax.lax.scan(body, state, acts if keys is None else (acts, keys))
                return predicted

            in_axes = (0, 0, None if step_keys is None else 0)
            predicted = jax.vmap(window, in_axes=in_axes)(starts, window_actions, step_keys)
            return weights * (predicted - targets)

        return _least_squares(
            residuals,
            params,
            _cast_params(params, dtype),
            names,
            coords,
            data,
            cache_key=("env", env, state_from_obs, horizon),
            jac=jac,
            max_steps=max_steps,
            rtol=rtol,
            atol=atol,
            rcond=rcond,
            counts=(len(starts), sum(len(a) >= horizon for _, a in episodes)),
        )


def _cast_params(params, dtype):
    """``params`` with every float field as a ``dtype`` scalar array (ints and bools kept)."""
    changes = {}
    for field in dataclasses.fields(params):
        value = getattr(params, field.name)
        if isinstance(value, (float, np.floating)) or (
            isinstance(value, (jax.Array, np.ndarray)) and jnp.issubdtype(value.dtype, jnp.floating)
        ):
            changes[field.name] = jnp.asarray(value, dtype)
    return dataclasses.replace(params, **changes)
