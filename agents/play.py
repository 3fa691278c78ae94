"""Watch a controller act: live in a pygame window, or recorded headless to a GIF.

``train-controller play --env pendulum`` runs the controller bundled in ``agents/assets/pendulum/`` on
the gymnasium env ``diffgym/Pendulum-v1`` with ``render_mode="human"``, episode after episode,
with the episode number and the running return in the window caption (and drawn over the scene
in recordings).
``--policy DIR`` plays a checkpoint written by ``train-controller --out DIR`` instead, and
``--record out.gif`` renders ``rgb_array`` frames into a GIF without opening a window (what
``make demo`` does on a machine without a display).

From Python::

    from agents.play import play
    returns = play("cartpole", episodes=2, record="cartpole.gif")
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

import diffgym
from agents.common import ASSETS_DIR, numpy_policy

#: Extensions ``--record`` accepts. GIF needs only pillow; MP4 needs an ffmpeg backend.
RECORD_EXTENSIONS = (".gif", ".mp4")

#: Recorded frames wider than this are scaled down (keeps GIFs small enough for a README).
MAX_RECORD_WIDTH = 480

#: GIFs faster than this keep every k-th frame (a GIF delay under 2 cs is shown as 10 cs).
MAX_GIF_FPS = 50

_RENDER_EXTRA_HINT = "pip install 'diffgym[render]'"


# --------------------------------------------------------------------------------------------
# Where policies come from
# --------------------------------------------------------------------------------------------
def short_env_name(env_id: str) -> str:
    """``"CartPole-v1"`` -> ``"cartpole"``: the folder name used under ``agents/assets/`` and ``runs/``."""
    return diffgym.spec(env_id).short_name


def bundled_policy_dir(env_id: str) -> Path:
    """The folder of the controller bundled for ``env_id`` (``agents/assets/<short name>/``)."""
    return ASSETS_DIR / short_env_name(env_id)


def resolve_policy(env: str | None, policy_dir: str | os.PathLike | None) -> tuple[str, Path]:
    """Decide which env and which checkpoint ``play`` uses; returns ``(env_id, checkpoint dir)``.

    Raises:
        ValueError: neither ``env`` nor ``policy_dir`` given, or the checkpoint was trained on
            another env than ``env``.
        FileNotFoundError: ``policy_dir`` (or the bundled folder) holds no checkpoint.
    """
    from agents.policy import CHECKPOINT_SPEC

    env_id = diffgym.resolve_env_id(env) if env is not None else None
    if policy_dir is None:
        if env_id is None:
            raise ValueError("play needs --env (to use the bundled controller) or --policy DIR")
        directory = bundled_policy_dir(env_id)
        if not (directory / CHECKPOINT_SPEC).exists():
            raise FileNotFoundError(
                f"no controller is bundled for {env_id} (looked in {str(directory)!r}); "
                f"train one with `train-controller --env {short_env_name(env_id)} --out DIR` "
                "and pass --policy DIR"
            )
    else:
        directory = Path(policy_dir)
    header = read_checkpoint_header(directory)
    trained_on = diffgym.resolve_env_id(header["env_id"])
    if env_id is not None and trained_on != env_id:
        raise ValueError(
            f"the policy in {str(directory)!r} was trained on {trained_on}, but --env asks for {env_id}; "
            f"drop --env or pass --env {short_env_name(trained_on)}"
        )
    return trained_on, directory


def read_checkpoint_header(directory: str | os.PathLike) -> dict:
    """The ``policy.json`` of a checkpoint folder (spec, ``env_id``, ...), or a FileNotFoundError."""
    from agents.policy import CHECKPOINT_SPEC, CHECKPOINT_WEIGHTS

    directory = Path(directory)
    spec_path = directory / CHECKPOINT_SPEC
    if not directory.is_dir():
        raise FileNotFoundError(f"policy folder {str(directory)!r} does not exist")
    if not spec_path.exists() or not (directory / CHECKPOINT_WEIGHTS).exists():
        raise FileNotFoundError(
            f"no policy checkpoint in {str(directory)!r}: expected {CHECKPOINT_SPEC} and "
            f"{CHECKPOINT_WEIGHTS} (written by `train-controller ... --out DIR`)"
        )
    return json.loads(spec_path.read_text())


def check_record_path(path: str | os.PathLike) -> Path:
    """Validate a ``--record`` path: a known extension, and a backend that can write it."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in RECORD_EXTENSIONS:
        raise ValueError(
            f"cannot record to {str(path)!r}: extension {suffix or '(none)'!r} is not supported; "
            f"use one of {', '.join(RECORD_EXTENSIONS)} (e.g. --record rollout.gif)"
        )
    if suffix == ".mp4" and importlib.util.find_spec("imageio_ffmpeg") is None:
        raise ValueError(
            f"cannot record to {str(path)!r}: MP4 needs an ffmpeg backend (pip install imageio-ffmpeg); "
            "a .gif works with what diffgym[render] installs"
        )
    return path


