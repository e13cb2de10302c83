"""Center loss (Wen et al. 2016): the loss, its in-place center update, and a holder of centers."""
import numpy as np

from fastloss import _validation as check
from fastloss._dispatch import select_backend
from fastloss._reduction import grad_scale, reduce
from fastloss._result import LossGrad
from fastloss.cpu import _storage
from fastloss.cpu.center import center_rows, update_centers


def _checked(features, labels, centers, alpha, update):
    """(features, int64 labels, centers, alpha) after every check, before anything runs."""
    features = check.feature_rows(features, "features")
    centers = check.centers_array(centers, features.shape[1], writable=update)
    labels = check.row_labels(labels, features.shape[0], "labels", upper=centers.shape[0])
    alpha = check.unit_interval(alpha, "alpha")
    return features, labels, centers, alpha


def center_update(centers, features, labels, *, alpha=0.5, backend="auto"):
    r"""Move each class center toward the features of its class, in place.

    For every class ``j`` present in the batch, with ``n_j`` rows of label ``j``:

    .. math::

        c_j \leftarrow c_j - \alpha \frac{\sum_{i: y_i = j} (c_j - x_i)}{1 + n_j}

    the rule of Wen et al., "A Discriminative Feature Learning Approach for
    Deep Face Recognition" (ECCV 2016), and of the seed's TensorFlow code.
    Classes absent from the batch are untouched.

    Deterministic: a Cython extension groups the rows by label (counting sort)
    and updates each class from its own rows, in row order, accumulating in
    float64; one thread owns each class, so the bits are the same for any
    thread count, and a permutation of the rows changes them by round-off at
    most.  NaN or inf in a row reaches only the center of that row's label.

    Args:
      centers: ``(K, D)`` float32 or float64 NumPy array, updated in place.
      features: ``(N, D)`` float16/32/64 array.
      labels: ``(N,)`` integers in ``[0, K)``; duplicates are the normal case.
      alpha: center learning rate, in ``[0, 1]`` (the paper's range).
      backend: ``"auto"``, ``"cpu"`` or ``"cuda"``.

    Returns:
      ``centers``, updated.  On bad input nothing is changed.

    Example:
      >>> import numpy as np, fastloss as fl
      >>> centers = np.zeros((2, 2))
      >>> fl.center_update(centers, np.array([[2.0, 4.0], [4.0, 8.0]]), [1, 1], alpha=0.5).tolist()
      [[0.0, 0.0], [1.0, 2.0]]
    """
    select_backend(backend, centers=centers, features=features, labels=labels)
    features, labels, centers, alpha = _checked(features, labels, centers, alpha, update=True)
    return update_centers(centers, features, labels, alpha)


def center_loss(features, labels, centers, *, alpha=0.5, update=True, reduction="mean", grad=True,
                grad_out=None, backend="auto"):
    r"""Center loss and its gradient w.r.t. the features; then the center update, in place.

    .. math::

        \ell_i = \tfrac12 \lVert x_i - c_{y_i} \rVert^2, \qquad
        \frac{\partial \ell_i}{\partial x_i} = x_i - c_{y_i}

    (Wen et al., ECCV 2016), so ``reduction="sum"`` equals the seed's
    ``tf.nn.l2_loss(features - centers_batch)`` and ``"mean"`` divides by N.
    Loss and gradient come from one fused pass and use the centers as they
    were before the update; then, when ``update=True``, :func:`center_update`
    moves the centers with learning rate ``alpha``.

    Args:
      features: ``(N, D)`` float16/32/64 array.
      labels: ``(N,)`` integers in ``[0, K)``.
      centers: ``(K, D)`` float32/float64 array; updated in place when
        ``update=True`` (so it must be a writable NumPy array), only read otherwise.
        The loss is computed in the features' precision (float32 for float16).
      alpha: center learning rate in ``[0, 1]``.
      update: whether to apply the center update after the loss.
      reduction: ``"mean"`` (over the N rows), ``"sum"`` or ``"none"`` (``(N,)``).
      grad: whether to compute the gradient.
      grad_out: optional ``(N, D)`` array of the features' dtype to write the
        gradient into; it may be ``features`` itself (written after the update
        has read them) but must not share memory with ``centers``.
      backend: ``"auto"``, ``"cpu"`` or ``"cuda"``.

    Returns:
      ``LossGrad(loss, grad)``.  Bad input raises before anything is computed
      or any center changes.

    Example:
      >>> import numpy as np, fastloss as fl
      >>> centers = np.zeros((3, 2))
      >>> x = np.array([[1.0, 2.0], [3.0, 4.0]])
      >>> loss, grad = fl.center_loss(x, [0, 2], centers, reduction="sum")
      >>> float(loss), grad.tolist()
      (15.0, [[1.0, 2.0], [3.0, 4.0]])
      >>> centers.tolist()   # each present class moved by alpha * (x - c) / (1 + 1)
      [[0.25, 0.5], [0.0, 0.0], [0.75, 1.0]]
    """
    select_backend(backend, features=features, labels=labels, centers=centers, grad_out=grad_out)
    features, labels, centers, alpha = _checked(features, labels, centers, alpha, update)
    reduction = check.reduction(reduction)
    if grad and grad_out is not None:
        check.grad_buffer(grad_out, features.shape, features.dtype)
        if np.may_share_memory(grad_out, centers):
            raise ValueError("grad_out must not share memory with centers")

    n = features.shape[0]
    T = _storage.compute_type(features.dtype)
    x = _storage.kernel_view(features)
    c = np.ascontiguousarray(centers, dtype=T)
    if grad:  # the update reads the features after the gradient is written: never in place then
        written, result = _storage.gradient_buffer(grad_out, features.shape, features.dtype,
                                                   None if update else features, (features, centers))
        g = _storage.kernel_view(written)
    else:
        g = np.empty((1, features.shape[1]), x.dtype)
    losses, total = center_rows(x, labels, c, grad_scale(reduction == "mean", n), g, grad, T)
    if update:
        update_centers(centers, features, labels, alpha)
    loss = reduce(losses, total, reduction, n, (n,), features.dtype)
    return LossGrad(loss, _storage.finish_gradient(written, result) if grad else None)


