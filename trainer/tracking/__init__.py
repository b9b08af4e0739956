"""Experiment tracking (MLflow, rank 0) and plots."""
