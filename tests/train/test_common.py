"""What the training loops share: the task loss (and the frozen backbone, checked by each loop's tests)."""

from __future__ import annotations

import torch

from tomec.train.common import task_loss


def test_task_loss_is_cross_entropy_or_kl_to_the_teacher():
    g = torch.Generator().manual_seed(0)
    logits, teacher = torch.randn(4, 10, generator=g), torch.randn(4, 10, generator=g)
    labels = torch.tensor([1, 2, 3, 4])
    torch.testing.assert_close(task_loss(logits, labels), torch.nn.functional.cross_entropy(logits, labels))
    p, log_q = teacher.softmax(-1), logits.log_softmax(-1)
    kl = (p * (p.log() - log_q)).sum(-1).mean()
    torch.testing.assert_close(task_loss(logits, labels, teacher), kl)
    assert task_loss(teacher, labels, teacher).abs().item() < 1e-6
