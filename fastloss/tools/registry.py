"""One description per public loss: the single place that check, bench, warmup and the tests read.

``LOSSES`` is a tuple of ``LossInfo``, one per loss function, in the order the tools list them;
``BY_NAME`` maps the function name and the short name (and the bench's name) to it.

A ``LossInfo`` holds:

* ``name``: the public function (``info.function`` is ``fastloss.<name>``, imported on use);
  ``short``: its name on the command line (``python -m fastloss check --losses ce``);
* ``n_grad``: how many leading positional arguments are differentiated (3 for the triplet
  margin loss: ``grad`` is a tuple); ``grad_keywords``: keyword arguments that get a
  gradient too when given, after those (the ``bias`` of the linear cross-entropy); ``grad_out``: whether it takes ``grad_out=``;
  ``in_place``: whether ``grad_out`` may be the first argument itself; ``updates``: the
  index of an argument updated in place (the centers of ``center_loss``), else None;
* ``make_inputs(rng, dtype, shape=None, classes=None, **inputs) -> tuple``: small random
  positional NumPy arguments (the default shape when ``shape`` is None; ``classes`` where
  labels index classes; ``prob=True`` for probability targets of the softmax losses);
  floating inputs in ``dtype``, labels int64;
* ``options``: the option sets ``python -m fastloss check`` runs, each an ``Option``, which
  unpacks as ``(label, make_kwargs)``: ``make_kwargs(rng, dtype, args) -> dict`` draws the
  keyword arguments (it may set labels to ``ignore_index`` in ``args``); ``option.inputs``
  are keywords for ``make_inputs`` (probability targets, another shape).  ``info.case(rng,
  dtype, option)`` gives ``(args, kwargs)``, drawn in that order;
* ``warmup_variants(dtype, rows, rng)``: the ``(args, kwargs)`` calls that compile the loss's
  kernels (``python -m fastloss warmup``);
* ``bench``: a ``BenchSpec``, the loss as ``python -m fastloss bench`` and ``bench/`` run it:
  its name there, sizes, hyper-parameters, its own synthetic inputs at scale, the kind of
  memory-copy ceiling, its place in the table;
* ``reference``: the loss's formula, ``fastloss.tools.references.<name>`` (written once over
  an array namespace: NumPy, ``jax.numpy`` or torch); ``update``: the in-place update's,
  ``references.<name>_update``, where there is one;
* ``competitors``: the libraries timed beside it (``fastloss.tools.competitors``: autograd
  of ``reference``).  The bench's ``numpy`` entry is the hand-written loss + gradient of
  ``fastloss.tools.numpy_losses`` (NumPy has no autograd: what a NumPy user writes).

To add a loss to the tools: write its formula in ``references.py`` (and its NumPy loss +
gradient in ``numpy_losses.py``), then one ``LossInfo`` below: inputs, check options, warm-up
variants, bench spec.  Check, bench, warmup and the registry-driven tests then cover it.

This module imports NumPy only.
"""
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

COMPETITORS = ("torch", "torch-compile", "jax")
WARMUP_WIDTH = 512  # warm-up rows x 512 values: the parallel rows go over every parallel threshold


class Option(tuple):
    """One option set: unpacks as ``(label, make_kwargs)``; ``inputs``: keywords for ``make_inputs``."""

    def __new__(cls, label, make_kwargs, **inputs):
        option = super().__new__(cls, (label, make_kwargs))
        option.inputs = inputs
        return option

    @property
    def label(self):
        return self[0]

    @property
    def make_kwargs(self):
        return self[1]


@dataclass(frozen=True, eq=False)
class BenchSpec:
    """A loss as the benchmarks run it (``python -m fastloss bench`` and ``bench/``)."""
    short: str                 # name in --losses, prefix of the pytest-benchmark group
    position: int              # its rows' place in the bench table (as in bench/results/)
    sizes: dict                # size -> shape passed to make_inputs
    make_inputs: Callable      # (rng, shape, classes) -> float32 / int64 arrays, cast by the caller
    kwargs: dict = field(default_factory=dict)     # hyper-parameters, the same for every entry
    fl_kwargs: dict = field(default_factory=dict)  # spelled out for fastloss only
    classes: dict = field(default_factory=dict)    # size -> number of classes (center, batch)
    float16: bool = False      # also benchmarked in float16 (at the medium size in the suite)
    ceiling: str = "copy"      # the least a one-pass kernel must move: "copy", "subtract", "gemm", "products" (bench.ceiling)
    what: str = ""             # one line for the docs


