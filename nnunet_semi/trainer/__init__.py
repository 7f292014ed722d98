"""The semi-supervised base trainer and what it owns: checkpoint state, progress plots, trainer lookup."""
