"""diffgym's environments, one per module."""
