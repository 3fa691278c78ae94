"""pygame renderers of diffgym's environments (install with ``pip install 'diffgym[render]'``).

Every env's ``renderer(width=..., height=...)`` returns an object with
``frames(state, params) -> list[np.ndarray]`` (``HxWx3`` uint8), ``render_fps`` and ``close()``.
The helpers below are shared by all renderers; pygame is imported only when one is used.
"""

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

__all__ = [
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
