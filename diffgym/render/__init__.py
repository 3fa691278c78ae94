"""pygame renderers of diffgym's environments (install with ``pip install 'diffgym[render]'``).

The physics knows no screen: renderers are found here, by env id, with ``renderer_class(env)``
(``make_renderer(env)`` builds one). A renderer has ``frames(state, params) -> list[np.ndarray]``
(``HxWx3`` uint8), ``render_fps`` (the one place an env's frame rate is written) and ``close()``.
A user's env registers its own with ``register_renderer("MyEnv-v0", MyRenderer)``. The helpers
below are shared by all renderers; pygame is imported only when one draws.
"""

from __future__ import annotations

import importlib

from diffgym.render._pygame import (
    BLACK,
    INSTALL_HINT,
    WHITE,
    Renderer,
    Viewport,
    Window,
    arc_arrow,
    fill_circle,
    fill_polygon,
    horizontal_line,
    import_pygame,
    new_surface,
    surface_to_frame,
    thick_line,
)

#: The renderer of each env id: a ``Renderer`` subclass, or ``"module:Class"`` (imported on use).
_RENDERERS: dict[str, object] = {
    "CartPole-v1": "diffgym.render.cartpole:CartPoleRenderer",
    "Pendulum-v1": "diffgym.render.pendulum:PendulumRenderer",
    "Trebuchet-v0": "diffgym.render.trebuchet:TrebuchetRenderer",
    "Acrobot-v1": "diffgym.render.acrobot:AcrobotRenderer",
    "MountainCar-v0": "diffgym.render.mountain_car:MountainCarRenderer",
    "MountainCarContinuous-v0": "diffgym.render.mountain_car:MountainCarContinuousRenderer",
    "LotkaVolterra-v0": "diffgym.render.lotka_volterra:LotkaVolterraRenderer",
    "KickedCartPole-v1": "diffgym.render.cartpole:CartPoleRenderer",
}


def register_renderer(env_id: str, renderer) -> None:
    """Use ``renderer`` (a ``Renderer`` subclass or ``"module:Class"``) for the env ``env_id``."""
    _RENDERERS[env_id] = renderer


def renderer_class(env) -> type[Renderer]:
    """The renderer class of an env id or ``Environment`` instance (its ``name``); importing it
    needs no pygame. ``NotImplementedError`` when none is registered."""
    env_id = env if isinstance(env, str) else env.name
    entry = _RENDERERS.get(env_id)
    if entry is None:
        raise NotImplementedError(
            f"{env_id} has no renderer; register one with diffgym.render.register_renderer({env_id!r}, MyRenderer)"
        )
    if isinstance(entry, str):
        module_name, _, attr = entry.partition(":")
        entry = getattr(importlib.import_module(module_name), attr)
    return entry


def make_renderer(env, **size) -> Renderer:
    """A renderer for ``env`` (``width=``/``height=`` optional: the renderer's own defaults)."""
    return renderer_class(env)(**size)


__all__ = [
    "make_renderer",
    "register_renderer",
    "renderer_class",
    "BLACK",
    "INSTALL_HINT",
    "WHITE",
    "Renderer",
    "Viewport",
    "Window",
    "arc_arrow",
    "fill_circle",
    "fill_polygon",
    "horizontal_line",
    "import_pygame",
    "new_surface",
    "surface_to_frame",
    "thick_line",
]
