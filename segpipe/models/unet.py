"""A plain 2-D U-Net in pure torch.

Kept dependency-free (no torchvision/timm) so the CPU-only install stays small. BatchNorm is used
in eval mode at inference, where it is a per-sample affine map: a patch's logits do not depend on
which other patches share its batch, which the tiling-invariance guarantee relies on.
"""

from __future__ import annotations

import torch
from torch import nn


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )


class UNet2d(nn.Module):
    """U-Net with ``depth`` resolution levels and ``base`` channels at the top level."""

    def __init__(self, in_channels: int, n_classes: int, base: int = 16, depth: int = 4) -> None:
        super().__init__()
        widths = [base * 2**i for i in range(depth)]
        self.down = nn.ModuleList()
        cin = in_channels
        for w in widths:
            self.down.append(_block(cin, w))
            cin = w
        self.pool = nn.MaxPool2d(2)
        self.up = nn.ModuleList()
        self.fuse = nn.ModuleList()
        for w in reversed(widths[:-1]):
            self.up.append(nn.ConvTranspose2d(w * 2, w, 2, stride=2))
            self.fuse.append(_block(w * 2, w))
        self.head = nn.Conv2d(base, n_classes, 1)
        self.multiple = 2 ** (depth - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            x = block(x)
            if i < len(self.down) - 1:
                skips.append(x)
                x = self.pool(x)
        for up, fuse in zip(self.up, self.fuse, strict=True):
            x = up(x)
            x = fuse(torch.cat([skips.pop(), x], dim=1))
        return self.head(x)
