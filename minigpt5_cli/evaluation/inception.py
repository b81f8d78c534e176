"""Inception-v3 as FID and IS use it: the TensorFlow 2015-12-05 graph, in plain PyTorch.

Module names match the state dicts that pytorch-fid (`pt_inception-2015-12-05-6726825d.pth`) and
torch-fidelity (`weights-inception-2015-12-05-6726825d.pth`) publish, so either file loads here.
Both of those packages need torchvision; this needs only torch. Where the TensorFlow graph differs
from torchvision's Inception3, so does this: average pools leave the padding out of the average,
the last block max-pools its pool branch, and the classifier has 1008 outputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SIZE = 299  # input side


class Conv(nn.Module):
    """Convolution without bias, batch norm (eps 1e-3), ReLU."""

    def __init__(self, cin: int, cout: int, kernel, stride: int = 1, same: bool = False):
        super().__init__()
        kernel = (kernel, kernel) if isinstance(kernel, int) else kernel
        padding = (kernel[0] // 2, kernel[1] // 2) if same else 0
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg_pool(x):
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class BlockA(nn.Module):  # Mixed_5b..5d
    def __init__(self, cin: int, pool: int):
        super().__init__()
        self.branch1x1 = Conv(cin, 64, 1)
        self.branch5x5_1 = Conv(cin, 48, 1)
        self.branch5x5_2 = Conv(48, 64, 5, same=True)
        self.branch3x3dbl_1 = Conv(cin, 64, 1)
        self.branch3x3dbl_2 = Conv(64, 96, 3, same=True)
        self.branch3x3dbl_3 = Conv(96, 96, 3, same=True)
        self.branch_pool = Conv(cin, pool, 1)

    def forward(self, x):
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_avg_pool(x)),
        ], 1)


class BlockB(nn.Module):  # Mixed_6a: 35 -> 17
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = Conv(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = Conv(cin, 64, 1)
        self.branch3x3dbl_2 = Conv(64, 96, 3, same=True)
        self.branch3x3dbl_3 = Conv(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, 3, stride=2),
        ], 1)


class BlockC(nn.Module):  # Mixed_6b..6e
    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.branch1x1 = Conv(cin, 192, 1)
        self.branch7x7_1 = Conv(cin, c7, 1)
        self.branch7x7_2 = Conv(c7, c7, (1, 7), same=True)
        self.branch7x7_3 = Conv(c7, 192, (7, 1), same=True)
        self.branch7x7dbl_1 = Conv(cin, c7, 1)
        self.branch7x7dbl_2 = Conv(c7, c7, (7, 1), same=True)
        self.branch7x7dbl_3 = Conv(c7, c7, (1, 7), same=True)
        self.branch7x7dbl_4 = Conv(c7, c7, (7, 1), same=True)
        self.branch7x7dbl_5 = Conv(c7, 192, (1, 7), same=True)
        self.branch_pool = Conv(cin, 192, 1)

    def forward(self, x):
        dbl = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            dbl = layer(dbl)
        return torch.cat([
            self.branch1x1(x),
            self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
            dbl,
            self.branch_pool(_avg_pool(x)),
        ], 1)


class BlockD(nn.Module):  # Mixed_7a: 17 -> 8
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = Conv(cin, 192, 1)
        self.branch3x3_2 = Conv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = Conv(cin, 192, 1)
        self.branch7x7x3_2 = Conv(192, 192, (1, 7), same=True)
        self.branch7x7x3_3 = Conv(192, 192, (7, 1), same=True)
        self.branch7x7x3_4 = Conv(192, 192, 3, stride=2)

    def forward(self, x):
        return torch.cat([
            self.branch3x3_2(self.branch3x3_1(x)),
            self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x)))),
            F.max_pool2d(x, 3, stride=2),
        ], 1)


class BlockE(nn.Module):  # Mixed_7b (average pool), Mixed_7c (max pool, as in the TensorFlow graph)
    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = Conv(cin, 320, 1)
        self.branch3x3_1 = Conv(cin, 384, 1)
        self.branch3x3_2a = Conv(384, 384, (1, 3), same=True)
        self.branch3x3_2b = Conv(384, 384, (3, 1), same=True)
        self.branch3x3dbl_1 = Conv(cin, 448, 1)
        self.branch3x3dbl_2 = Conv(448, 384, 3, same=True)
        self.branch3x3dbl_3a = Conv(384, 384, (1, 3), same=True)
        self.branch3x3dbl_3b = Conv(384, 384, (3, 1), same=True)
        self.branch_pool = Conv(cin, 192, 1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg_pool(x)
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(b3), self.branch3x3_2b(b3),
            self.branch3x3dbl_3a(dbl), self.branch3x3dbl_3b(dbl),
            self.branch_pool(pooled),
        ], 1)


class FIDInceptionV3(nn.Module):
    """Images (N, 3, 299, 299) in [0, 1] -> (pool3 features (N, 2048), logits without bias (N, 1008)).

    Inputs are scaled to [-1, 1] inside, as pytorch-fid does."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = Conv(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = Conv(32, 32, 3)
        self.Conv2d_2b_3x3 = Conv(32, 64, 3, same=True)
        self.Conv2d_3b_1x1 = Conv(64, 80, 1)
        self.Conv2d_4a_3x3 = Conv(80, 192, 3)
        self.Mixed_5b = BlockA(192, 32)
        self.Mixed_5c = BlockA(256, 64)
        self.Mixed_5d = BlockA(288, 64)
        self.Mixed_6a = BlockB(288)
        self.Mixed_6b = BlockC(768, 128)
        self.Mixed_6c = BlockC(768, 160)
        self.Mixed_6d = BlockC(768, 160)
        self.Mixed_6e = BlockC(768, 192)
        self.Mixed_7a = BlockD(768)
        self.Mixed_7b = BlockE(1280, max_pool=False)
        self.Mixed_7c = BlockE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = 2 * x - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        pool = x.mean((2, 3))
        return pool, pool @ self.fc.weight.T  # IS takes the logits without the bias, as torch-fidelity does


