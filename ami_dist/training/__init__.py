"""Training: losses, optimizers, the MLE loop, evaluation and checkpoints."""
