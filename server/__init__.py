"""Coordinator side: the Flower ServerApp, schedule, strategy, checkpoints, metrics, report."""
