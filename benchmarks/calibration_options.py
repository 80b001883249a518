"""The options of calibrated compression side by side on one trained MLP: number of calibration
images, damping, the calibration mode (sequential, original, asymmetric), centred fit with bias correction.

Test accuracy on full Fashion-MNIST right after ``decompose(model, {hidden1, hidden2: EXPR}, data=...)``,
the MLP of ``compress_calibrated.py`` (saved there with ``--dense``), plus the weight-only fit.

    .venv/bin/python benchmarks/calibration_options.py runs/mlp_2ep.keras "lowrank(params=0.1)" --images 1000,5000
    .venv/bin/python benchmarks/calibration_options.py runs/mlp_2ep.keras "sketch(params=0.1)" --damping 0.001,0.1,1 --modes sequential,original
    .venv/bin/python benchmarks/calibration_options.py runs/mlp_2ep.keras "lowrank(params=0.1)" --center
    .venv/bin/python benchmarks/calibration_options.py runs/mlp_5ep.keras "monarch(params=0.1)" --modes sequential,asymmetric --center
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a trained .keras MLP with layers hidden1, hidden2")
    parser.add_argument("expression")
    parser.add_argument("--images", default="1000")
    parser.add_argument("--damping", default="0.01")
    parser.add_argument("--modes", default="sequential")
    parser.add_argument("--center", action="store_true", help="also the centred fit with bias correction")
    args = parser.parse_args()
    from keras_decomp.compression.decompose import decompose
    from keras_decomp.layers import load_model
    from keras_decomp.training.data import load

    data = load("fashion_mnist", source="full")
    x_train, x_test = data.x_train.astype("float32") / 255.0, data.x_test.astype("float32") / 255.0
    dense = load_model(args.model)

    def accuracy(model):
        return float(np.mean(np.argmax(model.predict(x_test, batch_size=512, verbose=0), axis=1) == data.y_test))
    expressions = {"hidden1": args.expression, "hidden2": args.expression}
    print(f"dense {accuracy(dense):.4f}; weight-only {accuracy(decompose(dense, expressions)):.4f}", flush=True)
    for images in (int(v) for v in args.images.split(",")):
        calibration = x_train[np.random.default_rng(0).choice(len(x_train), images, replace=False)]
        for damping in (float(v) for v in args.damping.split(",")):
            for mode in args.modes.split(","):
                for center in ((False, True) if args.center else (False,)):
                    t, errors = time.time(), {}
                    model = decompose(dense, expressions, data=calibration, damping=damping, calibration=mode,
                                      center=center, data_report=errors)
                    print(f"{args.expression} images={images} damping={damping} {mode} center={center}: "
                          f"{accuracy(model):.4f} data errors {[round(e, 3) for e in errors.values()]} "
                          f"({time.time() - t:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
