"""Drawing helpers shared by every diffgym renderer; pygame is imported on first use only.

A renderer draws on an offscreen surface (``new_surface``) in world coordinates (metres, y up)
through a ``Viewport``, and hands frames out as ``HxWx3`` uint8 arrays (``surface_to_frame``).
``Window`` shows such frames in a pygame window at a given frame rate (``render_mode="human"``).
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np

INSTALL_HINT = "pip install 'diffgym[render]'"

Color = tuple[int, int, int]
WHITE: Color = (255, 255, 255)
BLACK: Color = (0, 0, 0)


def import_pygame():
    """The pygame module, or an ImportError naming the extra to install."""
    try:
        import pygame
        import pygame.gfxdraw  # noqa: F401 -- used through pygame.gfxdraw
    except ImportError as error:
        raise ImportError(f"rendering needs pygame, which is not installed: {INSTALL_HINT}") from error
    return pygame


def new_surface(width: int, height: int, background: Color = WHITE):
    """An offscreen ``width x height`` pixel surface filled with ``background`` (no window needed)."""
    pygame = import_pygame()
    surface = pygame.Surface((int(width), int(height)))
    surface.fill(background)
    return surface


def surface_to_frame(surface) -> np.ndarray:
    """The surface's pixels as a fresh ``(height, width, 3)`` uint8 array (row 0 at the top).

    ``pygame.image.tobytes`` is already row-major RGB: about 10x faster than ``surfarray`` plus a
    transpose, which matters for the hundreds of frames of an animated step (a trebuchet shot).
    """
    pygame = import_pygame()
    data = pygame.image.tobytes(surface, "RGB")
    return np.frombuffer(data, np.uint8).reshape(surface.get_height(), surface.get_width(), 3).copy()


class Viewport:
    """Maps world coordinates (metres, y up) to pixel coordinates (y down) of a surface.

    Args:
        height: surface height in pixels (to flip the y axis).
        scale: pixels per metre.
        origin: pixel position ``(from the left, from the bottom)`` of the world origin.
    """

    def __init__(self, height: int, scale: float, origin: tuple[float, float]):
        self.height = height
        self.scale = float(scale)
        self.origin = (float(origin[0]), float(origin[1]))

    def to_pixels(self, x: float, y: float) -> tuple[float, float]:
        return self.origin[0] + x * self.scale, self.height - (self.origin[1] + y * self.scale)

    def points(self, points: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
        return [self.to_pixels(x, y) for x, y in points]

    def length(self, metres: float) -> float:
        return metres * self.scale


# Drawing primitives in pixel coordinates, antialiased where pygame can.
def fill_polygon(surface, points: Sequence[tuple[float, float]], color: Color) -> None:
    pygame = import_pygame()
    points = [(round(x), round(y)) for x, y in points]
    pygame.gfxdraw.aapolygon(surface, points, color)
    pygame.gfxdraw.filled_polygon(surface, points, color)


def fill_circle(surface, center: tuple[float, float], radius: float, color: Color) -> None:
    pygame = import_pygame()
    x, y, r = round(center[0]), round(center[1]), max(1, round(radius))
    pygame.gfxdraw.aacircle(surface, x, y, r, color)
    pygame.gfxdraw.filled_circle(surface, x, y, r, color)


def horizontal_line(surface, y: int, color: Color) -> None:
    """A one-pixel line across the whole surface at pixel row ``y``."""
    import_pygame().gfxdraw.hline(surface, 0, surface.get_width(), int(y), color)


def thick_line(
    surface, start: tuple[float, float], end: tuple[float, float], width: float, color: Color
) -> None:
    """A ``width``-pixel bar from ``start`` to ``end`` (square ends), drawn as a polygon."""
    dx, dy = end[0] - start[0], end[1] - start[1]
    norm = math.hypot(dx, dy) or 1.0
    nx, ny = -dy / norm * width / 2, dx / norm * width / 2
    corners = [
        (start[0] + nx, start[1] + ny),
        (end[0] + nx, end[1] + ny),
        (end[0] - nx, end[1] - ny),
        (start[0] - nx, start[1] - ny),
    ]
    fill_polygon(surface, corners, color)


def arc_arrow(
    surface,
    center: tuple[float, float],
    radius: float,
    *,
    counterclockwise: bool,
    color: Color = BLACK,
    sweep: float = 1.5 * math.pi,
    start_angle: float = -0.75 * math.pi,
) -> None:
    """A circular arrow around ``center`` (pixels) of ``radius`` pixels, turning as seen on screen.

    ``start_angle`` is where the counter-clockwise arrow starts (screen radians, counter-clockwise
    from +x); the clockwise arrow is its mirror image about the vertical through ``center``.
    """
    if radius < 1:
        return
    if not counterclockwise:
        start_angle = math.pi - start_angle
    width = max(2.0, radius / 8)
    direction = 1.0 if counterclockwise else -1.0
    count = 32
    angles = [start_angle + direction * sweep * i / count for i in range(count + 1)]
    # Screen y points down, so a counter-clockwise screen angle a is at (cos a, -sin a).
    points = [(center[0] + radius * math.cos(a), center[1] - radius * math.sin(a)) for a in angles]
    for start, end in zip(points[:-1], points[1:]):
        thick_line(surface, start, end, width, color)
    end_angle = angles[-1]
    tangent = (-math.sin(end_angle) * direction, -math.cos(end_angle) * direction)
    normal = (math.cos(end_angle), -math.sin(end_angle))
    head = 2.5 * width
    tip = (points[-1][0] + tangent[0] * head * 1.5, points[-1][1] + tangent[1] * head * 1.5)
    fill_polygon(
        surface,
        [
            tip,
            (points[-1][0] + normal[0] * head, points[-1][1] + normal[1] * head),
            (points[-1][0] - normal[0] * head, points[-1][1] - normal[1] * head),
        ],
        color,
    )


class Renderer:
    """Base of the renderer protocol: ``frames(state, params) -> list[np.ndarray]``, ``render_fps``,
    ``close()``.

    Frames are ``(height, width, 3)`` uint8. One frame per state for CartPole and Pendulum; an
    animated step (a trebuchet shot) returns all of its frames, to be shown at ``render_fps``.
    """

    render_fps: int = 30

    def __init__(self, *, width: int, height: int):
        import_pygame()  # fail at construction, with the install hint, rather than mid-episode
        self.width, self.height = int(width), int(height)

    def frames(self, state, params=None) -> list[np.ndarray]:
        raise NotImplementedError

    def close(self) -> None:
        """Offscreen renderers hold nothing that outlives them; subclasses with windows override."""


class Window:
    """A pygame window that shows frames at ``fps`` frames per second (``render_mode="human"``).

    Opens on the first ``show``; closing the window by hand makes later ``show`` calls no-ops.
    Under ``SDL_VIDEODRIVER=dummy`` (headless tests) everything runs with no screen.
    """

    def __init__(self, width: int, height: int, *, fps: float, title: str = "diffgym"):
        self.pygame = import_pygame()
        self.width, self.height, self.fps, self.title = int(width), int(height), float(fps), title
        self._screen = None
        self._clock = None
        self.closed = False

    def show(self, frames: np.ndarray | Sequence[np.ndarray]) -> None:
        """Show one frame (``HxWx3`` uint8) or a sequence of them, each for ``1 / fps`` seconds."""
        if isinstance(frames, np.ndarray) and frames.ndim == 3:
            frames = [frames]
        pygame = self.pygame
        for frame in frames:
            if self.closed:
                return
            if self._screen is None:
                pygame.display.init()
                self._screen = pygame.display.set_mode((self.width, self.height))
                pygame.display.set_caption(self.title)
                self._clock = pygame.time.Clock()
            frame = np.asarray(frame)
            if frame.shape != (self.height, self.width, 3):
                raise ValueError(
                    f"Window of {self.width}x{self.height} px got a frame of shape {frame.shape}; "
                    f"accepted: ({self.height}, {self.width}, 3) uint8"
                )
            self._screen.blit(pygame.surfarray.make_surface(np.transpose(frame, (1, 0, 2))), (0, 0))
            if any(event.type == pygame.QUIT for event in pygame.event.get()):
                self.close()
                return
            pygame.display.flip()
            self._clock.tick(self.fps)

    def close(self) -> None:
        if self._screen is not None:
            self.pygame.display.quit()
            self._screen = None
        self.closed = True
