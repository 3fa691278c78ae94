"""The registry: one record (``EnvSpec``) per environment, and ``make``.

Every per-environment fact that the rest of diffgym and ``agents/`` needs lives in the env's
``EnvSpec``, written next to the env (``SPEC`` in its module) and registered with
``diffgym.register``. The gymnasium shells, the trainers, ``compare``, the CLI and ``play`` read it
from here; nothing else keeps a table of per-env facts::

    spec = diffgym.spec("cartpole")          # an id, a "diffgym/" id or the short alias
    spec.reward_threshold, spec.eval_episodes, spec.obs_scale
    env, params = diffgym.make("Pendulum-v1", g=9.81)   # physics overrides as keywords

A user's own environment joins the same way, and then trains with every trainer::

    diffgym.register(diffgym.EnvSpec(id="MyEnv-v0", entry_point=MyEnv, alias="myenv"))
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
from typing import TYPE_CHECKING, Any, Callable, Mapping

if TYPE_CHECKING:
    from diffgym.core import Environment, EnvParams
    from diffgym.task import Task

__all__ = ["EnvSpec", "make", "make_task", "register", "registered_envs", "resolve_env_id", "spec"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class EnvSpec:
    """Everything diffgym and its trainers need to know about one environment.

    Attributes:
        id: the environment id (``"CartPole-v1"``); gymnasium sees it as ``diffgym/<id>``.
        entry_point: the ``Environment`` subclass, or ``"module:Class"`` (imported on first use).
        alias: a short lower-case name accepted wherever an id is (``--env cartpole``), also the
            folder name of the env's bundled assets and of default run folders.
        reward_threshold: the mean return at which the task counts as solved (gymnasium's
            ``reward_threshold`` where gymnasium has the env); trainers stop there and
            ``compare`` measures steps to it. ``None``: no threshold.
        eval_episodes: episodes of a final evaluation on the gymnasium env (CLI, ``compare``).
        obs_mean, obs_scale: a typical centre and magnitude of each observation entry; trainers
            feed their networks ``(obs - obs_mean) / obs_scale``. ``None``: 0 and 1.
        task: the env's ``diffgym.task.Task`` subclass (or ``"module:Class"``): the
            differentiable training cost, its named surrogate terms and the training
            transition. ``None``: the base ``Task`` (the env's own reward).
        kwargs: keyword arguments of the env's constructor.
        obs_format: a ``str.format`` template of an observation ``obs`` for displays, e.g.
            ``"target {obs[0]:.1f} m  wind {obs[1]:+.1f} m/s"`` (``play`` shows the task of a
            one-step episode with it). ``None``: not shown.
        gymnasium: keyword arguments of the ``diffgym/<id>`` gymnasium registration that differ
            from what the spec implies: by default ``max_episode_steps`` is the default params'
            ``max_steps_in_episode`` and ``reward_threshold`` the spec's (the Pendulum keeps
            gymnasium's ``None`` there while diffgym counts -200 as solved).
    """

    id: str
    entry_point: str | Callable[..., Environment]
    alias: str | None = None
    reward_threshold: float | None = None
    eval_episodes: int = 100
    obs_mean: tuple[float, ...] | None = None
    obs_scale: tuple[float, ...] | None = None
    task: str | type[Task] | None = None
    kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    obs_format: str | None = None
    gymnasium: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.id, str) or not self.id or "/" in self.id:
            raise ValueError(f"EnvSpec.id must be a non-empty string without '/', got {self.id!r}")
        if self.alias is not None and (not isinstance(self.alias, str) or self.alias != self.alias.lower()):
            raise ValueError(f"EnvSpec.alias must be a lower-case string, got {self.alias!r}")
        if not isinstance(self.eval_episodes, int) or self.eval_episodes < 1:
            raise ValueError(f"EnvSpec.eval_episodes must be a positive integer, got {self.eval_episodes!r}")
        for name in ("obs_mean", "obs_scale"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(float(v) for v in value))
        if self.obs_scale is not None and not all(v > 0 for v in self.obs_scale):
            raise ValueError(f"EnvSpec.obs_scale must be positive, got {self.obs_scale!r}")
        object.__setattr__(self, "kwargs", dict(self.kwargs))
        object.__setattr__(self, "gymnasium", dict(self.gymnasium))

    @property
    def short_name(self) -> str:
        """The alias, or the lower-case id: the folder name of assets and runs."""
        return self.alias or self.id.lower()

    def env_class(self) -> type[Environment]:
        return _load(self.entry_point)

    def task_class(self) -> type[Task]:
        from diffgym.task import Task

        return Task if self.task is None else _load(self.task)

    def action_kind(self) -> str:
        """``"discrete"`` or ``"box"``: the kind of the env's action space."""
        from diffgym.core import Discrete

        env = self.env_class()(**self.kwargs)
        return "discrete" if isinstance(env.action_space(env.default_params), Discrete) else "box"


_SPECS: dict[str, EnvSpec] = {}


def register(spec: EnvSpec, *, gymnasium_id: bool = True) -> EnvSpec:
    """Register ``spec`` (replacing one of the same id); also as ``diffgym/<id>`` with gymnasium.

    Returns the spec. An alias taken by another id is an error.
    """
    if not isinstance(spec, EnvSpec):
        raise TypeError(f"register takes an EnvSpec, got {spec!r} of type {type(spec).__name__}")
    for other in _SPECS.values():
        if spec.alias is not None and other.alias == spec.alias and other.id != spec.id:
            raise ValueError(f"alias {spec.alias!r} of {spec.id} is already the alias of {other.id}")
    _SPECS[spec.id] = spec
    if gymnasium_id:
        from diffgym.gym import register_with_gymnasium

        register_with_gymnasium(spec)
    return spec


def registered_envs() -> tuple[str, ...]:
    """The ids of every registered environment, in registration order."""
    return tuple(_SPECS)


def resolve_env_id(name: str) -> str:
    """Map an id, a ``diffgym/`` id or an alias to a registered id, or raise with a suggestion."""
    if not isinstance(name, str):
        raise TypeError(f"env id must be a string, got {name!r} of type {type(name).__name__}")
    bare = name.removeprefix("diffgym/")
    if bare in _SPECS:
        return bare
    aliases = {s.alias: s.id for s in _SPECS.values() if s.alias}
    if bare.lower() in aliases:
        return aliases[bare.lower()]
    known = list(_SPECS) + list(aliases)
    raise ValueError(f"Unknown diffgym environment {name!r}.{did_you_mean(bare, known)} Known: {', '.join(known)}.")


def spec(env: str | Environment) -> EnvSpec:
    """The ``EnvSpec`` of an id or alias, or of an ``Environment`` instance.

    An instance of a registered class gets its registered spec; any other environment (a user's
    own, unregistered) gets a spec of defaults under its ``name`` (no threshold, 100 evaluation
    episodes, unscaled observations).
    """
    from diffgym.core import Environment

    if not isinstance(env, Environment):
        return _SPECS[resolve_env_id(env)]  # raises for anything but a known id
    registered = _SPECS.get(getattr(env, "name", None))
    if registered is not None and isinstance(env, registered.env_class()):
        return registered
    return EnvSpec(id=env.name, entry_point=type(env))


def make(name: str, **overrides) -> tuple[Environment, EnvParams]:
    """Create a functional environment: ``(env, params)``, as ``gymnax.make``.

    Keywords set physical parameters (any field of the env's params, e.g. ``g=9.81`` for the
    Pendulum, ``masspole=0.3`` for CartPole) or, failing that, the env's constructor arguments.
    An unknown keyword raises ``TypeError`` with the closest accepted name.
    """
    env_spec = spec(name)
    env_class = env_spec.env_class()
    constructor = set(inspect.signature(env_class).parameters) - {"self", "args", "kwargs"}
    env_kwargs = {**env_spec.kwargs, **{k: v for k, v in overrides.items() if k in constructor}}
    env = env_class(**env_kwargs)
    params = env.default_params
    fields = {f.name for f in dataclasses.fields(params)}
    unknown = [k for k in overrides if k not in fields and k not in constructor]
    if unknown:
        accepted = sorted(fields | constructor)
        hints = "".join(did_you_mean(k, accepted) for k in unknown)
        raise TypeError(
            f"{env_spec.id} has no parameter {', '.join(map(repr, unknown))}.{hints} "
            f"Accepted: {', '.join(accepted)}."
        )
    physics = {k: v for k, v in overrides.items() if k in fields}
    return env, dataclasses.replace(params, **physics) if physics else params


def make_task(env: str | Environment, **weights) -> Task:
    """The env's training ``Task`` with the given term weights (see ``diffgym.task``)."""
    return spec(env).task_class()(**weights)


def did_you_mean(name: str, known: list[str]) -> str:
    """``" Did you mean 'x'?"`` for the closest of ``known`` (case-blind), or ``""``."""
    by_lower = {k.lower(): k for k in known}
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.4) or [
        by_lower[k] for k in difflib.get_close_matches(name.lower(), list(by_lower), n=1, cutoff=0.4)
    ]
    return f" Did you mean {close[0]!r}?" if close else ""


def _load(entry_point):
    if not isinstance(entry_point, str):
        return entry_point
    module_name, _, attr = entry_point.partition(":")
    return getattr(importlib.import_module(module_name), attr)
