"""Controllers for diffgym's environments: BPTT through the simulator beside RL baselines."""
