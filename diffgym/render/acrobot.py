"""Acrobot frames: gymnasium's 500x500 picture (cyan links, yellow joints, the black goal line)."""

from __future__ import annotations

import math

import numpy as np

from diffgym.render._pygame import (
    BLACK,
    Renderer,
    Viewport,
    fill_circle,
    import_pygame,
    new_surface,
    surface_to_frame,
    thick_line,
)

LINK_COLOR = (0, 204, 204)
JOINT_COLOR = (204, 204, 0)


class AcrobotRenderer(Renderer):
    """Draws an ``AcrobotState``: the pivot at the centre, link 1 at ``theta1`` from hanging down
    (positive counter-clockwise on screen, as gymnasium's), link 2 at ``theta2`` relative to it.

    As gymnasium's picture: the view spans ±(``link_length_1 + link_length_2`` + 0.2) m, links are
    0.2 m wide bars from joint to joint, joints are circles of 0.1 m radius at the pivot and the
    elbow, and the goal line is drawn 1 m above the pivot (the height of the termination rule
    ``-cos(theta1) - cos(theta1 + theta2) > 1``, which is the tip's height for links of 1 m).
    """

    render_fps = 15

    def __init__(self, *, width: int = 500, height: int = 500):
        super().__init__(width=width, height=height)

    def frames(self, state, params=None) -> list[np.ndarray]:
        if params is None:
            from diffgym.envs.acrobot import AcrobotParams

            params = AcrobotParams()
        theta1, theta2 = float(state.theta1), float(state.theta2)
        length_1, length_2 = float(params.link_length_1), float(params.link_length_2)
        extent = length_1 + length_2 + 0.2  # m, gymnasium's "bound"
        scale = min(self.width, self.height) / (2 * extent)  # px per m
        view = Viewport(self.height, scale=scale, origin=(self.width / 2, self.height / 2))
        surface = new_surface(self.width, self.height)

        left, right = view.to_pixels(-2.2, 1.0), view.to_pixels(2.2, 1.0)
        import_pygame().draw.line(surface, BLACK, left, right)

        pivot = (0.0, 0.0)
        elbow = (length_1 * math.sin(theta1), -length_1 * math.cos(theta1))
        tip = (
            elbow[0] + length_2 * math.sin(theta1 + theta2),
            elbow[1] - length_2 * math.cos(theta1 + theta2),
        )
        joint_radius = view.length(0.1)
        for start, end in ((pivot, elbow), (elbow, tip)):
            thick_line(surface, view.to_pixels(*start), view.to_pixels(*end), view.length(0.2), LINK_COLOR)
            fill_circle(surface, view.to_pixels(*start), joint_radius, JOINT_COLOR)
        return [surface_to_frame(surface)]
