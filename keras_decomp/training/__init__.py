"""Specs, data and training: YAML specs -> Keras models, Fashion-MNIST, staged
training with least-squares hand-overs, checkpoints and resume, distribution."""