def display_available() -> bool:
    """Whether a pygame window can open: a display server, or an SDL driver chosen explicitly."""
    if os.environ.get("SDL_VIDEODRIVER"):
        return True
    if sys.platform.startswith("linux") or "bsd" in sys.platform:
        return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
    return True  # macOS and Windows always have a window system


def _import_pygame():
    try:
        os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
        import pygame
    except ImportError as error:
        raise ImportError(f"playing a controller needs pygame: {_RENDER_EXTRA_HINT}") from error
    return pygame


# --------------------------------------------------------------------------------------------
# Playing
# --------------------------------------------------------------------------------------------
def play(
    env: str | None = None,
    *,
    policy_dir: str | os.PathLike | None = None,
    episodes: int | None = None,
    record: str | os.PathLike | None = None,
    seed: int = 0,
    max_steps: int | None = None,
    echo: Callable[[str], Any] = print,
) -> list[float]:
    """Run a controller on the gymnasium env, live in a window or recorded to a file.

    Args:
        env: env name or id (``"pendulum"``, ``"Pendulum-v1"``); optional when ``policy_dir``
            is given (the checkpoint knows its env).
        policy_dir: a checkpoint folder (``train-controller --out DIR``); default: the
            controller bundled in ``agents/assets/<env>/``.
        episodes: how many episodes; default: until the window is closed (live) or 1 (record).
        record: a ``.gif`` (or ``.mp4``) path: render headless into it instead of a window.
        seed: episode ``k`` is reset with seed ``seed + k``.
        max_steps: cut every episode after this many steps (default: the env's time limit).
        echo: where one line per finished episode goes.

    Returns:
        The return of every episode played (a partial last one included when the window was
        closed mid-episode).
    """
    if episodes is not None and episodes < 1:
        raise ValueError(f"episodes must be at least 1, got {episodes}")
    if max_steps is not None and max_steps < 1:
        raise ValueError(f"max_steps must be at least 1, got {max_steps}")
    if record is not None:
        record = check_record_path(record)
    env_id, directory = resolve_policy(env, policy_dir)
    if record is None and not display_available():
        raise RuntimeError(
            "no display found (neither DISPLAY nor WAYLAND_DISPLAY is set): record instead with "
            "--record rollout.gif"
        )

    from agents.policy import load_policy

    policy = load_policy(directory)
    echo(f"playing {env_id} with the controller in {directory}")
    if record is None:
        return _play_live(env_id, policy, episodes, seed, max_steps, echo)
    return _play_recorded(env_id, policy, episodes or 1, seed, max_steps, record, echo)


def _make_gym_env(env_id: str, render_mode: str):
    import gymnasium

    import diffgym.gym  # noqa: F401  (registers the diffgym/ ids)

    return gymnasium.make(f"diffgym/{env_id}", render_mode=render_mode)


