"""Guards against divergence: training stops, naming the layer, as soon as a loss or
a weight is not finite, and the last checkpoint (a good epoch) is kept."""

from __future__ import annotations

import numpy as np

from ..errors import DecompError


def non_finite_layers(model) -> list[str]:
    """The names of the layers whose trainable weights hold a NaN or an infinity."""
    import keras

    return [layer.name for layer in model.layers
            if any(not np.all(np.isfinite(keras.ops.convert_to_numpy(w))) for w in layer.trainable_weights)]


def finite_guard(stage: int, folder):
    """A Keras callback that stops training with a DecompError naming the layer whose
    weights became NaN or infinite (``folder``: the checkpoint it leaves alone)."""
    import keras

    class FiniteGuard(keras.callbacks.Callback):
        """Stops training with a DecompError naming the layer as soon as the loss is not finite
        (checked every batch: a non-finite loss is where diverging weights show first), and at
        every epoch's end before the checkpoint, so that the last checkpoint stays a good one."""

        def __init__(self, stage: int, folder):
            super().__init__()
            self.stage, self.folder, self.epoch = stage, folder, 0

        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch

        def on_train_batch_end(self, batch, logs=None):
            loss = (logs or {}).get("loss")
            if loss is not None and not np.isfinite(float(loss)):
                self.stop(f"the loss became {float(loss)} at batch {batch}")

        def on_epoch_end(self, epoch, logs=None):
            if non_finite_layers(self.model):
                self.stop("at the end of the epoch")

        def stop(self, when: str):
            bad = non_finite_layers(self.model)
            where = f"stage {self.stage}, epoch {self.epoch}, numbered from 0 as in report.json"
            if bad:
                fact = (f"training diverged ({where}): the weights of layer '{bad[0]}' became NaN or infinite"
                        + (f" (also {', '.join(repr(b) for b in bad[1:])})" if bad[1:] else "") + f", {when}")
            else:
                fact = f"training diverged ({where}): {when}, though every weight is still finite"
            raise DecompError(f"{fact}; stopped, the checkpoint in {self.folder} keeps the last good epoch",
                              hint="lower the learning rate (train.learning_rate or stages[i].learning_rate), "
                                   "then continue with --resume (resume=True)")

    return FiniteGuard(stage, folder)
