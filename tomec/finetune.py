"""The task loss the learned parts of the methods train with (DTEM heads, DiffRate's search).

With the backbone frozen, the merged model can at best recover the unmerged model's predictions, so
distillation from the unmerged model (its logits on the same batch) is the natural target: it has a
signal on every image, including the ones the labels already call right. Labels alone (plain cross
entropy) are the default, as in the papers' recipes.
"""

from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor

__all__ = ["task_loss"]


def task_loss(logits: Tensor, labels: Tensor, teacher_logits: Optional[Tensor] = None) -> Tensor:
    """Cross entropy on ``labels [B]``, or with ``teacher_logits [B, classes]`` the KL divergence
    from the teacher's softmax to ``logits [B, classes]`` (temperature 1, batch mean)."""
    if teacher_logits is None:
        return F.cross_entropy(logits, labels)
    return F.kl_div(
        logits.log_softmax(-1), teacher_logits.detach().log_softmax(-1), log_target=True,
        reduction="batchmean",
    )
