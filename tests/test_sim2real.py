"""agents.sim2real and its CLI: a controller transferred to a changed "real" system, end to end.

Fast tier (about 30 s on the shared 2-core machine, nearly all of it the two compilations of one
identification and one BPTT chunk): the bundled CartPole controller on gymnasium's numpy
CartPole with a pole ten times heavier and three times longer balances about 100 steps there;
from two logged episodes the masses are identified to 1e-6 and fine-tuning on the fit restores
500 on the real system; the CLI reaches the same; the pieces (the real system's physics, noise,
logging, budgets) and the error messages. PPO's and BPTT's start from given weights are tested
in test_ppo.py and test_bptt.py.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffgym
from agents import sim2real
from agents.cli import main
from agents.common import ASSETS_DIR, numpy_policy
from agents.policy import load_policy_module
from diffgym.identify import load_episodes

CARTPOLE_REAL = {"masspole": 1.0, "length": 1.5}
BUNDLED_CARTPOLE = ASSETS_DIR / "cartpole"


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """The whole pipeline through ``train-controller sim2real`` (PPO off: it is measured in the
    bench), shared by the tests that read its outputs."""
    out = tmp_path_factory.mktemp("sim2real")
    argv = ["sim2real", "--env", "cartpole", "--real", "masspole=1.0", "length=1.5", "--out", str(out),
            "--eval-episodes", "5", "--no-ppo"]  # fmt: skip
    assert main(argv) == 0
    return out, json.loads((out / "report.json").read_text())


def test_the_pipeline_restores_the_return_on_the_real_system(cli_run):
    out, report = cli_run
    assert report["env"] == "CartPole-v1" and report["real"]["physics"] == CARTPOLE_REAL
    # The bundled controller balances on diffgym's defaults and falls on the real system.
    assert report["nominal_return"]["mean"] == 500.0
    assert report["before"]["mean"] < 200, report["before"]
    # Two logged episodes are all the real steps; the noise-free fit is exact to the solver.
    assert report["collect"]["episodes"] == 2
    assert (
        report["real_steps"] == len(load_episodes(out / "episodes.npz")["actions"]) - 2
    )  # a row per step, one per reset
    for name, truth in CARTPOLE_REAL.items():
        assert report["identify"]["true"][name] == truth
        assert report["identify"]["values"][name] == pytest.approx(truth, rel=1e-6)
    assert report["identify"]["converged"]
    # Fine-tuned on the identified simulator from the bundled weights: 500 on the real system.
    assert report["fine_tune"]["fitted_sim_curve"][0]["env_steps"] == 0  # the bundled policy, in the fit
    assert report["fine_tune"]["after"]["mean"] == 500.0
    assert (out / "report.md").read_text().count("|") > 20
    checkpoint, header = load_policy_module(out / "fine_tuned")
    assert header["env_id"] == "CartPole-v1" and checkpoint.kind == "bernoulli"


def test_identify_command_fits_a_logged_npz(cli_run, tmp_path, capsys):
    out, report = cli_run
    fit_dir = tmp_path / "fit"
    assert (
        main(["identify", "--env", "cartpole", "--data", str(out / "episodes.npz"), "--out", str(fit_dir)])
        == 0
    )
    printed = capsys.readouterr().out
    assert "masspole" in printed and "converged" in printed and str(fit_dir / "params.json") in printed
    record = json.loads((fit_dir / "params.json").read_text())
    assert record["fit"] == ["masspole", "length"] and record["converged"]
    assert record["values"] == pytest.approx(report["identify"]["values"], rel=1e-9)
    assert set(record["standard_errors"]) == {"masspole", "length"}
    assert record["unidentifiable"] == [] and record["condition_number"] < 1e3
    # The whole params come back as the env's dataclass.
    fitted = sim2real.load_fitted_params(fit_dir / "params.json")
    assert fitted.masspole == pytest.approx(1.0, rel=1e-6) and fitted.masscart == 1.0


def test_fitting_the_unidentifiable_mass_and_force_set_is_reported(cli_run, tmp_path):
    out, _ = cli_run
    fit_dir = tmp_path / "fit"
    argv = ["identify", "--env", "cartpole", "--data", str(out / "episodes.npz"), "--out", str(fit_dir),
            "--fit", "masscart", "masspole", "force_mag"]  # fmt: skip
    assert main(argv) == 0
    record = json.loads((fit_dir / "params.json").read_text())
    (direction,) = record["unidentifiable"]
    assert all(abs(abs(v) - 3**-0.5) < 1e-3 for v in direction.values())  # all three scaled together
    assert record["standard_errors"]["masspole"] is None  # inf, as strict JSON writes it


# --------------------------------------------------------------------------------------------
# The pieces
# --------------------------------------------------------------------------------------------
def test_the_gymnasium_real_system_steps_as_diffgym_with_the_same_constants():
    """Its derived constants follow the changed ones: one step from the same state matches
    diffgym's step with the real params (to float32 round-off)."""
    real = sim2real.real_system("cartpole", CARTPOLE_REAL)
    env = real.make()
    raw = env.unwrapped
    assert raw.total_mass == 2.0 and raw.polemass_length == 1.5
    functional, params = diffgym.make("CartPole-v1", **CARTPOLE_REAL)
    assert params == real.params()
    env.reset(seed=0)
    state = functional.state_from_obs(jnp.asarray(raw.state, jnp.float32))
    obs, *_ = env.step(1)
    expected, *_ = functional.step_env(None, state, 1, params)
    np.testing.assert_allclose(obs, np.asarray(expected), rtol=1e-5, atol=1e-6)


