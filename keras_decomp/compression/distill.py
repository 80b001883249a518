"""Fine-tuning a compressed model by distillation from the original one.

The student is trained on alpha * T^2 * KL(softmax(t / T) || softmax(s / T))
plus (1 - alpha) times the labels' cross-entropy, t and s the teacher's and
the student's logits, T the temperature (Hinton et al.; T^2 keeps the soft
term's gradients on the scale of the hard one's).  A model whose last layer
applies softmax gives probabilities; their logarithms serve as logits.

The teacher's logits are computed once per batch before training and travel
with the labels (``y`` = [label, teacher logits...]), so the student trains
with an ordinary ``fit`` on any backend.

>>> import numpy as np
>>> same = np.array([[1.0, 2.0]])
>>> round(float(distillation_loss(np.array([1]), same, same, alpha=1.0)), 6)  # no KL between equal logits
0.0
>>> round(float(distillation_loss(np.array([0]), np.array([[2.0, 0.0]]), same, alpha=0.0)), 6)  # log(1 + e^-2)
0.126928
"""

from __future__ import annotations

import numpy as np

from ..errors import DecompError


def distillation_loss(labels, student_logits, teacher_logits, temperature: float = 2.0, alpha: float = 0.5):
    """Mean over the batch of alpha T^2 KL(p_t^T || p_s^T) + (1 - alpha) CE(labels, p_s)."""
    import keras

    ops = keras.ops
    s = ops.convert_to_tensor(student_logits, "float32")
    t = ops.convert_to_tensor(teacher_logits, "float32")
    log_ps = ops.log_softmax(s / temperature, axis=-1)
    log_pt = ops.log_softmax(t / temperature, axis=-1)
    kl = ops.sum(ops.exp(log_pt) * (log_pt - log_ps), axis=-1)
    labels = ops.cast(ops.reshape(labels, (-1,)), "int32")
    hard = -ops.take_along_axis(ops.log_softmax(s, axis=-1), labels[:, None], axis=-1)[:, 0]
    return ops.mean(alpha * temperature ** 2 * kl + (1.0 - alpha) * hard)


def fine_tune(student, teacher, data, epochs: int = 1, temperature: float = 2.0, alpha: float = 0.5,
              batch_size: int = 128, learning_rate: float = 1e-3, verbose: int = 0):
    """Train ``student`` for ``epochs`` on ``data`` = (x, y) arrays or a
    tf.data.Dataset of (x, y) batches, distilling from ``teacher``; returns
    the Keras History.  The student is compiled afresh (Adam at
    ``learning_rate``, the loss above, accuracy on the labels) and, when done,
    with the labels' cross-entropy, so that it saves and loads as usual."""
    import keras

    if not 0.0 <= alpha <= 1.0:
        raise DecompError(f"alpha must be in [0, 1], got {alpha}")
    if not temperature > 0:
        raise DecompError(f"temperature must be positive, got {temperature}")
    teacher_logits = _logit_fn(teacher)
    student_probs = _outputs_probabilities(student)

    def loss(y, scores):
        logits = keras.ops.log(keras.ops.maximum(scores, 1e-12)) if student_probs else scores
        return distillation_loss(y[:, 0], logits, y[:, 1:], temperature, alpha)

    def accuracy(y, scores):
        return keras.ops.mean(keras.ops.cast(
            keras.ops.equal(keras.ops.cast(keras.ops.argmax(scores, axis=-1), "int32"), keras.ops.cast(y[:, 0], "int32")),
            "float32"))

    student.compile(optimizer=keras.optimizers.Adam(learning_rate), loss=loss, metrics=[accuracy])
    if isinstance(data, tuple):
        x, y = data
        packed = np.concatenate([np.asarray(y, "float32").reshape(-1, 1),
                                 teacher_logits(x, batch_size)], axis=1)
        history = student.fit(x, packed, epochs=epochs, batch_size=batch_size, verbose=verbose)
    else:
        import tensorflow as tf

        def pack(x, y):
            t = teacher_logits(x, None)
            return x, tf.concat([tf.cast(tf.reshape(y, (-1, 1)), "float32"), t], axis=1)
        history = student.fit(data.map(pack), epochs=epochs, verbose=verbose)
    student.compile(optimizer=keras.optimizers.Adam(learning_rate), metrics=["accuracy"],
                    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=not student_probs))
    return history


def _outputs_probabilities(model) -> bool:
    import keras

    return getattr(model.layers[-1], "activation", None) is keras.activations.softmax


def _logit_fn(teacher):
    """(x, batch_size) -> the teacher's logits (its outputs' logarithms when it
    ends in softmax); batch_size None: one symbolic batch (inside tf.data)."""
    import keras

    probabilities = _outputs_probabilities(teacher)

    def logits(x, batch_size):
        out = teacher.predict(x, batch_size=batch_size, verbose=0) if batch_size else teacher(x, training=False)
        if probabilities:
            out = keras.ops.log(keras.ops.maximum(out, 1e-12))
        return np.asarray(out, "float32") if batch_size else keras.ops.cast(out, "float32")
    return logits
