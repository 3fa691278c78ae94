"""pygame renderers (headless: conftest sets SDL_VIDEODRIVER=dummy): frames depict the state."""

from __future__ import annotations

import sys
import time

import gymnasium
import numpy as np
import pytest

import diffgym
from diffgym.envs.cartpole import CartPoleParams, CartPoleState
from diffgym.envs.pendulum import PendulumState
from diffgym.gym import DiffgymEnv
from diffgym.render import Window, make_renderer, renderer_class
from diffgym.render.cartpole import POLE_COLOR
from diffgym.render.pendulum import ROD_COLOR

pytest.importorskip("pygame")


def cartpole_frame(x=0.0, theta=0.0, params=None) -> np.ndarray:
    env, default_params = diffgym.make("CartPole-v1")
    zero = np.float32(0)
    x, theta = np.float32(x), np.float32(theta)
    state = CartPoleState(x=x, x_dot=zero, theta=theta, theta_dot=zero, time=np.int32(0))
    (frame,) = make_renderer(env).frames(state, default_params if params is None else params)
    return frame


def pendulum_frame(theta=0.0, last_u=0.0) -> np.ndarray:
    env, params = diffgym.make("Pendulum-v1")
    state = PendulumState(
        theta=np.float32(theta), theta_dot=np.float32(0), last_u=np.float32(last_u), time=np.int32(0)
    )
    (frame,) = make_renderer(env).frames(state, params)
    return frame


def mask_of(frame: np.ndarray, color) -> np.ndarray:
    return np.all(np.abs(frame.astype(int) - np.array(color)) <= 10, axis=-1)


def centroid_x(mask: np.ndarray) -> float:
    assert mask.sum() > 50, "the shape is missing from the frame"
    return float(np.nonzero(mask)[1].mean())


# ------------------------------------------------------------------------------------------------
# CartPole
# ------------------------------------------------------------------------------------------------
def test_cartpole_frame_shape_and_dtype():
    frame = cartpole_frame()
    assert frame.shape == (400, 600, 3) and frame.dtype == np.uint8
    assert frame.flags.writeable and frame.flags.c_contiguous


@pytest.mark.parametrize("theta", [0.15, -0.15])
def test_cartpole_pole_leans_the_way_theta_says(theta):
    frame = cartpole_frame(theta=theta)
    pole = mask_of(frame, POLE_COLOR)
    cart_center_px = 300
    assert np.sign(centroid_x(pole) - cart_center_px) == np.sign(theta)
    assert not np.array_equal(frame, cartpole_frame(theta=-theta))


def test_cartpole_cart_moves_125_px_per_metre():
    # The cart spans 85..115 px above the bottom; the track line at 100 px is left out.
    black_cart_rows = slice(400 - 114, 400 - 102)
    at_zero = centroid_x(mask_of(cartpole_frame(x=0.0)[black_cart_rows], (0, 0, 0)))
    at_one = centroid_x(mask_of(cartpole_frame(x=1.0)[black_cart_rows], (0, 0, 0)))
    assert at_one - at_zero == pytest.approx(600 / 4.8, abs=2)


def test_cartpole_pole_length_follows_params():
    short = mask_of(cartpole_frame(params=CartPoleParams(length=0.25)), POLE_COLOR).sum()
    long = mask_of(cartpole_frame(params=CartPoleParams(length=0.75)), POLE_COLOR).sum()
    assert long > 2 * short


@pytest.mark.parametrize("state", [(0.0, 0.0), (1.3, 0.2), (-2.0, -0.3)])
def test_cartpole_frame_reproduces_gymnasiums_picture(state):
    x, theta = state
    theirs = gymnasium.make("CartPole-v1", render_mode="rgb_array").unwrapped
    theirs.reset(seed=0)
    theirs.state = np.array([x, 0.0, theta, 0.0])
    their_frame = theirs.render()
    theirs.close()
    differing = np.any(np.abs(cartpole_frame(x, theta).astype(int) - their_frame) > 60, axis=-1)
    # Only antialiased edges and a one-pixel rounding offset differ.
    assert differing.mean() < 0.01, differing.mean()


# ------------------------------------------------------------------------------------------------
# Pendulum
# ------------------------------------------------------------------------------------------------
def test_pendulum_frame_shape_and_rod_direction():
    up = pendulum_frame(theta=0.0)
    assert up.shape == (500, 500, 3) and up.dtype == np.uint8
    rod_up = mask_of(up, ROD_COLOR)
    assert np.nonzero(rod_up)[0].mean() < 250  # upright: above the pivot
    rod_left = mask_of(pendulum_frame(theta=np.pi / 2), ROD_COLOR)  # counter-clockwise from up
    assert centroid_x(rod_left) < 240


