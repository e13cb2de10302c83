"""``python -m fastloss demo``: train a small NumPy network whose every loss gradient comes from fastloss.

The network is a plain-NumPy MLP, ``input -> hidden (ReLU) -> hidden (ReLU) ->
2-D embedding (linear) -> classifier (linear, 2 -> classes)``, with a
hand-written backward pass and Adam.  Two copies, from the same seed (the same
initial weights and the same batch order), are trained on the same data:

* ``softmax``: softmax cross-entropy alone;
* ``softmax + center``: plus ``--center-weight`` times center loss (Wen et al.
  2016) on the embedding, the centers moved in place by fastloss with rate
  ``--alpha``; ``--triplet-weight`` adds batch-hard triplet loss (Hermans et
  al. 2017) with ``--margin``.

The gradient of the logits comes from ``fl.softmax_cross_entropy`` (written in
place over the logits, ``grad_out=logits``: the backward pass no longer needs
them), those of the embedding from ``fl.center_loss`` and
``fl.batch_triplet_loss(mining="hard")`` (into preallocated ``grad_out=``
buffers); the rest of the step (the layers' forward and backward, Adam) is
NumPy.  The demo prints, per epoch, a progress bar and the held-out loss and
accuracy; at the end, both models' held-out accuracy, their within-class
spread, and the time spent in fastloss calls against the rest of the step; and
it saves a picture of the held-out 2-D embeddings with their centers, softmax
alone beside softmax + center loss (Wen et al.'s figure).

Choices, written down:

* Data: scikit-learn's bundled digits (1797 8x8 images, 64 features, 10
  classes; no download) when ``sklearn`` imports (``--dataset auto``),
  otherwise a synthetic set of 2000 rows that needs only NumPy: 10 Gaussian
  blobs in an 8-D latent space, sent through a random saturating ``tanh``
  layer and a random linear map into 64 dimensions, plus a little noise
  (deterministic from the seed; a few percent of the rows are ambiguous, and
  a 2-D bottleneck must untangle the rest).  A quarter of the rows,
  chosen by the seed, is held out; inputs are standardized with the training
  rows' mean and standard deviation.
* Batches: shuffled every epoch, the last incomplete batch dropped, so every
  step has the same shape and the gradient buffers are allocated once.
* Within-class spread (scale-free, so that a network cannot win by shrinking
  its embedding): the mean squared distance of the held-out embeddings to
  their class mean, divided by the mean squared distance between two class
  means (over all pairs of classes).  Lower means tighter clusters.
* Timing: ``time.perf_counter`` around the fastloss calls of each training
  step, against the whole step (forward, fastloss, backward, Adam); the first
  calls, which compile the Numba kernels or load them from the disk cache,
  are made once before training and reported apart.  On a GPU with CuPy the
  timed regions synchronize the device first and last.
* ``--backend cuda``: with CuPy importable (and not Numba's CUDA simulator),
  the data, the network and the centers live on the GPU as CuPy arrays and
  fastloss runs there without copies; otherwise the arrays stay NumPy and
  every fastloss call gets ``backend="cuda"`` (copied over and back: slower,
  but it runs the CUDA kernels, and runs under ``NUMBA_ENABLE_CUDASIM=1``).
  Without a GPU the command exits with status 2 and one line saying why.
* The picture: matplotlib (without pyplot, so no GUI backend is touched) when
  installed; otherwise the points are rasterized with NumPy and written as a
  PNG by a small zlib writer (no titles then: left is softmax, right is
  softmax + center).  The centers drawn are fastloss's learned centers where
  the model has them, else the class means of the held-out embeddings.
* The centers are a plain array passed to ``fl.center_loss`` (not an
  ``fl.CenterLoss``), so that one code path also serves ``backend="cuda"``
  with NumPy arrays.  Everything trains in float32.
* Defaults (Adam lr 0.01, 25 epochs of batch 64, hidden layers 128 and 64,
  center weight 0.5, alpha 0.5) were picked by trying seeds 0-7 on the
  synthetic data (held-out accuracy 0.96-0.99 for both models; center loss
  divides the spread by 2.6 to 6) and 0-2 on digits (0.94-0.97; by 2.2 to
  3.3), where a learning rate of 0.003 learned more slowly.  The held-out
  spread counts misclassified rows too, which sit near another class: a
  model's error rate puts a floor under it.
* The network is tiny, so on a machine busy with other work a multithreaded
  BLAS makes the NumPy part of the step many times slower (threads waiting
  for each other on 64-row products): when ``threadpoolctl`` is installed
  (scikit-learn brings it) the BLAS runs on one thread during training;
  otherwise ``OPENBLAS_NUM_THREADS=1`` does the same.  fastloss's own
  kernels are left alone (they pick a serial path for inputs this small).
"""
import contextlib
import itertools
import struct
import sys
import time
import zlib
from dataclasses import dataclass, field

