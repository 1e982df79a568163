"""Evaluation: how closely a model served without the prompt follows it (fidelity.py)."""
