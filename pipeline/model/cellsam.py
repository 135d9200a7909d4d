"""The CellSAM network (see docs/model.md).

``CellSAM`` = lightweight student encoder (+ optional frozen SAM ViT teacher and a gated fusion of
both embeddings, "dual" mode) -> dense decoder (nucleus logit + HoVer maps) -> prompt-free instances
(:mod:`pipeline.model.postprocess`) -> optional SAM prompt encoder + mask decoder refinement and mask
fusion (:mod:`pipeline.model.refine`). "lite" mode = student only (CPU).

The architecture is fully described by a JSON-able ``arch`` dict stored in every checkpoint.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .student import EMBED_DIM, DenseDecoder, InvertedResidual, StudentEncoder

# SAM's preprocessing (segment_anything.modeling.Sam.pixel_mean / pixel_std), RGB in 0..255
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)

DEFAULT_ARCH = {
    "student": {"widths": [24, 32, 64, 128], "depths": [1, 2, 3, 3], "expand": 4},
    "decoder": {"dec": [96, 64, 48, 24, 16], "out": 4},  # out 4 = + distance map (3 = HV only)
    "fusion": False,  # gated teacher/student fusion present ("dual" capable)
    "sam_decoder": False,  # SAM prompt encoder + mask decoder present (refinement capable)
}


class GatedFusion(nn.Module):
    """Aggregation of teacher and student embeddings: ``f = s + g * (t - s)``, with a per-pixel,
    per-channel gate ``g = sigmoid(conv1x1([s, t]))`` (initialised to 0.5)."""

    def __init__(self, dim: int = EMBED_DIM) -> None:
        super().__init__()
        self.gate = nn.Conv2d(2 * dim, dim, 1)
        nn.init.zeros_(self.gate.weight)
        nn.init.zeros_(self.gate.bias)

    def forward(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        g = torch.sigmoid(self.gate(torch.cat([s, t], 1)))
        return s + g * (t - s)


class ForegroundGate(nn.Module):
    """"Not a nucleus" suppression of the nucleus logit from the stride-16 embedding (``arch["fg_gate"]``).

    ``g = -softplus(conv1x1(relu(conv3x3(embed))))`` (3x3 cells = 48 µm of context at 0.5 µm/px),
    upsampled bilinearly to the maps and added to the nucleus logit: it can only lower it. The last
    convolution starts at zero weights and bias ``init_bias`` (softplus(-6) = 0.0025: no effect),
    so a gated checkpoint computes the ungated function until the gate is trained
    (:mod:`pipeline.training.gate`). The gate reads the embedding the decoder reads, so it costs
    two small convolutions at stride 16."""

    def __init__(self, dim: int = 256, hidden: int = 32, init_bias: float = -6.0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim, hidden, 3, padding=1)
        self.out = nn.Conv2d(hidden, 1, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.constant_(self.out.bias, init_bias)

    def forward(self, embed: torch.Tensor, size) -> torch.Tensor:
        """``(N, 1, H, W)`` logit offset (<= 0) for maps of spatial ``size``."""
        g = -F.softplus(self.out(F.relu(self.conv(embed))))
        return F.interpolate(g, size=size, mode="bilinear", align_corners=False)


class CellSAM(nn.Module):
    """Input ``float32 (N, 3, H, W)`` RGB 0..255 (H, W multiples of 16). ``forward`` returns a dict:
    ``maps`` (N, C, H, W) [nucleus logit, h, v(, distance logit)], ``embed`` (N, 256, H/16, W/16) used by the decoders,
    ``student_embed``, and ``teacher_embed`` (None in lite mode)."""

    def __init__(self, arch: dict | None = None) -> None:
        super().__init__()
        arch = copy.deepcopy(arch or DEFAULT_ARCH)
        self.arch = arch
        st = arch["student"]
        self.student = StudentEncoder(tuple(st["widths"]), tuple(st["depths"]), st.get("expand", 4))
        self.decoder = DenseDecoder(tuple(st["widths"]), tuple(arch["decoder"]["dec"]),
                                    int(arch["decoder"].get("out", 3)), int(arch["decoder"].get("refine2", 0)))
        self.fusion = GatedFusion() if arch.get("fusion") else None
        gate = arch.get("fg_gate")
        self.fg_gate = ForegroundGate(hidden=int(gate.get("hidden", 32))) if gate else None
        self.teacher = None  # frozen SAM image encoder, attached at run time (never saved)
        self.prompt_encoder = None
        self.mask_decoder = None
        if arch.get("sam_decoder"):
            from .refine import build_sam_decoder

            self.prompt_encoder, self.mask_decoder = build_sam_decoder(arch.get("sam_decoder_cfg"))
        self.type_head = None  # per-nucleus classifier (pipeline.model.typehead), arch["type_head"]
        if arch.get("type_head"):
            from .typehead import TypeHead

            self.type_head = TypeHead(arch["type_head"])
        self.patch_typer = None  # per-nucleus patch CNN (pipeline.model.patchtyper), arch["patch_typer"]
        if arch.get("patch_typer"):
            from .patchtyper import PatchTyper

            self.patch_typer = PatchTyper(arch["patch_typer"])
        self.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(PIXEL_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def mode(self) -> str:
        return "dual" if (self.teacher is not None and self.fusion is not None) else "lite"

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.pixel_mean) / self.pixel_std

    def forward(self, x: torch.Tensor, use_teacher: bool = True) -> dict:
        xn = self.normalize(x)
        feats = self.student(xn)
        s_emb = feats["embed"]
        t_emb = None
        embed = s_emb
        if use_teacher and self.teacher is not None and self.fusion is not None:
            t_emb = self.teacher(xn)
            embed = self.fusion(s_emb, t_emb)
        maps = self.decoder(xn, feats, embed)
        if self.fg_gate is not None:
            maps = torch.cat([maps[:, :1] + self.fg_gate(embed, maps.shape[-2:]), maps[:, 1:]], 1)
        return {"maps": maps, "embed": embed, "student_embed": s_emb, "teacher_embed": t_emb}

    def trainable_state_dict(self) -> dict:
        """State dict without the (frozen, user-supplied) teacher."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("teacher.")}