@dataclass(frozen=True, eq=False)
class LossInfo:
    """One public loss, as the tools and the cross-cutting tests see it (see the module docstring)."""
    name: str
    short: str
    make_inputs: Callable
    options: tuple
    warmup_variants: Callable
    bench: BenchSpec
    n_grad: int = 1
    grad_keywords: tuple = ()
    grad_out: bool = True
    in_place: bool = False
    updates: int | None = None
    competitors: tuple = COMPETITORS

    @property
    def function(self):
        """The public function, ``fastloss.<name>`` (the tools call it as a user does)."""
        import fastloss
        return getattr(fastloss, self.name)

    @property
    def reference(self):
        """The loss's formula: ``reference(ns, *args, reduction=..., **kwargs)`` (``references``)."""
        from . import references
        return getattr(references, self.name)

    @property
    def update(self):
        """The reference of the in-place update, ``references.<name>_update`` (``updates`` is not
        None), else None."""
        if self.updates is None:
            return None
        from . import references
        return getattr(references, self.name + "_update")

    def case(self, rng, dtype, option):
        """``(args, kwargs)`` of ``option``: the inputs drawn first, then the keywords."""
        args = self.make_inputs(rng, np.dtype(dtype), **option.inputs)
        return args, option.make_kwargs(rng, np.dtype(dtype), args)


def _fixed(**kwargs):
    """``make_kwargs`` of an option that draws nothing."""
    def make_kwargs(rng, dtype, args):
        return dict(kwargs)
    return make_kwargs


# ------------------------------------------------------------ softmax cross entropy and focal


def _class_inputs(rng, dtype, shape=None, classes=None, prob=False):
    """``(logits, target)``: logits ``2 N(0, 1)`` of ``shape`` (default (6, 5)), integer
    labels in ``[0, C)`` or, with ``prob``, Dirichlet probability targets of the logits' shape."""
    shape = (6, 5) if shape is None else tuple(shape)
    batch, C = shape[:-1], shape[-1]
    x = (2.0 * rng.standard_normal(shape)).astype(dtype)
    if prob:
        return x, rng.dirichlet(np.ones(C), size=batch).astype(dtype)
    return x, rng.integers(0, C, size=batch)


def _ce_kwargs(weight=False, sample_weight=False, **fixed):
    def make_kwargs(rng, dtype, args):
        x, y = args
        kw = dict(fixed)
        if "ignore_index" in kw:
            y[:2] = kw["ignore_index"]
        if weight:
            kw["weight"] = rng.uniform(0.2, 2.0, size=x.shape[-1]).astype(dtype)
        if sample_weight:
            kw["sample_weight"] = rng.uniform(0.0, 2.0, size=x.shape[:-1]).astype(dtype)
        return kw
    return make_kwargs


def _focal_kwargs(gamma, alpha=False):
    def make_kwargs(rng, dtype, args):
        kw = {"gamma": gamma}
        if alpha:
            kw["alpha"] = rng.uniform(0.2, 1.0, size=args[0].shape[-1]).astype(dtype)
        return kw
    return make_kwargs


def _class_variants(extra):
    """Warm-up calls of a softmax loss: defaults, ``grad=False``, sample weights, the
    loss's own ``extra`` options (a None value: a per-class array of ones), probability targets."""
    def variants(dtype, rows, rng):
        T = np.dtype(dtype)
        x = rng.standard_normal((rows, WARMUP_WIDTH)).astype(T)
        labels = rng.integers(0, WARMUP_WIDTH, rows)
        probs = np.full_like(x, 1.0 / WARMUP_WIDTH)
        per_class = np.ones(WARMUP_WIDTH, T)
        kwargs = [{}, {"grad": False}, {"sample_weight": np.ones(rows, T)}]
        kwargs += [{k: per_class if v is None else v for k, v in kw.items()} for kw in extra]
        return [((x, labels), kw) for kw in kwargs] + [((x, probs), {}), ((x, probs), {"grad": False})]
    return variants


