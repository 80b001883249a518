"""Running the same spec on several devices or machines, unchanged.

TensorFlow backend: ``tf.distribute.MirroredStrategy`` (the devices of one
machine) and ``MultiWorkerMirroredStrategy`` (the machines named in TF_CONFIG).
JAX backend: ``keras.distribution.DataParallel`` over the devices of one
machine.  Training code asks ``current()`` where it runs: only the chief writes
files, and what one process computes for all (the stage hand-over) is computed
on the chief and sent to the others with ``broadcast``.

>>> dist = make(None)
>>> dist.is_chief, dist.num_replicas
(True, 1)
>>> with dist.scope():
...     current() is dist
True
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import threading

import numpy as np

from ..errors import DecompError

KINDS = ("mirrored", "multi-worker")
_active = threading.local()
_made: dict = {}  # kind -> Distribution: one strategy per process


class Distribution:
    """Where training runs: ``kind`` (None: one device), the TensorFlow strategy
    or the Keras (JAX) distribution, and this process's place in the cluster."""

    def __init__(self, kind: str | None = None, strategy=None, keras_distribution=None):
        self.kind = kind
        self.strategy = strategy
        self.keras_distribution = keras_distribution

    @contextlib.contextmanager
    def scope(self):
        """Build, compile, fit and save inside: variables are created mirrored
        (or replicated on JAX) and ``current()`` returns this distribution."""
        if self.strategy is not None:
            inner = self.strategy.scope()
        elif self.keras_distribution is not None:
            inner = self.keras_distribution.scope()
        else:
            inner = contextlib.nullcontext()
        previous = getattr(_active, "distribution", None)
        _active.distribution = self
        try:
            with inner:
                yield self
        finally:
            _active.distribution = previous

    @property
    def is_chief(self) -> bool:
        """True in the process that writes checkpoints and outputs."""
        if self.kind != "multi-worker":
            return True
        resolver = self.strategy.cluster_resolver
        return _is_chief(resolver.cluster_spec().as_dict(), resolver.task_type, resolver.task_id)

    @property
    def num_replicas(self) -> int:
        """Replicas training in sync: each takes an equal part of the global batch."""
        if self.strategy is not None:
            return int(self.strategy.num_replicas_in_sync)
        if self.keras_distribution is not None:
            return int(self.keras_distribution.device_mesh.devices.size)
        return 1

    def describe(self) -> dict:
        """For the report: the kind, the number of replicas and the backend that ran them."""
        backend = "jax" if self.keras_distribution is not None else "tensorflow" if self.strategy is not None else None
        return {"kind": self.kind, "replicas": self.num_replicas, "backend": backend}

    def shard(self, dataset):
        """``dataset`` (the same pipeline on every worker, batched with the global
        batch size) marked for the strategy to split by elements.  The in-memory
        pipelines have no files to split, so DATA is what AUTO would fall back to,
        without its warning."""
        if self.strategy is None:
            return dataset
        import tensorflow as tf

        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
        return dataset.with_options(options)

    def check_batches(self, batch_size: int, split_sizes: dict) -> None:
        """On JAX every batch is split evenly over the devices, the last partial
        batch of each split included (TensorFlow strategies split unevenly)."""
        r = self.num_replicas
        if self.keras_distribution is None or r == 1:
            return
        for what, n in split_sizes.items():
            last = n % batch_size or batch_size
            if batch_size % r or last % r:
                raise DecompError(
                    f"on the JAX backend every batch is split evenly over {r} devices, but the batch size is "
                    f"{batch_size} and the last {what} batch has {min(last, n)} examples",
                    hint=f"choose train.batch_size and data.limit so that both are multiples of {r}, "
                         "or use the TensorFlow backend")

    def broadcast(self, values: dict) -> dict:
        """The chief's ``values`` (numpy arrays) in every process, as float64.

        Every worker calls it with arrays of the same shapes (what a non-chief
        passes is ignored).  One process (one device, mirrored, JAX): ``values``.
        """
        if self.kind != "multi-worker":
            return values
        import tensorflow as tf

        keys = sorted(values)
        shapes = [np.shape(values[k]) for k in keys]
        flat = np.concatenate([np.asarray(values[k], dtype=np.float64).ravel() for k in keys] + [np.zeros(0)])
        # An all-reduce sum to which only the chief's first replica contributes:
        # x + 0 + ... + 0 is x exactly, whatever the number of workers and devices.
        sent = []

        def share(context):
            if self.is_chief and not sent:
                sent.append(True)
                return tf.constant(flat)
            return tf.zeros(flat.shape, tf.float64)

        per_replica = self.strategy.experimental_distribute_values_from_function(share)
        total = self.strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None).numpy()
        out, start = {}, 0
        for key, shape in zip(keys, shapes):
            size = int(np.prod(shape))
            out[key] = total[start:start + size].reshape(shape)
            start += size
        return out

    def save(self, model, path) -> bool:
        """Save ``model`` at ``path`` on the chief; elsewhere into a folder that is
        deleted at once.  Returns whether ``path`` was written.

        Under MultiWorkerMirroredStrategy saving a Keras 3 model is collective
        (it reads the metrics' on-read variables, reduced over all workers, and
        creates a variable, which the strategy initialises by broadcast), so
        every worker must save, in the same order, or the chief waits forever.
        """
        if self.is_chief:
            model.save(path)
            return True
        with tempfile.TemporaryDirectory(prefix="keras-decomp-worker-") as folder:
            model.save(os.path.join(folder, "model.keras"))
        return False


