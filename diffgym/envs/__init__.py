"""diffgym's environments, one module each; every module's ``SPEC`` is registered here."""

from diffgym.envs import cartpole, pendulum, trebuchet
from diffgym.registry import register

for _module in (cartpole, pendulum, trebuchet):
    register(_module.SPEC)
