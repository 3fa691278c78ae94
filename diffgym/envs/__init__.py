"""diffgym's environments, one module each; every module's ``SPEC`` is registered here."""

from diffgym.envs import (
    acrobot,
    cartpole,
    continuous_mountain_car,
    kicked_cartpole,
    lotka_volterra,
    mountain_car,
    pendulum,
    trebuchet,
)
from diffgym.registry import register

for _module in (cartpole, pendulum, trebuchet, acrobot, mountain_car, continuous_mountain_car, lotka_volterra, kicked_cartpole):
    register(_module.SPEC)
