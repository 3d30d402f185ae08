"""Trained models: scoring, calibration, evaluation, metrics, export and the registry."""