@functools.lru_cache(maxsize=32)
def _one_step(env_id: str) -> bool:
    """Whether an episode is a single step (a shot): then its task is its start observation."""
    return diffgym.make(env_id)[1].max_steps_in_episode == 1


def _status_line(env_id: str, episode: int, step: int, total: float, start_obs: np.ndarray) -> str:
    """What the caption (and a recording's overlay) says: the episode and its running return; for
    a one-step episode, its task (the spec's ``obs_format`` of the start observation)."""
    obs_format = diffgym.spec(env_id).obs_format
    if _one_step(env_id) and obs_format is not None:
        line = f"{env_id}  episode {episode}  " + obs_format.format(obs=[float(v) for v in start_obs])
        return line + (f"  return {total:.2f}" if step else "")
    return f"{env_id}  episode {episode}  step {step}  return {total:.1f}"


def _episode_summary(env_id: str, episode: int, step: int, total: float, start_obs: np.ndarray) -> str:
    if _one_step(env_id) and diffgym.spec(env_id).obs_format is not None:
        return _status_line(env_id, episode, step, total, start_obs).removeprefix(f"{env_id}  ")
    return f"episode {episode}: return {total:.1f} in {step} steps"


def _play_live(env_id, policy, episodes, seed, max_steps, echo) -> list[float]:
    pygame = _import_pygame()
    gym_env = _make_gym_env(env_id, "human")
    returns: list[float] = []
    try:
        episode = 0
        while episodes is None or episode < episodes:
            obs, _ = gym_env.reset(seed=seed + episode)
            start_obs, total, step, done = obs, 0.0, 0, False
            while not done:
                obs, reward, terminated, truncated, _ = gym_env.step(policy(obs))
                total += float(reward)
                step += 1
                done = terminated or truncated or (max_steps is not None and step >= max_steps)
                # The shell's window closes itself (pygame.display.quit) when the user closes it.
                if pygame.display.get_surface() is None:
                    returns.append(total)
                    echo(f"window closed during episode {episode + 1} (return so far {total:.1f})")
                    return returns
                pygame.display.set_caption(_status_line(env_id, episode + 1, step, total, start_obs))
            returns.append(total)
            echo(_episode_summary(env_id, episode + 1, step, total, start_obs))
            episode += 1
    finally:
        gym_env.close()
    return returns


_FONT_CACHE: dict[str, Any] = {}


def _play_recorded(env_id, policy, episodes, seed, max_steps, record: Path, echo) -> list[float]:
    pygame = _import_pygame()
    gym_env = _make_gym_env(env_id, "rgb_array")
    shell = gym_env.unwrapped
    # The renderer protocol rather than gym_env.render(): a trebuchet step is a whole shot, and
    # render() gives only its last frame where frames() gives the flight.
    from diffgym.render import make_renderer

    renderer = make_renderer(shell.functional_env)
    fps = int(getattr(renderer, "render_fps", None) or gym_env.metadata.get("render_fps") or 30)
    writer = _FrameWriter(record, fps)
    returns: list[float] = []
    try:
        for episode in range(episodes):
            obs, _ = gym_env.reset(seed=seed + episode)
            start_obs, total, step, done = obs, 0.0, 0, False
            status = _status_line(env_id, episode + 1, 0, 0.0, start_obs)
            writer.add(renderer.frames(shell.state, shell.params)[-1:], status, pygame)
            while not done:
                obs, reward, terminated, truncated, _ = gym_env.step(policy(obs))
                total += float(reward)
                step += 1
                done = terminated or truncated or (max_steps is not None and step >= max_steps)
                status = _status_line(env_id, episode + 1, step, total, start_obs)
                writer.add(renderer.frames(shell.state, shell.params), status, pygame)
            returns.append(total)
            echo(_episode_summary(env_id, episode + 1, step, total, start_obs))
        writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        renderer.close()
        gym_env.close()
    echo(f"recorded {writer.frames} frames ({len(writer)} kept, at {writer.fps:g} fps) to {record}")
    return returns