def _bench_class_inputs(rng, shape, classes):
    """Logits ``N(0, 2**2)`` of ``shape``, labels uniform int64 in ``[0, C)``."""
    x = rng.standard_normal(shape, dtype=np.float32)
    x *= 2
    return x, rng.integers(0, shape[-1], size=shape[:-1], dtype=np.int64)


_CLASS_SIZES = dict(tiny=(8, 5), small=(64, 10), medium=(8192, 1000), large=(2048, 32000))

SOFTMAX_CROSS_ENTROPY = LossInfo(
    "softmax_cross_entropy", "ce", _class_inputs,
    (Option("plain, logits (3, 4, 5)", _fixed(), shape=(3, 4, 5)),
     Option("label_smoothing=0.1", _fixed(label_smoothing=0.1)),
     Option("weight, ignore_index=1", _ce_kwargs(weight=True, ignore_index=1)),
     Option("prob. targets, smoothing 0.1", _fixed(label_smoothing=0.1), prob=True),
     Option("z_loss=0.01", _ce_kwargs(z_loss=0.01, ignore_index=-100)),
     Option("softcap=3, sample_weight", _ce_kwargs(weight=True, sample_weight=True, softcap=3.0))),
    _class_variants([{"weight": None}, {"label_smoothing": 0.1}, {"z_loss": 1e-4}, {"softcap": 30.0}]),
    BenchSpec("ce", 0, _CLASS_SIZES, _bench_class_inputs, float16=True,
              what="softmax_cross_entropy(logits, labels)"),
    in_place=True)

FOCAL_LOSS = LossInfo(
    "focal_loss", "focal", _class_inputs,
    (Option("gamma=0", _focal_kwargs(0.0)),
     Option("gamma=0.5", _focal_kwargs(0.5)),
     Option("gamma=2", _focal_kwargs(2.0)),
     Option("gamma=2, alpha (C,)", _focal_kwargs(2.0, alpha=True))),
    _class_variants([{"alpha": None}, {"gamma": 0.5}]),
    BenchSpec("focal", 1, _CLASS_SIZES, _bench_class_inputs, {"gamma": 2.0}, float16=True,
              what="focal_loss(logits, labels, gamma=2) (multi-class softmax focal)"),
    in_place=True)


# ------------------------------------------------------------ sigmoid focal


def _sigmoid_focal_inputs(rng, dtype, shape=None, classes=None):
    """``(logits, targets)``: logits ``2 N(0, 1)`` (default (6, 5)), 0/1 targets, 30 % ones."""
    shape = (6, 5) if shape is None else tuple(shape)
    x = (2.0 * rng.standard_normal(shape)).astype(dtype)
    return x, (rng.random(shape) < 0.3).astype(dtype)


def _sigmoid_focal_variants(dtype, rows, rng):
    x = rng.standard_normal((rows, WARMUP_WIDTH)).astype(dtype)
    t = (rng.random(x.shape) < 0.1).astype(dtype)
    return [((x, t), {}), ((x, t), {"grad": False})]


def _bench_sigmoid_focal_inputs(rng, shape, classes):
    """Logits ``N(0, 2**2)``, 0/1 targets with about 10 % positives (detection-like)."""
    x = rng.standard_normal(shape, dtype=np.float32)
    x *= 2
    return x, (rng.random(shape, dtype=np.float32) < 0.1).astype(np.float32)


SIGMOID_FOCAL_LOSS = LossInfo(
    "sigmoid_focal_loss", "sigmoid_focal", _sigmoid_focal_inputs,
    (Option("alpha=0.25, gamma=2", _fixed(alpha=0.25, gamma=2.0)),
     Option("alpha=-1, gamma=0.5", _fixed(alpha=-1.0, gamma=0.5))),
    _sigmoid_focal_variants,
    BenchSpec("sigmoid_focal", 2, dict(tiny=(8, 5), small=(64, 10), medium=(8192, 1000), large=(16384, 1000)),
              _bench_sigmoid_focal_inputs, {"alpha": 0.25, "gamma": 2.0}, float16=True, ceiling="subtract",
              what="sigmoid_focal_loss(logits, targets, alpha=0.25, gamma=2), 0/1 targets, ~10 % positive"),
    in_place=True)


# ------------------------------------------------------------ Huber


