"""The answer every loss function returns."""
from typing import Any, NamedTuple


class LossGrad(NamedTuple):
    """``(loss, grad)`` from one fused pass.

    ``loss`` is a 0-d array for ``reduction="mean"|"sum"`` and a per-sample
    array for ``"none"``; ``grad`` is the gradient of the reduced loss (of the
    sum for ``"none"``) with respect to the first argument, or ``None`` when
    the call asked for ``grad=False``.

    Shapes: ``loss`` has shape ``()`` (``"mean"``, ``"sum"``) or the batch shape
    (``"none"``: ``(...)`` for ``(..., C)`` logits, the input's shape for the
    elementwise losses, ``(N,)`` for the row losses); ``grad`` has the shape and
    dtype of the first argument (a tuple of three such arrays for
    :func:`fastloss.triplet_margin_loss`).  Both are arrays of the input's kind
    (NumPy in, NumPy out; CUDA in, CUDA out); ``float(loss)`` works for a 0-d
    loss.  As a named tuple it unpacks (``loss, grad = ...``) or reads by name.

    Example:
      >>> import numpy as np, fastloss as fl
      >>> res = fl.huber_loss(np.array([1.0, -3.0]), np.zeros(2), reduction="sum")
      >>> isinstance(res, fl.LossGrad), res.loss.shape, float(res.loss)
      (True, (), 3.0)
      >>> loss, grad = res          # 0.5 * 1**2 + (3 - 0.5), gradient clip(r, -1, 1)
      >>> grad.tolist()
      [1.0, -1.0]
      >>> fl.huber_loss(np.array([1.0, -3.0]), np.zeros(2), grad=False).grad is None
      True
    """

    loss: Any
    grad: Any