class _FrameWriter:
    """Collects frames (with a text overlay) and writes them atomically on ``close``.

    GIF frames are kept palette-quantised (one byte a pixel, at most ``MAX_RECORD_WIDTH`` wide):
    a 500-step CartPole episode holds about 80 MB before it is encoded (a GIF of about 1 MB).
    """

    def __init__(self, path: Path, fps: int):
        self.path = path
        self.frames = 0  # frames rendered (a GIF may keep fewer, see below)
        # GIF delays are whole centiseconds and viewers slow down delays under 2 cs, so a faster
        # render (the trebuchet's 60 fps) keeps every stride-th frame.
        gif = path.suffix.lower() == ".gif"
        self._stride = math.ceil(fps / MAX_GIF_FPS) if gif else 1
        self.fps = fps / self._stride
        self._images: list = []
        self._palette = None
        self._tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix}")
        self._mp4 = None
        if path.suffix.lower() == ".mp4":
            import imageio.v2 as imageio

            path.parent.mkdir(parents=True, exist_ok=True)
            self._mp4 = imageio.get_writer(self._tmp, fps=fps, macro_block_size=1)

    def add(self, frames: list[np.ndarray], text: str, pygame) -> None:
        """Append ``frames`` (each ``HxWx3`` uint8) with ``text`` drawn over them."""
        for frame in frames:
            self.frames += 1
            if (self.frames - 1) % self._stride:
                continue
            frame = _with_overlay(np.asarray(frame, dtype=np.uint8), text, pygame)
            if self._mp4 is not None:
                self._mp4.append_data(frame)
            else:
                self._images.append(self._to_gif_frame(frame))

    def _to_gif_frame(self, frame: np.ndarray):
        from PIL import Image

        image = Image.fromarray(frame)
        if image.width > MAX_RECORD_WIDTH:
            height = round(image.height * MAX_RECORD_WIDTH / image.width)
            image = image.resize((MAX_RECORD_WIDTH, height), Image.Resampling.BILINEAR)
        if self._palette is None:
            self._palette = _palette_of(np.asarray(image))
        return image.quantize(palette=self._palette, dither=Image.Dither.NONE)

    def close(self) -> None:
        if self.frames == 0:
            raise RuntimeError("the env rendered no frames; nothing to record")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self._mp4 is not None:
            self._mp4.close()
        else:
            first, *rest = self._images
            # Whole-centisecond delays whose running sum tracks the true clock (30 fps: 3, 4, 3 cs).
            ticks = np.round(np.arange(len(self._images) + 1) * 100 / self.fps).astype(int)
            durations = (np.diff(ticks) * 10).tolist()
            first.save(self._tmp, save_all=True, append_images=rest, duration=durations, loop=0, optimize=False)
        os.replace(self._tmp, self.path)

    def __len__(self) -> int:
        """Frames written (or to be written) to the file."""
        return len(self._images) if self._mp4 is None else self.frames

    def abort(self) -> None:
        if self._mp4 is not None:
            self._mp4.close()
        self._tmp.unlink(missing_ok=True)


def _palette_of(frame: np.ndarray, size: int = 64, min_distance: float = 12.0):
    """A GIF palette of the most frequent colours of ``frame``, each kept exact.

    One palette for the whole GIF, from the first frame (the scene's flat colours and the text
    are all in it): half the file size of a palette per frame and four times faster. Colours
    closer than ``min_distance`` (RGB units) to a more frequent one are left out, so that pillow's
    approximate colour lookup cannot map the white background onto a near-white antialiasing
    shade (a median-cut palette turns it grey).
    """
    from PIL import Image

    colors, counts = np.unique(frame.reshape(-1, 3), axis=0, return_counts=True)
    chosen: list[np.ndarray] = []
    for color in colors[np.argsort(counts)[::-1]].astype(np.float32):
        if all(np.linalg.norm(color - other) >= min_distance for other in chosen):
            chosen.append(color)
            if len(chosen) == size:
                break
    colors = np.asarray(chosen, np.uint8)
    palette = np.zeros((256, 3), np.uint8)
    palette[: len(colors)] = colors
    palette[len(colors) :] = colors[0]  # unused entries repeat the commonest colour
    image = Image.new("P", (1, 1))
    image.putpalette(palette.ravel().tolist())
    return image