import numpy as np

import fastloss as fl

HELP = "train a small NumPy network with fastloss gradients (softmax vs softmax + center loss)"
DESCRIPTION = (
    "Train a plain-NumPy MLP with a 2-D embedding on a small offline dataset (scikit-learn's "
    "digits when installed, else a built-in synthetic one), twice from the same seed: with "
    "softmax cross-entropy alone, and with softmax + center loss (+ optional batch-hard triplet "
    "loss), every loss gradient coming from fastloss. Prints held-out loss and accuracy per "
    "epoch, the within-class spread of both models and the time spent in fastloss, and saves "
    "a picture of the 2-D embeddings with their centers.")

DATASETS = ("auto", "digits", "synthetic")
TEST_FRACTION = 0.25
SYNTHETIC_ROWS = 2000
EMBEDDING_DIM = 2
TAB10 = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
         "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")


class DemoError(ValueError):
    """A bad option, a missing dataset or a missing GPU: one line for the user, exit status 2."""


@dataclass(frozen=True)
class DemoConfig:
    """Everything ``run_demo`` needs; the command-line options map onto it one to one."""
    dataset: str = "auto"
    samples: int | None = None        # rows of the dataset to use (None: all; synthetic: 2000)
    epochs: int = 25
    batch_size: int = 64
    lr: float = 1e-2
    center_weight: float = 0.5
    alpha: float = 0.5
    triplet_weight: float = 0.0
    margin: float = 1.0
    hidden: tuple = (128, 64)
    seed: int = 0
    backend: str = "cpu"
    out: str | None = "fastloss-demo.png"  # None: no picture
    quiet: bool = False
    use_cupy: bool | None = None      # None: with --backend cuda, when CuPy imports (not simulated)

    def problem(self):
        """What is wrong with these options, in one line, or None."""
        if self.dataset not in DATASETS:
            return f"--dataset must be one of {', '.join(DATASETS)}, got {self.dataset!r}"
        if self.backend not in ("cpu", "cuda"):
            return f"--backend must be cpu or cuda, got {self.backend!r}"
        if self.epochs < 1:
            return f"--epochs must be at least 1, got {self.epochs}"
        if self.batch_size < 2:
            return f"--batch-size must be at least 2, got {self.batch_size}"
        if self.samples is not None and self.samples < 8:
            return f"--samples must be at least 8, got {self.samples}"
        if not self.lr > 0:
            return f"--lr must be positive, got {self.lr}"
        if not (self.center_weight >= 0 and self.triplet_weight >= 0):
            return "--center-weight and --triplet-weight must be >= 0"
        if self.center_weight == 0 and self.triplet_weight == 0:
            return "--center-weight and --triplet-weight are both 0: nothing to compare softmax with"
        if not 0 <= self.alpha <= 1:
            return f"--alpha must be in [0, 1], got {self.alpha}"
        if not self.margin >= 0:
            return f"--margin must be >= 0, got {self.margin}"
        if not self.hidden or any(h < 1 for h in self.hidden):
            return f"hidden layer sizes must be positive, got {self.hidden}"
        return None


# ---------------------------------------------------------------------- data


@dataclass
class Dataset:
    """Standardized float32 inputs and int64 labels, split into training and held-out rows."""
    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int


def _rng(seed, purpose):
    """An independent generator per purpose, so that e.g. the batch order does
    not depend on how many numbers the data generator drew."""
    streams = {"data": 1, "split": 2, "init": 3, "order": 4}
    return np.random.default_rng([seed, streams[purpose]])


def synthetic_data(seed, n_samples=SYNTHETIC_ROWS, n_features=64, num_classes=10, latent_dim=8):
    """``(x, y)``: Gaussian blobs in a latent space through a random nonlinear map.

    Deterministic from ``seed``; needs only NumPy.  The classes are balanced;
    unit-variance blobs around means drawn with standard deviation 2.5 overlap
    a little (a few percent of the rows are ambiguous), a saturating ``tanh``
    layer bends them, a random linear map mixes them into ``n_features``
    dimensions, and a little noise is added.
    """
    rng = _rng(seed, "data")
    means = 2.5 * rng.normal(size=(num_classes, latent_dim))
    y = np.arange(n_samples) % num_classes
    rng.shuffle(y)
    z = means[y] + rng.normal(size=(n_samples, latent_dim))
    bend = rng.normal(size=(latent_dim, n_features)) / np.sqrt(latent_dim)
    shift = rng.uniform(-1, 1, size=n_features)
    mix = rng.normal(size=(n_features, n_features)) / np.sqrt(n_features)
    x = np.tanh(3.0 * z @ bend + shift) @ mix + 0.03 * rng.normal(size=(n_samples, n_features))
    return x, y.astype(np.int64)


