"""Fused linear + softmax cross-entropy: the public wrapper (validation, dispatch, docstring)."""
import numpy as np

from fastloss import _validation as check
from fastloss._dispatch import select_backend
from fastloss._reduction import reduce
from fastloss._result import LossGrad
from fastloss.cpu import _storage
from fastloss.cpu import linear_cross_entropy as cpu


def linear_cross_entropy(embeddings, classifier, target, *, bias=None, weight=None,
                         sample_weight=None, ignore_index=-100, label_smoothing=0.0, z_loss=0.0,
                         softcap=None, reduction="mean", grad=True, grad_out=None, block_size=None,
                         backend="auto"):
    r"""Softmax cross-entropy of a linear layer's logits, without ever holding the logits.

    Equal to ``softmax_cross_entropy(embeddings @ classifier.T + bias, target, ...)`` with
    integer targets and every option of it: for a row ``e`` of the embeddings, logits
    ``z = cap(W e + b)`` (``cap`` the optional soft-cap), ``p = softmax(z)``,
    ``lse = logsumexp(z)``, class weights ``w``, smoothing ``eps``, sample weight ``s``:

    .. math::

        \ell = s \Big[(1-\varepsilon)\, w_y (\mathrm{lse} - z_y)
               + \tfrac{\varepsilon}{V} \sum_c w_c (\mathrm{lse} - z_c)
               + \lambda_z\, \mathrm{lse}^2\Big]

    With ``G = dL/dz`` (``softmax_cross_entropy``'s gradient, times the cap's slope), the
    gradients are ``d_embeddings = G W``, ``d_classifier = G^T E`` and ``d_bias = sum_rows G``.

    The ``(N, V)`` logits are never held.  On the CPU, by default, the rows go in chunks
    that hold every class (at most ``fastloss.cpu.linear_cross_entropy.CHUNK_BYTES``, 16 MiB,
    of logits, and at least 128 rows): one product forms a chunk's logits, the cross-entropy
    kernel turns them into ``G`` in place, then ``d_embeddings = G W`` and ``d_classifier +=
    G^T E``: three products, as the unfused path (Liger-Kernel's recipe).  Where chunks
    would be shorter (a wide vocabulary), for float16, on the GPU, or when ``block_size`` is
    given, the vocabulary is walked in blocks of ``block_size`` classes instead: a first
    pass keeps an online log-sum-exp per row, and a second forms each block's ``G`` in
    place and sends it straight into the products.  That second pass recomputes the block
    logits (four products in all) because ``d_classifier``'s block needs each row's final
    log-sum-exp (the Cut Cross-Entropy recipe).  Beyond the inputs and the returned
    gradients the memory is one chunk or block, a 2 MiB slice of ``d_classifier`` (chunks)
    or an ``(N, H)`` accumulator (blocks), and vectors of N, whatever V is.
    ``grad=False`` runs one product per chunk or block.  On the GPU the products are
    CuPy's (cuBLAS) on the caller's stream, for CuPy, PyTorch and Numba inputs alike where
    CuPy is installed, and a plain product kernel otherwise (the CUDA simulator).

    Args:
      embeddings: float16/32/64 array ``E`` of shape ``(..., H)``.  float16 computes in
        float32 (products included) and returns float16 gradients.
      classifier: the ``(V, H)`` weight ``W`` of the output layer, the embeddings' dtype.
      target: integer class indices of shape ``(...)`` in ``[0, V)`` (or equal to
        ``ignore_index``), any integer dtype.  Probability targets are not taken.
      bias: ``None`` (default) or the ``(V,)`` bias ``b``, the embeddings' dtype.
      weight: ``None`` (default: ones) or ``(V,)`` class weights, as
        ``softmax_cross_entropy``'s (and PyTorch's) ``weight``.
      sample_weight: ``None`` or weights of shape ``(...)``, as in ``softmax_cross_entropy``.
      ignore_index: default ``-100``; targets equal to it contribute nothing and leave the mean.
      label_smoothing: ``eps`` in ``[0, 1]``, default ``0.0``.
      z_loss: ``lambda_z >= 0``, default ``0.0`` (PaLM's ``lse**2`` term).
      softcap: ``None`` or a positive cap: ``z = softcap * tanh((W e + b) / softcap)``.
      reduction: ``"mean"`` (default: divided by the sum of ``w[y] * sample_weight`` over
        rows not ignored), ``"sum"``, or ``"none"`` (per-row losses of shape ``(...)``; the
        gradients are those of their sum).
      grad: ``True`` (default); ``False`` skips the second pass (``grad`` is then ``None``).
      grad_out: ``None`` (default: new arrays) or a tuple ``(d_embeddings, d_classifier)``,
        plus ``d_bias`` when a bias is given, of the inputs' shapes and dtype, written in
        place; they may not share memory with any input or with each other.
      block_size: classes per block of the vocabulary walk; ``None`` (default): chunks of
        rows on the CPU where they fit, else blocks of about 8 MiB of logits
        (``fastloss.cpu.linear_cross_entropy.block_size``, between 128 and 8192 classes), and
        blocks of 256 MiB on the GPU (``fastloss.cuda.linear_cross_entropy.block_size``).
      backend: ``"auto"`` (default), ``"cpu"`` or ``"cuda"``.

    Dask arrays (``embeddings``, ``target``, ``sample_weight`` chunked along the rows;
    ``classifier``, ``bias``, ``weight`` in memory) give a lazy ``LossGrad`` whose classifier
    and bias gradients are sums over the chunks, added in a fixed order.

    Returns:
      ``LossGrad(loss, grad)``: ``loss`` in the embeddings' dtype (``()`` or ``(...)``);
      ``grad`` the tuple ``(d_embeddings, d_classifier)`` or ``(d_embeddings,
      d_classifier, d_bias)``, or ``None``.

    References:
      Wijmans, Huval, Hertzberg, Koltun & Krähenbühl 2024, "Cut Your Losses in
      Large-Vocabulary Language Models" (Cut Cross-Entropy).
      Hsu et al. 2024, "Liger Kernel: Efficient Triton Kernels for LLM Training"
      (fused linear cross-entropy).

    Example:
      A zero classifier gives equal logits, so the loss is ``log V``; the gradient with
      respect to the classifier is then ``(p - onehot)^T E / N`` with ``p = 1/V``:

      >>> import numpy as np, fastloss as fl
      >>> E = np.array([[1.0, 2.0], [3.0, 4.0]])
      >>> loss, (dE, dW) = fl.linear_cross_entropy(E, np.zeros((5, 2)), np.array([0, 1]))
      >>> round(float(loss), 4)  # log(5)
      1.6094
      >>> dW[0].tolist()  # ((0.2 - 1) * [1, 2] + 0.2 * [3, 4]) / 2
      [-0.1, -0.4]
      >>> dE.tolist()  # G W with W = 0
      [[0.0, 0.0], [0.0, 0.0]]
    """
    # The common case first, in one compiled call: NumPy buffers that pass every check of
    # _grads_out against the arguments as given (validation keeps those arrays, or makes
    # copies, which overlap nothing); they cannot move the call off the host either.
    ready = grad and type(grad_out) is tuple and _storage.ready_apart(
        grad_out, (embeddings, classifier) if bias is None else (embeddings, classifier, bias),
        (embeddings, classifier, bias, target, weight, sample_weight))
    outs = dict(enumerate(grad_out)) if grad and isinstance(grad_out, (tuple, list)) else {}
    where = select_backend(backend, embeddings=embeddings, classifier=classifier, target=target,
                           bias=bias, weight=weight, sample_weight=sample_weight,
                           **({} if ready else {f"grad_out[{k}]": g for k, g in outs.items()}))
    if where == "dask":
        from fastloss import _dask
        return _dask.call(linear_cross_entropy, locals())
    dev = caller_grad_out = first_bad = None
    if where == "cuda":
        from fastloss.cuda._arrays import Device
        from fastloss.cuda._checks import label_check
        dev = Device(embeddings)
        first_bad = label_check(dev)
        if outs and dev.kind == "numpy":  # host buffers, copied back at the end: apart on the host
            _apart(outs.values(), {"embeddings": embeddings, "classifier": classifier, "bias": bias},
                   np.may_share_memory)
        embeddings, classifier, target, bias, weight, sample_weight = dev.views(
            embeddings=embeddings, classifier=classifier, target=target, bias=bias, weight=weight,
            sample_weight=sample_weight)
        if outs:
            caller_grad_out = tuple(grad_out)
            grad_out = tuple(dev.view(g, f"grad_out[{k}]") for k, g in outs.items())
    E = check.float_array(embeddings, "embeddings")
    if E.ndim < 1:
        raise ValueError(f"embeddings must have shape (..., H), got {E.shape}")
    shape = tuple(E.shape)  # the simulator's shapes refuse negative indices
    H = shape[-1]
    W = check.float_array(classifier, "classifier")
    if W.ndim != 2 or W.shape[1] != H or W.shape[0] == 0:
        raise ValueError(f"classifier must have shape (V, {H}) with V >= 1 (H = embeddings.shape[-1]),"
                         f" got {W.shape}")
    _same_dtype(W, E, "classifier")
    V = W.shape[0]
    if bias is not None:
        bias = check.float_array(bias, "bias")
        check.shape_equal(bias, (V,), "bias", "one bias per class of classifier")
        _same_dtype(bias, E, "bias")
    reduction = check.reduction(reduction)
    eps = check.unit_interval(label_smoothing, "label_smoothing")
    zcoef = check.nonnegative(z_loss, "z_loss")
    cap = None if softcap is None else check.positive(softcap, "softcap")
    cap = None if cap == np.inf else cap
    ignore_index = check.integer(ignore_index, "ignore_index")
    T = _storage.compute_type(E.dtype)
    weight = check.weight_vector(weight, V, "weight", T)
    labels = check.as_array(target, "target", "integer class indices")
    if labels.dtype.kind not in "iu":
        raise TypeError(f"target must hold integer class indices, got dtype {labels.dtype}")
    labels = check.label_array(labels, "target")
    check.shape_equal(labels, shape[:-1], "target", "one class index per row of embeddings")
    check.labels_in_range(labels, V, "target", ignore_index, first_bad)
    sw = check.sample_weights(sample_weight, shape[:-1], "sample_weight", T)
    n = labels.size
    width = None if block_size is None else min(V, _block_size(block_size))
    if width is None and dev is not None:
        width = _gpu().block_size(n, V, np.dtype(T).itemsize)
    if not grad:
        grads_out = None
    elif ready and dev is None:
        grads_out = grad_out
    else:
        grads_out = _grads_out(grad_out, E, W, bias, dev is not None, labels, weight, sw)

    if dev is not None:
        return LossGrad(*_gpu().linear_cross_entropy(
            dev, E, W, labels, bias, weight, sw, ignore_index, eps, zcoef, cap, reduction, grad,
            grads_out, caller_grad_out, width))
    losses, total, denom, grads = cpu.linear_cross_entropy(
        E.reshape(n, H), W, np.ascontiguousarray(labels).reshape(n), bias, weight, sw, ignore_index,
        eps, zcoef, cap, reduction, grad, grads_out, width)
    loss = reduce(losses, total, reduction, denom, shape[:-1], E.dtype)
    if grads is not None and grads_out is None:
        grads = (grads[0].reshape(shape),) + grads[1:]
    return LossGrad(loss, grads)