def to_input(image, resize: str = "torch") -> torch.Tensor:
    """A PIL image -> (3, 299, 299), RGB, the network's input. `resize` "torch": bilinear as pytorch-fid
    does it (`F.interpolate`, align_corners=False, no antialias), in [0, 1]. "tf1": as torch-fidelity
    does it (8-bit values, TensorFlow 1's bilinear rule, `resize_tf1`), divided by 256, so that the
    network's 2x - 1 is torch-fidelity's (x - 128) / 128."""
    import numpy as np

    x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32)).permute(2, 0, 1)[None]
    if resize == "tf1":
        return resize_tf1(x, SIZE)[0] / 256
    return F.interpolate(x / 255, size=(SIZE, SIZE), mode="bilinear", align_corners=False)[0]


def resize_tf1(x: torch.Tensor, size: int) -> torch.Tensor:
    """TensorFlow 1's bilinear resize of (N, C, H, W) to size x size, align_corners=False: output pixel i
    reads input position i * in / out (no half-pixel offset), its neighbour clamped at the edge."""
    def grid(n: int):
        at = torch.arange(size, dtype=x.dtype) * torch.tensor(n / size, dtype=torch.float32)
        lo = at.long()
        return lo, (lo + 1).clamp_max(n - 1), at - lo.float()

    (y0, y1, dy), (x0, x1, dx) = grid(x.shape[2]), grid(x.shape[3])
    rows0, rows1 = x[:, :, y0, :], x[:, :, y1, :]
    top = rows0[..., x0] + (rows0[..., x1] - rows0[..., x0]) * dx
    bottom = rows1[..., x0] + (rows1[..., x1] - rows1[..., x0]) * dx
    return top + (bottom - top) * dy[:, None]