def current() -> Distribution:
    """The distribution whose ``scope()`` we are in; one device outside any.

    >>> current().kind is None
    True
    """
    return getattr(_active, "distribution", None) or Distribution()


def make(kind: str | None) -> Distribution:
    """A Distribution for ``kind``: None (one device), "mirrored" (every GPU of
    this machine, else every logical CPU device) or "multi-worker" (the cluster
    in TF_CONFIG; TensorFlow backend only).  Make it before anything else runs
    TensorFlow: collective ops are configured when the strategy is created.

    A process gets one strategy per kind, made on the first call: two
    MirroredStrategy objects number their collective ops alike, and the second
    one's all-reduce then meets the first one's (a shape-mismatch abort).

    >>> make("ring")
    Traceback (most recent call last):
    ...
    keras_decomp.errors.DecompError: unknown distribution 'ring'
    use mirrored or multi-worker
    """
    if kind is None:
        return Distribution()
    if kind not in KINDS:
        raise DecompError(f"unknown distribution '{kind}'", hint="use mirrored or multi-worker")
    if kind not in _made:
        _made[kind] = _make(kind)
    return _made[kind]


def _make(kind: str) -> Distribution:
    import keras

    backend = keras.backend.backend()
    if backend == "jax":
        if kind == "multi-worker":
            raise DecompError("multi-worker training runs on the TensorFlow backend",
                              hint="set KERAS_BACKEND=tensorflow, or use --distribute mirrored on JAX "
                                   "(the devices of one machine)")
        return Distribution(kind, keras_distribution=keras.distribution.DataParallel())
    if backend != "tensorflow":
        raise DecompError(f"distributed training is not supported on the {backend} backend",
                          hint="set KERAS_BACKEND=tensorflow (or jax for --distribute mirrored)")
    import tensorflow as tf

    if kind == "mirrored":
        # Named explicitly: MirroredStrategy() would read TF_CONFIG and span the cluster.
        devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
        return Distribution(kind, tf.distribute.MirroredStrategy([d.name for d in devices]))
    config = _tf_config()
    if not config.get("cluster"):
        raise DecompError("multi-worker training needs TF_CONFIG describing the cluster and this worker",
                          hint='e.g. export TF_CONFIG=\'{"cluster": {"worker": ["host1:2222", "host2:2222"]}, '
                               '"task": {"type": "worker", "index": 0}}\' (see docs/distributed.md)')
    return Distribution(kind, _multi_worker_strategy(tf)())


def _multi_worker_strategy(tf):
    """MultiWorkerMirroredStrategy with ``reduce`` mended for two calls that Keras
    3.15's ``fit`` and ``evaluate`` make on it (keras-team/keras#20585): one
    reduces a whole (x, y) batch, a nest, which the strategy leaves to
    ``Strategy.reduce``'s TODO; the other reduces scalar metrics with
    ``axis=0``.  Both are taken apart here; MirroredStrategy needs neither."""

    class MultiWorkerMirroredStrategy(tf.distribute.MultiWorkerMirroredStrategy):
        def reduce(self, reduce_op, value, axis):
            if tf.nest.is_nested(value):
                return tf.nest.map_structure(lambda v: self.reduce(reduce_op, v, axis), value)
            if axis is not None:
                local = value.values[0] if isinstance(value, tf.distribute.DistributedValues) else value
                if local.shape.rank == 0:
                    axis = None
            return super().reduce(reduce_op, value, axis)

    return MultiWorkerMirroredStrategy


def _is_chief(cluster: dict, task_type: str | None, task_id: int | None) -> bool:
    """The chief task if the cluster has one, else worker 0.

    >>> _is_chief({"worker": ["a:1", "b:1"]}, "worker", 1), _is_chief({"worker": ["a:1"]}, "worker", 0)
    (False, True)
    >>> _is_chief({"chief": ["a:1"], "worker": ["b:1"]}, "worker", 0)
    False
    """
    if task_type == "chief":
        return True
    return task_type in ("worker", None) and not task_id and "chief" not in cluster


def _tf_config() -> dict:
    raw = os.environ.get("TF_CONFIG", "")
    if not raw:
        return {}
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as err:
        raise DecompError(f"TF_CONFIG is not valid JSON: {err}",
                          hint='e.g. {"cluster": {"worker": ["host1:2222", "host2:2222"]}, '
                               '"task": {"type": "worker", "index": 0}}') from None
    if not isinstance(config, dict):
        raise DecompError("TF_CONFIG must be a JSON object with 'cluster' and 'task'")
    return config
