"""Tutorial 2: a decomposed LeNet, trained in stages.

An expression with `|` has several training stages.  keras_decomp.fit_staged
trains the first stage, multiplies each decomposed layer's W out, fits the next
stage's parameters to it by least squares (the hand-over), keeps the biases and
the other layers, and trains on.  This walk-through trains a LeNet whose
kernels are all decomposed (adapted from specs/lenet_prodsum.yaml) on the
Fashion-MNIST subset bundled with the package, and prints the accuracy of
every stage and the error of every hand-over.

Run it from the repository root:

    .venv/bin/python tutorials/02_staged_lenet.py          # a few minutes on a CPU
    .venv/bin/python tutorials/02_staged_lenet.py --fast   # ~30 s: 1024 images, 1 epoch a stage

The model, its checkpoints and report.json go to --out (default runs/tutorial_02).
"""

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # quiet TensorFlow's start-up messages

import keras_decomp  # noqa: E402

# --- the spec ---------------------------------------------------------------------
# A spec names its layers with Keras's own class names and arguments and adds W:
# where a kernel is decomposed.  Every W below has two stages; a layer whose
# expression has fewer stages than the model would keep its last one.
#
#   conv 1    sum(G, n=20) | dense          20 coefficients of fixed Gaussian kernels,
#                                           then the full 5x5x1x32 kernel
#   conv 2    sum(G, n=40) | sum(G, n=80)   the first 40 of the 80 draws are the 40
#                                           of stage 1: the hand-over loses nothing
#   hidden    sum(G, n=20) + sum(R, n=100)  full-rank plus rank-1 random terms, then
#             | lowrank(r=R)                a trainable low-rank matrix: the hand-over
#                                           is a truncated SVD and does lose something
#   output    sum(G, n=10) | dense          10 coefficients, then a dense 10-class layer
SPEC = """
name: tutorial_staged_lenet
seed: 0
input: {shape: [28, 28, 1]}
params: {r: RANK}
layers:
  - Conv2D: {filters: 32, kernel_size: 5, padding: same, activation: relu, W: "sum(G, n=20) | dense"}
  - MaxPooling2D: {pool_size: 2}
  - Conv2D: {filters: 64, kernel_size: 5, padding: same, activation: relu, W: "sum(G, n=40) | sum(G, n=80)"}
  - MaxPooling2D: {pool_size: 2}
  - Flatten: {}
  - Dense: {units: UNITS, activation: relu, W: "sum(G, n=20) + sum(R, n=100) | lowrank(r=r)"}
  - Dropout: {rate: 0.5}
  - Dense: {units: 10, W: "sum(G, n=10) | dense"}
data: {name: fashion_mnist, source: bundled, limit: LIMIT}
train: {batch_size: 128, optimizer: adam, learning_rate: 1.0e-2}
stages: [{epochs: EPOCHS}, {epochs: EPOCHS, learning_rate: 2.0e-3}]
"""


def options():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="1024 images, 1 epoch a stage, a small hidden layer")
    parser.add_argument("--out", default="runs/tutorial_02", help="where the model and report go")
    args = parser.parse_args()
    args.fast = args.fast or os.environ.get("KERAS_DECOMP_TUTORIAL_FAST") == "1"
    return args


def main() -> None:
    args = options()
    # The paper's hidden layer has 1024 units; the fast mode uses 128 and a
    # fraction of the bundled 5000/1000 images.
    sizes = ({"UNITS": 128, "RANK": 8, "LIMIT": 1024, "EPOCHS": 1} if args.fast else
             {"UNITS": 1024, "RANK": 32, "LIMIT": 5000, "EPOCHS": 3})
    text = SPEC
    for key, value in sizes.items():
        text = text.replace(key, str(value))

    # load_spec checks the whole spec (keys, Keras arguments, every expression
    # for its layer's shape) before anything is built or trained.
    spec = keras_decomp.load_spec(text)
    print(f"spec '{spec.name}': {spec.num_stages} stages, {len(spec.layers)} layers")
    for stage in range(spec.num_stages):
        model = keras_decomp.build(spec, stage=stage)
        print(f"\nstage {stage}: {model.count_params():,} parameters in all "
              f"({sum(v.numpy().size for v in model.trainable_variables):,} trainable)")
        keras_decomp.summarize(model)

    # fit_staged trains every stage in turn.  It writes a checkpoint after every
    # epoch and every hand-over under --out; with resume=True an interrupted run
    # would continue where it stopped.
    print("\ntraining ...")
    report = keras_decomp.fit_staged(spec, source="bundled", out=args.out, verbose=2)

    # The report has one entry per stage: its trainable parameters, the relative
    # error ||W_old - W_new|| / ||W_old|| of each layer's hand-over, and the test
    # accuracy before the hand-over (end of the previous stage), right after it
    # (before any training of the new stage) and at the end of the stage.
    print("\nstage  trainable  accuracy after hand-over  accuracy at end")
    for entry in report["stages"]:
        after = entry["accuracy_after_handover"]
        print(f"{entry['stage']:>5}  {entry['trainable_params']:>9,}  "
              f"{'-' if after is None else f'{after:.4f}':>24}  {entry['accuracy_end']:>15.4f}")
    print("\nhand-over errors (stage 0 -> stage 1), relative Frobenius norm:")
    for layer, error in report["stages"][1]["handover_error"].items():
        print(f"  {layer:10} {error:.2e}")
    # The sums of Gaussians line up and the dense stages can hold any matrix, so
    # their errors are at rounding level; the low-rank stage keeps the top
    # singular directions of the hidden layer's W, and the accuracy right after
    # the hand-over shows how much that costs before training recovers it.
    print(f"\nmodel and report: {args.out}/model.keras, {args.out}/report.json")
    print(f"final test accuracy: {report['test_accuracy']:.4f} "
          f"({report['trainable_params']:,} trainable parameters, data: {report['data_source']})")


if __name__ == "__main__":
    main()
