"""Pruning with masks: ``prune`` zeroes a fraction of every Dense kernel and
returns a model whose pruned weights stay exactly zero through fine-tuning;
``strip`` turns it back into plain Dense layers for export; ``shrink`` is the
structured alternative (every kernel replaced by its tri-factorised form).

Scores, per kernel (the lowest are pruned):

- ``method="magnitude"``: |w|, the classic baseline;
- ``method="trifactor"``: all Dense kernels of the model, neighbours sharing
  the factor of the layer of neurons between them, are tri-factorised
  together (``keras_decomp.trifactor``, after Rostan's "Neural network
  pruning with simultaneous matrix tri-factorization"), W_j ~ G_j S_j G_{j+1}^T;
  with ``criterion="approximation"`` the score is |w_hat|, the magnitude of
  the weight's low-rank approximation, with ``criterion="paper"`` it is the
  paper's literal rule, prune where |w| - |w_hat| < threshold.

Every pruned layer loses exactly round(sparsity * size) weights; ties are
broken by position (row-major: the earlier weight goes first), so the masks
are deterministic.  A layer that is pruned already keeps its zeros.

Which works better (``benchmarks/prune_mnist.py``; BENCHMARKS.md, "Pruning
with tri-factorisation"; Fashion-MNIST MLPs with two and five hidden layers,
50-95% sparsity, 5 epochs of fine-tuning): magnitude pruning is at least as
good.  ``trifactor`` with the default ranks ties it after fine-tuning (-0.4
to +0.9 points on the full data; on the bundled subset within the seed spread
for two hidden layers, 0.6-0.7 points behind at 80-90% for five); before
fine-tuning it is ahead at 80-95% on the full data (+2 to +15 points, one
seed).  The paper's literal criterion is clearly worse: -0.1 to -5.5 points at
50-80%, -8 to -15 at 90%, -18.5 to -27 at 95% (subset, 3 seeds; -0.1 to -10.6
on the full data).  Small ranks hurt trifactor badly, above all an output
rank below the number of classes (-30 points at 90% with a tenth of every
width).

The masked layer is ``PrunedDense``: a ``keras.layers.Dense`` that multiplies
its kernel by a non-trainable 0/1 ``prune_mask`` weight in ``call`` (pruned
weights get no gradient) and gives the kernel variable a constraint that
multiplies it by the mask after every optimizer step (so the kernel itself is
exactly zero there whatever the optimizer does).  The mask is a weight: a
``.keras`` file keeps it.  Loading needs this module imported (it registers
the class), e.g. by touching ``keras_decomp.prune`` before
``keras.saving.load_model``.

>>> import keras, numpy as np
>>> model = keras.Sequential([keras.Input((20,)), keras.layers.Dense(16, activation="relu"),
...                           keras.layers.Dense(3)])
>>> pruned = prune(model, method="trifactor", sparsity=0.75)
>>> list(mask_sparsity(pruned).values())
[0.75, 0.75]
>>> plain = strip(pruned)
>>> x = np.ones((2, 20), "float32")
>>> bool(np.allclose(plain(x), pruned(x))), type(plain.layers[0]).__name__
(True, 'Dense')
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from ..errors import DecompError
from ..fitting.trifactor import trifactorize
from ..layers.pruned import PrunedDense
from ..layers.tying import tying

METHODS = ("trifactor", "magnitude")
CRITERIA = ("approximation", "paper")


# ---- public functions ---------------------------------------------------------------

def prune(model, method: str = "trifactor", sparsity: float = 0.9, ranks=None, layers=None,
          criterion: str = "approximation", sweeps: int = 30, report: dict | None = None):
    """A copy of ``model`` whose Dense layers (or those named in ``layers``) have
    ``sparsity`` of their kernel weights pruned, held at zero by masks.

    ``ranks`` (trifactor only; the factorisation covers every chain of Dense
    layers, so unpruned neighbours inform it too): the rank of each layer of
    neurons of the chain, as in ``keras_decomp.trifactor.trifactorize`` (one
    int for all, a fraction of each width, or one per layer of neurons);
    default a quarter of each width, at least 16.  ``sweeps`` of alternating
    least squares: 30 by default (on the benchmark's MLP, 98-100% of each
    mask agrees with 100 sweeps').  Biases are not pruned.  A compiled
    model's compile settings carry over (with a fresh optimizer), ready for
    fine-tuning.  ``report``, if given, receives per pruned layer its
    sparsity and, for trifactor, the approximation's relative error.
    """
    if method not in METHODS:
        raise DecompError(f"method must be one of {METHODS}, got {method!r}")
    if criterion not in CRITERIA:
        raise DecompError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
        raise DecompError(f"sparsity must be a fraction in [0, 1), got {sparsity!r}")
    targets = _targets(model, layers)
    kernels = {layer.name: _kernel(layer) for layer in model.layers if _prunable(layer)}
    errors = {}
    if method == "magnitude":
        scores = {name: np.abs(kernels[name]) for name in targets}
    else:
        approximations = _approximations(model, kernels, ranks, sweeps, errors)
        scores = {name: _score(kernels[name], approximations[name], criterion) for name in targets}
    masks = {name: keep_mask(scores[name], sparsity, _old_mask(model.get_layer(name))) for name in targets}
    new = _rebuild(model, lambda layer: layer.name in masks, _pruned_clone)
    for old, layer in zip(model.layers, new.layers):
        if old.name in masks:
            layer.kernel.assign((kernels[old.name] * masks[old.name]).astype(layer.kernel.dtype))
            layer.prune_mask.assign(masks[old.name].astype(layer.prune_mask.dtype))
            if old.bias is not None:
                layer.bias.assign(ops.convert_to_numpy(old.bias))
        else:
            layer.set_weights(old.get_weights())
    if report is not None:
        report.update({name: {"sparsity": float(1 - masks[name].mean()),
                              **({"approximation_error": errors[name]} if name in errors else {})}
                       for name in masks})
    return new


def strip(model):
    """A copy of ``model`` with every ``PrunedDense`` replaced by a plain
    ``keras.layers.Dense`` holding the same kernel (zeros in place): no masks,
    for export and saving without this package.  Outputs are unchanged."""
    new = _rebuild(model, lambda layer: isinstance(layer, PrunedDense),
                   lambda layer: keras.layers.Dense.from_config(layer.get_config()))
    for old, layer in zip(model.layers, new.layers):
        if isinstance(old, PrunedDense):
            kernel = ops.convert_to_numpy(old.kernel) * ops.convert_to_numpy(old.prune_mask)
            layer.set_weights([kernel] + ([ops.convert_to_numpy(old.bias)] if old.bias is not None else []))
        else:
            layer.set_weights(old.get_weights())
    return new


def mask_sparsity(model) -> dict:
    """{layer name: fraction of its kernel that its mask prunes} for every PrunedDense."""
    return {layer.name: float(1.0 - np.mean(ops.convert_to_numpy(layer.prune_mask), dtype=np.float64))
            for layer in model.layers if isinstance(layer, PrunedDense)}


def shrink(model, ranks=None, layers=None, sweeps: int = 100, report: dict | None = None):
    """Structured shrinking: a copy of ``model`` whose Dense layers (or those
    named in ``layers``) become ``keras_decomp.layers.Dense`` with the
    tri-factorised kernel of the chain they belong to,

        W_j = c_g{j}[:k_j] c_s{j} (c_g{j+1}[:k_{j+1}])'   (c = "shrink<chain>_")

    the factor of each hidden layer of neurons one variable shared by the two
    kernels around it, all initialised from ``trifactorize`` (``ranks`` as in
    ``prune``).  Activations stay as wide as before; each kernel becomes a
    product through k-wide bottlenecks, with fewer parameters when the ranks
    are small.  ``report`` receives per layer its expression and relative error.
    """
    from ..layers.convert import decomposed_from

    names = _targets(model, layers)
    groups = chains(model, names)
    if ranks is not None and not isinstance(ranks, (int, float)) and len(groups) > 1:
        raise DecompError(f"the layers form {len(groups)} chains, so ranks cannot be one list",
                          hint="give one int or a fraction for all layers")
    plan, values = {}, {}
    for c, chain in enumerate(groups):
        fit = trifactorize([_kernel(model.get_layer(n)) for n in chain], ranks=ranks, sweeps=sweeps)
        g = [f"shrink{c}_g{j}" for j in range(len(chain) + 1)]
        for j, name in enumerate(chain):
            s = f"shrink{c}_s{j}"
            plan[name] = (f"{g[j]}[:{fit.ranks[j]}] {s} ({g[j + 1]}[:{fit.ranks[j + 1]}])'", fit.errors[j])
            values.update({g[j]: fit.G[j], s: fit.S[j], g[j + 1]: fit.G[j + 1]})

    def decomposed(layer):
        return decomposed_from(layer, plan[layer.name][0])

    new = _rebuild(model, lambda layer: layer.name in plan, decomposed)
    for old, layer in zip(model.layers, new.layers):
        if old.name in plan:
            for key, variable in layer.decomposition_variables.items():
                variable.assign(values[key].astype(variable.dtype))
            if old.bias is not None:
                layer.bias.assign(ops.convert_to_numpy(old.bias))
        else:
            layer.set_weights(old.get_weights())
    if report is not None:
        report.update({name: {"expression": expr, "approximation_error": error}
                       for name, (expr, error) in plan.items()})
    return new


def keep_mask(score, sparsity: float, keep=None) -> np.ndarray:
    """0/1 mask (float32) pruning the round(sparsity * size) lowest scores;
    equal scores go in row-major order.  Where ``keep`` is 0 the weight is
    pruned already and stays pruned.

    >>> keep_mask(np.array([[3.0, 1.0], [1.0, 2.0]]), 0.5)
    array([[1., 0.],
           [0., 1.]], dtype=float32)
    """
    score = np.asarray(score, dtype=np.float64)
    count = int(np.floor(sparsity * score.size + 0.5))
    flat = score.ravel().copy()
    if keep is not None:
        dead = np.asarray(keep).ravel() == 0
        if dead.sum() > count:
            raise DecompError(f"{int(dead.sum())} of {score.size} weights are pruned already, more than the "
                              f"{count} that sparsity={sparsity:g} asks for", hint="ask for a higher sparsity")
        flat[dead] = -np.inf
    order = np.argsort(flat, kind="stable")
    mask = np.ones(score.size, dtype=np.float32)
    mask[order[:count]] = 0.0
    return mask.reshape(score.shape)


# ---- scores --------------------------------------------------------------------------

def _score(w, w_hat, criterion):
    if criterion == "paper":  # prune where |w| - |w_hat| is below the threshold
        return np.abs(w) - np.abs(w_hat)
    return np.abs(w_hat)


def chains(model, names=None) -> list[list[str]]:
    """The Dense layers (those in ``names``, else all) in model order, cut into
    chains of neighbours: one layer's units are the next one's inputs."""
    out, last = [], None
    for layer in model.layers:
        if not _prunable(layer) or (names is not None and layer.name not in names):
            continue
        rows, cols = tuple(layer.kernel.shape)
        if last is not None and last == rows:
            out[-1].append(layer.name)
        else:
            out.append([layer.name])
        last = cols
    return out


def _approximations(model, kernels, ranks, sweeps, errors) -> dict:
    """name -> w_hat from the simultaneous tri-factorisation of each chain."""
    out = {}
    groups = chains(model)
    if ranks is not None and not isinstance(ranks, (int, float)) and len(groups) > 1:
        raise DecompError(f"the model has {len(groups)} chains of Dense layers, so ranks cannot be one list",
                          hint="give one int or a fraction for all layers")
    for names in groups:
        fit = trifactorize([kernels[n] for n in names], ranks=ranks, sweeps=sweeps)
        for j, name in enumerate(names):
            out[name] = fit.approximation(j)
            errors[name] = fit.errors[j]
    return out


# ---- models ---------------------------------------------------------------------------

def _prunable(layer) -> bool:
    return type(layer) in (keras.layers.Dense, PrunedDense)


def _targets(model, names) -> list[str]:
    prunable = [layer.name for layer in model.layers if _prunable(layer)]
    if names is None:
        if not prunable:
            raise DecompError("the model has no Dense layers to prune")
        return prunable
    by_name = {layer.name: layer for layer in model.layers}
    for name in names:
        if name not in by_name:
            raise DecompError(f"the model has no layer '{name}'", hint="layers: " + ", ".join(by_name))
        if not _prunable(by_name[name]):
            raise DecompError(f"layer '{name}' is a {type(by_name[name]).__name__}; only keras Dense layers "
                              "can be pruned")
    return list(dict.fromkeys(names))


def _kernel(layer) -> np.ndarray:
    kernel = np.asarray(ops.convert_to_numpy(layer.kernel), dtype=np.float64)
    old = _old_mask(layer)
    return kernel if old is None else kernel * old


def _old_mask(layer):
    return ops.convert_to_numpy(layer.prune_mask) if isinstance(layer, PrunedDense) else None


def _pruned_clone(layer):
    return PrunedDense.from_config(layer.get_config())


def _rebuild(model, chosen, make):
    """``model`` cloned, the layers where ``chosen`` holds made by ``make``;
    weights are the caller's to copy.  Named parameters of keras_decomp
    layers stay tied; a compiled model's compile settings carry over."""

    def clone(layer):
        return make(layer) if chosen(layer) else layer.__class__.from_config(layer.get_config())

    with tying():
        new = keras.models.clone_model(model, clone_function=clone)
    if getattr(model, "compiled", False) and model.get_compile_config():
        new.compile_from_config(model.get_compile_config())
    return new
