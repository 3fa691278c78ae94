"""The built wheel works on its own: ``pip install .`` then ``train-controller play`` from elsewhere.

Builds the wheel from a copy of the sources (a build in the checkout would leave ``build/`` and
``*.egg-info`` there, and setuptools ships whatever stale files ``build/lib`` still holds), installs
it without dependencies into a temporary folder, and plays the bundled CartPole controller from
another working directory with only that folder ahead of the venv's site-packages. A
``sitecustomize`` hook records where every ``diffgym``/``agents`` module was imported from: the
venv's editable install of the checkout must not fill in anything the wheel lacks.
"""

import email.parser
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
#: What the build reads: the metadata, the files it names and the two packages.
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "diffgym", "agents")
PACKAGES = ("diffgym", "agents")
HEADLESS = {"SDL_VIDEODRIVER": "dummy", "SDL_AUDIODRIVER": "dummy", "PYGAME_HIDE_SUPPORT_PROMPT": "1"}

#: Run by ``site`` at start-up (it is first on PYTHONPATH): at exit, dumps each loaded module of
#: ours (and ``__main__``, the module ``-m`` ran) and its file to the JSON file named by
#: $DIFFGYM_IMPORTED_FROM.
IMPORT_HOOK = """\
import atexit, json, os, sys

def _dump():
    modules = {name: getattr(module, "__file__", None) for name, module in list(sys.modules.items())
               if name.partition(".")[0] in ("diffgym", "agents", "__main__")}
    with open(os.environ["DIFFGYM_IMPORTED_FROM"], "w") as f:
        json.dump(modules, f)

atexit.register(_dump)
"""


def _run(args, **kwargs):
    result = subprocess.run(args, check=False, capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{' '.join(map(str, args))} failed:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    setuptools_version = importlib.metadata.version("setuptools")
    if int(setuptools_version.split(".")[0]) < 77:
        pytest.fail(f"building needs setuptools>=77 (PEP 639 license), this venv has {setuptools_version}: "
                    "pip install -e '.[test]'")
    root = tmp_path_factory.mktemp("packaging")
    source = root / "source"
    source.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(REPO / name, source / name)
    dist = root / "dist"
    # No build isolation and no index: the venv's setuptools, nothing downloaded.
    _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
          "--wheel-dir", str(dist), str(source)])
    (built,) = dist.glob("diffgym-*.whl")
    return built


def test_wheel_ships_the_controllers_markers_license_and_the_train_extra(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        (metadata_name,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        metadata = email.parser.Parser().parsestr(archive.read(metadata_name).decode())
        entry_points = archive.read(metadata_name.replace("METADATA", "entry_points.txt")).decode()
    for env in ("cartpole", "pendulum", "trebuchet"):
        for file in ("policy.json", "policy.eqx", "metrics.json"):
            assert f"agents/assets/{env}/{file}" in names
    for toml in (REPO / "agents" / "assets").glob("*/*.toml"):
        assert toml.relative_to(REPO).as_posix() in names
    sprites = {p.relative_to(REPO).as_posix() for p in (REPO / "diffgym" / "render").glob("*.png")}
    assert sprites <= names
    assert {"diffgym/py.typed", "agents/py.typed"} <= names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert metadata["License-Expression"] == "MIT"
    assert not any(n.startswith(("tests/", "bench/")) for n in names)
    assert "train-controller = agents.cli:main" in entry_points
    requirements = metadata.get_all("Requires-Dist")
    core = [r for r in requirements if "extra ==" not in r]
    train = [r for r in requirements if 'extra == "train"' in r]
    for name in ("tyro", "tqdm", "matplotlib"):
        assert not any(r.startswith(name) for r in core), f"{name} must be in the train extra only: {core}"
        assert any(r.startswith(name) for r in train), f"{name} missing from the train extra: {train}"


def test_installed_wheel_plays_the_bundled_controller_from_another_directory(wheel, tmp_path):
    site = tmp_path / "site"
    _run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", "--no-compile",
          "--target", str(site), str(wheel)])
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(IMPORT_HOOK)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    imported_from = tmp_path / "imported_from.json"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(hook), str(site)]),  # replaces any PYTHONPATH to the checkout
        "DIFFGYM_IMPORTED_FROM": str(imported_from),
        **HEADLESS,
    }
    result = _run(
        [sys.executable, "-m", "agents.cli", "play", "--env", "cartpole", "--episodes", "1",
         "--record", "out.gif"],
        cwd=elsewhere,
        env=env,
    )
    assert f"with the controller in {site / 'agents' / 'assets' / 'cartpole'}" in result.stdout, result.stdout
    assert "episode 1: return" in result.stdout
    gif = elsewhere / "out.gif"
    assert gif.read_bytes()[:6] in (b"GIF87a", b"GIF89a")

    modules = json.loads(imported_from.read_text())
    assert modules["__main__"] == str(site / "agents" / "cli.py")
    assert {"agents.play", "agents.policy", "diffgym.core", "diffgym.gym"} <= set(modules)
    assert any(name.startswith("diffgym.render.") for name in modules), sorted(modules)
    outside = {name: file for name, file in modules.items() if file and not Path(file).is_relative_to(site)}
    assert not outside, f"imported from outside the installed wheel (the checkout?): {outside}"
    for package in PACKAGES:
        assert Path(modules[package]).parent == site / package


# ------------------------------------------------------------------------------------------------
# The train extra (tyro, tqdm, matplotlib): only agents/ needs it
# ------------------------------------------------------------------------------------------------
TRAIN_EXTRA = ("tyro", "tqdm", "matplotlib")


def test_physics_agents_modules_and_python_play_work_without_the_train_extra(tmp_path):
    # A None in sys.modules makes `import tyro` raise ModuleNotFoundError, as if not installed.
    code = f"""
import sys
for name in {TRAIN_EXTRA!r}:
    sys.modules[name] = None
import gymnasium, jax, diffgym, diffgym.gym
env, params = diffgym.make("CartPole-v1")
obs, state = env.reset(jax.random.key(0), params)
env.step(jax.random.key(1), state, 1, params)
gymnasium.make("diffgym/Pendulum-v1").reset(seed=0)
import importlib, pkgutil, agents, agents.play
for module in pkgutil.iter_modules(agents.__path__, "agents."):  # each imports them lazily, if at all
    importlib.import_module(module.name)
agents.play.play("cartpole", episodes=1, max_steps=3, record=sys.argv[1], echo=lambda _: None)
"""
    env = {**os.environ, **HEADLESS}
    _run([sys.executable, "-c", code, str(tmp_path / "out.gif")], env=env, cwd=REPO)
    assert (tmp_path / "out.gif").exists()


@pytest.mark.parametrize(
    "command", [["play", "--env", "cartpole"], ["--env", "cartpole"], ["compare", "--env", "cartpole"]]
)
def test_cli_names_the_train_extra_when_tyro_is_missing(monkeypatch, capsys, command):
    from agents.cli import main

    monkeypatch.setitem(sys.modules, "tyro", None)
    assert main(command) == 1
    assert "tyro is not installed: pip install 'diffgym[train]'" in capsys.readouterr().err


def test_gymnax_adapter_names_gymnax_when_it_is_missing():
    code = (
        "import sys; sys.modules['gymnax'] = None\n"
        "try:\n    import diffgym.gymnax_compat\nexcept ModuleNotFoundError as error:\n    print(error)\n"
    )
    result = _run([sys.executable, "-c", code], cwd=REPO)
    assert "gymnax, which is not installed: pip install 'gymnax>=1.0'" in result.stdout, result.stdout