def _rebuilt(model: CellSAM, arch: dict, state: dict) -> tuple[CellSAM, list, list]:
    """A new ``CellSAM(arch)`` loaded non-strictly with ``state``, sharing ``model``'s teacher and
    training mode; returns it with the missing and unexpected state keys (architecture upgrades)."""
    new = CellSAM(arch)
    missing, unexpected = new.load_state_dict(state, strict=False)
    new.teacher = model.teacher
    return new.train(model.training), missing, unexpected


def with_distance_head(model: CellSAM) -> CellSAM:
    """Upgrade a 3-channel (HV-only) model to the 4-channel decoder head: every weight is kept, the
    new distance channel starts from zero weights (a warm start for ``cellsam train --init``)."""
    if model.decoder.head.out_channels == 4:
        return model
    arch = copy.deepcopy(model.arch)
    arch["decoder"]["out"] = 4
    state = model.trainable_state_dict()
    w, b = state.pop("decoder.head.weight"), state.pop("decoder.head.bias")
    new, _, _ = _rebuilt(model, arch, state)
    with torch.no_grad():
        new.decoder.head.weight.zero_()
        new.decoder.head.bias.zero_()
        new.decoder.head.weight[:3] = w
        new.decoder.head.bias[:3] = b
    return new


def grown(model: CellSAM, extra_depth: int) -> CellSAM:
    """A deeper copy of ``model`` that computes exactly the same function (a warm start with more
    capacity, ``cellsam train --init CKPT --grow-depth N``): ``extra_depth`` residual
    inverted-residual blocks are appended to each of the student's stride-4/8/16 stages and to the
    decoder's stride-2 level (``arch["decoder"]["refine2"]``). Every new block's last BatchNorm
    starts with zero scale, so each block is the identity until training moves it; every existing
    weight is kept."""
    if extra_depth <= 0:
        return model
    arch = copy.deepcopy(model.arch)
    d = list(arch["student"]["depths"])
    arch["student"]["depths"] = [d[0]] + [n + extra_depth for n in d[1:]]
    arch["decoder"]["refine2"] = int(arch["decoder"].get("refine2", 0)) + extra_depth
    new, missing, unexpected = _rebuilt(model, arch, model.trainable_state_dict())
    if unexpected:
        raise ValueError(f"cannot grow: unexpected weights {unexpected[:3]}")
    fresh = {k.rsplit(".", 4)[0] for k in missing}  # "...s4.2.block.2.1.weight" -> "...s4.2"
    with torch.no_grad():
        for name, mod in new.named_modules():
            if name in fresh and isinstance(mod, InvertedResidual):
                mod.block[2][1].weight.zero_()
    return new


class Pointwise(nn.Module):
    """A 1x1 convolution computed as a matrix product over the channel axis (inference only).

    On the CPU, PyTorch sends batch-1 1x1 convolutions to its generic (im2col) kernel; the same
    product as ``F.linear`` on the channels-last view is a plain GEMM: identical outputs, 1.2-1.5x
    faster forward for this network."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.weight = nn.Parameter(conv.weight.detach()[:, :, 0, 0].clone(), requires_grad=False)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.permute(0, 2, 3, 1), self.weight, self.bias).permute(0, 3, 1, 2)


def fold_batchnorm(modules) -> None:
    """Fold, in place, every ``Conv2d -> BatchNorm2d`` pair inside the ``nn.Sequential`` among
    ``modules`` (eval mode) into one convolution (the BatchNorm becomes ``Identity``)."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    for mod in modules:
        if isinstance(mod, nn.Sequential):
            for i in range(len(mod) - 1):
                if isinstance(mod[i], nn.Conv2d) and isinstance(mod[i + 1], nn.BatchNorm2d):
                    mod[i] = fuse_conv_bn_eval(mod[i], mod[i + 1])
                    mod[i + 1] = nn.Identity()


def inference_copy(model: CellSAM) -> CellSAM:
    """An inference copy of ``model`` (the caller's model is untouched; the frozen teacher is
    shared, not copied):

    * every ``Conv2d -> BatchNorm2d`` pair folded into one convolution (BatchNorm -> ``Identity``);
      same outputs up to float rounding (~1e-5), ~1.4x faster on the CPU (BatchNorm was a fifth of
      the forward time in the profile);
    * every stride-1, ungrouped 1x1 convolution of the student and decoder replaced by
      :class:`Pointwise` (same outputs).
    """
    memo = {} if model.teacher is None else {id(model.teacher): model.teacher}
    out = copy.deepcopy(model, memo).eval()
    containers = [*out.student.modules(), *out.decoder.modules()]
    fold_batchnorm(containers + ([] if out.patch_typer is None else list(out.patch_typer.modules())))
    for mod in containers:
        for name, child in list(mod.named_children()):
            if (isinstance(child, nn.Conv2d) and child.kernel_size == (1, 1) and child.groups == 1
                    and child.stride == (1, 1) and child.padding == (0, 0)):
                setattr(mod, name, Pointwise(child))
    return out
