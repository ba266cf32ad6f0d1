"""The small model the optimizer tests share: every awkward parameter kind the spec lists."""

from __future__ import annotations

import torch
from torch import nn


class AwkwardNet(nn.Module):
    """Linear -> (BN) -> tanh -> linear, with a non-contiguous, a zero-size and an unused
    parameter. Test modules subclass it to add their parameter groups."""

    def __init__(self, bn: bool = False) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(8, 5) * 0.5)
        self.b1 = nn.Parameter(torch.randn(8) * 0.1)
        self.w2t = nn.Parameter((torch.randn(8, 3) * 0.5).t())  # non-contiguous
        assert not self.w2t.is_contiguous()
        self.b2 = nn.Parameter(torch.zeros(3))
        self.empty = nn.Parameter(torch.randn(0, 4))  # zero-size
        self.unused = nn.Parameter(torch.randn(4))  # never gets a gradient
        self.bn = nn.BatchNorm1d(8) if bn else None

    def forward(self, x):
        h = x @ self.w1.t() + self.b1
        if self.bn is not None:
            h = self.bn(h)
        h = torch.tanh(h)
        return h @ self.w2t.t() + self.b2 + self.empty.sum()
