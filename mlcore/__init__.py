"""Code both sides of the range use: architectures, datasets, MI, training, checkpoints, wire."""
