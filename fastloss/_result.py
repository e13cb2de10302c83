"""The answer every loss function returns."""
from typing import Any, NamedTuple


class LossGrad(NamedTuple):
    """``(loss, grad)`` from one fused pass.

    ``loss`` is a 0-d array for ``reduction="mean"|"sum"`` and a per-sample
    array for ``"none"``; ``grad`` is the gradient of the reduced loss (of the
    sum for ``"none"``) with respect to the first argument, or ``None`` when
    the call asked for ``grad=False``.
    """

    loss: Any
    grad: Any
