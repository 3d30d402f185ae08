"""Training: the train stage, augmentation, checkpoints, distributed setup."""
