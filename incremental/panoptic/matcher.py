"""Hungarian matching of predicted queries to target segments (class + BCE + dice costs).

Every target segment gets exactly one query (set prediction, DETR / Mask2Former); the assignment
minimising the total cost is solved with ``scipy.optimize.linear_sum_assignment``. The costs are
pure tensor functions so they can be checked by hand.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment


def class_cost(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(N, K): ``-p_n(label_k)``. Negative probability, not log-probability, as Mask2Former: it is
    bounded, so one very unlikely class cannot outweigh the mask costs."""
    return -logits.softmax(-1)[:, labels]


def bce_cost(mask_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(N, K): mean over pixels of the binary cross-entropy of mask n against target k.

    Uses ``BCE(x, t) = t * softplus(-x) + (1 - t) * softplus(x)``, so all pairs come from two matrix
    products instead of N * K full-size losses. ``mask_logits`` (N, P), ``targets`` (K, P) in [0, 1].
    """
    pixels = mask_logits.shape[1]
    pos = F.softplus(-mask_logits)
    neg = F.softplus(mask_logits)
    return (pos @ targets.T + neg @ (1 - targets).T) / max(pixels, 1)


def dice_cost(mask_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(N, K): ``1 - (2 |m n t| + 1) / (|m| + |t| + 1)`` with soft masks m = sigmoid(logits)."""
    probs = mask_logits.sigmoid()
    numerator = 2 * probs @ targets.T
    denominator = probs.sum(-1)[:, None] + targets.sum(-1)[None, :]
    return 1 - (numerator + 1) / (denominator + 1)


def match_cost(logits: torch.Tensor, mask_logits: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor,
               weight_class: float = 2.0, weight_bce: float = 5.0, weight_dice: float = 5.0) -> torch.Tensor:
    """(N, K) total cost; ``mask_logits`` (N, P) and ``masks`` (K, P) flattened to the same pixels."""
    masks = masks.to(mask_logits.dtype)
    return (weight_class * class_cost(logits, labels) + weight_bce * bce_cost(mask_logits, masks)
            + weight_dice * dice_cost(mask_logits, masks))


@torch.no_grad()
def hungarian_match(logits: torch.Tensor, mask_logits: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor,
                    weight_class: float = 2.0, weight_bce: float = 5.0, weight_dice: float = 5.0
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices ``(queries, targets)`` of the minimum-cost one-to-one assignment for one image.

    ``logits`` (N, C+1), ``mask_logits`` (N, h, w) or (N, P), ``labels`` (K,), ``masks`` (K, h, w) or
    (K, P) at the same resolution. With no targets both index tensors are empty.
    """
    if len(labels) == 0:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty
    cost = match_cost(logits.float(), mask_logits.flatten(1).float(), labels, masks.flatten(1).float(),
                      weight_class, weight_bce, weight_dice)
    rows, cols = linear_sum_assignment(cost.cpu().numpy())
    return torch.as_tensor(np.asarray(rows), dtype=torch.long), torch.as_tensor(np.asarray(cols), dtype=torch.long)
