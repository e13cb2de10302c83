"""Focal losses: softmax (multi-class) and sigmoid (RetinaNet) public wrappers."""
import numpy as np

from fastloss import _validation as check
from fastloss._dispatch import on_device, select_backend
from fastloss._result import LossGrad
from fastloss.cpu import _storage
from fastloss.cpu import focal as cpu


def _is_scalar(value):
    """A Python or NumPy number, or a 0-d NumPy array (not a device array)."""
    return (isinstance(value, (int, float, np.number))
            or (isinstance(value, np.ndarray) and value.ndim == 0))


def _alpha(alpha, C, T):
    """``(scale, vector)`` of the per-class factors: ``alpha`` None (1, None), a
    number or a 0-d array (its value, None; a device one is read back, one
    synchronisation) or a ``(C,)`` vector (1, the checked vector)."""
    if alpha is None:
        return 1.0, None
    if on_device(alpha) and alpha.ndim == 0:
        return check.scalar(float(alpha.copy_to_host()), "alpha"), None
    if not on_device(alpha) and np.ndim(check.as_array(alpha, "alpha")) == 0:
        return check.scalar(alpha, "alpha"), None
    return 1.0, check.weight_vector(alpha, C, "alpha", T)


def focal_loss(logits, target, *, gamma=2.0, alpha=None, sample_weight=None, ignore_index=-100,
               reduction="mean", grad=True, grad_out=None, backend="auto"):
    r"""Multi-class softmax focal loss and its gradient w.r.t. the logits, in one pass.

    .. math::

        \ell = -s\, \alpha_y (1 - p_y)^\gamma \log p_y, \qquad p = \mathrm{softmax}(z)

    for an integer target ``y`` (Lin et al. 2017, "Focal Loss for Dense Object
    Detection", applied to a softmax), and
    ``-s sum_c t_c alpha_c (1 - p_c)^gamma log p_c`` for probability targets
    ``t``; ``s`` is the sample weight.  With ``q = 1 - p_y`` and ``l = log p_y``
    the gradient of one sample's loss is

    .. math::

        \frac{\partial \ell}{\partial z_j} = s\, \alpha_y
            \big(\gamma q^{\gamma-1} p_y l - q^\gamma\big)\big([j = y] - p_j\big).

    The modulating factor is computed in log space, so gradients stay
    finite for ``0 < gamma < 1`` and saturated logits.  ``gamma=0`` with
    ``alpha=None`` equals :func:`softmax_cross_entropy` with the same options.

    Args:
      logits: float16/32/64 array of shape ``(..., C)``.
      target: integer class indices of shape ``(...)`` or float probabilities
        of the logits' shape.
      gamma: focusing parameter, ``>= 0``, default ``2.0`` (the paper's).
      alpha: ``None`` (default: 1), a scalar applied to every class, or a
        ``(C,)`` array of per-class factors (the paper's alpha is a class
        balance: pass e.g. ``0.25``).  Unlike cross entropy's ``weight`` it does
        not enter the ``"mean"`` denominator.
      sample_weight: ``None`` (default) or weights of shape ``(...)``.
      ignore_index: default ``-100``; integer targets equal to it contribute
        nothing.
      reduction: ``"mean"`` (default) divides by the number of rows not ignored
        (or the sum of their sample weights; for probability targets, all
        rows); ``"sum"``; ``"none"`` (per-sample losses, gradient of their sum).
      grad, grad_out, backend: as in :func:`softmax_cross_entropy` (defaults
        ``True``, ``None``, ``"auto"``); ``grad_out=logits`` works in place.

    Shapes:
      logits ``(..., C)``, target ``(...)`` or ``(..., C)`` -> loss ``()``, or
      ``(...)`` for ``"none"``; grad ``(..., C)``, the logits' dtype.

    Returns:
      ``LossGrad(loss, grad)``.

    Dask arrays (``logits``, ``target``, ``sample_weight`` chunked along the rows;
    ``alpha`` in memory) give a lazy ``LossGrad`` whose ``"mean"`` is over the whole
    array, as for :func:`softmax_cross_entropy`.

    With probability targets, a class with zero target mass contributes 0
    (even when its probability is 0).

    On the GPU (CUDA arrays in, or ``backend="cuda"``) the same semantics run
    in one fused kernel per call, one block per row; ``alpha`` may be a
    number, a NumPy scalar or a ``(C,)`` device array (a 0-d device array is
    read back to the host, one synchronisation).  Logits of more than two
    dimensions must be C-contiguous there.

    References:
      Lin, Goyal, Girshick, He & Dollar 2017, "Focal Loss for Dense Object
      Detection" (ICCV).

    Example:
      Equal logits over 4 classes give ``p_y = 1/4``: the loss is
      ``(3/4)**2 log 4``, and ``gamma=0`` gives cross entropy's ``log 4``:

      >>> import numpy as np, fastloss as fl
      >>> loss, grad = fl.focal_loss(np.zeros((1, 4)), np.array([0]), gamma=2.0)
      >>> round(float(loss), 4)  # 0.5625 * log(4)
      0.7798
      >>> np.round(grad, 4).tolist()  # c * ([j = 0] - 1/4), c = 2 * 0.75 * 0.25 * log(1/4) - 0.5625
      [[-0.8118, 0.2706, 0.2706, 0.2706]]
      >>> round(float(fl.focal_loss(np.zeros((1, 4)), np.array([0]), gamma=0.0).loss), 4)
      1.3863
      >>> round(float(fl.focal_loss(np.zeros((1, 4)), np.array([0]), alpha=0.25).loss), 4)
      0.1949

      >>> logits = np.array([[2.0, 0.5, -1.0], [0.0, 0.0, 0.0]], np.float32)
      >>> loss, grad = fl.focal_loss(logits, np.array([0, 2]), gamma=2.0)
      >>> round(float(loss), 4)
      0.2497
    """
    dev = caller_grad_out = first_bad = None
    # a scalar alpha lives nowhere (a NumPy scalar or 0-d array with CUDA logits is no mix)
    scalar_alpha = alpha is None or _is_scalar(alpha)
    where = select_backend(backend, logits=logits, target=target,
                           alpha=None if scalar_alpha else alpha, sample_weight=sample_weight,
                           grad_out=grad_out)
    if where == "dask":
        from fastloss import _dask
        return _dask.call(focal_loss, locals())
    if where == "cuda":
        from fastloss.cuda._arrays import Device
        from fastloss.cuda._checks import label_check
        dev, caller_grad_out = Device(logits), grad_out
        first_bad = label_check(dev)
        logits, target, sample_weight, grad_out = dev.views(
            logits=logits, target=target, sample_weight=sample_weight, grad_out=grad_out)
        if not scalar_alpha:
            alpha = dev.view(alpha, "alpha")
    logits = check.class_logits(logits)
    reduction = check.reduction(reduction)
    gamma = check.nonnegative(gamma, "gamma")
    ignore_index = check.integer(ignore_index, "ignore_index")
    T = _storage.compute_type(logits.dtype)
    ascale, alpha = _alpha(alpha, tuple(logits.shape)[-1], T)
    labels, probs, sw = check.class_batch(logits, target, sample_weight, grad_out, grad,
                                          ignore_index, T, first_bad)

    if dev is not None:
        from fastloss.cuda import focal as gpu
        return LossGrad(*gpu.focal_loss(dev, logits, labels, probs, alpha, ascale, sw, ignore_index,
                                        gamma, reduction, grad, grad_out, caller_grad_out))
    return LossGrad(*cpu.focal_loss(logits, labels, probs, alpha, ascale, sw, ignore_index, gamma,
                                    reduction, grad, grad_out))