def _gpu():
    from fastloss.cuda import linear_cross_entropy
    return linear_cross_entropy


def _same_dtype(a, E, name):
    if a.dtype != E.dtype:
        raise TypeError(f"{name} must have the embeddings' dtype {E.dtype}, got {a.dtype}")


def _block_size(value):
    size = check.integer(value, "block_size")
    if size < 1:
        raise ValueError(f"block_size must be a positive number of classes, got {value}")
    return size


def _grads_out(grad_out, E, W, bias, device, labels, weight, sw):
    """The caller's ``(d_embeddings, d_classifier[, d_bias])``, checked (device views on the
    GPU); None when not given."""
    if grad_out is None:
        return None
    inputs = {"embeddings": E, "classifier": W, "bias": bias, "target": labels, "weight": weight,
              "sample_weight": sw}
    expected = [("grad_out[0]", E), ("grad_out[1]", W)] + ([("grad_out[2]", bias)] if bias is not None else [])
    if not isinstance(grad_out, (tuple, list)) or len(grad_out) != len(expected):
        what = "(d_embeddings, d_classifier, d_bias)" if bias is not None else "(d_embeddings, d_classifier)"
        raise TypeError(f"grad_out must be a tuple {what}, got {type(grad_out).__name__}"
                        + (f" of length {len(grad_out)}" if isinstance(grad_out, (tuple, list)) else ""))
    outs = tuple(check.grad_buffer(out, tuple(like.shape), like.dtype, device, name=name)
                 for out, (name, like) in zip(grad_out, expected))
    if device:
        from fastloss.cuda._arrays import rows
        from fastloss.cuda._checks import shares_memory
        rows(outs[0], tuple(E.shape)[-1], "grad_out[0]")  # refused before anything is written
    else:
        shares_memory = np.may_share_memory
    _apart(outs, inputs, shares_memory)
    return outs


def _apart(outs, inputs, shares_memory):
    """ValueError naming ``grad_out[k]`` when one shares memory with an input or another output."""
    outs = list(outs)
    for k, out in enumerate(outs):
        others = list(inputs.items()) + [(f"grad_out[{j}]", o) for j, o in enumerate(outs) if j != k]
        for name, a in others:
            if a is not None and isinstance(out, type(a)) and shares_memory(out, a):
                raise ValueError(f"grad_out[{k}] shares memory with {name}: "
                                 "linear_cross_entropy writes its gradients apart from its inputs")