_TEXT_COLOR = np.array([20, 20, 20], np.float32)


def _with_overlay(frame: np.ndarray, text: str, pygame) -> np.ndarray:
    """A copy of ``frame`` (H, W, 3 uint8) with ``text`` drawn in its top-right corner.

    Top right because the scenes keep it empty (the trebuchet writes its own labels top left).
    """
    if not pygame.font.get_init():
        pygame.font.init()
    font = _FONT_CACHE.setdefault("record", pygame.font.Font(None, 22))
    # Blend only the label's own pixels by their antialiasing alpha: a round trip of the whole
    # frame through a pygame surface costs more than rendering it.
    alpha = pygame.surfarray.array_alpha(font.render(text, True, (255, 255, 255))).T / np.float32(255)
    out = frame.copy()
    top, left = 6, max(0, out.shape[1] - alpha.shape[1] - 8)
    height = min(alpha.shape[0], out.shape[0] - top)
    width = min(alpha.shape[1], out.shape[1] - left)
    alpha = alpha[:height, :width, None]
    region = out[top : top + height, left : left + width].astype(np.float32)
    out[top : top + height, left : left + width] = (region * (1 - alpha) + _TEXT_COLOR * alpha).astype(np.uint8)
    return out


# --------------------------------------------------------------------------------------------
# Watching training (train-controller --render)
# --------------------------------------------------------------------------------------------
class TrainingViewer:
    """Shows one episode of the current policy in a pygame window: a trainer's ``render_fn``.

    Calls closer together than ``min_interval_s`` are skipped so that watching costs a bounded
    share of the training time. Closing the window stops further rendering; training goes on.

    Args:
        env_id: the env being trained on.
        max_steps: steps shown per call (the rest of the episode is not simulated).
        min_interval_s: the least wall time between two shown episodes.
    """

    def __init__(self, env_id: str, *, max_steps: int = 200, min_interval_s: float = 0.0):
        if not display_available():
            raise RuntimeError(
                "--render needs a display (neither DISPLAY nor WAYLAND_DISPLAY is set); "
                "train without it and record afterwards with `train-controller play --record out.gif`"
            )
        self.env_id = diffgym.resolve_env_id(env_id)
        self.max_steps = max_steps
        self.min_interval_s = min_interval_s
        self._last_shown = -float("inf")
        self._gym_env = None
        self._closed = False
        self.shown = 0

    def __call__(self, policy, info: dict | None = None) -> None:
        """Show ``policy`` (a ``Policy`` module, or a ``numpy obs -> action`` callable) acting."""
        if self._closed or time.monotonic() - self._last_shown < self.min_interval_s:
            return
        pygame = _import_pygame()
        if self._gym_env is None:
            self._gym_env = _make_gym_env(self.env_id, "human")
        act = numpy_policy(policy)
        obs, _ = self._gym_env.reset(seed=self.shown)
        total, label = 0.0, ""
        if info:
            shown = ("env_steps", "eval_return", "loss")
            label = "  ".join(f"{k} {info[k]:.4g}" for k in shown if isinstance(info.get(k), (int, float)))
        for step in range(1, self.max_steps + 1):
            obs, reward, terminated, truncated, _ = self._gym_env.step(act(obs))
            total += float(reward)
            if pygame.display.get_surface() is None:  # the user closed the window
                self.close()
                return
            pygame.display.set_caption(f"training {self.env_id}  {label}  step {step}  return {total:.1f}")
            if terminated or truncated:
                break
        self.shown += 1
        self._last_shown = time.monotonic()

    def close(self) -> None:
        self._closed = True
        if self._gym_env is not None:
            self._gym_env.close()
            self._gym_env = None
