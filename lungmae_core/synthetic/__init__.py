"""Synthetic data beyond the basic phantoms: the experiment's histogram-matched phantoms (``experiment_phantoms``)."""