def digits_data():
    """scikit-learn's bundled 8x8 digits (no download), or DemoError without scikit-learn."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DemoError("--dataset digits needs scikit-learn (pip install scikit-learn); "
                        "--dataset synthetic needs nothing") from None
    x, y = load_digits(return_X_y=True)
    return np.asarray(x, np.float64), np.asarray(y, np.int64)


def sklearn_available():
    try:
        import sklearn.datasets  # noqa: F401
    except ImportError:
        return False
    return True


def load_dataset(name, seed, samples=None):
    """The dataset ``name`` ("auto": digits when scikit-learn imports, else synthetic),
    split by ``seed`` (a quarter held out) and standardized with the training rows' statistics."""
    if name == "auto":
        name = "digits" if sklearn_available() else "synthetic"
    if name == "digits":
        x, y = digits_data()
    else:
        x, y = synthetic_data(seed, n_samples=samples or SYNTHETIC_ROWS)
    order = _rng(seed, "split").permutation(len(y))
    if samples is not None:
        order = order[:samples]
    n_test = max(1, round(TEST_FRACTION * len(order)))
    test, train = order[:n_test], order[n_test:]
    mean, std = x[train].mean(axis=0), x[train].std(axis=0)
    std[std < 1e-6] = 1.0  # constant features (digits' corner pixels) stay 0
    x = ((x - mean) / std).astype(np.float32)
    num_classes = int(y.max()) + 1
    return Dataset(name, x[train], y[train], x[test], y[test], num_classes)


# ---------------------------------------------------------------------- array module and device


class ArrayModule:
    """NumPy or CuPy, how fastloss is called, and how the device is synchronized for timing."""

    def __init__(self, backend, use_cupy=None):
        self.backend = backend
        self.fl_backend = backend  # passed to every fastloss call
        self.xp = np
        if backend != "cuda":
            return
        from fastloss.cuda._arrays import cuda_module
        try:
            cuda = cuda_module()
        except RuntimeError as exc:
            reason = str(exc).removeprefix("fastloss: ").split(";")[0]
            raise DemoError(f"{reason}; run with --backend cpu") from None
        del cuda  # only asked whether a GPU is there
        if use_cupy is None:  # the simulator's device arrays are NumPy: no CuPy there
            use_cupy = not _simulated() and _cupy() is not None
        if use_cupy:
            self.xp = _cupy()

    @property
    def on_cupy(self):
        return self.xp is not np

    def asarray(self, a):
        return self.xp.asarray(a)

    def host(self, a):
        """A NumPy copy (or the array itself when it already is one)."""
        return a.get() if self.on_cupy and hasattr(a, "get") else np.asarray(a)

    def sync(self):
        """Wait for the GPU (CuPy), so that a timer measures the work and not its launch."""
        if self.on_cupy:
            self.xp.cuda.Device().synchronize()


def _simulated():
    try:
        from numba import config
    except ImportError:  # pragma: no cover
        return False
    return bool(getattr(config, "ENABLE_CUDASIM", False))


def _cupy():
    try:
        import cupy
    except ImportError:
        return None
    return cupy


# ---------------------------------------------------------------------- the network


class MLP:
    """``x -> ReLU hidden layers -> linear embedding -> linear classifier``, in NumPy (or CuPy).

    ``params`` is a list of ``(W, b)`` pairs, layer ``i`` computing
    ``a_{i+1} = a_i @ W_i + b_i``, followed by a ReLU except for the last two
    layers (the embedding and the classifier).
    """

    def __init__(self, sizes, rng, xp=np, dtype=np.float32):
        self.xp = xp
        self.params = []
        for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
            gain = 2.0 if self._relu_after(i, len(sizes) - 1) else 1.0  # He init before a ReLU
            W = rng.normal(scale=np.sqrt(gain / fan_in), size=(fan_in, fan_out)).astype(dtype)
            self.params.append((xp.asarray(W), xp.zeros(fan_out, dtype)))

    @staticmethod
    def _relu_after(layer, num_layers):
        return layer < num_layers - 2

    @property
    def num_layers(self):
        return len(self.params)

    def forward(self, x):
        """``(logits, embedding, inputs)``; ``inputs[i]`` is the input of layer ``i``
        (``inputs[-1]`` is the embedding), what the backward pass needs."""
        inputs, a = [], x
        for i, (W, b) in enumerate(self.params):
            inputs.append(a)
            a = a @ W + b
            if self._relu_after(i, self.num_layers):
                self.xp.maximum(a, 0, out=a)
        return a, inputs[-1], inputs

    def backward(self, inputs, d_logits, d_embedding=None):
        """Gradients ``[(dW, db), ...]`` of the loss whose gradient is ``d_logits``
        with respect to the logits and (plus the classifier's share)
        ``d_embedding`` with respect to the embedding."""
        grads = [None] * self.num_layers
        d = d_logits  # gradient w.r.t. the output of layer i
        for i in reversed(range(self.num_layers)):
            W, _ = self.params[i]
            a = inputs[i]
            grads[i] = (a.T @ d, d.sum(axis=0))
            if i == 0:
                break
            d = d @ W.T  # now w.r.t. inputs[i]
            if i == self.num_layers - 1 and d_embedding is not None:
                d += d_embedding
            if self._relu_after(i - 1, self.num_layers):
                d *= a > 0
        return grads


