"""Trained models made smaller: decomposing their layers (fitted to the kernels or, with
calibration data, to the layers' inputs), re-estimating their BatchNormalization statistics,
pruning them, fine-tuning them by distillation."""