class CenterLoss:
    """Holds the class centers of center loss and applies loss + update in one call.

    ``cl = CenterLoss(K, D)`` starts from zero centers, as the seed does (or
    from ``init``); ``loss, grad = cl(features, labels)`` is
    :func:`center_loss` with ``cl.centers``, which it updates.
    ``state_dict()`` / ``load_state_dict()`` round-trip through plain NumPy
    arrays, copied both ways.

    Args:
      num_classes: K, the number of centers.
      num_features: D, their width.
      alpha: center learning rate in ``[0, 1]``.
      init: optional ``(K, D)`` initial centers (copied).
      dtype: ``"float32"`` (default) or ``"float64"``.
      device: ``"cpu"``; ``"cuda"`` keeps the centers on the GPU.

    Example:
      >>> import numpy as np, fastloss as fl
      >>> cl = fl.CenterLoss(num_classes=2, num_features=3)
      >>> loss, grad = cl(np.ones((4, 3), np.float32), [0, 1, 1, 1])
      >>> float(loss), cl.centers[1].tolist()
      (1.5, [0.375, 0.375, 0.375])
    """

    def __init__(self, num_classes, num_features, *, alpha=0.5, init=None, dtype="float32",
                 device="cpu"):
        num_classes = check.integer(num_classes, "num_classes")
        num_features = check.integer(num_features, "num_features")
        if num_classes < 1 or num_features < 0:
            raise ValueError(f"num_classes must be >= 1 and num_features >= 0, got "
                             f"{num_classes} and {num_features}")
        dtype = np.dtype(dtype)
        if dtype not in check.FLOAT_DTYPES[1:]:
            raise TypeError(f"dtype must be float32 or float64, got {dtype}")
        if device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
        if device == "cuda":
            select_backend("cuda")  # the GPU backend's own error until it exists
        self.alpha = check.unit_interval(alpha, "alpha")
        self.device = device
        self.centers = np.zeros((num_classes, num_features), dtype)
        if init is not None:
            self.load_state_dict({"centers": init})

    def __call__(self, features, labels, *, update=True, reduction="mean", grad=True,
                 grad_out=None):
        return center_loss(features, labels, self.centers, alpha=self.alpha, update=update,
                           reduction=reduction, grad=grad, grad_out=grad_out)

    def state_dict(self):
        """``{"centers": copy of the centers, "alpha": alpha}``, plain NumPy."""
        return {"centers": np.array(self.centers, copy=True), "alpha": self.alpha}

    def load_state_dict(self, state):
        """Copies ``state["centers"]`` (shape ``(K, D)``, any float dtype) into the
        centers, and ``state["alpha"]`` when present; checks everything first."""
        if "centers" not in state:
            raise ValueError("state must have a 'centers' entry")
        new = check.float_array(state["centers"], "centers")
        check.shape_equal(new, self.centers.shape, "centers", "num_classes x num_features")
        alpha = check.unit_interval(state.get("alpha", self.alpha), "alpha")
        np.copyto(self.centers, new, casting="same_kind")
        self.alpha = alpha

    def __repr__(self):
        K, D = self.centers.shape
        return (f"CenterLoss(num_classes={K}, num_features={D}, alpha={self.alpha}, "
                f"dtype={self.centers.dtype.name!r}, device={self.device!r})")