class Adam:
    """Adam (Kingma & Ba 2015) over the network's parameters, in place."""

    def __init__(self, params, lr, beta1=0.9, beta2=0.999, eps=1e-8, xp=np):
        self.lr, self.beta1, self.beta2, self.eps = lr, beta1, beta2, eps
        self.params = [p for pair in params for p in pair]
        self.m = [xp.zeros_like(p) for p in self.params]
        self.v = [xp.zeros_like(p) for p in self.params]
        self.t = 0

    def step(self, grads):
        self.t += 1
        # a Python float, so that float32 parameters stay float32
        scale = float(self.lr * np.sqrt(1 - self.beta2 ** self.t) / (1 - self.beta1 ** self.t))
        for p, g, m, v in zip(self.params, (g for pair in grads for g in pair), self.m, self.v):
            m *= self.beta1
            m += (1 - self.beta1) * g
            v *= self.beta2
            v += (1 - self.beta2) * g * g
            p -= (scale * m / (v ** 0.5 + self.eps)).astype(p.dtype, copy=False)


# ---------------------------------------------------------------------- the losses, all from fastloss


class Objective:
    """Softmax cross-entropy + ``center_weight`` * center loss + ``triplet_weight`` *
    batch-hard triplet loss; every gradient from fastloss.  Holds the class
    centers (updated in place by ``fl.center_loss``) and the seconds spent in
    fastloss calls."""

    def __init__(self, num_classes, embedding_dim, *, center_weight=0.0, alpha=0.5,
                 triplet_weight=0.0, margin=1.0, arrays=None, dtype=np.float32):
        self.arrays = arrays or ArrayModule("cpu")
        xp = self.arrays.xp
        self.center_weight, self.alpha = center_weight, alpha
        self.triplet_weight, self.margin = triplet_weight, margin
        self.centers = xp.zeros((num_classes, embedding_dim), dtype) if center_weight > 0 else None
        self.fastloss_seconds = 0.0
        self._buffers = {}

    def _buffer(self, name, like):
        """A gradient buffer of ``like``'s shape and dtype, allocated once per shape."""
        key = (name, like.shape, like.dtype)
        if key not in self._buffers:
            self._buffers[key] = self.arrays.xp.empty_like(like)
        return self._buffers[key]

    def __call__(self, logits, embedding, labels, *, update_centers=True):
        """``(loss, parts, d_logits, d_embedding)``: the total loss (a float), its
        terms by name, its gradient w.r.t. the logits (written over ``logits``)
        and the gradient of the embedding terms w.r.t. the embedding (None when
        there are none).  ``update_centers=False`` leaves the centers as they are."""
        kw = {"backend": self.arrays.fl_backend}
        self.arrays.sync()
        start = time.perf_counter()
        ce, d_logits = fl.softmax_cross_entropy(logits, labels, grad_out=logits, **kw)
        terms = [("softmax", 1.0, ce, None)]
        if self.center_weight > 0:
            cl, g = fl.center_loss(embedding, labels, self.centers, alpha=self.alpha,
                                   update=update_centers,
                                   grad_out=self._buffer("center", embedding), **kw)
            terms.append(("center", self.center_weight, cl, g))
        if self.triplet_weight > 0:
            tl, g = fl.batch_triplet_loss(embedding, labels, mining="hard", margin=self.margin,
                                          grad_out=self._buffer("triplet", embedding), **kw)
            terms.append(("triplet", self.triplet_weight, tl, g))
        self.arrays.sync()
        self.fastloss_seconds += time.perf_counter() - start

        parts = {name: float(loss) for name, _, loss, _ in terms}
        if "triplet" in parts and np.isnan(parts["triplet"]):
            parts["triplet"] = 0.0  # a batch where no anchor has a positive and a negative
        total = sum(weight * parts[name] for name, weight, _, _ in terms)
        d_embedding = None
        for _, weight, _, g in terms[1:]:
            d_embedding = weight * g if d_embedding is None else d_embedding + weight * g
        return total, parts, d_logits, d_embedding


def loss_and_gradients(net, objective, x, labels, *, update_centers=True):
    """One forward and backward pass: ``(loss, parts, grads)``."""
    logits, embedding, inputs = net.forward(x)
    loss, parts, d_logits, d_embedding = objective(logits, embedding, labels,
                                                   update_centers=update_centers)
    return loss, parts, net.backward(inputs, d_logits, d_embedding)