def test_collect_logs_episodes_and_cuts_at_a_step_budget():
    real = sim2real.real_system("cartpole", CARTPOLE_REAL, backend="diffgym")
    policy = numpy_policy(load_policy_module(BUNDLED_CARTPOLE)[0])
    data = sim2real.collect(policy, real.make, steps=150, seed=4)
    assert data.steps == 150 and data.seeds == list(range(4, 4 + len(data.returns)))
    for obs, actions in zip(data.observations, data.actions):
        assert obs.shape == (len(actions) + 1, 4) and set(np.unique(actions)) <= {0, 1}
    # The controller falls within 150 steps here: the first episode ended by termination.
    assert len(data.returns) >= 2 and data.returns[0] == len(data.actions[0])
    again = sim2real.collect(policy, real.make, steps=150, seed=4)
    assert all(np.array_equal(a, b) for a, b in zip(data.observations, again.observations))
    explored = sim2real.collect(policy, real.make, steps=150, seed=4, exploration=0.5)
    assert not np.array_equal(explored.actions[0][:20], data.actions[0][:20])


def test_observation_noise_has_the_given_spread_and_follows_the_seed():
    real = sim2real.real_system("pendulum", {"m": 1.3}, obs_noise=0.05)
    hold = lambda obs: np.zeros(1, np.float32)  # noqa: E731
    noisy = sim2real.collect(hold, real.make, episodes=1, seed=0)
    clean = sim2real.collect(hold, dataclasses.replace(real, obs_noise=0.0).make, episodes=1, seed=0)
    # The noise does not touch the dynamics when the actions do not depend on what is seen.
    residual = noisy.observations[0] - clean.observations[0]
    assert residual.std() == pytest.approx(0.05, rel=0.1) and abs(residual.mean()) < 0.01
    repeat = sim2real.collect(hold, real.make, episodes=1, seed=0)
    np.testing.assert_array_equal(noisy.observations[0], repeat.observations[0])


def test_noisy_functional_env_keeps_the_dynamics():
    env, params = diffgym.make("Pendulum-v1")
    noisy = sim2real.NoisyObservations(env, 0.1)
    _, state = env.reset(jax.random.key(0), params)
    obs, next_state, reward, _, _ = noisy.step_env(jax.random.key(1), state, jnp.ones(1), params)
    clean_obs, clean_state, clean_reward, _, _ = env.step_env(None, state, jnp.ones(1), params)
    assert next_state == clean_state and reward == clean_reward
    assert 0 < float(jnp.max(jnp.abs(obs - clean_obs))) < 0.5


@pytest.mark.parametrize("budget", [100, 208, 400, 5000])
def test_ppo_configs_fit_the_real_step_budget(budget):
    from agents import ppo

    for env_id in ("cartpole", "pendulum"):
        config = sim2real._ppo_config_for_budget(ppo.default_config(env_id), budget)
        assert 0 < config.total_env_steps <= budget and config.batch_size <= budget
        assert config.batch_size % config.num_minibatches == 0 and config.target_return is None


