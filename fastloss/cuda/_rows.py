"""The launch of a one-block-per-row kernel (cross entropy, focal loss) on checked device views."""
from fastloss.cuda._arrays import compute_type, rows
from fastloss.cuda._blocks import fit, row_grid, threads_for
from fastloss.cuda._checks import grad_out_apart
from fastloss.cuda._reduction import finish, per_row_losses


def class_rows(logits, labels, probs, weight, sw, grad, grad_out):
    """``(x, labels, probs, sw)``: the logits ``(..., C)`` as rows ``(n, C)``, integer
    ``labels`` as ``(n,)`` or ``probs`` as ``(n, C)`` (the other None), sample
    weights ``sw`` (or None) as ``(n,)``.  First, a
    ValueError when ``grad_out``, which the kernels write directly, overlaps an
    input other than the logits themselves (in place)."""
    if grad:
        grad_out_apart(grad_out, "logits", logits=logits,
                       target=labels if labels is not None else probs, weight=weight,
                       sample_weight=sw)
    C = tuple(logits.shape)[-1]  # the simulator's shapes refuse negative indices
    return (rows(logits, C, "logits"), None if labels is None else rows(labels, None, "target"),
            None if probs is None else rows(probs, C, "target"),
            None if sw is None else rows(sw, None, "sample_weight"))


def row_loss(dev, kernel, args, stats, logits, reduction, grad, grad_out, caller_grad_out):
    """``(loss, grad)`` from ``kernel(*args, stats, g, losses)``, a kernel over the
    rows of ``args[0]`` (n, C) made of ``logits`` (..., C), launched when there is
    any row: the per-row losses (``per_row_losses``), the gradient ``g``
    (``grad_out`` or a new array; None unless ``grad``) and the loss as returned
    (``finish``; ``stats`` is the "mean" denominator, None otherwise).  Native
    arrays of the call's kind; ``grad`` is the caller's ``grad_out`` when given."""
    n, C = args[0].shape
    batch_shape, dtype = tuple(logits.shape)[:-1], logits.dtype
    losses = per_row_losses(dev, n, reduction, dtype, compute_type(dtype))
    g_native = g = None
    if grad:
        g_native, g = ((grad_out, grad_out) if grad_out is not None
                       else dev.empty(batch_shape + (C,), dtype))
    if n:
        threads = fit(kernel, threads_for(C))
        g = None if g is None else rows(g, C, "grad_out")
        dev.launch(kernel, row_grid(n, threads), threads, *args, stats, g, losses[1])
    return (finish(dev, losses, stats, reduction, batch_shape, dtype),
            dev.give_grad(g_native, caller_grad_out))
