"""Softmax cross-entropy: the public wrapper (validation, dispatch, docstring)."""
import numpy as np

from fastloss import _validation as check
from fastloss._dispatch import select_backend
from fastloss._result import LossGrad
from fastloss.cpu import _storage
from fastloss.cpu import cross_entropy as cpu


def softmax_cross_entropy(logits, target, *, weight=None, sample_weight=None, ignore_index=-100,
                          label_smoothing=0.0, z_loss=0.0, softcap=None, reduction="mean",
                          grad=True, grad_out=None, backend="auto"):
    r"""Softmax cross-entropy and its gradient with respect to the logits, in one pass.

    For a row of logits ``z`` (after ``softcap``), ``p = softmax(z)``,
    ``lse = logsumexp(z)``, class weights ``w``, smoothing ``eps`` and sample
    weight ``s``, the per-sample loss is

    .. math::

        \ell = s \Big[(1-\varepsilon)\, w_y (\mathrm{lse} - z_y)
               + \tfrac{\varepsilon}{C} \sum_c w_c (\mathrm{lse} - z_c)
               + \lambda_z\, \mathrm{lse}^2\Big]

    for an integer target ``y``, and ``s [sum_c t'_c w_c (lse - z_c) + lambda_z lse^2]``
    with ``t' = (1-eps) t + eps/C`` for a probability target ``t``.  This is
    ``torch.nn.functional.cross_entropy`` on ``logits.reshape(-1, C)`` with the
    same options, plus PaLM's z-loss (Chowdhery et al. 2022) and Gemma 2's
    soft-capping ``z = softcap * tanh(x / softcap)``.

    The gradient of one sample's loss with respect to its (capped) logits is

    .. math::

        \frac{\partial \ell}{\partial z_j} = s \Big[(1-\varepsilon)\, w_y (p_j - [j = y])
            + \tfrac{\varepsilon}{C} (W p_j - w_j) + 2 \lambda_z\, \mathrm{lse}\, p_j\Big],
        \qquad W = \textstyle\sum_c w_c

    (``s [(sum_c w_c t'_c) p_j - w_j t'_j + 2 lambda_z lse p_j]`` for a probability
    target), times ``1 - tanh(x_j / softcap)**2`` through the cap, divided by the
    ``"mean"`` denominator.

    Args:
      logits: float16/32/64 array of shape ``(..., C)`` (any number of batch
        axes, possibly non-contiguous).  float16 computes in float32.
      target: integer class indices of shape ``(...)`` in ``[0, C)`` (or equal
        to ``ignore_index``), any integer dtype; or float probabilities (one-hot
        or soft labels) of the logits' shape.
      weight: ``None`` (default: every class 1) or ``(C,)`` class weights
        ``w``, as PyTorch's ``weight``.
      sample_weight: ``None`` (default: 1) or weights of shape ``(...)``
        multiplying each sample's loss (z-loss included); a fastloss extension.
      ignore_index: default ``-100``; integer targets equal to it contribute
        nothing (loss and gradient 0) and are left out of the mean.  Not used
        with probabilities.
      label_smoothing: ``eps`` in ``[0, 1]``, default ``0.0`` (Szegedy et al.
        2016): the target becomes ``(1 - eps) onehot(y) + eps / C``.
      z_loss: coefficient ``lambda_z >= 0`` of ``lse**2``, default ``0.0`` (0 on
        ignored rows; scaled by the sample weight, not the class weight).
      softcap: ``None`` (default: no cap) or a positive cap applied to the
        logits first.
      reduction: ``"mean"`` (default) divides the sum by the sum of the weights
        that apply: ``w[y] * sample_weight`` over rows not ignored for integer
        targets; the sample weights (or the row count) for probabilities, as
        in PyTorch.  ``"sum"``; ``"none"`` gives the per-sample losses of shape
        ``(...)`` and the gradient of their sum.
      grad: ``True`` (default); ``False`` skips the gradient (``grad`` is then
        ``None``).
      grad_out: ``None`` (default: a new array) or an array of the logits'
        shape and dtype to write the gradient into; may be ``logits`` itself
        (in-place).
      backend: ``"auto"`` (default: where the arrays live, or
        ``FASTLOSS_BACKEND``), ``"cpu"`` or ``"cuda"``.

    Shapes:
      logits ``(..., C)``, target ``(...)`` or ``(..., C)`` -> loss ``()`` for
      ``"mean"``/``"sum"``, ``(...)`` for ``"none"``; grad ``(..., C)``, the
      logits' dtype.

    Returns:
      ``LossGrad(loss, grad)``; ``loss`` has the logits' dtype.

    Dask arrays (``logits``, ``target`` and ``sample_weight`` chunked along the rows,
    the class axis in one chunk; ``weight`` in memory) give a lazy ``LossGrad``: each
    chunk runs this function, and ``"mean"`` divides by the denominator of the whole
    array, computed in the same graph (``fastloss._dask``).

    Choices where PyTorch is silent or surprising: with probability targets a
    class whose target mass (after smoothing) is 0 contributes 0 even when its
    logit is ``-inf`` (xlogy's convention; PyTorch gives NaN).  A "mean" over
    zero total weight is NaN with an all-zero gradient, as in PyTorch.

    References:
      Szegedy, Vanhoucke, Ioffe, Shlens & Wojna 2016, "Rethinking the Inception
      Architecture for Computer Vision" (label smoothing).
      Chowdhery et al. 2022, "PaLM: Scaling Language Modeling with Pathways"
      (the z-loss).
      Gemma Team 2024, "Gemma 2: Improving Open Language Models at a Practical
      Size" (logit soft-capping).

    Example:
      Equal logits give ``p = 1/C``: the loss is ``log C`` whatever the target,
      and the gradient of the mean is ``(1/C - onehot) / N``:

      >>> import numpy as np, fastloss as fl
      >>> loss, grad = fl.softmax_cross_entropy(np.zeros((4, 10)), np.array([0, 1, 2, 3]))
      >>> round(float(loss), 4)  # log(10)
      2.3026
      >>> np.round(grad[0, :3], 6).tolist()  # (0.1 - 1) / 4, 0.1 / 4, 0.1 / 4
      [-0.225, 0.025, 0.025]

      Smoothing leaves ``log C`` alone there (every class has ``lse - z_c = log C``);
      the z-loss adds ``lambda_z (log C)**2``; an ignored row drops out:

      >>> loss, grad = fl.softmax_cross_entropy(np.zeros((2, 10)), np.array([3, -100]),
      ...                                       label_smoothing=0.1, z_loss=0.1)
      >>> round(float(loss), 4)  # log(10) + 0.1 * log(10)**2
      2.8328
      >>> bool(grad[1].any())
      False

      >>> logits = np.array([[2.0, 0.5, -1.0], [0.0, 0.0, 0.0]], np.float32)
      >>> loss, grad = fl.softmax_cross_entropy(logits, np.array([0, 2]))
      >>> round(float(loss), 2)  # (log(e**2 + e**0.5 + e**-1) - 2 + log(3)) / 2
      0.67
      >>> grad.shape, grad.dtype
      ((2, 3), dtype('float32'))
    """
    dev = caller_grad_out = first_bad = None
    where = select_backend(backend, logits=logits, target=target, weight=weight,
                           sample_weight=sample_weight, grad_out=grad_out)
    if where == "dask":
        from fastloss import _dask
        return _dask.call(softmax_cross_entropy, locals())
    if where == "cuda":
        from fastloss.cuda._arrays import Device
        from fastloss.cuda._checks import label_check
        dev, caller_grad_out = Device(logits), grad_out
        first_bad = label_check(dev)
        logits, target, weight, sample_weight, grad_out = dev.views(
            logits=logits, target=target, weight=weight, sample_weight=sample_weight,
            grad_out=grad_out)
    logits = check.class_logits(logits)
    reduction = check.reduction(reduction)
    eps = check.unit_interval(label_smoothing, "label_smoothing")
    zcoef = check.nonnegative(z_loss, "z_loss")
    cap = None if softcap is None else check.positive(softcap, "softcap")
    cap = None if cap == np.inf else cap  # softcap=inf is the limit: no cap (inf * tanh(0) is nan)
    ignore_index = check.integer(ignore_index, "ignore_index")
    T = _storage.compute_type(logits.dtype)
    weight = check.weight_vector(weight, tuple(logits.shape)[-1], "weight", T)
    labels, probs, sw = check.class_batch(logits, target, sample_weight, grad_out, grad,
                                          ignore_index, T, first_bad)

    if dev is not None:
        from fastloss.cuda import cross_entropy as gpu
        return LossGrad(*gpu.softmax_cross_entropy(dev, logits, labels, probs, weight, sw,
                                                   ignore_index, eps, zcoef, cap, reduction, grad,
                                                   grad_out, caller_grad_out))
    return LossGrad(*cpu.softmax_cross_entropy(logits, labels, probs, weight, sw, ignore_index, eps,
                                               zcoef, cap, reduction, grad, grad_out))
