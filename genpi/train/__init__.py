"""Training: example builders, losses (GenPI and baselines), QLoRA, per-prompt training."""
