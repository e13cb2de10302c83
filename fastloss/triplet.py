"""Triplet losses: the public wrappers (``triplet_margin_loss``, ``batch_triplet_loss``)."""

from fastloss import _validation as check
from fastloss._dispatch import select_backend
from fastloss._result import LossGrad
from fastloss.cpu import _storage, batch_mining, triplet_margin
from fastloss.formulas.triplet import DISTANCES, MININGS


def _choice(value, allowed, name):
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}")
    return value


_GRAD_OUT_NAMES = ("grad_out[0]", "grad_out[1]", "grad_out[2]")


def _grad_outs(grad_out, anchor, dev=None):
    """``grad_out`` of triplet_margin_loss: a tuple of three writable arrays of the (checked)
    ``anchor``'s shape and dtype that do not overlap one another; on the GPU (``dev`` given,
    device inputs) three device arrays, returned as Numba views."""
    shape, dtype = anchor.shape, anchor.dtype
    if not isinstance(grad_out, (tuple, list)) or len(grad_out) != 3:
        raise TypeError("grad_out must be a tuple of three arrays (d_anchor, d_positive, "
                        f"d_negative), got {type(grad_out).__name__}")
    for k, (g, name) in enumerate(zip(grad_out, ("anchor", "positive", "negative"))):
        try:
            check.grad_buffer(g, shape, dtype, dev is not None)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"grad_out[{k}] (gradient w.r.t. {name}): {exc}") from None
    if dev is None:
        def shared(a, b):
            return not _storage.apart(a, b)
    else:
        from fastloss.cuda._checks import shares_memory as shared
        grad_out = dev.views(**{f"grad_out[{k}]": g for k, g in enumerate(grad_out)})
    for k in range(3):
        for m in range(k):
            if shared(grad_out[k], grad_out[m]):
                raise ValueError(f"grad_out[{k}] overlaps grad_out[{m}]: the three gradients "
                                 "need separate buffers")
    return tuple(grad_out)


