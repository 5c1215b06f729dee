"""What the learned parts of the methods share when they train (DTEM heads, DiffRate's search, LTMP's
thresholds, FPET's adapter), besides the forward (:mod:`tomec.train.vit`): the frozen backbone and
the task loss.

With the backbone frozen, the merged model can at best recover the unmerged model's predictions, so
distillation from the unmerged model (its logits on the same batch) is the natural target: it has a
signal on every image, including the ones the labels already call right. Labels alone (plain cross
entropy) are the default, as in the papers' recipes.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["frozen", "task_loss"]


@contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block the backbone is frozen (no parameter wants a gradient) and in eval mode (no
    dropout); each parameter's flag and the mode come back on exit, whatever happens inside."""
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    model.eval()
    try:
        yield model
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


def task_loss(logits: Tensor, labels: Tensor, teacher_logits: Optional[Tensor] = None) -> Tensor:
    """Cross entropy on ``labels [B]``, or with ``teacher_logits [B, classes]`` the KL divergence
    from the teacher's softmax to ``logits [B, classes]`` (temperature 1, batch mean)."""
    if teacher_logits is None:
        return F.cross_entropy(logits, labels)
    return F.kl_div(
        logits.log_softmax(-1), teacher_logits.detach().log_softmax(-1), log_target=True,
        reduction="batchmean",
    )
