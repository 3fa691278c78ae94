"""CartPole frames: gymnasium's 600x400 picture (track, black cart, brown pole, blue axle)."""

from __future__ import annotations

import math

import numpy as np

from diffgym.render._pygame import (
    BLACK,
    Renderer,
    Viewport,
    fill_circle,
    fill_polygon,
    horizontal_line,
    new_surface,
    surface_to_frame,
)

POLE_COLOR = (202, 152, 101)
AXLE_COLOR = (129, 132, 203)


class CartPoleRenderer(Renderer):
    """Draws a ``CartPoleState``; the frame's width spans ``±x_threshold`` (the
    termination bounds).

    Sizes in pixels follow gymnasium at 600x400: cart 50x30 with its centre 100 px above the
    bottom, pole 10 px wide and ``2 * length`` metres long, axle 7.5 px above the cart's centre.
    """

    render_fps = 50

    def __init__(self, *, width: int = 600, height: int = 400):
        super().__init__(width=width, height=height)

    def frames(self, state, params=None) -> list[np.ndarray]:
        if params is None:
            from diffgym.envs.cartpole import CartPoleParams

            params = CartPoleParams()
        x, theta = float(state.x), float(state.theta)
        zoom = self.width / 600  # gymnasium's pixel sizes are for a 600 px wide frame
        scale = self.width / (2 * float(params.x_threshold))  # px per m
        view = Viewport(self.height, scale=scale, origin=(self.width / 2, 100 * zoom))
        surface = new_surface(self.width, self.height)

        cart_x_px, cart_y_px = view.to_pixels(x, 0.0)
        half_width, half_height = 25 * zoom, 15 * zoom
        fill_polygon(
            surface,
            [
                (cart_x_px - half_width, cart_y_px + half_height),
                (cart_x_px - half_width, cart_y_px - half_height),
                (cart_x_px + half_width, cart_y_px - half_height),
                (cart_x_px + half_width, cart_y_px + half_height),
            ],
            BLACK,
        )

        # Pole: a bar from the axle along theta measured from upright, positive leaning right.
        axle = (cart_x_px, cart_y_px - 7.5 * zoom)
        pole_px = view.length(2 * float(params.length))
        half_pole_width = 5 * zoom
        along = (math.sin(theta), -math.cos(theta))  # screen direction of the pole (y down)
        across = (-along[1], along[0])
        back, front = -half_pole_width, pole_px - half_pole_width
        fill_polygon(
            surface,
            [
                (axle[0] + along[0] * back + across[0] * sign * half_pole_width,
                 axle[1] + along[1] * back + across[1] * sign * half_pole_width)
                for sign in (-1, 1)
            ]
            + [
                (axle[0] + along[0] * front + across[0] * sign * half_pole_width,
                 axle[1] + along[1] * front + across[1] * sign * half_pole_width)
                for sign in (1, -1)
            ],
            POLE_COLOR,
        )
        fill_circle(surface, axle, half_pole_width, AXLE_COLOR)

        horizontal_line(surface, round(cart_y_px), BLACK)  # the track
        return [surface_to_frame(surface)]