def _huber_inputs(rng, dtype, shape=None, classes=None):
    """``(input, target)``, both ``1.5 N(0, 1)`` of ``shape`` (default (6, 4)): both branches hit."""
    shape = (6, 4) if shape is None else tuple(shape)
    return tuple((1.5 * rng.standard_normal(shape)).astype(dtype) for _ in range(2))


def _huber_kwargs(delta, weighted=False):
    def make_kwargs(rng, dtype, args):
        kw = {"delta": delta}
        if weighted:
            kw["sample_weight"] = rng.uniform(0.0, 2.0, size=(args[0].shape[0], 1)).astype(dtype)
        return kw
    return make_kwargs


def _huber_variants(dtype, rows, rng):
    x = rng.standard_normal((rows, WARMUP_WIDTH)).astype(dtype)
    t = rng.standard_normal(x.shape).astype(dtype)
    return [((x, t), {}), ((x, t), {"grad": False}), ((x, t), {"sample_weight": np.ones_like(x)}),
            ((x, t), {"sample_weight": np.ones((rows, 1), dtype)})]


def _bench_huber_inputs(rng, shape, classes):
    """Input and target both ``N(0, 1)``: both branches are hit."""
    return rng.standard_normal(shape, dtype=np.float32), rng.standard_normal(shape, dtype=np.float32)


HUBER_LOSS = LossInfo(
    "huber_loss", "huber", _huber_inputs,
    (Option("delta=1", _huber_kwargs(1.0)),
     Option("delta=0.5, sample_weight", _huber_kwargs(0.5, weighted=True))),
    _huber_variants,
    BenchSpec("huber", 3, dict(tiny=(40,), small=(4096,), medium=(2 ** 24,), large=(2 ** 26,)),
              _bench_huber_inputs, {"delta": 1.0}, float16=True, ceiling="subtract",
              what="huber_loss(input, target, delta=1)"),
    in_place=True)


# ------------------------------------------------------------ triplet margin


def _triplet_inputs(rng, dtype, shape=None, classes=None):
    """``(anchor, positive, negative)``, each ``N(0, 1)`` of ``shape`` (default (6, 4))."""
    shape = (6, 4) if shape is None else tuple(shape)
    return tuple(rng.standard_normal(shape).astype(dtype) for _ in range(3))


def _triplet_variants(dtype, rows, rng):
    x = rng.standard_normal((rows, WARMUP_WIDTH)).astype(dtype)
    p, n = (rng.standard_normal(x.shape).astype(dtype) for _ in range(2))
    return [((x, p, n), {"distance": d, "swap": s})
            for d in ("euclidean", "squared_euclidean", "cosine") for s in (False, True)]


def _bench_triplet_inputs(rng, shape, classes):
    """Positives near the anchors, negatives a little farther: about half of the rows active."""
    a = rng.standard_normal(shape, dtype=np.float32)
    p = a + 0.12 * rng.standard_normal(shape, dtype=np.float32)
    q = a + 0.21 * rng.standard_normal(shape, dtype=np.float32)
    return a, p, q


TRIPLET_MARGIN_LOSS = LossInfo(
    "triplet_margin_loss", "triplet", _triplet_inputs,
    (Option("euclidean, swap", _fixed(margin=0.5, swap=True)),
     Option("squared_euclidean", _fixed(margin=0.5, distance="squared_euclidean")),
     Option("cosine", _fixed(margin=0.2, distance="cosine"))),
    _triplet_variants,
    BenchSpec("triplet", 5, dict(tiny=(8, 4), small=(64, 128), medium=(65536, 128), large=(131072, 128)),
              _bench_triplet_inputs, {"margin": 1.0, "eps": 1e-6},
              what="triplet_margin_loss(anchor, positive, negative), euclidean, three gradients"),
    n_grad=3, grad_out=False)


# ------------------------------------------------------------ batch triplet