# ---------------------------------------------------------------------- training and evaluation


@dataclass
class EpochStats:
    epoch: int
    train_loss: float
    test_loss: float
    test_accuracy: float


@dataclass
class ModelResult:
    """One trained model: its history, held-out numbers, embeddings and timings."""
    name: str
    center_weight: float
    triplet_weight: float
    history: list = field(default_factory=list)
    test_loss: float = float("nan")
    test_accuracy: float = float("nan")
    spread: float = float("nan")
    embeddings: np.ndarray | None = None   # held-out, on the host
    labels: np.ndarray | None = None
    centers: np.ndarray | None = None      # learned (center loss) or held-out class means
    learned_centers: bool = False
    steps: int = 0
    step_seconds: float = 0.0
    fastloss_seconds: float = 0.0

    @property
    def rest_seconds(self):
        return self.step_seconds - self.fastloss_seconds


@dataclass
class DemoResult:
    config: DemoConfig
    dataset: str
    sizes: tuple                 # layer widths, input to classes
    n_train: int
    n_test: int
    array_module: str            # "numpy" or "cupy"
    first_call_seconds: float    # first fastloss calls: JIT compile or cache load
    models: tuple = ()
    picture: str | None = None
    picture_tool: str | None = None   # "matplotlib" or "numpy"
    total_seconds: float = 0.0


def evaluate(net, arrays, x, y):
    """``(loss, accuracy, embedding)`` on held-out rows (forward only).  The loss comes from
    the training steps' call (its gradient written over the logits and dropped): a
    ``grad=False`` call would compile a kernel of its own, a second or so of a cold start."""
    logits, embedding, _ = net.forward(x)
    accuracy = float((logits.argmax(axis=1) == y).mean())
    loss, _ = fl.softmax_cross_entropy(logits, y, grad_out=logits, backend=arrays.fl_backend)
    return float(loss), accuracy, embedding


def class_means(embedding, labels):
    """``(classes present, their mean embeddings)``."""
    classes = np.unique(labels)
    return classes, np.stack([embedding[labels == k].mean(axis=0) for k in classes])


def within_class_spread(embedding, labels):
    """Mean squared distance to the class mean over mean squared distance between
    class means (all pairs): scale-free, lower is tighter."""
    embedding = np.asarray(embedding, np.float64)
    classes, means = class_means(embedding, labels)
    index = np.searchsorted(classes, labels)
    within = np.mean(np.sum((embedding - means[index]) ** 2, axis=1))
    diff = means[:, None, :] - means[None, :, :]
    pairs = len(classes) * (len(classes) - 1)
    between = np.sum(diff ** 2) / max(pairs, 1)
    return float(within / between) if between > 0 else float("nan")


class ProgressBar:
    """``[#####-----] name epoch 3/20 ...`` on one line of ``stream``, redrawn in place
    on a terminal; elsewhere (a log file, a pipe) only each epoch's last line is written."""

    def __init__(self, stream, name, epochs, width=24):
        self.stream, self.name, self.epochs, self.width = stream, name, epochs, width
        self.live = stream is not None and getattr(stream, "isatty", lambda: False)()
        self._last_draw = 0.0

    def _line(self, epoch, fraction, text):
        filled = round(fraction * self.width)
        bar = "#" * filled + "-" * (self.width - filled)
        return f"[{bar}] {self.name:<18} epoch {epoch:>{len(str(self.epochs))}}/{self.epochs} {text}"

    def update(self, epoch, fraction, text):
        now = time.perf_counter()
        if self.live and (now - self._last_draw > 0.05 or fraction >= 1):
            self._last_draw = now
            self.stream.write("\r" + self._line(epoch, fraction, text))
            self.stream.flush()

    def finish_epoch(self, epoch, text):
        if self.stream is not None:
            self.stream.write(("\r" if self.live else "") + self._line(epoch, 1.0, text) + "\n")
            self.stream.flush()


