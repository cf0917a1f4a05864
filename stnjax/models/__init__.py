"""Network definitions as Flax Linen modules and pure forward functions."""
