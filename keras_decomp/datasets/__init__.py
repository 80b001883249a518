"""Data files shipped with keras_decomp, read through ``keras_decomp.data``.

``fashion_mnist_subset/`` holds a small real subset of Fashion-MNIST in IDX format;
``scripts/make_subset.py`` in the source repository regenerates it.
"""
