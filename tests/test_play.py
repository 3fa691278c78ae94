"""``train-controller play``: headless GIF recording, live windows (dummy SDL driver), bundled controllers."""

import json
import sys

import numpy as np
import pytest

import agents
import diffgym
from agents.cli import main
from agents.common import evaluate_gymnasium
from agents.play import ASSETS_DIR, TrainingViewer, _play_live, check_record_path, play

#: Controllers bundled by `train-controller --out agents/assets/<alias>` (their metrics.json holds the
#: CLI's gymnasium evaluation; the trebuchet's aiming network has its own test), and the return each
#: must reach: its env spec's reward_threshold.
BUNDLED = {
    spec.short_name: (spec.id, spec.reward_threshold)
    for spec in map(diffgym.spec, diffgym.registered_envs())
    if (ASSETS_DIR / spec.short_name / "metrics.json").exists()
    and "eval_seed" in json.loads((ASSETS_DIR / spec.short_name / "metrics.json").read_text())
}


def test_the_classic_control_controllers_are_bundled():
    assert {"cartpole", "pendulum", "acrobot", "mountaincar", "mountaincarcontinuous"} <= set(BUNDLED)


def _bundled(name):
    if not (ASSETS_DIR / name / "policy.json").exists():
        pytest.fail(f"no controller bundled in agents/assets/{name}/")
    return ASSETS_DIR / name


@pytest.fixture
def captions(monkeypatch):
    """Every window caption set while the test runs."""
    import pygame

    seen = []
    original = pygame.display.set_caption
    def record(text, *args):
        seen.append(text)
        return original(text, *args)

    monkeypatch.setattr(pygame.display, "set_caption", record)
    return seen


def test_record_gif_headless_with_the_bundled_controller(tmp_path, capsys):
    gif = tmp_path / "nested" / "cartpole.gif"
    assert main(["play", "--env", "cartpole", "--record", str(gif), "--max-steps", "40"]) == 0
    out = capsys.readouterr().out
    assert str(ASSETS_DIR / "cartpole") in out, "without --policy, play must use the bundled controller"
    assert "episode 1: return 40.0 in 40 steps" in out

    from PIL import Image

    with Image.open(gif) as image:
        assert image.n_frames == 41  # the reset frame and one per step
        assert image.width <= 480 and image.info["duration"] == 20  # CartPole renders at 50 fps
        image.seek(0)
        first = np.asarray(image.convert("RGB"))
        image.seek(40)
        last = np.asarray(image.convert("RGB"))
    assert first.shape == last.shape and not np.array_equal(first, last)
    assert not list(gif.parent.glob(".*.tmp*")), "the temporary file must be renamed into place"


def test_record_pendulum_gif_from_a_policy_folder(tmp_path):
    gif = tmp_path / "pendulum.gif"
    returns = play(policy_dir=_bundled("pendulum"), record=gif, episodes=2, max_steps=5, echo=lambda _: None)
    assert len(returns) == 2 and all(-16.3 * 5 <= r <= 0 for r in returns)  # Pendulum's cost bounds
    from PIL import Image

    with Image.open(gif) as image:
        assert image.n_frames == 2 * 6
        durations = []
        for index in range(image.n_frames):
            image.seek(index)
            durations.append(image.info["duration"])
    # Pendulum renders at 30 fps: whole-centisecond delays (30 or 40 ms) that keep real time.
    assert set(durations) == {30, 40} and sum(durations) == 400


@pytest.mark.parametrize("name", sorted(BUNDLED))
def test_bundled_controller_is_solved_and_matches_its_metrics(name):
    env_id, solved = BUNDLED[name]
    directory = _bundled(name)
    metrics = json.loads((directory / "metrics.json").read_text())
    policy = agents.load_policy(directory)
    assert policy.env_id == env_id == metrics["env"]
    assert metrics["eval_return_mean"] >= solved
    assert metrics["eval_episodes"] >= 20
    # The bundled weights are the ones that were evaluated: the first episodes replay exactly.
    returns = evaluate_gymnasium(policy, env_id, episodes=2, seed=metrics["eval_seed"])
    np.testing.assert_allclose(returns, metrics["eval_returns"][:2], rtol=1e-5)


def test_live_play_shows_episode_and_return_in_the_caption(captions):
    returns = play("cartpole", episodes=2, max_steps=15, echo=lambda _: None)
    assert returns == [15.0, 15.0]
    assert any("episode 1" in c and "return 15.0" in c for c in captions)
    assert any("episode 2" in c and "step 3 " in c for c in captions)


