"""Controllers for diffgym's environments: BPTT through the simulator beside RL baselines.

``agents.load_policy(DIR)`` turns a checkpoint written by ``train-controller --out DIR`` into a
``policy(obs) -> action`` that acts directly on the gymnasium env it was trained for.
"""

from agents.policy import Policy, load_policy, save_policy

__all__ = ["Policy", "load_policy", "save_policy"]