def triplet_margin_loss(anchor, positive, negative, *, margin=1.0, distance="euclidean", swap=False,
                        eps=1e-6, reduction="mean", grad=True, grad_out=None, backend="auto"):
    r"""Triplet margin loss and its gradients w.r.t. all three inputs, in one pass.

    Per row ``i`` (Schroff et al. 2015, "FaceNet"; Balntas et al. 2016 for ``swap``):

    .. math::

        \ell_i = \max\bigl(0,\; \text{margin} + d(a_i, p_i) - d(a_i, n_i)\bigr)

    With ``distance="euclidean"`` (the default) this equals
    ``torch.nn.functional.triplet_margin_loss(anchor, positive, negative, margin=margin,
    p=2, eps=eps, swap=swap, reduction=reduction)``, value and autograd gradients,
    including at ``margin=0`` (which torch's Python wrapper refuses but its operator
    computes).  Distances, per row:

    * ``"euclidean"``: ``||x - y + eps||_2``, eps added to every coordinate of the
      difference (``torch.pairwise_distance``); its gradient is ``(x - y + eps) / d``,
      and 0 where ``d == 0`` (torch's norm backward).
    * ``"squared_euclidean"``: ``sum((x - y)**2)``, no eps (FaceNet's form, per row).
    * ``"cosine"``: ``1 - x.y / (max(||x||, eps) * max(||y||, eps))``; the clamped
      norm passes no gradient where ``||x|| <= eps``.

    ``swap=True`` uses ``min(d(a, n), d(p, n))`` as the negative distance; on an exact
    tie the gradient is split half/half, as ``torch.minimum``'s backward does.  The
    hinge passes the gradient where ``z >= 0`` (``torch.clamp_min``'s backward), so a
    row exactly at the margin still has a gradient.

    Args:
      anchor, positive, negative: float16/32/64 arrays of one shape ``(N, D)``, all of
        one dtype; a 1-D ``(D,)`` input is one triplet (as in torch: the loss of
        ``reduction="none"`` is then 0-d).  Non-contiguous arrays are fine.
      margin: ``>= 0``, default ``1.0``.
      distance: ``"euclidean"`` (default), ``"squared_euclidean"`` or ``"cosine"``.
      swap: default ``False``; ``True`` takes the distance swap of Balntas et al.
      eps: ``>= 0``, default ``1e-6`` (torch's); the euclidean shift, and the cosine
        norms' clamp.
      reduction: ``"mean"`` (default; divides by N; an empty batch gives ``nan`` and
        zero gradients, as in PyTorch), ``"sum"`` or ``"none"`` (per-row losses
        ``(N,)``, gradients of their sum).
      grad: ``True`` (default); ``False`` skips the gradient pass (``grad`` of the
        result is ``None``).
      grad_out: ``None`` (default) or a tuple of three writable arrays of the inputs'
        shape and dtype, one per gradient; passing the inputs themselves
        (``grad_out=(anchor, positive, negative)``) overwrites them in place.
      backend: ``"auto"``, ``"cpu"`` or ``"cuda"`` (see :func:`fastloss.backend_of`).
        On the GPU one block per row sums the row (float64 block reductions of the
        compute type's per-thread sums), then writes its three gradient rows; ``grad_out``
        is then a tuple of three device arrays (the inputs themselves allowed, in any
        order; a buffer overlapping an input otherwise is written through a temporary).

    Dask arrays (the three inputs chunked along the rows, ``D`` in one chunk) give a lazy
    ``LossGrad`` whose three gradients are chunked like ``anchor``; ``"mean"`` divides by
    the whole N.

    Shapes:
      anchor, positive, negative ``(N, D)`` (or ``(D,)``) -> loss ``()``, or ``(N,)``
      for ``"none"`` (``()`` for one triplet); three gradients ``(N, D)``.

    Returns:
      ``LossGrad(loss, grad)`` with ``grad = (d_anchor, d_positive, d_negative)``, each
      of the inputs' shape and dtype (or ``None`` when ``grad=False``).  float16 inputs
      are computed in float32, float32 in float32, float64 in float64.

    References:
      Schroff, Kalenichenko & Philbin 2015, "FaceNet: A Unified Embedding for Face
      Recognition and Clustering" (CVPR).
      Balntas, Riba, Ponsa & Mikolajczyk 2016, "Learning local feature descriptors
      with triplets and shallow convolutional neural networks" (BMVC; the swap).

    Example:
      >>> import numpy as np, fastloss as fl
      >>> a = np.array([[0.0, 0.0]]); p = np.array([[0.0, 4.0]]); n = np.array([[2.0, 0.0]])
      >>> loss, (ga, gp, gn) = fl.triplet_margin_loss(a, p, n, margin=1.0, eps=0.0)
      >>> float(loss), ga.tolist(), gp.tolist(), gn.tolist()  # 1 + 4 - 2; (a-p)/4 - (a-n)/2, ...
      (3.0, [[1.0, -1.0]], [[0.0, 1.0]], [[-1.0, 0.0]])
      >>> float(fl.triplet_margin_loss(a, p, n, distance="squared_euclidean").loss)  # 1 + 16 - 4
      13.0
      >>> u, v = np.array([[1.0, 0.0]]), np.array([[0.0, 2.0]])
      >>> float(fl.triplet_margin_loss(u, v, u, distance="cosine", margin=0.5).loss)  # 0.5 + (1 - 0) - (1 - 1)
      1.5
    """
    dev = caller_grad_out = None
    # The common case first, in one compiled call: three NumPy buffers of the anchor's shape
    # and dtype, apart (validation keeps the anchor as given); they cannot move the call off
    # the host either.
    ready = grad and type(grad_out) is tuple and _storage.ready_apart(grad_out, (anchor,) * 3)
    where = select_backend(backend, anchor=anchor, positive=positive, negative=negative,
                           **({} if ready or grad_out is None or not isinstance(grad_out, (tuple, list))
                              else dict(zip(_GRAD_OUT_NAMES, grad_out))))
    if where == "dask":
        from fastloss import _dask
        return _dask.call(triplet_margin_loss, locals())
    if where == "cuda":
        from fastloss.cuda._arrays import Device
        dev = Device(anchor)
        anchor, positive, negative = dev.views(anchor=anchor, positive=positive, negative=negative)
    anchor = check.float_array(anchor, "anchor")
    if anchor.ndim not in (1, 2):
        raise ValueError(f"anchor must have shape (N, D) (or (D,) for one triplet), got {anchor.shape}")
    positive = check.float_array(positive, "positive")
    negative = check.float_array(negative, "negative")
    for x, name in ((positive, "positive"), (negative, "negative")):
        if x.dtype != anchor.dtype:
            raise TypeError(f"{name} must have the anchor's dtype {anchor.dtype}, got {x.dtype}")
        check.shape_equal(x, anchor.shape, name, "the anchor's shape")
    margin = check.nonnegative(margin, "margin")
    eps = check.nonnegative(eps, "eps")
    distance = _choice(distance, DISTANCES, "distance")
    reduction = check.reduction(reduction)
    if not grad:
        grad_out = None
    elif dev is None:
        grad_out = grad_out if grad_out is None or ready else _grad_outs(grad_out, anchor)
    elif grad_out is not None:
        caller_grad_out = tuple(grad_out) if isinstance(grad_out, (tuple, list)) else grad_out
        grad_out = _grad_outs(grad_out, anchor, dev if dev.kind != "numpy" else None)

    if dev is not None:
        from fastloss.cuda import triplet as gpu
        return LossGrad(*gpu.triplet_margin_loss(dev, anchor, positive, negative, distance, swap,
                                                 margin, eps, reduction, grad, grad_out,
                                                 caller_grad_out))
    return LossGrad(*triplet_margin.triplet_margin_loss(anchor, positive, negative, distance,
                                                        swap, margin, eps, reduction, grad,
                                                        grad_out))


