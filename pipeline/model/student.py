"""Lightweight student encoder + dense decoder of CellSAM.

Student encoder: a MobileNetV2-style CNN (inverted residual, depthwise 3x3) with strides 2/4/8/16.
Its *neck* emits SAM-compatible image embeddings: 256 channels at stride 16 with SAM's LayerNorm2d,
so the embeddings plug into SAM's prompt encoder + mask decoder, and can be distilled from (and fused
with) SAM ViT features. A U-Net style dense decoder uses the (possibly fused) embedding plus the
student's stride-2/4/8 features to predict, at full resolution, a nucleus logit and HoVer-style
horizontal/vertical maps. Why a CNN: on 2 CPU cores a depthwise CNN is ~10x cheaper per pixel than a
ViT of similar quality, and its cost is linear in image size (no global attention).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

EMBED_DIM = 256  # SAM's prompt/mask decoder width
EMBED_STRIDE = 16  # SAM's image-embedding stride


class LayerNorm2d(nn.Module):
    """Channel LayerNorm for (N, C, H, W) (same as segment_anything.modeling.common.LayerNorm2d)."""

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act:
        layers.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int = 4) -> None:
        super().__init__()
        hid = cin * expand
        self.use_res = stride == 1 and cin == cout
        self.block = nn.Sequential(
            conv_bn(cin, hid, 1),
            conv_bn(hid, hid, 3, stride, groups=hid),
            conv_bn(hid, cout, 1, act=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return x + y if self.use_res else y


def _stage(cin: int, cout: int, n: int, stride: int, expand: int) -> nn.Sequential:
    blocks = [InvertedResidual(cin, cout, stride, expand)]
    blocks += [InvertedResidual(cout, cout, 1, expand) for _ in range(n - 1)]
    return nn.Sequential(*blocks)


class StudentEncoder(nn.Module):
    """Input ``float32 (N, 3, H, W)`` normalised with SAM's pixel mean/std, H and W multiples of 16.

    Returns a dict: ``s2`` (N, w0, H/2, W/2), ``s4`` (N, w1, H/4, W/4), ``s8`` (N, w2, H/8, W/8),
    ``embed`` (N, 256, H/16, W/16) — the SAM-compatible embedding.
    """

    def __init__(self, widths=(24, 32, 64, 128), depths=(1, 2, 3, 3), expand: int = 4) -> None:
        super().__init__()
        w0, w1, w2, w3 = widths
        self.widths = tuple(widths)
        self.stem = nn.Sequential(conv_bn(3, w0, 3, 2), conv_bn(w0, w0, 3, 1, groups=w0), conv_bn(w0, w0, 1))
        self.s4 = _stage(w0, w1, depths[1], 2, expand)
        self.s8 = _stage(w1, w2, depths[2], 2, expand)
        self.s16 = _stage(w2, w3, depths[3], 2, expand)
        self.neck = nn.Sequential(
            nn.Conv2d(w3, EMBED_DIM, 1, bias=False),
            LayerNorm2d(EMBED_DIM),
            nn.Conv2d(EMBED_DIM, EMBED_DIM, 3, padding=1, bias=False),
            LayerNorm2d(EMBED_DIM),
        )

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        s2 = self.stem(x)
        s4 = self.s4(s2)
        s8 = self.s8(s4)
        s16 = self.s16(s8)
        return {"s2": s2, "s4": s4, "s8": s8, "embed": self.neck(s16)}


class DenseDecoder(nn.Module):
    """U-Net style decoder from the (fused) 256-d stride-16 embedding and the student's skips to
    full-resolution maps ``(N, out, H, W)``: channel 0 nucleus logit, 1-2 horizontal/vertical (tanh),
    and with ``out=4`` channel 3 the logit of the normalised distance-to-border map."""

    def __init__(self, widths=(24, 32, 64, 128), dec=(96, 64, 48, 24, 16), out: int = 3,
                 refine2: int = 0) -> None:
        super().__init__()
        w0, w1, w2, _ = widths
        d16, d8, d4, d2, d1 = dec
        self.lat16 = conv_bn(EMBED_DIM, d16, 1)
        self.up8 = nn.Sequential(conv_bn(d16 + w2, d8, 1), conv_bn(d8, d8, 3, groups=d8), conv_bn(d8, d8, 1))
        self.up4 = nn.Sequential(conv_bn(d8 + w1, d4, 1), conv_bn(d4, d4, 3, groups=d4), conv_bn(d4, d4, 1))
        self.up2 = nn.Sequential(conv_bn(d4 + w0, d2, 1), conv_bn(d2, d2, 3))
        # optional residual blocks at stride 2 (``refine2``; see pipeline.model.cellsam.grown)
        self.refine2 = nn.Sequential(*[InvertedResidual(d2, d2, 1, 4) for _ in range(refine2)])
        self.full = conv_bn(3, 8, 3)
        self.up1 = nn.Sequential(conv_bn(d2 + 8, d1, 1), conv_bn(d1, d1, 3, groups=d1), conv_bn(d1, d1, 1))
        if out not in (3, 4):
            raise ValueError(f"decoder out must be 3 or 4, got {out}")
        self.head = nn.Conv2d(d1, out, 1)

    @staticmethod
    def _up(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, size=ref.shape[-2:], mode="bilinear", align_corners=False)

    def forward(self, image: torch.Tensor, feats: dict[str, torch.Tensor], embed: torch.Tensor) -> torch.Tensor:
        x = self.lat16(embed)
        x = self.up8(torch.cat([self._up(x, feats["s8"]), feats["s8"]], 1))
        x = self.up4(torch.cat([self._up(x, feats["s4"]), feats["s4"]], 1))
        x = self.refine2(self.up2(torch.cat([self._up(x, feats["s2"]), feats["s2"]], 1)))
        x = self.up1(torch.cat([self._up(x, image), self.full(image)], 1))
        out = self.head(x).contiguous()  # channel slices of a contiguous tensor: fast tanh
        return torch.cat([out[:, :1], torch.tanh(out[:, 1:3]), out[:, 3:]], 1)
