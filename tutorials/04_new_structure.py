"""Tutorial 4: add a new structure to the language.

The trainable structures (dense, lowrank, sss, sparse, ...) are entries of a
registry.  A new one needs two things: an IR node (a frozen dataclass that says
which trainable arrays it owns and how to turn them into W), and a build
function that the registry calls with the checked arguments and the shape the
expression gives it.  This walk-through adds a Toeplitz matrix,

    toeplitz        W[i, j] = t[j - i]: one value per diagonal, rows + cols - 1 in all
    toeplitz(b=3)   banded: only the diagonals with |j - i| < b, the rest zero

uses it in expressions, checks it against its dense form, builds and trains a
Keras layer with it, and fits it to a matrix with keras_decomp.approximate.

Run it from the repository root:

    .venv/bin/python tutorials/04_new_structure.py          # under a minute
    .venv/bin/python tutorials/04_new_structure.py --fast   # fewer images and epochs
"""

import argparse
import math
import os
import tempfile
from dataclasses import dataclass

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # quiet TensorFlow's start-up messages

import numpy as np  # noqa: E402

import keras_decomp  # noqa: E402
from keras_decomp import DecompError, parse  # noqa: E402
from keras_decomp.operators.ir import Node  # noqa: E402
from keras_decomp.operators.structures.registry import Structure, register  # noqa: E402


def fast_mode() -> bool:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="fewer images and epochs, for tests")
    args = parser.parse_args()
    return args.fast or os.environ.get("KERAS_DECOMP_TUTORIAL_FAST") == "1"


# --- 1. the IR node ---------------------------------------------------------------------
# A node is a frozen dataclass with its shape (rows, cols).  It names its trainable
# arrays (own_params: key -> shape), draws their initial values (own_init) and
# builds W from them (materialize).  materialize gets ``xp``, an array namespace:
# numpy for to_dense and approximate, keras.ops inside a layer, so it may only use
# what both have (take, pad, matmul, ...).  Costs come from the shape alone.
@dataclass(frozen=True)
class Toeplitz(Node):
    """W[i, j] = t[j - i] on the kept diagonals, zero elsewhere."""

    key: str = ""
    band: int | None = None  # keep the diagonals with |j - i| < band; None keeps them all

    def offsets(self) -> np.ndarray:
        """The kept diagonals j - i, in increasing order: one parameter each."""
        rows, cols = self.shape
        every = np.arange(-(rows - 1), cols)
        return every if self.band is None else every[np.abs(every) < self.band]

    def slots(self) -> np.ndarray:
        """(rows, cols) int array: which entry of t each W[i, j] reads; len(t) reads zero."""
        rows, cols = self.shape
        offsets = self.offsets()
        diagonal = np.arange(cols)[None, :] - np.arange(rows)[:, None]
        slot = np.searchsorted(offsets, diagonal)
        kept = (slot < len(offsets)) & (offsets[np.minimum(slot, len(offsets) - 1)] == diagonal)
        return np.where(kept, slot, len(offsets))

    def own_params(self):
        return {self.key: (len(self.offsets()),)}

    def own_init(self, rng):
        rows, cols = self.shape
        limit = math.sqrt(6.0 / (rows + cols))  # Glorot-uniform scale for each entry of W
        return {self.key: rng.uniform(-limit, limit, len(self.offsets()))}

    def materialize(self, v, xp):
        padded = xp.pad(v[self.key], [[0, 1]])  # one zero at the end, for the dropped diagonals
        return xp.take(padded, self.slots(), axis=0)

    def build_cost(self):
        return math.prod(self.shape)  # a gather: one read per entry of W

    def label(self):
        return "toeplitz" if self.band is None else f"toeplitz(b={self.band})"

    # Optional: the exact least-squares fit in closed form.  approximate() would
    # solve any structure that is linear in its parameters by probing it one
    # parameter at a time; with solve_block it takes the mean of each diagonal.
    def solve_block(self, target, key, values):
        slots, n = self.slots().ravel(), len(self.offsets())
        sums = np.bincount(slots, weights=np.asarray(target, dtype=np.float64).ravel(), minlength=n + 1)
        counts = np.bincount(slots, minlength=n + 1)
        return {key: sums[:n] / counts[:n]}


# --- 2. the build function and the registry entry ------------------------------------
# The registry checks the arguments first: ``optional`` lists them with their
# defaults (``required`` those without), integers >= 1 where given.  ``size``
# names the argument that ``params=<fraction>`` may replace.  ``low.keys`` gives
# the node a key that is unique in the expression (two toeplitz in one expression
# are two matrices) and the same in every process.
def build_toeplitz(low, call, args, rows, cols, key):
    array_key, _ = low.keys(call, "toeplitz", key)
    return Toeplitz((rows, cols), key=array_key, band=args["b"])


