"""A plain U-Net in pure torch, 2-D or 3-D.

Kept dependency-free (no torchvision/timm) so the CPU-only install stays small. BatchNorm is used
in eval mode at inference, where it is a per-sample affine map: a patch's logits do not depend on
which other patches share its batch, which the tiling-invariance guarantee relies on.
"""

from __future__ import annotations

import torch
from torch import nn

_LAYERS = {
    2: (nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d, nn.ConvTranspose2d),
    3: (nn.Conv3d, nn.BatchNorm3d, nn.MaxPool3d, nn.ConvTranspose3d),
}


def _block(dims: int, cin: int, cout: int) -> nn.Sequential:
    conv, norm, _, _ = _LAYERS[dims]
    return nn.Sequential(
        conv(cin, cout, 3, padding=1, bias=False), norm(cout), nn.ReLU(inplace=True),
        conv(cout, cout, 3, padding=1, bias=False), norm(cout), nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    """U-Net with ``depth`` resolution levels, ``base`` channels at the top, on ``dims`` axes."""

    def __init__(self, in_channels: int, n_classes: int, base: int = 16, depth: int = 4, dims: int = 2) -> None:
        super().__init__()
        if dims not in _LAYERS:
            raise ValueError(f"U-Net supports 2 or 3 spatial dimensions, not {dims}")
        conv, _, pool, up = _LAYERS[dims]
        widths = [base * 2**i for i in range(depth)]
        self.down = nn.ModuleList()
        cin = in_channels
        for w in widths:
            self.down.append(_block(dims, cin, w))
            cin = w
        self.pool = pool(2)
        self.up = nn.ModuleList()
        self.fuse = nn.ModuleList()
        for w in reversed(widths[:-1]):
            self.up.append(up(w * 2, w, 2, stride=2))
            self.fuse.append(_block(dims, w * 2, w))
        self.head = conv(base, n_classes, 1)
        self.multiple = 2 ** (depth - 1)
        self.dims = dims

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