def test_closing_the_window_stops_an_endless_session():
    import pygame

    bundled = agents.load_policy(_bundled("cartpole"))
    calls = 0

    def policy(obs):
        nonlocal calls
        calls += 1
        if calls == 5:  # the user clicks the close button during the 5th step
            pygame.event.post(pygame.event.Event(pygame.QUIT))
        return bundled(obs)

    lines = []
    returns = _play_live("CartPole-v1", policy, None, 0, None, lines.append)
    assert returns == [5.0]
    assert lines == ["window closed during episode 1 (return so far 5.0)"]


def test_policy_trained_on_another_env_is_refused():
    with pytest.raises(ValueError, match="trained on CartPole-v1, but --env asks for Pendulum-v1"):
        play("pendulum", policy_dir=_bundled("cartpole"), record="x.gif")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="display detection differs off Linux")
def test_without_a_display_play_asks_for_a_recording(monkeypatch):
    for name in ("SDL_VIDEODRIVER", "DISPLAY", "WAYLAND_DISPLAY"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(RuntimeError, match="--record rollout.gif"):
        play("cartpole")


def test_record_extensions():
    assert check_record_path("a/b.GIF").suffix == ".GIF"
    with pytest.raises(ValueError, match="extension '.png' is not supported; use one of .gif, .mp4"):
        check_record_path("frame.png")
    with pytest.raises(ValueError, match="extension '\\(none\\)'"):
        check_record_path("movie")


def test_training_viewer_shows_the_current_policy(captions):
    from agents.policy import load_policy_module

    module, _ = load_policy_module(_bundled("cartpole"))
    viewer = TrainingViewer("cartpole", max_steps=10)
    viewer(module, {"env_steps": 500, "eval_return": 123.0, "loss": 0.5})
    viewer.close()
    assert viewer.shown == 1
    assert any("eval_return 123" in c and "step 10" in c for c in captions)


@pytest.mark.slow  # ~40 s on a loaded 2-core machine, nearly all of it compiling the trebuchet
def test_a_trebuchet_shot_is_recorded_whole(tmp_path):
    """One step of the trebuchet is a whole shot: every frame of its flight goes into the GIF."""
    import jax

    import diffgym
    from agents.policy import Policy, save_policy

    env, params = diffgym.make("Trebuchet-v0")
    box = env.action_space(params)
    low, high = tuple(map(float, box.low)), tuple(map(float, box.high))
    spec = dict(obs_size=2, action_size=2, kind="box", low=low, high=high, width=8, depth=1)
    save_policy(tmp_path / "aim", Policy(**spec, key=jax.random.key(0)), spec, env_id="Trebuchet-v0")
    lines = []
    gif = tmp_path / "shot.gif"
    (miss,) = play(policy_dir=tmp_path / "aim", record=gif, episodes=1, echo=lines.append)
    assert miss < 0  # the reward is minus the miss distance
    assert lines[1].startswith("episode 1  target ") and lines[1].endswith(f"return {miss:.2f}")
    rendered = int(lines[2].split()[1])  # "recorded N frames (M kept, at 30 fps) to ..."
    assert rendered > 60, "a shot animates over many frames"
    from PIL import Image

    with Image.open(gif) as image:
        # 60 fps renders keep every other frame (GIF delays are whole centiseconds).
        assert abs(image.n_frames - (rendered + 1) // 2) <= 5 and image.info["duration"] in (30, 40)


@pytest.mark.parametrize("fps, kept, durations", [(50, 12, {20}), (30, 12, {30, 40}), (60, 6, {30, 40})])
def test_gif_frames_and_delays_keep_real_time(tmp_path, fps, kept, durations):
    import pygame
    from PIL import Image

    from agents.play import _FrameWriter

    gif = tmp_path / "clip.gif"
    writer = _FrameWriter(gif, fps)
    # 12 rendered frames of a bar moving right, in two calls (as a multi-frame step would give).
    frames = [np.full((40, 60, 3), 255, np.uint8) for _ in range(12)]
    for index, frame in enumerate(frames):
        frame[20:30, 4 * index : 4 * index + 6] = (200, 30, 30)
    writer.add(frames[:5], "first", pygame)
    writer.add(frames[5:], "second", pygame)
    writer.close()
    assert writer.frames == 12 and len(writer) == kept
    with Image.open(gif) as image:
        assert image.n_frames == kept
        seen = []
        for index in range(kept):
            image.seek(index)
            seen.append(image.info["duration"])
    assert set(seen) == durations
    assert sum(seen) == pytest.approx(12 * 1000 / fps, abs=10)  # the clip lasts as long as the render