def sigmoid_focal_loss(logits, targets, *, alpha=0.25, gamma=2.0, reduction="mean", grad=True,
                       grad_out=None, backend="auto"):
    r"""Sigmoid focal loss (RetinaNet) and its gradient w.r.t. the logits, in one pass.

    .. math::

        \ell = \alpha_t (1 - p_t)^\gamma\, \mathrm{BCE}(x, t), \quad
        p_t = p t + (1-p)(1-t), \quad \alpha_t = \alpha t + (1-\alpha)(1-t)

    elementwise with ``p = sigmoid(x)``, equal to
    ``torchvision.ops.sigmoid_focal_loss`` (Lin et al. 2017).  ``alpha < 0``
    disables the alpha weighting, as there.  With ``m = 1 - p_t`` the gradient is

    .. math::

        \frac{\partial \ell}{\partial x} = \alpha_t \big[(p - t)\, m^\gamma
            + \gamma\, m^{\gamma-1} p (1-p) (1-2t)\, \mathrm{BCE}(x, t)\big].

    Computed in log space, so the gradient stays finite at saturated logits for
    any ``gamma >= 0`` (where torchvision returns NaN).

    Args:
      logits: float16/32/64 array, any shape.
      targets: array of the logits' shape with values in ``[0, 1]`` (float;
        bool or integer 0/1 labels are converted to the logits' dtype).
      alpha: balance factor of the positives, default ``0.25`` (torchvision's
        and the paper's); ``< 0`` for none.
      gamma: focusing parameter, ``>= 0``, default ``2.0``.
      reduction: ``"mean"`` (default) over all elements, ``"sum"``, or
        ``"none"`` (per-element losses of the logits' shape).
      grad, grad_out, backend: as in :func:`softmax_cross_entropy` (defaults
        ``True``, ``None``, ``"auto"``); ``grad_out=logits`` works in place.

    Shapes:
      logits and targets of one shape ``S`` -> loss ``()``, or ``S`` for
      ``"none"``; grad ``S``, the logits' dtype.

    Returns:
      ``LossGrad(loss, grad)``.

    Dask arrays (``logits`` and ``targets``, chunked along any axis) give a lazy
    ``LossGrad`` whose ``"mean"`` is over every element of the whole array.

    On the GPU the elementwise kernel reads 1-D and 2-D arrays as they are
    (strided or not) and arrays of more dimensions when C-contiguous.

    References:
      Lin, Goyal, Girshick, He & Dollar 2017, "Focal Loss for Dense Object
      Detection" (ICCV); ``torchvision.ops.sigmoid_focal_loss``.

    Example:
      At ``x = 0``, ``p = 1/2``: each element's loss is
      ``alpha_t * (1/2)**2 * log 2``, with ``alpha_t`` 0.25 for a positive and
      0.75 for a negative:

      >>> import numpy as np, fastloss as fl
      >>> loss, grad = fl.sigmoid_focal_loss(np.zeros(2), np.array([1.0, 0.0]), reduction="sum")
      >>> round(float(loss), 4)  # (0.25 + 0.75) * 0.25 * log(2)
      0.1733
      >>> np.round(grad, 4).tolist()  # alpha_t * (-+0.5 * 0.25 -+ log(2) * 2 * 0.5 * 0.25)
      [-0.0746, 0.2237]

      >>> x = np.array([[3.0, -1.0], [0.5, -4.0]], np.float32)
      >>> t = np.array([[1.0, 0.0], [0.0, 0.0]], np.float32)
      >>> loss, grad = fl.sigmoid_focal_loss(x, t)
      >>> round(float(loss), 4)
      0.075
    """
    dev = caller_grad_out = None
    where = select_backend(backend, logits=logits, targets=targets, grad_out=grad_out)
    if where == "dask":
        from fastloss import _dask
        return _dask.call(sigmoid_focal_loss, locals())
    if where == "cuda":
        from fastloss.cuda._arrays import Device
        dev, caller_grad_out = Device(logits), grad_out
        logits, targets, grad_out = dev.views(logits=logits, targets=targets, grad_out=grad_out)
    logits = check.float_array(logits, "logits")
    reduction = check.reduction(reduction)
    alpha = check.scalar(alpha, "alpha")
    gamma = check.nonnegative(gamma, "gamma")
    targets = check.as_array(targets, "targets", "an array of labels in [0, 1]")
    if targets.dtype.kind not in "fiub":
        raise TypeError(f"targets must be float (or 0/1 integer or bool) labels, got dtype {targets.dtype}")
    check.shape_equal(targets, logits.shape, "targets", "the logits' shape")
    if grad and grad_out is not None:
        check.grad_buffer(grad_out, logits.shape, logits.dtype, dev is not None)

    if dev is not None:
        from fastloss.cuda import focal as gpu
        return LossGrad(*gpu.sigmoid_focal_loss(dev, logits, targets, alpha, gamma, reduction, grad,
                                                grad_out, caller_grad_out))
    return LossGrad(*cpu.sigmoid_focal_loss(logits, targets, alpha, gamma, reduction, grad,
                                            grad_out))