def train_model(name, data, num_classes, config, arrays, *, center_weight, triplet_weight,
                progress=None):
    """Train one network on ``data = (x_train, y_train, x_test, y_test)`` (arrays
    already on the device) for ``config.epochs``; a ``ModelResult``."""
    xp = arrays.xp
    x_train, y_train, x_test, y_test = data
    n_train = x_train.shape[0]
    sizes = (x_train.shape[1], *config.hidden, EMBEDDING_DIM, num_classes)
    net = MLP(sizes, _rng(config.seed, "init"), xp)
    objective = Objective(sizes[-1], EMBEDDING_DIM, center_weight=center_weight,
                          alpha=config.alpha, triplet_weight=triplet_weight,
                          margin=config.margin, arrays=arrays)
    adam = Adam(net.params, config.lr, xp=xp)
    order_rng = _rng(config.seed, "order")
    batch = min(config.batch_size, n_train)
    steps = n_train // batch  # the last incomplete batch is dropped: one shape, buffers reused
    result = ModelResult(name, center_weight, triplet_weight)
    bar = ProgressBar(progress, name, config.epochs)

    for epoch in range(1, config.epochs + 1):
        order = xp.asarray(order_rng.permutation(n_train))
        running = 0.0
        for s in range(steps):
            start = time.perf_counter()
            rows = order[s * batch:(s + 1) * batch]
            loss, _, grads = loss_and_gradients(net, objective, x_train[rows], y_train[rows])
            adam.step(grads)
            arrays.sync()
            result.step_seconds += time.perf_counter() - start
            running += loss
            bar.update(epoch, (s + 1) / steps, f"train loss {running / (s + 1):.4f}")
        test_loss, test_acc, _ = evaluate(net, arrays, x_test, y_test)
        result.history.append(EpochStats(epoch, running / steps, test_loss, test_acc))
        bar.finish_epoch(epoch, f"train loss {running / steps:.4f}  held-out loss {test_loss:.4f}"
                                f"  acc {test_acc:.3f}")

    result.steps = steps * config.epochs
    result.fastloss_seconds = objective.fastloss_seconds
    result.test_loss, result.test_accuracy, embedding = evaluate(net, arrays, x_test, y_test)
    result.embeddings = arrays.host(embedding).astype(np.float64)
    result.labels = arrays.host(y_test)
    result.spread = within_class_spread(result.embeddings, result.labels)
    if objective.centers is not None:
        result.centers, result.learned_centers = arrays.host(objective.centers), True
    else:
        result.centers = class_means(result.embeddings, result.labels)[1]
    return result


def warm_up(data, num_classes, config, arrays):
    """Call every fastloss function the training will call once, on a real batch
    (the kernels compile or load from the disk cache here); the seconds taken."""
    x_train, y_train, x_test, y_test = data
    sizes = (x_train.shape[1], *config.hidden, EMBEDDING_DIM, num_classes)
    net = MLP(sizes, _rng(config.seed, "init"), arrays.xp)
    objective = Objective(sizes[-1], EMBEDDING_DIM, center_weight=config.center_weight,
                          triplet_weight=config.triplet_weight, margin=config.margin,
                          arrays=arrays)
    batch = min(config.batch_size, x_train.shape[0])
    start = time.perf_counter()
    loss_and_gradients(net, objective, x_train[:batch], y_train[:batch])
    evaluate(net, arrays, x_test, y_test)
    arrays.sync()
    return time.perf_counter() - start


