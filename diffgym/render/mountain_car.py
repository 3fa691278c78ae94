"""MountainCar frames: gymnasium's 600x400 picture (the hill, a black car on grey wheels, the
flag), for MountainCar-v0 and MountainCarContinuous-v0."""

from __future__ import annotations

import math

import numpy as np

from diffgym.render._pygame import (
    BLACK,
    Renderer,
    fill_circle,
    fill_polygon,
    import_pygame,
    new_surface,
    surface_to_frame,
)

WHEEL_COLOR = (128, 128, 128)
FLAG_COLOR = (204, 204, 0)


def hill_height(position):
    """The drawn height of the hill (m): ``0.45 sin(3 x) + 0.55``, as gymnasium's ``_height``."""
    return np.sin(3 * position) * 0.45 + 0.55


class MountainCarRenderer(Renderer):
    """Draws a ``MountainCarState``; the frame's width spans [``min_position``, ``max_position``].

    Sizes in pixels follow gymnasium at 600x400: the car is 40x20 px, 10 px above the hill,
    tilted by ``cos(3 position)`` radians (gymnasium's tilt), on two wheels of 8 px radius; the
    flag stands 50 px tall at ``goal_position``.
    """

    render_fps = 30

    def __init__(self, *, width: int = 600, height: int = 400):
        super().__init__(width=width, height=height)

    def default_params(self):
        from diffgym.envs.mountain_car import MountainCarParams

        return MountainCarParams()

    def frames(self, state, params=None) -> list[np.ndarray]:
        params = self.default_params() if params is None else params
        pygame = import_pygame()
        position = float(state.position)
        min_position, goal = float(params.min_position), float(params.goal_position)
        zoom = self.width / 600  # gymnasium's pixel sizes are for a 600 px wide frame
        scale = self.width / (float(params.max_position) - min_position)  # px per position unit
        surface = new_surface(self.width, self.height)

        def to_pixels(x_px: float, y_px: float) -> tuple[float, float]:
            """Pixels from the left and from the bottom to screen coordinates (y down): gymnasium
            draws y up and flips the surface, which puts row ``y`` at ``height - 1 - y``."""
            return x_px, self.height - 1 - y_px

        xs = np.linspace(min_position, float(params.max_position), 100)
        hill = [to_pixels((x - min_position) * scale, hill_height(x) * scale) for x in xs]
        pygame.draw.aalines(surface, BLACK, False, hill)

        tilt = math.cos(3 * position)
        cos_tilt, sin_tilt = math.cos(tilt), math.sin(tilt)
        base = ((position - min_position) * scale, 10 * zoom + hill_height(position) * scale)

        def on_car(x_px: float, y_px: float) -> tuple[float, float]:
            """A point of the car (px, in the car's own frame) on the screen."""
            return to_pixels(
                base[0] + x_px * cos_tilt - y_px * sin_tilt, base[1] + x_px * sin_tilt + y_px * cos_tilt
            )

        half_width, car_height = 20 * zoom, 20 * zoom
        corners = [(-half_width, 0), (-half_width, car_height), (half_width, car_height), (half_width, 0)]
        fill_polygon(surface, [on_car(*corner) for corner in corners], BLACK)
        for wheel_x in (half_width / 2, -half_width / 2):
            fill_circle(surface, on_car(wheel_x, 0.0), car_height / 2.5, WHEEL_COLOR)

        flag_x = (goal - min_position) * scale
        flag_bottom = hill_height(goal) * scale
        flag_top = flag_bottom + 50 * zoom
        pygame.draw.line(surface, BLACK, to_pixels(flag_x, flag_bottom), to_pixels(flag_x, flag_top))
        pennant = [
            (flag_x, flag_top), (flag_x, flag_top - 10 * zoom), (flag_x + 25 * zoom, flag_top - 5 * zoom)
        ]
        fill_polygon(surface, [to_pixels(*point) for point in pennant], FLAG_COLOR)
        return [surface_to_frame(surface)]


class MountainCarContinuousRenderer(MountainCarRenderer):
    """``MountainCarRenderer`` whose default params are MountainCarContinuous-v0's (the flag at 0.45)."""

    def default_params(self):
        from diffgym.envs.continuous_mountain_car import MountainCarContinuousParams

        return MountainCarContinuousParams()
