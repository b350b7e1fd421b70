"""The camera encoder: a 64x64x3 uint8 image -> a grid of patch tokens for the backbone."""

from __future__ import annotations

import torch
from torch import nn

# uint8 -> [0, 1] -> roughly zero-mean, unit-scale: (x - 0.5) / 0.25
_MEAN, _STD = 0.5, 0.25
IMAGE_NORMS = ("fixed", "per_image")
# per_image: each frame's own per-channel mean and spread, measured on its centre (a `NORM_MARGIN` pixel
# border is left out, so the black edge of a shifted camera does not move them), with the spread floored at
# `NORM_MIN_STD` grey levels so a flat frame is not blown up into noise
NORM_MARGIN = 8
NORM_MIN_STD = 8.0


def normalize_image(image: torch.Tensor, mode: str = "fixed") -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float, the encoder's input.

    `fixed`: one affine map for every frame, (x / 255 - 0.5) / 0.25 (the shipped checkpoint's).
    `per_image`: per frame and channel, (x - mean) / max(std, NORM_MIN_STD), both measured on the frame's
    centre. A dimmer or colour-cast camera is a per-channel gain and offset of the frame, which this removes
    exactly (up to clipping at 0 and 255), so a policy trained with it never sees a lighting change
    (instance normalization, as style-invariant vision models use it).
    """
    if mode == "fixed":
        return image.permute(0, 3, 1, 2).float().mul_(1.0 / (255.0 * _STD)).sub_(_MEAN / _STD)
    if mode != "per_image":
        raise ValueError(f"image norm must be one of {IMAGE_NORMS}, got {mode!r}")
    h, w = image.shape[1], image.shape[2]
    m = NORM_MARGIN if min(h, w) > 4 * NORM_MARGIN else 0
    centre = image[:, m : h - m, m : w - m].reshape(image.shape[0], -1, image.shape[3]).float()  # (B, N, 3)
    std, mean = torch.std_mean(centre, dim=1, correction=0)
    scale = 1.0 / std.clamp(min=NORM_MIN_STD)
    x = (image.float() - mean[:, None, None]) * scale[:, None, None]  # never in place: a float input stays as is
    return x.permute(0, 3, 1, 2)


class PatchEncoder(nn.Module):
    """Patch embedding with a small conv stem and a learned, factorized 2D position embedding.

    With `conv_stem`, two overlapping 3x3 stride-2 convolutions precede the patch projection, so a
    token knows where inside its 8x8 patch an edge lies (a plain patchify conv localizes objects only
    to the patch grid); the stem costs ~8 MMAC per image. The position embedding is row + column,
    which generalizes better than one free vector per cell with this little data.
    """

    def __init__(
        self,
        d_model: int,
        image_size: int = 64,
        patch_size: int = 8,
        conv_stem: bool = True,
        keypoints: int = 0,
        image_norm: str = "fixed",
    ) -> None:
        super().__init__()
        if image_norm not in IMAGE_NORMS:
            raise ValueError(f"PatchEncoder: image_norm must be one of {IMAGE_NORMS}, got {image_norm!r}")
        self.image_norm = image_norm
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
        self.keypoints = keypoints
        if keypoints:
            self.kp = SpatialKeypoints(d_model, keypoints, image_size)

    @property
    def n_tokens(self) -> int:
        return self.grid * self.grid + (self.keypoints + self.kp.n_query if self.keypoints else 0)

    def forward(self, image: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """image: (B, H, W, 3) uint8 -> tokens (B, grid*grid [+ K], d), row-major over the patch grid.

        cond: (B, d) instruction summary that FiLM-modulates the keypoint features (None = no modulation).
        """
        x = normalize_image(image, self.image_norm)
        tokens = self.embed(x).flatten(2).transpose(1, 2)  # (B, grid*grid, d)
        tokens = tokens + (self.row_pos + self.col_pos).reshape(1, self.grid * self.grid, -1)
        if self.keypoints:
            tokens = torch.cat([tokens, self.kp(x, cond)], dim=1)
        return tokens


class SpatialKeypoints(nn.Module):
    """Spatial-softmax keypoints (Levine et al., 2016): K learned feature maps, each turned into the
    expected image position of its activation plus its spread and orientation (second moments).

    A grid of patch tokens localizes an object only as finely as the transformer learns to decode it;
    these tokens carry sub-pixel coordinates, sizes and angles directly, which is what reaching,
    grasping and hand-shaping need, and they are cheap (a 16x16 map per keypoint). The instruction
    FiLM-modulates the features (as RT-1 conditions its image encoder), so a keypoint can follow
    "the red one" rather than every red thing the transformer must later sort out.
    """

    def __init__(self, d_model: int, keypoints: int, image_size: int = 64) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Conv2d(3, 32, 3, stride=2, padding=1),
            nn.GELU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1),
            nn.GELU(),
        )
        self.film = nn.Linear(d_model, 2 * 64)
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)
        self.head = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1), nn.GELU(), nn.Conv2d(64, keypoints, 1))
        # query keypoints: the instruction picks a weighting of low-level colour/shape features (a dynamic
        # 1x1 conv), so "the red cube" becomes a heat map whose expected position is the named object
        self.n_query = 4
        self.colour = nn.Sequential(nn.Conv2d(3, 32, 4, stride=4), nn.GELU(), nn.Conv2d(32, 32, 1))
        self.query = nn.Linear(d_model, self.n_query * 32)
        # the instruction summary starts tiny (embeddings ~0.02) and softmax maps start flat: normalizing
        # the summary and a learnable temperature (starting sharp) let localization be learned in hundreds
        # of steps instead of thousands
        self.cond_norm = nn.LayerNorm(d_model)
        self.log_temp = nn.Parameter(torch.tensor(2.0))
        side = image_size // 4
        coords = (torch.arange(side, dtype=torch.float32) + 0.5) / side * 2 - 1
        self.register_buffer("ys", coords.view(1, 1, side, 1).expand(1, 1, side, side).reshape(1, 1, -1), False)
        self.register_buffer("xs", coords.view(1, 1, 1, side).expand(1, 1, side, side).reshape(1, 1, -1), False)
        self.proj = nn.Linear(6, d_model)
        self.ident = nn.Parameter(torch.randn(keypoints + 4, d_model) * 0.02)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, 3, H, W) normalized image, cond (B, d) or None -> (B, K, d) keypoint tokens."""
        h = self.trunk(x)
        if cond is not None:
            cond = self.cond_norm(cond)
            gamma, beta = self.film(cond).chunk(2, dim=-1)
            h = h * (1 + gamma[:, :, None, None]) + beta[:, :, None, None]
        logits = self.head(h).flatten(2)  # (B, K, side*side)
        if cond is not None:
            f = self.colour(x).flatten(2)  # (B, 32, side*side)
            w = self.query(cond).view(-1, self.n_query, 32)
            logits = torch.cat([logits, torch.einsum("bqc,bcs->bqs", w, f) * 32**-0.5], dim=1)
        logits = logits * self.log_temp.exp()
        p = torch.softmax(logits, dim=-1)
        ex, ey = (p * self.xs).sum(-1), (p * self.ys).sum(-1)
        vx = (p * self.xs.square()).sum(-1) - ex.square()
        vy = (p * self.ys.square()).sum(-1) - ey.square()
        cxy = (p * self.xs * self.ys).sum(-1) - ex * ey
        peak = logits.amax(-1) - logits.mean(-1)  # how strongly the feature is present at all
        sx, sy = vx.clamp(min=1e-6).sqrt(), vy.clamp(min=1e-6).sqrt()
        feats = torch.stack([ex, ey, 4 * sx, 4 * sy, 8 * cxy, 0.01 * peak], dim=-1)
        # kept for the auxiliary focus loss: the first query keypoint's expected (x, y) is trained to be
        # the named object's position (FleetPolicy.action_loss), which teaches grounding directly
        self.last_query_xy = feats[:, self.head[-1].out_channels, :2] if cond is not None else None
        return self.proj(feats) + self.ident[: feats.shape[1]]
