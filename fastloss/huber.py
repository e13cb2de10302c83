"""Huber loss: the public wrapper."""
from fastloss import _validation as check
from fastloss._dispatch import select_backend
from fastloss._result import LossGrad
from fastloss.cpu import huber as cpu


def huber_loss(input, target, *, delta=1.0, sample_weight=None, reduction="mean", grad=True,
               grad_out=None, backend="auto"):
    r"""Huber loss and its gradient w.r.t. ``input``, in one pass.

    .. math::

        \ell_i = w_i \begin{cases} \tfrac12 r_i^2 & |r_i| \le \delta \\
                 \delta (|r_i| - \tfrac12 \delta) & \text{otherwise} \end{cases},
        \qquad r = \text{input} - \text{target}

    equal to ``torch.nn.functional.huber_loss`` (Huber 1964); the gradient is
    ``w * clip(r, -delta, delta)`` (divided by the ``"mean"`` denominator).
    With ``delta=1`` it is also PyTorch's ``smooth_l1_loss``.

    Args:
      input: float16/32/64 array, any shape.
      target: array of the same shape (converted to ``input``'s dtype).
      delta: threshold between the quadratic and the linear part, ``> 0``,
        default ``1.0``.
      sample_weight: ``None`` (default) or weights broadcasting against
        ``input`` (e.g. ``(N, 1)`` for ``(N, D)``; a fastloss extension);
        ``"mean"`` divides by the sum of the broadcast weights.
      reduction: ``"mean"`` (default: over all elements), ``"sum"`` or
        ``"none"`` (per-element losses).
      grad, grad_out, backend: as in :func:`softmax_cross_entropy` (defaults
        ``True``, ``None``, ``"auto"``); ``grad_out=input`` works in place.

    Shapes:
      input and target of one shape ``S`` (sample_weight broadcasting to
      ``S``) -> loss ``()``, or ``S`` for ``"none"``; grad ``S``, the input's
      dtype.

    Returns:
      ``LossGrad(loss, grad)``; ``loss`` has the input's dtype.

    References:
      Huber 1964, "Robust Estimation of a Location Parameter", Annals of
      Mathematical Statistics 35(1).

    Dask arrays (``input``, ``target`` and ``sample_weight`` all Dask, chunked along any
    axis) give a lazy ``LossGrad``; ``"mean"`` divides by the broadcast weights of the
    whole array.

    On the GPU the weights stay on the device, never broadcast to the
    input's size (a view of them is read per element; only weights that vary
    along axes separated by a broadcast one, say ``(N, 1, K)`` against
    ``(N, M, K)``, are compacted on the host first), and the ``"mean"``
    denominator is summed there.  Arrays of more than two dimensions must be
    C-contiguous there.

    Example:
      >>> import numpy as np, fastloss as fl
      >>> loss, grad = fl.huber_loss(np.array([0.5, 3.0]), np.array([0.0, 0.0]))
      >>> float(loss), grad.tolist()  # (0.5 * 0.5**2 + (3 - 0.5)) / 2; clip(r, -1, 1) / 2
      (1.3125, [0.25, 0.5])
      >>> res = fl.huber_loss(np.array([0.5, 3.0]), np.zeros(2), sample_weight=np.array([2.0, 0.0]))
      >>> float(res.loss), res.grad.tolist()  # 2 * 0.125 / (2 + 0); 2 * 0.5 / 2
      (0.125, [0.5, 0.0])
    """
    dev = caller_grad_out = None
    where = select_backend(backend, input=input, target=target, sample_weight=sample_weight,
                           grad_out=grad_out)
    if where == "dask":
        from fastloss import _dask
        return _dask.call(huber_loss, locals())
    if where == "cuda":
        from fastloss.cuda._arrays import Device
        dev, caller_grad_out = Device(input), grad_out
        input, target, sample_weight, grad_out = dev.views(
            input=input, target=target, sample_weight=sample_weight, grad_out=grad_out)
    input = check.float_array(input, "input")
    target = check.float_array(target, "target")
    check.shape_equal(target, input.shape, "target", "the input's shape")
    reduction = check.reduction(reduction)
    delta = check.positive(delta, "delta")
    if sample_weight is not None:  # shapes only: the same checks serve device arrays
        sample_weight = check.broadcast_weights(sample_weight, input.shape, "sample_weight")
    if grad and grad_out is not None:
        check.grad_buffer(grad_out, input.shape, input.dtype, dev is not None)

    if dev is not None:
        from fastloss.cuda import huber as gpu
        from fastloss.cuda._checks import grad_out_apart
        if grad:  # written directly: grad_out may be the input, and overlap nothing else
            grad_out_apart(grad_out, "input", input=input, target=target,
                           sample_weight=sample_weight)
        return LossGrad(*gpu.huber_loss(dev, input, target, sample_weight, delta, reduction, grad,
                                        grad_out, caller_grad_out))
    return LossGrad(*cpu.huber_loss(input, target, sample_weight, delta, reduction, grad, grad_out))
