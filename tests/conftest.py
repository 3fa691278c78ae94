import os

# Headless pygame for every test; must be set before pygame is imported.
os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
os.environ.setdefault("SDL_AUDIODRIVER", "dummy")
os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")

from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

# Compiling (the trebuchet's scans above all) is most of the suite's time. A persistent cache lets
# the two xdist workers, and later local runs, reuse each other's executables instead of compiling
# the same programs again; the key covers the program, the jax version and the x64 setting.
jax.config.update("jax_compilation_cache_dir", str(Path(__file__).parent.parent / ".pytest_cache" / "jax"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


@pytest.fixture
def key():
    return jax.random.key(0)
