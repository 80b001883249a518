"""Trained models made smaller: decomposing their layers, pruning them."""
