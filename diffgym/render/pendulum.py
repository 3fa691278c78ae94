"""Pendulum frames: gymnasium's 500x500 picture, with the torque drawn as a circular arrow."""

from __future__ import annotations

import math

import numpy as np

from diffgym.render._pygame import (
    BLACK,
    Renderer,
    Viewport,
    arc_arrow,
    fill_circle,
    new_surface,
    surface_to_frame,
    thick_line,
)

ROD_COLOR = (204, 77, 77)


class PendulumRenderer(Renderer):
    """Draws a ``PendulumState``: the rod from the pivot at the centre (``theta = 0`` is up,
    positive ``theta`` counter-clockwise), and the last torque ``last_u`` as a black circular arrow
    around the pivot, counter-clockwise for a positive torque, its radius proportional to ``|last_u|``
    (a quarter of the rod length per N m, as gymnasium's arrow image). No arrow when ``last_u == 0``.

    The view spans ±2.2 rod lengths, as gymnasium's.
    """

    render_fps = 30

    def __init__(self, *, width: int = 500, height: int = 500):
        super().__init__(width=width, height=height)

    def frames(self, state, params=None) -> list[np.ndarray]:
        if params is None:
            from diffgym.envs.pendulum import PendulumParams

            params = PendulumParams()
        theta, last_u, length = float(state.theta), float(state.last_u), float(params.l)
        extent = 2.2 * length
        scale = min(self.width, self.height) / (2 * extent)  # px per m
        view = Viewport(self.height, scale=scale, origin=(self.width / 2, self.height / 2))
        surface = new_surface(self.width, self.height)

        pivot = view.to_pixels(0.0, 0.0)
        tip = view.to_pixels(-length * math.sin(theta), length * math.cos(theta))
        rod_width = view.length(0.2 * length)
        thick_line(surface, pivot, tip, rod_width, ROD_COLOR)
        fill_circle(surface, pivot, rod_width / 2, ROD_COLOR)
        fill_circle(surface, tip, rod_width / 2, ROD_COLOR)

        if last_u != 0.0:
            arc_arrow(surface, pivot, view.length(length * abs(last_u) / 4), counterclockwise=last_u > 0)
        fill_circle(surface, pivot, view.length(0.05 * length), BLACK)
        return [surface_to_frame(surface)]
