"""One trainer interface: every trainer is a module called the same way.

A trainer module has a ``NAME``, a config dataclass, and::

    default_config(env) -> Config            # the env's tuned settings (assets/<env>/hyperparams.toml)
    train(env, config=None, *, seed=0, env_params=None, progress_fn=None, render_fn=None)
        -> agents.common.TrainResult

where ``env`` is an id, an alias or an ``Environment`` instance (a user's own or wrapped env
trains too). ``supports_render`` (default True) says whether ``render_fn`` is honoured. The CLI
and ``compare`` dispatch through ``trainer(name)`` only::

    from agents.trainers import trainer
    result = trainer("ppo").train("pendulum", seed=0)
"""

from __future__ import annotations

import importlib
from types import ModuleType

from diffgym.registry import did_you_mean

#: The trainer behind each name, imported on first use.
TRAINERS: dict[str, str] = {
    "bptt": "agents.bptt",  # backpropagation through time through the differentiable env
    "ppo": "agents.ppo",  # our PPO, fully jitted
    "aiming": "agents.trebuchet",  # the trebuchet's aiming network, trained through the simulator
    "sb3": "agents.sb3",  # Stable-Baselines3's PPO/SAC on the gymnasium shells (the `baselines` extra)
}

#: Trainers that differentiate through the simulator, in order of preference for an env.
GRADIENT_TRAINERS = ("bptt", "aiming")


def trainer(name: str) -> ModuleType:
    """The trainer module ``name``; ValueError (with the closest name) for an unknown one,
    ImportError naming the extra to install when its dependencies are missing."""
    if name not in TRAINERS:
        raise ValueError(f"unknown trainer {name!r}.{did_you_mean(name, list(TRAINERS))} Known: {', '.join(TRAINERS)}.")
    module = importlib.import_module(TRAINERS[name])
    available = getattr(module, "available", None)
    if available is not None and not available():
        raise ImportError(f"the {name} trainer needs an optional extra: {module.INSTALL_HINT}")
    return module


def supports_render(module: ModuleType) -> bool:
    return getattr(module, "supports_render", True)


def gradient_trainer(env) -> str:
    """The name of the gradient trainer with tuned settings for ``env`` (``bptt`` unless the env's
    hyperparams name another, as the trebuchet's ``aiming``); ``bptt`` when none is tuned."""
    from agents.common import tuned_settings

    for name in GRADIENT_TRAINERS:
        if tuned_settings(env, name) is not None:
            return name
    return "bptt"