def main() -> None:
    fast = fast_mode()
    rng = np.random.default_rng(0)

    print("=== before registering ===")
    try:
        parse("toeplitz(b=2)", 6, 4)
    except DecompError as err:
        print(f"{type(err).__name__}: {err}\n")

    register(Structure("toeplitz", build_toeplitz, optional={"b": None}, size="b"))

    # --- 3. in expressions -------------------------------------------------------------
    print("=== in expressions ===")
    small = parse("toeplitz", 5, 4).stages[0]
    t = np.arange(1.0, 9.0)  # 5 + 4 - 1 = 8 diagonals, from the bottom-left corner
    print("toeplitz on (5, 4) with t = 1..8:\n", small.to_dense({small.key: t}))
    banded = parse("toeplitz(b=2)", 5, 4).stages[0]
    print("toeplitz(b=2): the 3 diagonals around the main one:\n",
          banded.to_dense({banded.key: np.array([1.0, 2.0, 3.0])}))
    for text in ("toeplitz", "toeplitz(b=16)", "toeplitz(params=0.01)", "DCT2[:k] toeplitz",
                 "toeplitz + lowrank(r=1)", "sum(G, n=4) toeplitz(b=5)'"):
        d = parse("W = " + text, 784, 10, params={"k": 64})
        print(f"  {text:28} {d.num_params:>5} trainable parameters")
    print(parse("W = DCT2[:k] toeplitz + lowrank(r=1)", 784, 10, params={"k": 64}).summary())
    # Argument checks and near-misses come from the registry and the parser:
    for text in ("toeplitz(c=2)", "toeplitz(b=0)", "toeplits"):
        try:
            parse(text, 784, 10)
        except DecompError as err:
            print(f"{type(err).__name__}: {err}")

    # --- 4. checked against its dense form --------------------------------------------
    print("\n=== checks ===")
    node = parse("toeplitz(b=7)", 40, 30).stages[0]
    values = node.init(rng)
    W = node.to_dense(values)
    x = rng.normal(size=(3, 40))
    print("constant along diagonals:", bool(np.allclose(W[1:, 1:], W[:-1, :-1])),
          "| zero outside the band:", bool(np.all(np.triu(W, 7) == 0) and np.all(np.tril(W, -7) == 0)),
          "| apply == x @ to_dense:", bool(np.allclose(node.apply(x, values, np), x @ W)))

    # --- 5. in a Keras layer -----------------------------------------------------------
    # keras_decomp.layers.Dense builds it like any other expression: one variable per
    # trainable array, materialize() through keras.ops inside call().
    print("\n=== in a layer ===")
    import keras

    from keras_decomp.training.data import load

    layer = keras_decomp.layers.Dense(10, W="toeplitz(b=64)", name="toe")
    xs = rng.random((4, 784)).astype("float32")
    y = np.asarray(layer(xs))
    Wl = np.asarray(layer.materialize())
    print(f"layer '{layer.name}': {layer.count_params()} parameters; "
          f"max |layer(x) - (x @ W + b)| = {np.max(np.abs(y - (xs @ Wl + np.asarray(layer.bias)))):.1e}")

    images, epochs = (1024, 2) if fast else (5000, 6)
    data = load("fashion_mnist", source="bundled")
    x_train, y_train = data.x_train[:images] / np.float32(255), data.y_train[:images]
    x_test, y_test = data.x_test / np.float32(255), data.y_test
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input(data.input_shape), keras.layers.Flatten(),
                              keras_decomp.layers.Dense(64, W="DCT2[:k] toeplitz", params={"k": 128},
                                                        activation="relu", name="hidden"),
                              keras_decomp.layers.Dense(10, W="toeplitz", name="logits")])
    model.compile(optimizer=keras.optimizers.Adam(1e-2), metrics=["accuracy"],
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x_train, y_train, batch_size=64, epochs=epochs, verbose=0)
    _, accuracy = model.evaluate(x_test, y_test, verbose=0)
    # A saved model stores the expressions; loading it needs the structure registered.
    with tempfile.TemporaryDirectory() as folder:
        model.save(f"{folder}/toeplitz.keras")
        again = keras_decomp.load_model(f"{folder}/toeplitz.keras")
        same = np.allclose(model.predict(x_test[:8], verbose=0), again.predict(x_test[:8], verbose=0), atol=1e-5)
    print(f"MLP 784 -(DCT2[:128] toeplitz)-> 64 -(toeplitz)-> 10: {model.count_params()} parameters; "
          f"saved and loaded: {'same outputs' if same else 'DIFFERENT outputs'}")

    # --- 6. in approximate() -------------------------------------------------------------
    # approximate() sees a node that is linear in its one parameter array and solves
    # the least-squares problem exactly (here through solve_block).
    print("\n=== in approximate() ===")
    from keras_decomp.fitting.approximate import fit

    target = node.to_dense(values) + 0.01 * rng.normal(size=node.shape)
    result = fit(target, "toeplitz(b=7)")
    design = np.stack([node.to_dense({node.key: e}).ravel() for e in np.eye(len(node.offsets()))], axis=1)
    reference = np.linalg.lstsq(design, target.ravel(), rcond=None)[0]
    print(f"fit of a noisy banded Toeplitz matrix: method '{result.method}', relative error "
          f"{result.rel_error:.3f}; max |t - lstsq| = {np.max(np.abs(result.values[node.key] - reference)):.1e}")
    # ... and so staged training and decompose() can hand over to it: here the
    # trained output layer is re-fitted as a narrower band.
    kernel = np.asarray(model.get_layer("logits").materialize(), dtype=np.float64)
    for text in ("toeplitz(b=8)", "toeplitz(b=32)", "toeplitz"):
        _, error = keras_decomp.approximate(kernel, text)
        print(f"  trained logits kernel as {text:15} relative error {error:.3f}")
    print(f"\nfinal test accuracy: {accuracy:.4f}")


if __name__ == "__main__":
    main()