def _batch_inputs(rng, dtype, shape=None, classes=None):
    """``(embeddings, labels)``: ``shape`` (N, D) (default (12, 3)), ``classes`` (default 4) of
    equal size (the last ones one smaller where ``classes`` does not divide N), shuffled;
    embeddings ``0.6 c_y + 0.5 N(0, 1)`` around class centers ``N(0, 1)``."""
    n, d = (12, 3) if shape is None else shape
    k = 4 if classes is None else classes
    labels = np.repeat(np.arange(k), -(-n // k))[:n]
    rng.shuffle(labels)
    centers = rng.standard_normal((k, d))
    return (0.6 * centers[labels] + 0.5 * rng.standard_normal((n, d))).astype(dtype), labels


def _batch_variants(dtype, rows, rng):
    e = rng.standard_normal((max(rows, 8), 16)).astype(dtype)
    y = np.arange(e.shape[0]) % 4
    return [((e, y), {"mining": m, "distance": d, "soft": s})
            for m in ("hard", "semihard", "all") for d in ("euclidean", "squared_euclidean", "cosine")
            for s in (False, True)]


def _bench_batch_inputs(rng, shape, classes):
    """``classes`` (default 64) classes of equal size, shuffled; embeddings clustered by class."""
    k = 64 if classes is None else classes
    n, d = shape
    centers = rng.standard_normal((k, d), dtype=np.float32)
    labels = np.repeat(np.arange(k, dtype=np.int64), -(-n // k))[:n]
    rng.shuffle(labels)
    return 0.12 * centers[labels] + 0.1 * rng.standard_normal((n, d), dtype=np.float32), labels


BATCH_TRIPLET_LOSS = LossInfo(
    "batch_triplet_loss", "batch_triplet", _batch_inputs,
    (Option("hard", _fixed(mining="hard", margin=0.5)),
     Option("semihard", _fixed(mining="semihard", margin=0.5)),
     Option("all", _fixed(mining="all", margin=0.5)),
     Option("hard, soft", _fixed(mining="hard", margin=0.0, soft=True))),
    _batch_variants,
    BenchSpec("batch_hard", 6, dict(tiny=(8, 4), small=(64, 128), medium=(2048, 128), large=(4096, 128)),
              _bench_batch_inputs, {"margin": 1.0}, {"mining": "hard"},
              classes=dict(tiny=2, small=8, medium=64, large=128), ceiling="gemm",
              what="batch_triplet_loss(embeddings, labels, mining='hard'), classes of equal size"))


# ------------------------------------------------------------ center


def _center_inputs(rng, dtype, shape=None, classes=None):
    """``(features, labels, centers)``: ``shape`` (N, D) (default (8, 3)) and ``classes`` centers
    (default 4), all ``N(0, 1)``; with two classes or more, class ``classes // 2`` is absent (its
    center must not move); the others each have a row where N allows."""
    n, d = (8, 3) if shape is None else shape
    k = 4 if classes is None else classes
    present = [c for c in range(k) if c != k // 2] or [0]
    x = rng.standard_normal((n, d)).astype(dtype)
    labels = rng.choice(present, size=n)
    labels[:len(present)] = present[:n]
    return x, labels, rng.standard_normal((k, d)).astype(dtype)


def _center_variants(dtype, rows, rng):
    x = rng.standard_normal((rows, WARMUP_WIDTH)).astype(dtype)
    labels = rng.integers(0, WARMUP_WIDTH, rows)
    centers = np.zeros((WARMUP_WIDTH, WARMUP_WIDTH), np.float64 if np.dtype(dtype) == np.float64 else np.float32)
    return [((x, labels, centers), {}), ((x, labels, centers), {"update": False, "grad": False})]


def _bench_center_inputs(rng, shape, classes):
    """Features, labels uniform in ``[0, classes)`` (default 1000), centers, all ``N(0, 1)``."""
    k = 1000 if classes is None else classes
    x = rng.standard_normal(shape, dtype=np.float32)
    labels = rng.integers(0, k, size=shape[0], dtype=np.int64)
    return x, labels, rng.standard_normal((k, shape[1]), dtype=np.float32)


CENTER_LOSS = LossInfo(
    "center_loss", "center", _center_inputs,
    (Option("alpha=0.5", _fixed(alpha=0.5)),),
    _center_variants,
    BenchSpec("center", 4, dict(tiny=(8, 4), small=(64, 32), medium=(8192, 512), large=(32768, 512)),
              _bench_center_inputs, {"alpha": 0.5}, classes=dict(tiny=3, small=10, medium=1000, large=10000),
              what="center_loss(features, labels, centers, alpha=0.5): loss, gradient, in-place update"),
    updates=2)


# ------------------------------------------------------------ linear + cross entropy


def _linear_inputs(rng, dtype, shape=None, classes=None):
    """``(embeddings, classifier, target)``: embeddings ``N(0, 1)`` of ``shape`` (default
    (6, 4)), a classifier ``(classes, H)`` (default 9 classes) of ``N(0, 1/H)`` (logits of
    about unit scale), labels uniform in ``[0, classes)``."""
    shape = (6, 4) if shape is None else tuple(shape)
    V = 9 if classes is None else classes
    H = shape[-1]
    e = rng.standard_normal(shape).astype(dtype)
    w = (rng.standard_normal((V, H)) / np.sqrt(H)).astype(dtype)
    return e, w, rng.integers(0, V, size=shape[:-1])


def _linear_kwargs(bias=False, weight=False, sample_weight=False, **fixed):
    def make_kwargs(rng, dtype, args):
        e, w, y = args
        kw = dict(fixed)
        if "ignore_index" in kw:
            y.reshape(-1)[:2] = kw["ignore_index"]
        if bias:
            kw["bias"] = rng.standard_normal(w.shape[0]).astype(dtype)
        if weight:
            kw["weight"] = rng.uniform(0.2, 2.0, size=w.shape[0]).astype(dtype)
        if sample_weight:
            kw["sample_weight"] = rng.uniform(0.0, 2.0, size=e.shape[:-1]).astype(dtype)
        return kw
    return make_kwargs


def _linear_variants(dtype, rows, rng):
    """Warm-up calls: defaults, ``grad=False``, a bias, and every option at once."""
    T = np.dtype(dtype)
    e = rng.standard_normal((rows, 64)).astype(T)
    w = rng.standard_normal((WARMUP_WIDTH, 64)).astype(T) / 8
    y = rng.integers(0, WARMUP_WIDTH, rows)
    every = {"bias": np.zeros(WARMUP_WIDTH, T), "weight": np.ones(WARMUP_WIDTH, T),
             "sample_weight": np.ones(rows, T), "label_smoothing": 0.1, "z_loss": 1e-4, "softcap": 30.0}
    return [((e, w, y), kw) for kw in ({}, {"grad": False}, {"bias": every["bias"]}, every)]


def _bench_linear_inputs(rng, shape, classes):
    """Embeddings ``N(0, 1)`` ``(N, H)``, a classifier ``(classes, H)`` of ``N(0, 1/H)``, labels
    uniform int64 in ``[0, classes)``."""
    n, h = shape
    e = rng.standard_normal(shape, dtype=np.float32)
    w = rng.standard_normal((classes, h), dtype=np.float32)
    w *= np.float32(1.0 / np.sqrt(h))
    return e, w, rng.integers(0, classes, size=n, dtype=np.int64)


LINEAR_CROSS_ENTROPY = LossInfo(
    "linear_cross_entropy", "linear_ce", _linear_inputs,
    (Option("plain, embeddings (2, 3, 4)", _fixed(), shape=(2, 3, 4)),
     Option("bias, 70 classes", _linear_kwargs(bias=True), classes=70),
     Option("weight, ignore_index=1, smoothing 0.1",
            _linear_kwargs(weight=True, ignore_index=1, label_smoothing=0.1)),
     Option("z_loss=0.01, softcap=3, sample_weight",
            _linear_kwargs(bias=True, sample_weight=True, z_loss=0.01, softcap=3.0))),
    _linear_variants,
    BenchSpec("linear_ce", 7, dict(tiny=(8, 4), small=(64, 32), medium=(2048, 256), large=(8192, 256)),
              _bench_linear_inputs, classes=dict(tiny=16, small=1000, medium=32768, large=32768),
              ceiling="products",
              what="linear_cross_entropy(embeddings, classifier, labels): the (N, V) logits never held"),
    n_grad=2, grad_keywords=("bias",))


LOSSES = (SOFTMAX_CROSS_ENTROPY, FOCAL_LOSS, SIGMOID_FOCAL_LOSS, HUBER_LOSS, TRIPLET_MARGIN_LOSS,
          BATCH_TRIPLET_LOSS, CENTER_LOSS, LINEAR_CROSS_ENTROPY)
BY_NAME = {key: info for info in LOSSES for key in (info.name, info.short, info.bench.short)}
