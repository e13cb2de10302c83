"""fastloss: fused loss + gradient kernels for NumPy and CUDA arrays.

Every loss returns ``LossGrad(loss, grad)`` from one fused pass; see SPEC.md
for the contract.  Importing fastloss compiles nothing: each kernel is
compiled on first use and cached on disk.
"""
from fastloss._dispatch import backend_of
from fastloss._result import LossGrad
from fastloss.center import CenterLoss, center_loss, center_update
from fastloss.cross_entropy import softmax_cross_entropy
from fastloss.focal import focal_loss, sigmoid_focal_loss
from fastloss.huber import huber_loss
from fastloss.linear_cross_entropy import linear_cross_entropy
from fastloss.triplet import batch_triplet_loss, triplet_margin_loss

__all__ = [
    "CenterLoss",
    "LossGrad",
    "backend_of",
    "batch_triplet_loss",
    "center_loss",
    "center_update",
    "focal_loss",
    "huber_loss",
    "linear_cross_entropy",
    "sigmoid_focal_loss",
    "softmax_cross_entropy",
    "triplet_margin_loss",
]
__version__ = "0.1.0"