def batch_triplet_loss(embeddings, labels, *, mining="hard", margin=1.0, distance="euclidean",
                       soft=False, reduction="mean", grad=True, grad_out=None, backend="auto"):
    r"""Triplet loss with online mining inside one batch, and its gradient w.r.t. the embeddings.

    Every term is ``f(z)``, ``z = d(a, p) - d(a, n) + margin``, over triplets of rows
    with ``a != p``, ``labels[a] == labels[p]`` and ``labels[n] != labels[a]``;
    ``f(z) = max(0, z)`` (its gradient passes where ``z > 0``, in every mining mode), or
    ``softplus(z)`` with ``soft=True`` (gradient ``sigmoid(z)``; pass ``margin=0`` for
    Hermans et al.'s soft margin).  The triplets:

    * ``mining="hard"`` (Hermans et al. 2017, "In Defense of the Triplet Loss"): per
      anchor, its farthest positive and its nearest negative; anchors lacking a
      positive or a negative contribute nothing.
    * ``"semihard"`` (Schroff et al. 2015, FaceNet): for each anchor-positive pair, the
      nearest negative with ``d(a, n) > d(a, p)`` strictly, else the farthest negative.
    * ``"all"``: every valid ``(a, p, n)``.

    Ties in these argmax/argmin choices go to the lowest row index.

    Distances: ``"euclidean"`` is the plain ``||x - y||`` (no eps shift; its gradient is
    0 at zero distance, so identical embeddings never give NaN),
    ``"squared_euclidean"`` ``||x - y||**2``, ``"cosine"`` ``1 - cos(x, y)`` with norms
    clamped at 1e-8 (``torch.nn.functional.cosine_similarity``'s default eps).

    How it is computed: one Gram matrix ``G = E E^T`` by BLAS (float32 for float16 and
    float32 input, float64 for float64), squared distances
    ``max(0, |e_i|^2 + |e_j|^2 - 2 G_ij)`` (exactly 0 on the diagonal) and cosines
    ``G_ij / (|e_i| |e_j|)`` from it, as ``torch.cdist``'s matmul path does.  Mining and
    the loss value use these matrix distances; in float32 a distance ``d`` between
    vectors of norm ``r`` carries an absolute error of about ``1e-7 r**2 / d``.  The
    gradient touches only the selected pairs and uses, for euclidean, the exact
    difference ``e_r - e_o`` over its exact norm, recomputed.  Memory is ``O(N**2)``
    (the Gram matrix; for ``"all"`` also a dense ``N x N`` coefficient matrix), never
    ``O(N**3)``; ``"all"``'s time is ``O(N**3)`` (every triplet).  The result does not
    depend on the number of threads.

    ``mining="hard"`` never forms the whole Gram matrix: its upper triangle (with the
    diagonal blocks) comes in four column blocks ``G[:J1, J0:J1]``, about 5/8 of the
    product, each mined from both sides (its columns' anchors against every row before
    ``J1``, its rows' anchors against its columns) while in cache, ``O(N**2 / 4)``
    memory; the squared norms are the gemm's diagonal, and the cosine is
    ``G_ij (1/|e_i|) (1/|e_j|)`` with the inverse norms multiplied first, so that both
    orders of a pair give the same bits.  A NaN distance sends the call to the full-Gram
    path, where the first NaN wins the selection and reaches the loss.

    Args:
      embeddings: float16/32/64 array ``(N, D)``.
      labels: integer array ``(N,)`` of any integer dtype; the values are only compared
        for equality (any integers, negative too).
      mining: ``"hard"`` (default), ``"semihard"`` or ``"all"``.
      margin: ``>= 0``, default ``1.0``.
      distance: ``"euclidean"`` (default), ``"squared_euclidean"`` or ``"cosine"``.
      soft: default ``False``; ``True`` takes ``softplus`` instead of the hinge.
      reduction: ``"mean"`` (default) divides the sum of the terms by the anchors that have a
        positive and a negative (``"hard"``), by the anchor-positive pairs whose anchor
        has a negative (``"semihard"``), or by the triplets with positive loss
        (``"all"``; with ``soft=True`` every softplus term is positive, so by every valid
        triplet).  With no such anchor or pair, ``"hard"``/``"semihard"`` give ``nan`` and
        a zero gradient (an empty mean, as in PyTorch); ``"all"`` gives 0 (and a zero
        gradient) when no triplet has positive loss.  ``"sum"``; ``"none"``: one loss
        per anchor ``(N,)``, the sum of its selected terms (0 for an anchor with none),
        and the gradient of their sum.
      grad: ``True`` (default); ``False`` skips the backward pass (``grad`` of the
        result is ``None``).
      grad_out: ``None`` (default) or a writable array of the embeddings' shape and
        dtype; ``grad_out=embeddings`` is allowed (the gradient is written through a
        temporary, then copied over).
      backend: ``"auto"`` (default), ``"cpu"`` or ``"cuda"``.

    Shapes:
      embeddings ``(N, D)``, labels ``(N,)`` -> loss ``()``, or ``(N,)`` for
      ``"none"``; grad ``(N, D)``.

    Dask arrays (``embeddings`` and ``labels`` chunked along the rows): **mining stays
    within each chunk**, a chunk being a batch (no triplet spans two chunks); the lazy
    ``"mean"`` is the mean of the chunks' means (each chunk weighs the same, as the
    batches of an epoch), ``"sum"`` the sum, ``"none"`` the chunks' per-anchor losses.

    On the GPU (``fastloss.cuda.triplet``) the ``N x N`` matrix comes from tiled
    kernels rather than BLAS: squared distances summed from the differences
    themselves (euclidean, squared: no cancellation, exactly 0 between equal rows)
    or the Gram matrix (cosine), in the compute type; then one block per anchor
    mines (same choices, same ties, same NaN rules as on the CPU) and writes its
    row of pair coefficients, and one block per embedding row gathers the pairs
    that touch it: ``O(N**2)`` memory, no atomics, the same bits on every run.

    Returns:
      ``LossGrad(loss, grad)``, ``grad`` of the embeddings' shape and dtype.

    References:
      Hermans, Beyer & Leibe 2017, "In Defense of the Triplet Loss for Person
      Re-Identification" (batch-hard mining, the soft margin).
      Schroff, Kalenichenko & Philbin 2015, "FaceNet: A Unified Embedding for Face
      Recognition and Clustering" (CVPR; semi-hard mining).

    Example:
      Two classes of two points; anchor 0 has positive 1 at distance 1 and
      negatives at 2 and 0.5, and so on:

      >>> import numpy as np, fastloss as fl
      >>> e = np.array([[0.0, 0.0], [0.0, 1.0], [2.0, 0.0], [0.5, 0.0]])
      >>> loss, grad = fl.batch_triplet_loss(e, [0, 0, 1, 1], margin=1.0)
      >>> round(float(loss), 4)  # (1.5 + (2 - sqrt(1.25)) + 0.5 + 2) / 4
      1.2205
      >>> np.round(fl.batch_triplet_loss(e, [0, 0, 1, 1], reduction="none").loss, 4).tolist()
      [1.5, 0.882, 0.5, 2.0]
      >>> res = fl.batch_triplet_loss(e, [0, 0, 1, 1], mining="semihard")
      >>> round(float(res.loss), 4)  # (0 + (2 - sqrt(1.25)) + 0.5 + (2.5 - sqrt(1.25))) / 4
      0.691
    """
    dev = None
    where = select_backend(backend, embeddings=embeddings, labels=labels, grad_out=grad_out)
    if where == "dask":
        from fastloss import _dask
        return _dask.call(batch_triplet_loss, locals())
    if where == "cuda":
        from fastloss.cuda._arrays import Device
        dev = Device(embeddings)
        embeddings, labels = dev.views(embeddings=embeddings, labels=labels)
    embeddings = check.feature_rows(embeddings, "embeddings")
    labels = check.row_labels(labels, embeddings.shape[0], "labels")
    mining = _choice(mining, MININGS, "mining")
    distance = _choice(distance, DISTANCES, "distance")
    margin = check.nonnegative(margin, "margin")
    reduction = check.reduction(reduction)
    soft = bool(soft)
    if not grad:
        grad_out = None
    elif grad_out is not None:
        on_device = dev is not None and dev.kind != "numpy"
        check.grad_buffer(grad_out, embeddings.shape, embeddings.dtype, on_device)

    if dev is not None:
        from fastloss.cuda import triplet as gpu
        return LossGrad(*gpu.batch_triplet_loss(dev, embeddings, labels, mining, distance, margin,
                                                soft, reduction, grad, grad_out))
    return LossGrad(*batch_mining.batch_triplet_loss(embeddings, labels, mining, distance, margin,
                                                     soft, reduction, grad, grad_out))