def single_threaded_blas():
    """A context in which NumPy's BLAS uses one thread (``threadpoolctl``), or a
    no-op without threadpoolctl: for products this small, threads only wait."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def model_names(config):
    extra = [f"center x{config.center_weight:g}" if config.center_weight > 0 else None,
             f"triplet x{config.triplet_weight:g}" if config.triplet_weight > 0 else None]
    return "softmax", " + ".join(["softmax", *[e for e in extra if e]])


def run_demo(config=DemoConfig(), *, out=None, progress=None):
    """Train softmax alone and softmax + center (+ triplet) loss; print the report
    to ``out`` (None: print nothing) and the progress to ``progress``
    (None: none); save the picture to ``config.out`` (None: no picture).
    Returns a ``DemoResult``; raises ``DemoError`` for bad options, a missing
    dataset or a missing GPU."""
    problem = config.problem()
    if problem:
        raise DemoError(problem)
    started = time.perf_counter()
    arrays = ArrayModule(config.backend, config.use_cupy)
    ds = load_dataset(config.dataset, config.seed, config.samples)
    if ds.x_train.shape[0] < 2:
        raise DemoError("too few rows to train on: raise --samples")
    data = tuple(arrays.asarray(a) for a in (ds.x_train, ds.y_train, ds.x_test, ds.y_test))
    sizes = (ds.x_train.shape[1], *config.hidden, EMBEDDING_DIM, ds.num_classes)
    result = DemoResult(config, ds.name, sizes, ds.x_train.shape[0], ds.x_test.shape[0],
                        "cupy" if arrays.on_cupy else "numpy", 0.0)
    if out is not None:
        print(_header(result), file=out, flush=True)
    baseline_name, combined_name = model_names(config)
    with single_threaded_blas():
        result.first_call_seconds = warm_up(data, ds.num_classes, config, arrays)
        baseline = train_model(baseline_name, data, ds.num_classes, config, arrays,
                               center_weight=0.0, triplet_weight=0.0, progress=progress)
        combined = train_model(combined_name, data, ds.num_classes, config, arrays,
                               center_weight=config.center_weight,
                               triplet_weight=config.triplet_weight, progress=progress)
    result.models = (baseline, combined)
    if config.out is not None:
        result.picture_tool = save_picture(config.out, result.models)
        result.picture = config.out
    result.total_seconds = time.perf_counter() - started
    if out is not None:
        print_report(result, out)
    return result


# ---------------------------------------------------------------------- the report


def _header(result):
    c = result.config
    where = (f"backend {c.backend}" + (f", {result.array_module} arrays" if c.backend == "cuda" else ""))
    return (f"fastloss demo: {result.dataset} ({result.n_train} training / {result.n_test} held-out "
            f"rows, {result.sizes[0]} features, {result.sizes[-1]} classes), MLP "
            f"{'-'.join(str(s) for s in result.sizes)}, Adam lr {c.lr:g}, {c.epochs} epochs of "
            f"batch {c.batch_size}, seed {c.seed}, {where}")


def print_report(result, out):
    """The end-of-run summary: both models side by side, timings and the picture."""
    print(f"first fastloss calls (JIT compile or disk-cache load): {result.first_call_seconds:.2f} s",
          file=out)
    header = (f"{'model':<36} {'held-out acc':>12} {'held-out loss':>13} {'spread':>8} "
              f"{'fastloss s':>10} {'rest s':>7} {'fastloss %':>10}")
    print(header, file=out)
    print("-" * len(header), file=out)
    for m in result.models:
        share = 100 * m.fastloss_seconds / m.step_seconds if m.step_seconds > 0 else float("nan")
        print(f"{m.name:<36} {m.test_accuracy:>12.3f} {m.test_loss:>13.4f} {m.spread:>8.4f} "
              f"{m.fastloss_seconds:>10.3f} {m.rest_seconds:>7.3f} {share:>9.0f}%", file=out)
    baseline, combined = result.models
    print("spread: mean squared distance of held-out embeddings to their class mean / mean "
          "squared distance between class means (lower: tighter clusters)", file=out)
    print("fastloss s: time in fastloss calls during the training steps; rest s: the rest of the "
          "steps (NumPy forward, backward, Adam)", file=out)
    if combined.spread > 0:
        print(f"{combined.name} shrank the within-class spread {baseline.spread / combined.spread:.1f}x "
              f"(held-out accuracy {baseline.test_accuracy:.3f} -> {combined.test_accuracy:.3f})",
              file=out)
    if result.picture:
        how = "" if result.picture_tool == "matplotlib" else " (drawn without matplotlib)"
        print(f"picture: {result.picture}{how}: held-out embeddings, left {baseline.name}, right "
              f"{combined.name}; large markers: centers", file=out)
    print(f"total {result.total_seconds:.1f} s", file=out)


# ---------------------------------------------------------------------- the picture


def save_picture(path, models):
    """Two panels of held-out 2-D embeddings with their centers; "matplotlib" or
    "numpy" (the PNG writer below), whichever drew it."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        write_png(path, rasterize(models))
        return "numpy"
    fig = Figure(figsize=(5.2 * len(models), 5.2))
    for i, m in enumerate(models):
        ax = fig.add_subplot(1, len(models), i + 1)
        colors = [TAB10[k % len(TAB10)] for k in m.labels]
        ax.scatter(m.embeddings[:, 0], m.embeddings[:, 1], c=colors, s=7, alpha=0.6, linewidths=0)
        center_colors = [TAB10[k % len(TAB10)] for k in range(len(m.centers))]
        ax.scatter(m.centers[:, 0], m.centers[:, 1], c=center_colors, marker="X", s=140,
                   edgecolors="black", linewidths=1.2)
        what = "fastloss's centers" if m.learned_centers else "class means"
        ax.set_title(f"{m.name}\nheld-out acc {m.test_accuracy:.3f}, spread {m.spread:.3f}\n"
                     f"X: {what}", fontsize=10)
        ax.set_aspect("equal", adjustable="datalim")
        ax.tick_params(labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return "matplotlib"


def _rgb(hex_color):
    return tuple(int(hex_color[i:i + 2], 16) for i in (1, 3, 5))


def rasterize(models, panel=400, pad=16):
    """An ``(H, W, 3)`` uint8 image: one square panel per model, points as 3x3
    squares of their class color, centers as 9x9 black squares with a colored core."""
    width = len(models) * panel + (len(models) + 1) * pad
    image = np.full((panel + 2 * pad, width, 3), 255, np.uint8)
    palette = np.array([_rgb(c) for c in TAB10], np.uint8)
    for i, m in enumerate(models):
        left, top = pad + i * (panel + pad), pad
        image[top:top + panel, [left, left + panel - 1]] = 160  # frame
        image[[top, top + panel - 1], left:left + panel] = 160
        pts = np.concatenate([m.embeddings, m.centers])
        lo, hi = pts.min(axis=0), pts.max(axis=0)
        span = max(float((hi - lo).max()), 1e-12) * 1.1  # one scale for both axes
        frame = ((lo + hi) / 2, span, left, top, panel)
        px, py = _to_pixels(m.embeddings, *frame)
        _stamp(image, px, py, 1, palette[m.labels % len(palette)])
        cx, cy = _to_pixels(m.centers, *frame)
        _stamp(image, cx, cy, 4, np.zeros((len(cx), 3), np.uint8))
        _stamp(image, cx, cy, 2, palette[np.arange(len(cx)) % len(palette)])
    return image


def _to_pixels(xy, mid, span, left, top, panel):
    """Pixel columns and rows of the points ``xy`` in a panel showing the square
    of side ``span`` around ``mid`` (y pointing up)."""
    u = (xy - mid) / span + 0.5  # in [0.05, 0.95]
    return ((left + u[:, 0] * (panel - 1)).astype(int),
            (top + (1 - u[:, 1]) * (panel - 1)).astype(int))


def _stamp(image, xs, ys, radius, colors):
    """Squares of half-width ``radius`` centered at the pixels ``(xs, ys)``, clipped to the image."""
    h, w, _ = image.shape
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            x, y = np.clip(xs + dx, 0, w - 1), np.clip(ys + dy, 0, h - 1)
            image[y, x] = colors


def write_png(path, rgb):
    """Write an ``(H, W, 3)`` uint8 array as an 8-bit RGB PNG (no filter, zlib), needing nothing."""
    rgb = np.ascontiguousarray(rgb, np.uint8)
    h, w, _ = rgb.shape
    raw = np.concatenate([np.zeros((h, 1), np.uint8), rgb.reshape(h, w * 3)], axis=1)  # filter 0

    def chunk(tag, data):
        return (struct.pack(">I", len(data)) + tag + data
                + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF))

    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)  # 8 bits, truecolor, no interlace
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                + chunk(b"IDAT", zlib.compress(raw.tobytes(), 6)) + chunk(b"IEND", b""))


