"""LotkaVolterra frames: the episode's population curves (left) and its phase plane (right)."""

from __future__ import annotations

import numpy as np

from diffgym.render._pygame import (
    Renderer,
    Viewport,
    fill_circle,
    import_pygame,
    new_surface,
    surface_to_frame,
)

PREY_COLOR = (46, 139, 87)  # green
PREDATOR_COLOR = (200, 60, 50)  # red
ORBIT_COLOR = (70, 90, 200)  # blue: the phase-plane trajectory
TARGET_COLOR = (150, 150, 150)  # grey: the reward's target in the phase plane (a cross)
AXIS_COLOR = (60, 60, 60)
MARGIN = 30  # px around each panel


class LotkaVolterraRenderer(Renderer):
    """Draws a ``LotkaVolterraState`` with the history of its episode.

    Left panel: prey (green) and predator (red) populations against time, over the whole episode
    (``max_steps_in_episode * dt``), with their targets as dashed lines of the same colours. Right panel: the
    phase plane (prey along x, predators along y) with the trajectory so far in blue, the current
    state as a filled dot and the target as a grey cross. Both panels scale to the larger of 1.5
    times the targets and the largest population seen in the episode.

    A renderer remembers the states it drew: a state whose ``time`` is not later than the last
    one's starts a new history (an episode reset). One frame per state.
    """

    render_fps = 20

    def __init__(self, *, width: int = 800, height: int = 400):
        super().__init__(width=width, height=height)
        self._history: list[tuple[int, float, float]] = []

    def frames(self, state, params=None) -> list[np.ndarray]:
        if params is None:
            from diffgym.envs.lotka_volterra import LotkaVolterraParams

            params = LotkaVolterraParams()
        pygame = import_pygame()
        step, prey, predator = int(state.time), float(state.prey), float(state.predator)
        if self._history and step <= self._history[-1][0]:
            self._history = []
        self._history.append((step, prey, predator))
        history = np.array(self._history, np.float64)

        target_prey, target_predator = float(params.target_prey), float(params.target_predator)
        top = max(1.5 * max(target_prey, target_predator), float(np.max(history[:, 1:])) * 1.05, 1e-6)
        prey_top = max(1.5 * target_prey, float(np.max(history[:, 1])) * 1.05, 1e-6)
        predator_top = max(1.5 * target_predator, float(np.max(history[:, 2])) * 1.05, 1e-6)
        horizon = max(int(params.max_steps_in_episode), step, 1)
        surface = new_surface(self.width, self.height)
        panel = self.width // 2
        inner_w, inner_h = panel - 2 * MARGIN, self.height - 2 * MARGIN

        # Left: populations against time (x in steps, y in population units).
        curves = Viewport(self.height, scale=1.0, origin=(MARGIN, MARGIN))
        x_scale, y_scale = inner_w / horizon, inner_h / top

        def curve_point(t, value):
            return curves.to_pixels(t * x_scale, value * y_scale)

        self._axes(pygame, surface, curve_point(0, 0), curve_point(horizon, 0), curve_point(0, top))
        for target, color in ((target_prey, PREY_COLOR), (target_predator, PREDATOR_COLOR)):
            self._dashed(pygame, surface, curve_point(0, target), curve_point(horizon, target), color)
        for column, color in ((1, PREY_COLOR), (2, PREDATOR_COLOR)):
            points = [curve_point(t, v) for t, v in zip(history[:, 0], history[:, column])]
            if len(points) > 1:
                pygame.draw.aalines(surface, color, False, points)
            fill_circle(surface, points[-1], 3, color)

        # Right: the phase plane.
        phase = Viewport(self.height, scale=1.0, origin=(panel + MARGIN, MARGIN))
        px, py = inner_w / prey_top, inner_h / predator_top

        def phase_point(x, y):
            return phase.to_pixels(x * px, y * py)

        self._axes(pygame, surface, phase_point(0, 0), phase_point(prey_top, 0), phase_point(0, predator_top))
        cx, cy = phase_point(target_prey, target_predator)
        pygame.draw.line(surface, TARGET_COLOR, (cx - 6, cy - 6), (cx + 6, cy + 6), 2)
        pygame.draw.line(surface, TARGET_COLOR, (cx - 6, cy + 6), (cx + 6, cy - 6), 2)
        orbit = [phase_point(x, y) for x, y in history[:, 1:]]
        if len(orbit) > 1:
            pygame.draw.aalines(surface, ORBIT_COLOR, False, orbit)
        fill_circle(surface, orbit[-1], 5, ORBIT_COLOR)
        return [surface_to_frame(surface)]

    @staticmethod
    def _axes(pygame, surface, origin, x_end, y_end) -> None:
        pygame.draw.line(surface, AXIS_COLOR, origin, x_end, 1)
        pygame.draw.line(surface, AXIS_COLOR, origin, y_end, 1)

    @staticmethod
    def _dashed(pygame, surface, start, end, color, dash: float = 6.0) -> None:
        """A dashed horizontal line from ``start`` to ``end`` (pixels)."""
        length = max(abs(end[0] - start[0]), 1.0)
        for offset in np.arange(0.0, length, 2 * dash):
            a = start[0] + offset
            pygame.draw.line(surface, color, (a, start[1]), (min(a + dash, end[0]), end[1]), 1)

    def close(self) -> None:
        self._history = []
