"""Type checkers see diffgym's state and params classes as the keyword-only frozen dataclasses they are.

``pytree_dataclass`` is declared with ``typing.dataclass_transform``: without it mypy reports every
``CartPoleState(x=...)`` as an unexpected keyword argument (``call-arg``, 41 of them in the package).
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest

import diffgym

#: Each line that is wrong says so with ``# error: <mypy code>``; every other line must type-check.
SNIPPET = """\
import dataclasses

import jax.numpy as jnp

from diffgym.envs.cartpole import CartPoleState
from diffgym.envs.pendulum import PendulumParams

zero = jnp.zeros(())
state = CartPoleState(x=zero, x_dot=zero, theta=zero, theta_dot=zero, time=jnp.zeros((), jnp.int32))
params = PendulumParams(g=9.81, max_steps_in_episode=100)
heavier = dataclasses.replace(params, m=2.0)
reveal_type(params.g)  # note: Revealed type is "float"
PendulumParams(gg=9.81)  # error: call-arg
PendulumParams(8.0)  # error: call-arg
params.g = 1.0  # error: misc
"""


def test_pytree_dataclass_fields_are_keyword_only_and_frozen_for_mypy(tmp_path):
    pytest.importorskip("mypy")
    snippet = tmp_path / "snippet.py"
    snippet.write_text(SNIPPET)
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--follow-imports=silent", "--ignore-missing-imports",
         "--no-error-summary", "--show-error-codes", "--cache-dir", str(tmp_path / "cache"), str(snippet)],
        check=False,
        cwd=Path(diffgym.__file__).parent.parent,
        capture_output=True,
        text=True,
    )
    assert result.returncode in (0, 1), result.stdout + result.stderr  # 1: the deliberate errors
    reported: dict[int, set[str]] = {}
    for match in re.finditer(r"snippet\.py:(\d+): error: .*\[([a-z-]+)\]$", result.stdout, re.MULTILINE):
        reported.setdefault(int(match[1]), set()).add(match[2])
    expected = {
        number: {match[1]}
        for number, line in enumerate(SNIPPET.splitlines(), start=1)
        if (match := re.search(r"# error: ([a-z-]+)", line))
    }
    assert set(reported) == set(expected), result.stdout
    assert all(expected[number] <= reported[number] for number in expected), result.stdout
    assert 'Revealed type is "float"' in result.stdout, result.stdout
