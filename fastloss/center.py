"""Center loss (Wen et al. 2016): the loss, its in-place center update, and a holder of centers."""
import numpy as np

from fastloss import _validation as check
from fastloss._dispatch import on_device, select_backend
from fastloss._result import LossGrad
from fastloss.cpu import _storage
from fastloss.cpu import center as cpu


def _checked(features, labels, centers, alpha, update):
    """(features, int64 labels, centers, alpha) after every check, before anything runs.
    On the GPU, ``fastloss.cuda.center.checked_call`` runs the same checks."""
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
    and updates each class from its own rows, accumulating in float64 in an
    order fixed by the rows' contents (their bytes, compared
    lexicographically); one thread owns each class, so the bits are the same
    for any thread count and any order of the rows (stronger than the
    contract's "round-off at most").  NaN or inf in a row reaches only the
    center of that row's label.

    On the GPU (CUDA arrays, or ``backend="cuda"``) the same rule runs as
    Numba CUDA kernels with no float atomics: a stable counting sort of the
    rows by label on the device, then one block per class (and tile of
    features) whose threads each sum one feature over the class's rows in
    ascending row order, in float64; the bits do not depend on the threads
    per block, and equal the CPU's up to round-off (a permutation of the rows
    can change the GPU's result by round-off; not the CPU's).
    ``centers`` is then a CUDA array (CuPy, Numba device array, ...) updated
    in place, or a NumPy array when ``backend="cuda"`` is given NumPy inputs
    (copied over and back).

    Args:
      centers: ``(K, D)`` float32 or float64 array, updated in place (a
        NumPy array on the CPU, a CUDA array on the GPU).
      features: ``(N, D)`` float16/32/64 array.
      labels: ``(N,)`` integers in ``[0, K)``; duplicates are the normal case.
      alpha: center learning rate, in ``[0, 1]`` (the paper's range), default
        ``0.5`` (the seed's).
      backend: ``"auto"`` (default), ``"cpu"`` or ``"cuda"``.

    Dask ``features`` and ``labels`` (chunked along the rows; ``centers`` in memory): the
    per-class sums and counts of every chunk are merged in a fixed tree, computed before
    the call returns, then applied once, in place: equal to one in-memory call on all the
    rows to round-off, and the same bits on every run.

    Shapes:
      centers ``(K, D)``, features ``(N, D)``, labels ``(N,)`` -> centers
      ``(K, D)`` (the same array).

    Returns:
      ``centers``, updated.  On bad input nothing is changed.

    References:
      Wen, Zhang, Li & Qiao 2016, "A Discriminative Feature Learning Approach
      for Deep Face Recognition" (ECCV), the center update of its Algorithm 1.

    Example:
      Class 1 has two rows, so its center moves by
      ``0.5 * ((2, 4) + (4, 8)) / (1 + 2)``; class 0 is absent and stays:

      >>> import numpy as np, fastloss as fl
      >>> centers = np.zeros((2, 2))
      >>> fl.center_update(centers, np.array([[2.0, 4.0], [4.0, 8.0]]), [1, 1], alpha=0.5).tolist()
      [[0.0, 0.0], [1.0, 2.0]]
    """
    where = select_backend(backend, centers=centers, features=features, labels=labels)
    if where == "dask":
        from fastloss import _dask
        return _dask.center_update(center_update, locals())
    if where == "cuda":
        from fastloss.cuda import center as gpu
        gpu.center_update(gpu.checked_call(features, labels, centers, alpha, update=True))
        return centers
    features, labels, centers, alpha = _checked(features, labels, centers, alpha, update=True)
    return cpu.center_update(centers, features, labels, alpha)


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

    Dask ``features`` and ``labels`` (chunked along the rows; ``centers`` in memory): loss
    and gradient are lazy (``"mean"`` over all N rows) and read a copy of the centers as
    they were; with ``update=True`` the update of all the rows (as :func:`center_update`
    on Dask arrays) is applied to ``centers`` before the call returns.

    Args:
      features: ``(N, D)`` float16/32/64 array.
      labels: ``(N,)`` integers in ``[0, K)``.
      centers: ``(K, D)`` float32/float64 array; updated in place when
        ``update=True`` (so it must be a writable NumPy array, or a CUDA
        array beside CUDA features), only read otherwise.
        The loss is computed in the features' precision (float32 for float16).
      alpha: center learning rate in ``[0, 1]``, default ``0.5``.
      update: default ``True``: apply the center update after the loss;
        ``False`` leaves ``centers`` untouched.
      reduction: ``"mean"`` (default; over the N rows), ``"sum"`` or ``"none"``
        (``(N,)``).
      grad: ``True`` (default): compute the gradient; ``False``: ``grad`` is ``None``.
      grad_out: ``None`` (default) or an ``(N, D)`` array of the features' dtype to write the
        gradient into; it may be ``features`` itself (written after the update
        has read them) but must not share memory with ``centers``.  On the
        GPU, "sharing memory" is decided from the device pointers, shapes and
        strides of ``__cuda_array_interface__`` (byte ranges that intersect,
        as ``np.may_share_memory``); under Numba's CUDA simulator from the
        NumPy arrays its device arrays wrap.
      backend: ``"auto"`` (default), ``"cpu"`` or ``"cuda"``.  On the GPU (CUDA arrays,
        every array argument on the device, ``centers`` included) the loss and
        gradient come from one CUDA kernel (one block per row) and the update
        is :func:`center_update`'s deterministic CUDA one; the results are
        arrays of the features' kind.  ``backend="cuda"`` with NumPy inputs
        copies them over and the results, and the updated centers, back.

    Shapes:
      features ``(N, D)``, labels ``(N,)``, centers ``(K, D)`` -> loss ``()``, or
      ``(N,)`` for ``"none"``; grad ``(N, D)``, the features' dtype.

    Returns:
      ``LossGrad(loss, grad)``.  Bad input raises before anything is computed
      or any center changes.

    References:
      Wen, Zhang, Li & Qiao 2016, "A Discriminative Feature Learning Approach
      for Deep Face Recognition" (ECCV).

    Example:
      >>> import numpy as np, fastloss as fl
      >>> centers = np.zeros((3, 2))
      >>> x = np.array([[1.0, 2.0], [3.0, 4.0]])
      >>> loss, grad = fl.center_loss(x, [0, 2], centers, reduction="sum")
      >>> float(loss), grad.tolist()  # 0.5 * (1 + 4) + 0.5 * (9 + 16); x - 0
      (15.0, [[1.0, 2.0], [3.0, 4.0]])
      >>> centers.tolist()   # each present class moved by alpha * (x - c) / (1 + 1)
      [[0.25, 0.5], [0.0, 0.0], [0.75, 1.0]]
      >>> loss, grad = fl.center_loss(x, [0, 2], np.zeros((3, 2)), update=False)
      >>> float(loss), grad.tolist()  # the mean: 15 / 2, (x - 0) / 2
      (7.5, [[0.5, 1.0], [1.5, 2.0]])
    """
    where = select_backend(backend, features=features, labels=labels, centers=centers,
                           grad_out=grad_out)
    if where == "dask":
        from fastloss import _dask
        return _dask.call(center_loss, locals())
    if where == "cuda":
        from fastloss.cuda import center as gpu
        call = gpu.checked_call(features, labels, centers, alpha, update)
        reduction = check.reduction(reduction)
        g_view = gpu.checked_grad_out(call, grad_out) if grad else None
        return LossGrad(*gpu.center_loss(call, update, reduction, grad, grad_out, g_view))
    features, labels, centers, alpha = _checked(features, labels, centers, alpha, update)
    reduction = check.reduction(reduction)
    if grad and grad_out is not None and not _storage.ready_apart((grad_out,), (features,),
                                                                 (centers,)):
        check.grad_buffer(grad_out, features.shape, features.dtype)
        if not _storage.apart(grad_out, centers):
            raise ValueError("grad_out must not share memory with centers")
    return LossGrad(*cpu.center_loss(features, labels, centers, alpha, update, reduction, grad,
                                     grad_out))


class CenterLoss:
    """Holds the class centers of center loss and applies loss + update in one call.

    ``cl = CenterLoss(K, D)`` starts from zero centers, as the seed does (or
    from ``init``); ``loss, grad = cl(features, labels)`` is
    :func:`center_loss` with ``cl.centers``, which it updates.
    ``state_dict()`` / ``load_state_dict()`` round-trip through plain NumPy
    arrays, copied both ways.

    With ``device="cuda"``, ``cl.centers`` is a Numba device array
    (``numba.cuda.DeviceNDArray``; CuPy is not needed), updated in place on
    the GPU; the features and labels passed to ``cl(...)`` must then be CUDA
    arrays too (CuPy, Numba, PyTorch...: mixing devices is a TypeError), and
    the results are of the features' kind.  ``state_dict()`` copies the
    centers to the host; ``load_state_dict()`` checks the NumPy array on the
    host and copies it to the device.

    Args:
      num_classes: K, the number of centers, ``>= 1``.
      num_features: D, their width.
      alpha: center learning rate in ``[0, 1]``, default ``0.5``.
      init: ``None`` (default: zero centers) or ``(K, D)`` initial centers
        (copied).
      dtype: ``"float32"`` (default) or ``"float64"``.
      device: ``"cpu"`` (default); ``"cuda"`` keeps the centers on the GPU.

    Shapes:
      ``cl.centers`` is ``(K, D)``; ``cl(features (N, D), labels (N,))`` gives
      a loss ``()`` (``(N,)`` for ``reduction="none"``) and a grad ``(N, D)``.

    References:
      Wen, Zhang, Li & Qiao 2016, "A Discriminative Feature Learning Approach
      for Deep Face Recognition" (ECCV).

    Example:
      >>> import numpy as np, fastloss as fl
      >>> cl = fl.CenterLoss(num_classes=2, num_features=3)
      >>> loss, grad = cl(np.ones((4, 3), np.float32), [0, 1, 1, 1])
      >>> float(loss), cl.centers[1].tolist()  # 0.5 * 3; 0.5 * 3 / (1 + 3) per feature
      (1.5, [0.375, 0.375, 0.375])
      >>> cl
      CenterLoss(num_classes=2, num_features=3, alpha=0.5, dtype='float32', device='cpu')
    """

    def __init__(self, num_classes, num_features, *, alpha=0.5, init=None, dtype="float32",
                 device="cpu"):
        num_classes = check.integer(num_classes, "num_classes")
        num_features = check.integer(num_features, "num_features")
        if num_classes < 1 or num_features < 0:
            raise ValueError(f"num_classes must be >= 1 and num_features >= 0, got "
                             f"{num_classes} and {num_features}")
        try:
            dtype = np.dtype(dtype)
        except TypeError:
            raise TypeError(f"dtype must be float32 or float64, got {dtype!r}") from None
        if dtype not in check.FLOAT_DTYPES[1:]:
            raise TypeError(f"dtype must be float32 or float64, got {dtype}")
        if device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
        self.alpha = check.unit_interval(alpha, "alpha")
        self.device = device
        if device == "cuda":
            from fastloss.cuda._arrays import cuda_module
            self.centers = cuda_module().to_device(np.zeros((num_classes, num_features), dtype))
        else:
            self.centers = np.zeros((num_classes, num_features), dtype)
        if init is not None:
            self.load_state_dict({"centers": init})

    def __call__(self, features, labels, *, update=True, reduction="mean", grad=True,
                 grad_out=None):
        """:func:`center_loss` with ``self.centers`` and ``self.alpha``: the loss and
        its gradient w.r.t. the features, then (``update=True``, the default) the
        update of ``self.centers`` in place.

        Args:
          features: ``(N, D)`` float16/32/64 array.
          labels: ``(N,)`` integers in ``[0, K)``.
          update, reduction, grad, grad_out: as in :func:`center_loss` (defaults
            ``True``, ``"mean"``, ``True``, ``None``).

        Shapes:
          features ``(N, D)``, labels ``(N,)`` -> loss ``()`` (``(N,)`` for
          ``"none"``), grad ``(N, D)`` of the features' dtype; ``self.centers``
          stays ``(K, D)``.

        Returns:
          ``LossGrad(loss, grad)``.

        Example:
          >>> import numpy as np, fastloss as fl
          >>> cl = fl.CenterLoss(num_classes=2, num_features=2, dtype="float64")
          >>> loss, grad = cl(np.array([[3.0, 0.0], [0.0, 3.0]]), [0, 0], reduction="none")
          >>> loss.tolist(), grad.tolist()  # 0.5 * 9 per row; x - 0
          ([4.5, 4.5], [[3.0, 0.0], [0.0, 3.0]])
          >>> cl.centers.tolist()  # c_0 += 0.5 * ((3, 0) + (0, 3)) / (1 + 2)
          [[0.5, 0.5], [0.0, 0.0]]
        """
        return center_loss(features, labels, self.centers, alpha=self.alpha, update=update,
                           reduction=reduction, grad=grad, grad_out=grad_out)

    def state_dict(self):
        """``{"centers": copy of the centers, "alpha": alpha}``, plain NumPy
        (copied from the GPU with ``device="cuda"``).

        Shapes: ``"centers"`` is a ``(K, D)`` array of the centers' dtype.

        Example:
          >>> import fastloss as fl
          >>> cl = fl.CenterLoss(num_classes=2, num_features=3, alpha=0.25)
          >>> d = cl.state_dict()
          >>> sorted(d), d["centers"].shape, d["alpha"]
          (['alpha', 'centers'], (2, 3), 0.25)
          >>> d["centers"][0, 0] = 7.0  # a copy: the centers themselves are unchanged
          >>> float(cl.centers[0, 0])
          0.0
        """
        if self.device == "cuda":
            return {"centers": self.centers.copy_to_host(), "alpha": self.alpha}
        return {"centers": np.array(self.centers, copy=True), "alpha": self.alpha}

    def load_state_dict(self, state):
        """Copies ``state["centers"]`` (shape ``(K, D)``, any float dtype) into the
        centers, and ``state["alpha"]`` when present; checks everything first.

        The centers keep their own dtype (float32 by default) and device; a
        wrong shape, a non-float array or an ``alpha`` outside ``[0, 1]`` raises
        and changes nothing.

        Example:
          >>> import numpy as np, fastloss as fl
          >>> cl = fl.CenterLoss(num_classes=2, num_features=2)
          >>> cl.load_state_dict({"centers": np.array([[1.0, 2.0], [3.0, 4.0]]), "alpha": 0.25})
          >>> cl.centers.dtype, cl.centers.tolist(), cl.alpha
          (dtype('float32'), [[1.0, 2.0], [3.0, 4.0]], 0.25)
          >>> cl.load_state_dict({"centers": np.zeros((3, 2))})
          Traceback (most recent call last):
          ...
          ValueError: centers must have shape (2, 2) (num_classes x num_features), got (3, 2)
        """
        if not (hasattr(state, "keys") and hasattr(state, "get")):
            raise TypeError(f"state must be a dict with a 'centers' entry, got {type(state).__name__}")
        if "centers" not in state:
            raise ValueError("state must have a 'centers' entry")
        new = check.float_array(state["centers"], "centers")
        if on_device(new):  # a CUDA array given anyway: read it through a Numba view
            from fastloss.cuda._arrays import Device
            new = Device(new).view(new, "centers").copy_to_host()
        check.shape_equal(new, tuple(self.centers.shape), "centers", "num_classes x num_features")
        alpha = check.unit_interval(state.get("alpha", self.alpha), "alpha")
        if self.device == "cuda":
            host = np.empty(tuple(self.centers.shape), self.centers.dtype)
            np.copyto(host, new, casting="same_kind")
            self.centers.copy_to_device(host)
        else:
            np.copyto(self.centers, new, casting="same_kind")
        self.alpha = alpha

    def __repr__(self):
        K, D = self.centers.shape
        return (f"CenterLoss(num_classes={K}, num_features={D}, alpha={self.alpha}, "
                f"dtype={self.centers.dtype.name!r}, device={self.device!r})")