def test_pendulum_torque_arrow_size_and_direction_follow_last_u():
    black = [mask_of(pendulum_frame(last_u=u), (0, 0, 0)).sum() for u in (0.0, 1.0, 2.0)]
    assert black[0] < black[1] < black[2]  # no arrow at zero torque, then a growing one
    counterclockwise, clockwise = pendulum_frame(last_u=1.5), pendulum_frame(last_u=-1.5)
    assert not np.array_equal(counterclockwise, clockwise)
    # The clockwise arrow is the mirror image of the counter-clockwise one (the rod is vertical);
    # the pivot sits between pixel columns 249 and 250, so mirroring moves it by one column.
    mirrored = np.roll(clockwise[:, ::-1], 1, axis=1)
    arrow_ccw, arrow_cw_mirrored = mask_of(counterclockwise, (0, 0, 0)), mask_of(mirrored, (0, 0, 0))
    overlap = (arrow_ccw & arrow_cw_mirrored).sum() / arrow_ccw.sum()
    assert overlap > 0.9, overlap
    direct_overlap = (arrow_ccw & mask_of(clockwise, (0, 0, 0))).sum() / arrow_ccw.sum()
    assert direct_overlap < overlap - 0.1


# ------------------------------------------------------------------------------------------------
# Shells
# ------------------------------------------------------------------------------------------------
# A full push each step, so that every picture changes within a few steps.
PUSHES = {
    "CartPole-v1": (1, (400, 600, 3)),
    "Pendulum-v1": (np.array([2.0], np.float32), (500, 500, 3)),
    "Acrobot-v1": (2, (500, 500, 3)),
    "MountainCar-v0": (2, (400, 600, 3)),
    "MountainCarContinuous-v0": (np.array([1.0], np.float32), (400, 600, 3)),
}


@pytest.mark.parametrize("env_id", PUSHES)
def test_shell_render_after_reset_and_step_shows_the_current_state(env_id):
    action, shape = PUSHES[env_id]
    env = gymnasium.make(f"diffgym/{env_id}", render_mode="rgb_array")
    env.reset(seed=0)
    first = env.render()
    assert first.shape == shape and first.dtype == np.uint8
    for _ in range(8):
        env.step(action)
    after = env.render()
    assert not np.array_equal(first, after)
    (expected,) = make_renderer(env.unwrapped.functional_env).frames(env.unwrapped.state, env.unwrapped.params)
    np.testing.assert_array_equal(after, expected)
    env.close()
    env.close()  # closing twice is allowed


def test_render_before_reset_raises_and_no_mode_warns():
    with pytest.raises(gymnasium.error.ResetNeeded):
        DiffgymEnv("CartPole-v1", render_mode="rgb_array").render()
    env = DiffgymEnv("CartPole-v1")
    env.reset(seed=0)
    with pytest.warns(UserWarning, match="render_mode"):
        assert env.render() is None


def test_bad_render_mode_is_refused():
    with pytest.raises(ValueError, match="'rgb'"):
        DiffgymEnv("CartPole-v1", render_mode="rgb")


@pytest.mark.parametrize("env_id", PUSHES)
def test_human_mode_runs_headless(env_id):
    env = gymnasium.make(f"diffgym/{env_id}", render_mode="human")
    assert env.metadata["render_fps"] == renderer_class(env.unwrapped.functional_env).render_fps
    env.reset(seed=0)
    env.action_space.seed(0)
    for _ in range(3):
        assert env.render() is None
        env.step(env.action_space.sample())
    window = env.unwrapped._window
    assert window is not None and not window.closed
    env.close()
    assert window.closed


def test_window_paces_frames_at_fps():
    frames = [np.full((40, 60, 3), value, np.uint8) for value in range(0, 250, 25)]
    window = Window(60, 40, fps=100)
    started = time.perf_counter()
    window.show(frames)
    elapsed = time.perf_counter() - started
    window.close()
    assert elapsed >= 0.08  # 10 frames at 100 fps; the first one is shown at once
    with pytest.raises(ValueError, match=r"\(40, 60, 3\)"):
        Window(60, 40, fps=10).show(np.zeros((10, 10, 3), np.uint8))


def test_vector_env_renders_one_frame_per_env():
    envs = gymnasium.make_vec(
        "diffgym/CartPole-v1", num_envs=6, max_episode_steps=25, render_mode="rgb_array"
    )
    envs.reset(seed=0)
    frames = envs.render()
    assert isinstance(frames, tuple) and len(frames) == 6
    assert all(frame.shape == (400, 600, 3) for frame in frames)
    assert not np.array_equal(frames[0], frames[1])


def test_missing_pygame_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "pygame", None)  # makes `import pygame` raise ImportError
    env, _ = diffgym.make("CartPole-v1")
    with pytest.raises(ImportError, match=r"pip install 'diffgym\[render\]'"):
        make_renderer(env)
