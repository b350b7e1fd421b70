"""The camera encoder: a 64x64x3 uint8 image -> a grid of patch tokens for the backbone."""

from __future__ import annotations

import torch
from torch import nn

# uint8 -> [0, 1] -> roughly zero-mean, unit-scale: (x - 0.5) / 0.25
_MEAN, _STD = 0.5, 0.25


class PatchEncoder(nn.Module):
    """Patch embedding with a small conv stem and a learned, factorized 2D position embedding.

    With `conv_stem`, two overlapping 3x3 stride-2 convolutions precede the patch projection, so a
    token knows where inside its 8x8 patch an edge lies (a plain patchify conv localizes objects only
    to the patch grid); the stem costs ~8 MMAC per image. The position embedding is row + column,
    which generalizes better than one free vector per cell with this little data.
    """

    def __init__(self, d_model: int, image_size: int = 64, patch_size: int = 8, conv_stem: bool = True) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"PatchEncoder: image_size {image_size} is not a multiple of patch_size {patch_size}")
        self.image_size = image_size
        self.grid = image_size // patch_size
        if conv_stem:
            if patch_size % 4:
                raise ValueError(f"PatchEncoder: the conv stem needs patch_size divisible by 4, got {patch_size}")
            c1, c2 = max(d_model // 4, 8), max(d_model // 2, 16)
            self.embed = nn.Sequential(
                nn.Conv2d(3, c1, 3, stride=2, padding=1),
                nn.GELU(),
                nn.Conv2d(c1, c2, 3, stride=2, padding=1),
                nn.GELU(),
                nn.Conv2d(c2, d_model, patch_size // 4, stride=patch_size // 4),
            )
        else:
            self.embed = nn.Sequential(nn.Conv2d(3, d_model, patch_size, stride=patch_size))
        self.row_pos = nn.Parameter(torch.randn(self.grid, 1, d_model) * 0.02)
        self.col_pos = nn.Parameter(torch.randn(1, self.grid, d_model) * 0.02)

    @property
    def n_tokens(self) -> int:
        return self.grid * self.grid

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """image: (B, H, W, 3) uint8 -> tokens (B, grid*grid, d), row-major over the patch grid."""
        x = image.permute(0, 3, 1, 2).float().mul_(1.0 / (255.0 * _STD)).sub_(_MEAN / _STD)
        x = self.embed(x)  # (B, d, grid, grid)
        x = x.flatten(2).transpose(1, 2)  # (B, grid*grid, d)
        return x + (self.row_pos + self.col_pos).reshape(1, self.n_tokens, -1)