# ---------------------------------------------------------------------- the command


def add_arguments(parser):
    d = DemoConfig()
    parser.add_argument("--dataset", choices=DATASETS, default=d.dataset,
                        help="auto: scikit-learn's digits when installed, else synthetic (default auto)")
    parser.add_argument("--samples", type=int, default=None, metavar="N",
                        help=f"use N rows of the dataset (default: all of digits' 1797; {SYNTHETIC_ROWS} synthetic)")
    parser.add_argument("--epochs", type=int, default=d.epochs,
                        help=f"passes over the training rows, for each model (default {d.epochs})")
    parser.add_argument("--batch-size", type=int, default=d.batch_size, metavar="N",
                        help=f"rows per training step (default {d.batch_size})")
    parser.add_argument("--lr", type=float, default=d.lr, help=f"Adam's learning rate (default {d.lr:g})")
    parser.add_argument("--center-weight", type=float, default=d.center_weight, metavar="LAMBDA",
                        help=f"weight of center loss in the second model (default {d.center_weight:g})")
    parser.add_argument("--alpha", type=float, default=d.alpha,
                        help=f"center update rate, in [0, 1] (default {d.alpha:g})")
    parser.add_argument("--triplet-weight", type=float, default=d.triplet_weight, metavar="W",
                        help="weight of batch-hard triplet loss in the second model (default 0: off)")
    parser.add_argument("--margin", type=float, default=d.margin,
                        help=f"triplet margin (default {d.margin:g})")
    parser.add_argument("--seed", type=int, default=d.seed,
                        help="seed of the synthetic data, the held-out split, the initial weights "
                             f"and the batch order, the same for both models (default {d.seed})")
    parser.add_argument("--backend", choices=("cpu", "cuda"), default=d.backend,
                        help="where fastloss runs; cuda keeps everything on the GPU when CuPy is "
                             "installed (default cpu)")
    parser.add_argument("--out", default=d.out, metavar="PNG",
                        help=f"where to save the picture (default {d.out})")
    parser.add_argument("--no-plot", action="store_true", help="save no picture")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch lines")


def config_from_args(args):
    return DemoConfig(dataset=args.dataset, samples=args.samples, epochs=args.epochs,
                      batch_size=args.batch_size, lr=args.lr, center_weight=args.center_weight,
                      alpha=args.alpha, triplet_weight=args.triplet_weight, margin=args.margin,
                      seed=args.seed, backend=args.backend,
                      out=None if args.no_plot else args.out, quiet=args.quiet)


def run(args):
    config = config_from_args(args)
    try:
        run_demo(config, out=sys.stdout, progress=None if config.quiet else sys.stderr)
    except DemoError as exc:
        print(f"fastloss demo: {exc}", file=sys.stderr)
        return 2
    return 0


__all__ = ["DemoConfig", "DemoError", "DemoResult", "ModelResult", "run_demo"]