def test_parse_assignments_and_real_system_errors():
    assert sim2real.parse_assignments(["m=1.3", "l = 0.7"]) == {"m": 1.3, "l": 0.7}
    with pytest.raises(ValueError, match="Did you mean 'masspole'"):
        sim2real.real_system("cartpole", {"maspole": 1.0})
    with pytest.raises(ValueError, match="must be a finite number, got nan"):
        sim2real.real_system("cartpole", {"masspole": float("nan")})
    with pytest.raises(ValueError, match="gymnasium has no numpy LotkaVolterra-v0"):
        sim2real.real_system("lotkavolterra", {"predation_rate": 1.2}, backend="gymnasium")
    with pytest.raises(ValueError, match="exactly one"):
        sim2real.collect(lambda obs: 0, sim2real.real_system("cartpole", {}).make, episodes=1, steps=5)


# --------------------------------------------------------------------------------------------
# The CLI's errors
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pendulum_log(tmp_path_factory):
    """A tiny log of Pendulum-shaped rows (3 entries), to feed to the CartPole fit by mistake."""
    path = tmp_path_factory.mktemp("log") / "pendulum.npz"
    np.savez(path, observations=np.zeros((4, 3)), actions=np.zeros((4, 1)), episode_starts=np.eye(4)[0] > 0)
    return path


@pytest.mark.parametrize(
    "argv, message",
    [
        (["identify", "--env", "cartpol", "--data", "{log}", "--out", "x"], "Did you mean 'cartpole'?"),
        (["identify", "--env", "cartpole", "--data", "missing.npz", "--out", "x"], "--data 'missing.npz': no such file"),
        (["identify", "--env", "cartpole", "--data", "{log}", "--out", "x", "--fit", "maspole"],
         "--fit 'maspole': CartPole-v1 has no parameter 'maspole'. Did you mean 'masspole'?"),
        (["identify", "--env", "cartpole", "--data", "{log}", "--out", "x", "--fit", "max_steps_in_episode"],
         "is not a real-valued parameter of CartPole-v1"),
        (["identify", "--env", "cartpole", "--data", "{log}", "--out", "x"],
         "the logged observations have shape (3,) per row; CartPole-v1's have (4,)"),
        (["identify", "--env", "acrobot", "--data", "{log}", "--out", "x"], "name the parameters to fit for Acrobot-v1"),
        (["identify", "--env", "pendulum", "--data", "{log}", "--out", "x", "--horizon", "0"], "--horizon must be at least 1"),
        (["sim2real", "--env", "cartpole", "--real", "maspole=1", "--out", "x"], "Did you mean 'masspole'?"),
        (["sim2real", "--env", "cartpole", "--real", "masspole", "--out", "x"], "--real takes PARAM=VALUE items"),
        (["sim2real", "--env", "cartpole", "--real", "masspole=heavy", "--out", "x"], "'heavy' is not a number"),
        (["sim2real", "--env", "cartpole", "--real", "masspole=1", "--out", "x", "--episodes", "0"],
         "--episodes must be at least 1"),
        (["sim2real", "--env", "cartpole", "--real", "masspole=1", "--out", "x", "--policy", "{empty}"],
         "no policy checkpoint in"),
        (["sim2real", "--env", "cartpole", "--real", "masspole=1", "--out", "x", "--fit", "lenght"],
         "Did you mean 'length'?"),
    ],
)  # fmt: skip
def test_bad_flags_exit_nonzero_saying_what_is_wrong(argv, message, pendulum_log, tmp_path, capsys):
    argv = [a.format(log=pendulum_log, empty=tmp_path) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("train-controller: error:") and message in err, err


@pytest.mark.parametrize("command, options", [("identify", ["--data", "--fit", "--horizon"]),
                                              ("sim2real", ["--real", "--obs-noise", "--episodes", "--no-ppo"])])  # fmt: skip
def test_help_documents_the_commands(command, options, capsys):
    assert main([command, "--help"]) == 0
    text = capsys.readouterr().out
    assert all(option in text for option in options)
