"""Trebuchet frames: the whole shot as an animation, drawn to scale from the simulated trajectory."""

from __future__ import annotations

import math

import numpy as np

from diffgym.render._pygame import (
    BLACK,
    Renderer,
    Viewport,
    fill_circle,
    fill_polygon,
    import_pygame,
    new_surface,
    surface_to_frame,
    thick_line,
)

SKY = (222, 236, 250)
GROUND = (120, 170, 90)
WOOD = (140, 90, 45)
IRON = (70, 70, 80)
SLING = (60, 40, 20)
STONE = (90, 90, 90)
TRAIL = (200, 60, 60)
FLAG = (220, 40, 40)
WIND = (40, 90, 200)


class TrebuchetRenderer(Renderer):
    """Draws a ``TrebuchetState``.

    Before the shot (``state.time == 0``): one frame, the trebuchet at rest, the target flag and
    the wind. After it: the whole shot re-simulated with ``shoot_trajectory`` from the state's
    last action, one frame per Euler step (``render_fps = 60`` is real time) — the frame, the arm
    and its counterweight, the sling, the projectile and its trail, the target flag, a wind arrow
    (length proportional to the wind speed) and the ground, all to the same scale in x and y.
    """

    render_fps = 60

    def __init__(self, *, width: int = 800, height: int = 400):
        super().__init__(width=width, height=height)
        self._trajectory_fn = None
        self._font = None

    # -- simulation -----------------------------------------------------------------------------
    def _trajectory(self, state, params):
        import jax

        from diffgym.envs.trebuchet import shoot_trajectory

        if self._trajectory_fn is None:
            self._trajectory_fn = jax.jit(shoot_trajectory)
        trajectory = self._trajectory_fn(
            np.float32(state.wind), np.float32(state.release_angle_deg), np.float32(state.counterweight_kg), params
        )
        return jax.tree.map(np.asarray, trajectory)

    def frames(self, state, params=None) -> list[np.ndarray]:
        from diffgym.envs.trebuchet import TrebuchetParams, _initial_arm_state, linkage_points

        params = TrebuchetParams() if params is None else params
        target, wind = float(state.target), float(state.wind)
        if int(state.time) == 0:
            arm = np.asarray(_initial_arm_state(params, np.float32)[:3])[None]
            points = {k: np.asarray(v) for k, v in linkage_points(arm, params).items()}
            projectile = points["sling_end"]
            view = self._viewport(params, projectile, target)
            return [self._draw(view, params, points, 0, projectile, target, wind, landed=None)]

        trajectory = self._trajectory(state, params)
        valid = np.flatnonzero(trajectory.valid)
        arm = trajectory.arm_angles[valid]
        projectile = trajectory.projectile[valid]
        points = {k: np.asarray(v) for k, v in linkage_points(arm, params).items()}
        view = self._viewport(params, projectile, target)
        landed = float(trajectory.distance)
        frames = []
        for i in range(len(valid)):
            last = i == len(valid) - 1
            frames.append(self._draw(view, params, points, i, projectile, target, wind, landed if last else None))
        return frames

    # -- drawing --------------------------------------------------------------------------------
    def _viewport(self, params, projectile: np.ndarray, target: float) -> Viewport:
        ground = -float(params.pivot_height)
        reach = float(params.long_arm_length + params.sling_length)
        x_min = min(-reach - 2.0, float(projectile[:, 0].min()) - 2.0)
        x_max = max(reach + 2.0, target + 6.0, float(projectile[:, 0].max()) + 4.0)
        y_max = max(reach + 2.0, float(projectile[:, 1].max()) + 3.0)
        y_min = ground - 2.0
        scale = min(self.width / (x_max - x_min), self.height / (y_max - y_min))
        # Centre the scene horizontally; the ground sits near the bottom.
        left_pad = (self.width - scale * (x_max - x_min)) / 2
        origin = (left_pad - scale * x_min, -scale * y_min)
        return Viewport(self.height, scale=scale, origin=origin)

    def _draw(self, view, params, points, i, projectile, target, wind, landed) -> np.ndarray:
        surface = new_surface(self.width, self.height, SKY)
        ground_y = -float(params.pivot_height)
        pixel = max(1.0, view.length(0.08))  # line widths: at least a pixel, whatever the scale

        # Ground.
        ground_top = view.to_pixels(0.0, ground_y)[1]
        fill_polygon(
            surface,
            [(0, ground_top), (self.width, ground_top), (self.width, self.height), (0, self.height)],
            GROUND,
        )

        # Target flag: a pole and a pennant at the target distance.
        pole_height = 3.0
        foot = view.to_pixels(target, ground_y)
        top = view.to_pixels(target, ground_y + pole_height)
        thick_line(surface, foot, top, max(1.5, pixel / 2), BLACK)
        fill_polygon(surface, [top, view.to_pixels(target + 1.5, ground_y + pole_height - 0.5), view.to_pixels(target, ground_y + pole_height - 1.0)], FLAG)

        # Support frame: an A-frame from the ground to the pivot.
        pivot = view.to_pixels(0.0, 0.0)
        half_base = 0.5 * float(params.pivot_height)
        for side in (-1.0, 1.0):
            thick_line(surface, view.to_pixels(side * half_base, ground_y), pivot, 2 * pixel, WOOD)

        # Arm, counterweight, sling.
        long_end = view.to_pixels(*points["long_end"][i])
        short_end = view.to_pixels(*points["short_end"][i])
        weight = view.to_pixels(*points["counterweight"][i])
        thick_line(surface, short_end, long_end, 2 * pixel, WOOD)
        thick_line(surface, short_end, weight, pixel, IRON)
        fill_circle(surface, weight, max(3.0, view.length(0.35)), IRON)
        stone = view.to_pixels(*projectile[i])
        attached = np.allclose(projectile[i], points["sling_end"][i], atol=1e-4)
        sling_end = stone if attached else view.to_pixels(*points["sling_end"][i])
        thick_line(surface, long_end, sling_end, max(1.0, pixel / 2), SLING)
        fill_circle(surface, pivot, max(2.0, 1.5 * pixel), BLACK)

        # Projectile and its trail.
        if i > 0:
            pygame = import_pygame()
            trail = [(float(x), float(y)) for x, y in view.points(projectile[: i + 1])]
            pygame.draw.lines(surface, TRAIL, False, trail, max(1, round(pixel / 2)))
        fill_circle(surface, stone, max(2.5, view.length(float(params.projectile_radius))), STONE)

        self._draw_wind(surface, wind)
        self._draw_text(surface, target, wind, landed)
        return surface_to_frame(surface)

    def _draw_wind(self, surface, wind: float) -> None:
        """An arrow in the top-left corner, 6 px per m/s, pointing the way the wind blows."""
        if wind == 0.0:
            return
        y, x0 = 18.0, 110.0
        length = 6.0 * wind
        end = (x0 + length, y)
        thick_line(surface, (x0, y), end, 3.0, WIND)
        direction = math.copysign(1.0, wind)
        head = [(end[0] + 8 * direction, y), (end[0], y - 6), (end[0], y + 6)]
        fill_polygon(surface, head, WIND)

    def _draw_text(self, surface, target: float, wind: float, landed: float | None) -> None:
        pygame = import_pygame()
        if self._font is None:
            pygame.font.init()
            self._font = pygame.font.Font(None, 20)
        lines = [f"wind {wind:+.1f} m/s", f"target {target:.1f} m"]
        if landed is not None:
            lines.append(f"landed {landed:.2f} m (miss {landed - target:+.2f} m)")
        for row, text in enumerate(lines):
            surface.blit(self._font.render(text, True, BLACK), (8, 10 + 18 * row))
