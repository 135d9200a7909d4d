"""Frozen SAM ViT image encoder ("teacher") built from an official SAM checkpoint (see docs/model.md).

The user supplies the checkpoint (``sam_vit_b_01ec64.pth``, ``sam_vit_l_0b3195.pth``,
``sam_vit_h_4b8939.pth`` or a compatible fine-tune such as a state dict with the same key names).
It is read with ``torch.load(weights_only=True)`` (no code from the file runs), the architecture is
derived from the tensor shapes (embedding width, depth, heads, windows, input size), the full SAM
(image encoder + prompt encoder + mask decoder) is built with :mod:`segment_anything` and the state
dict is loaded strictly. The image encoder becomes the teacher; the prompt encoder / mask decoder
weights stay available (``SamTeacher.decoder_state``) to initialise CellSAM's refinement decoder.

**One physical scale.** The teacher receives CellSAM's normalised input (SAM pixel mean/std) of any
size (multiples of 16) and always encodes it the same way: the input is cut into crops of
``tile_px`` model pixels (:data:`pipeline.config.SAM_TEACHER_TILE_PX`, 256; step ``tile_px``, the
last crop aligned to the far edge, a side shorter than a crop is one zero-padded crop), each crop is
resized by the fixed factor ``img_size / tile_px`` (4x for the official 1024-px models), padded
bottom/right with zeros (= SAM's pad-after-normalisation) and encoded; each crop's 256-d embedding of
its valid region is resampled to the student's grid (H/16 per crop side) and the crops' embeddings
are stitched (two overlapping crops split their overlap in the middle). So a 256-px training crop
and a 1216-px whole-slide window are seen at the same scale, and a region that is one of the
window's crops gets exactly the features it gets as a training crop (:func:`teacher_tiles`).

:func:`build_tiny_sam_checkpoint` writes a small randomly initialised SAM with the official key
names (for tests and benchmarks).
"""

from __future__ import annotations

import logging
import os
import re
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..config import SAM_TEACHER_BATCH, SAM_TEACHER_TILE_PX
from ..errors import ModelError

log = logging.getLogger(__name__)

OFFICIAL = {(768, 12): "vit_b", (1024, 24): "vit_l", (1280, 32): "vit_h"}
_PATCH_KEY = "image_encoder.patch_embed.proj.weight"


# --------------------------------------------------------------------------------------------------
# checkpoint reading and architecture detection


def read_sam_state(path) -> dict[str, torch.Tensor]:
    """Read a SAM state dict safely.

    Parameters
    ----------
    path : path-like
        Official SAM checkpoint (a ``torch.save`` of ``Sam.state_dict()``); ``{"model": sd}`` and
        ``{"state_dict": sd}`` wrappers are accepted.

    Returns
    -------
    dict of str to Tensor

    Raises
    ------
    ModelError
        Missing file, unsafe pickle (refused by ``weights_only=True``), unreadable file, or a file
        that is not a SAM checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: SAM teacher checkpoint not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickle refusal, truncation, not-a-zip...
        text = str(exc).strip()
        if "weights_only" in text or "Unsupported global" in text or "GLOBAL" in text:
            msg = "refused: contains non-tensor Python objects (unsafe pickle)"
        else:
            msg = (text.splitlines()[0] if text else exc.__class__.__name__)[:200]
        raise ModelError(f"{path}: not a loadable SAM checkpoint ({msg})") from None
    if isinstance(obj, dict) and obj.get("format") == "cellsam-checkpoint":
        raise ModelError(f"{path}: is a CellSAM checkpoint, not a SAM checkpoint (use --model for it)")
    if isinstance(obj, dict):
        for wrap in ("model", "state_dict"):
            if isinstance(obj.get(wrap), dict) and _PATCH_KEY in obj[wrap]:
                obj = obj[wrap]
    if not isinstance(obj, dict) or _PATCH_KEY not in obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelError(f"{path}: not a SAM checkpoint (no '{_PATCH_KEY}' tensor)")
    return obj


def detect_sam_arch(sd: dict[str, torch.Tensor], where: str = "checkpoint") -> dict:
    """Derive the SAM architecture from state-dict shapes.

    Returns
    -------
    dict
        ``type`` ("vit_b" | "vit_l" | "vit_h" | "custom"), ``encoder`` (ImageEncoderViT kwargs, JSON-able)
        and ``decoder`` (``mlp_dim``, ``depth``, ``num_heads``, ``iou_head_hidden_dim``,
        ``iou_head_depth``, ``num_multimask_outputs``).

    Raises
    ------
    ModelError
        If a required tensor is missing or has an unexpected shape.
    """
    try:
        e, cin, p, _ = sd[_PATCH_KEY].shape
        g = sd["image_encoder.pos_embed"].shape[1]
        blocks = sorted({int(m.group(1)) for k in sd if (m := re.match(r"image_encoder\.blocks\.(\d+)\.", k))})
        depth = len(blocks)
        head_dim = sd["image_encoder.blocks.0.attn.rel_pos_h"].shape[1]
        sizes = [(sd[f"image_encoder.blocks.{i}.attn.rel_pos_h"].shape[0] + 1) // 2 for i in blocks]
        global_idx = [i for i, s in zip(blocks, sizes) if s == g]
        windows = {s for s in sizes if s != g}
        if len(windows) > 1:
            raise ValueError(f"several window sizes {sorted(windows)}")
        out_chans = sd["image_encoder.neck.0.weight"].shape[0]
        mlp_hidden = sd["image_encoder.blocks.0.mlp.lin1.weight"].shape[0]
        dec_layers = sorted({int(m.group(1)) for k in sd if (m := re.match(r"mask_decoder\.transformer\.layers\.(\d+)\.", k))})
        iou_layers = sorted({int(m.group(1)) for k in sd if (m := re.match(r"mask_decoder\.iou_prediction_head\.layers\.(\d+)\.", k))})
        decoder = {
            "mlp_dim": int(sd["mask_decoder.transformer.layers.0.mlp.lin1.weight"].shape[0]),
            "depth": len(dec_layers),
            "num_heads": 8,  # not visible in shapes; SAM uses 8 (so do our tiny checkpoints)
            "iou_head_hidden_dim": int(sd["mask_decoder.iou_prediction_head.layers.0.weight"].shape[0]),
            "iou_head_depth": len(iou_layers),
            "num_multimask_outputs": int(sd["mask_decoder.mask_tokens.weight"].shape[0]) - 1,
        }
    except (KeyError, IndexError, ValueError) as exc:
        raise ModelError(f"{where}: not a SAM checkpoint (unexpected tensors: {exc})") from None
    if out_chans != 256 or cin != 3 or depth == 0 or blocks != list(range(depth)):
        raise ModelError(f"{where}: unsupported SAM image encoder (out_chans {out_chans}, in_chans {cin}, depth {depth})")
    encoder = {
        "img_size": int(g * p), "patch_size": int(p), "embed_dim": int(e), "depth": depth,
        "num_heads": int(e // head_dim), "mlp_ratio": float(mlp_hidden / e), "out_chans": 256,
        "qkv_bias": "image_encoder.blocks.0.attn.qkv.bias" in sd, "use_rel_pos": True,
        "window_size": int(next(iter(windows))) if windows else 0, "global_attn_indexes": global_idx,
    }
    return {"type": OFFICIAL.get((int(e), depth), "custom"), "encoder": encoder, "decoder": decoder}


def build_sam(arch: dict):
    """A ``segment_anything.modeling.Sam`` for ``arch`` (from :func:`detect_sam_arch`), random weights."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    enc = dict(arch["encoder"])
    dec = arch["decoder"]
    grid = enc["img_size"] // enc["patch_size"]
    return Sam(
        image_encoder=ImageEncoderViT(norm_layer=partial(nn.LayerNorm, eps=1e-6),
                                      global_attn_indexes=tuple(enc.pop("global_attn_indexes")), **enc),
        prompt_encoder=PromptEncoder(embed_dim=256, image_embedding_size=(grid, grid),
                                     input_image_size=(arch["encoder"]["img_size"],) * 2, mask_in_chans=16),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=dec["num_multimask_outputs"],
            transformer=TwoWayTransformer(depth=dec["depth"], embedding_dim=256, mlp_dim=dec["mlp_dim"],
                                          num_heads=dec["num_heads"]),
            transformer_dim=256, iou_head_depth=dec["iou_head_depth"],
            iou_head_hidden_dim=dec["iou_head_hidden_dim"]),
    )


# --------------------------------------------------------------------------------------------------
# the teacher module


def teacher_tiles(n: int, tile: int) -> list[tuple[int, int, int, int]]:
    """Crops of one axis of length ``n`` (pixels, multiples of 16) for the teacher.

    Returns
    -------
    list of (start, stop, own_start, own_stop)
        Crop ``[start, stop)`` (``stop - start <= tile``; the last crop is aligned to ``n``) and the
        part ``[own_start, own_stop)`` of the axis whose embedding it supplies: consecutive crops
        that overlap split the overlap in the middle (rounded to the 16-px grid), the others own
        themselves.
    """
    if n <= tile:
        return [(0, n, 0, n)]
    starts = list(range(0, n - tile + 1, tile))
    if starts[-1] != n - tile:
        starts.append(n - tile)
    bounds = [0]
    for a, b in zip(starts[:-1], starts[1:]):
        bounds.append(((b + a + tile) // 2) // 16 * 16)
    bounds.append(n)
    return [(st, st + tile, bounds[i], bounds[i + 1]) for i, st in enumerate(starts)]


class SamTeacher(nn.Module):
    """Frozen SAM image encoder mapping CellSAM's normalised input to the student's embedding grid.

    Input ``float32 (N, 3, H, W)`` normalised with SAM's pixel mean/std, H and W multiples of 16.
    Output ``float32 (N, 256, H/16, W/16)``. Always in eval mode, no trainable parameters. Every input
    is encoded in crops of :attr:`tile_px` at the fixed scale :attr:`scale` (module docstring).

    Attributes
    ----------
    info : dict
        JSON-able identity stored in checkpoint metadata (``type``, ``file`` (name only),
        ``sha256``, ``bytes``, ``encoder``, ``tile_px``).
    decoder_state : dict of str to Tensor
        SAM's ``prompt_encoder.*`` / ``mask_decoder.*`` weights from the same checkpoint.
    decoder_cfg : dict
        Their architecture (``mlp_dim``, ``depth``, ``num_heads``...; see :func:`detect_sam_arch`).
    """

    def __init__(self, encoder: nn.Module, info: dict, decoder_state: dict, decoder_cfg: dict,
                 tile_px: int = SAM_TEACHER_TILE_PX, batch: int = SAM_TEACHER_BATCH) -> None:
        super().__init__()
        if tile_px % 16 or tile_px <= 0:
            raise ModelError(f"teacher tile_px must be a positive multiple of 16, got {tile_px}")
        self.encoder = encoder
        self.img_size = int(encoder.img_size)
        self.tile_px = int(tile_px)
        self.batch = max(1, int(batch))
        self.info = {**info, "tile_px": self.tile_px}
        self.decoder_state = decoder_state
        self.decoder_cfg = decoder_cfg
        for p in self.encoder.parameters():
            p.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):  # noqa: ARG002 - the teacher stays frozen in eval mode
        return super().train(False)

    @property
    def type(self) -> str:
        return self.info["type"]

    @property
    def scale(self) -> float:
        """SAM input pixels per model pixel (the same for every input)."""
        return self.img_size / self.tile_px

    def _encode(self, crops: torch.Tensor) -> torch.Tensor:
        """``(B, 3, h, w)`` crops (h, w <= tile_px, multiples of 16) -> ``(B, 256, h/16, w/16)``."""
        _, _, h, w = crops.shape
        s = self.scale
        rh, rw = max(1, round(h * s)), max(1, round(w * s))
        x = crops
        if (rh, rw) != (h, w):
            x = F.interpolate(x, size=(rh, rw), mode="bilinear", align_corners=False, antialias=s < 1)
        x = F.pad(x, (0, self.img_size - rw, 0, self.img_size - rh))
        with torch.no_grad():
            emb = torch.cat([self.encoder(x[i:i + self.batch].contiguous()) for i in range(0, x.shape[0], self.batch)])
        ps = self.img_size // emb.shape[-1]
        emb = emb[:, :, : -(-rh // ps), : -(-rw // ps)]
        out_hw = (h // 16, w // 16)
        if tuple(emb.shape[-2:]) != out_hw:
            down = emb.shape[-2] > out_hw[0]
            emb = F.interpolate(emb.float(), size=out_hw, mode="bilinear", align_corners=False, antialias=down)
        return emb.float()

    def forward(self, xn: torch.Tensor) -> torch.Tensor:
        n, _, h, w = xn.shape
        rows, cols = teacher_tiles(h, self.tile_px), teacher_tiles(w, self.tile_px)
        out = xn.new_zeros((n, 256, h // 16, w // 16), dtype=torch.float32)
        # crops of equal size are encoded together (interior crops are all tile_px x tile_px)
        groups: dict = {}
        for r in rows:
            for c in cols:
                groups.setdefault((r[1] - r[0], c[1] - c[0]), []).append((r, c))
        for items in groups.values():
            crops = torch.cat([xn[:, :, r[0]:r[1], c[0]:c[1]] for r, c in items])
            emb = self._encode(crops)
            for j, (r, c) in enumerate(items):
                e = emb[j * n:(j + 1) * n]
                (r0, _, o0, o1), (c0, _, q0, q1) = r, c
                out[:, :, o0 // 16:o1 // 16, q0 // 16:q1 // 16] = \
                    e[:, :, (o0 - r0) // 16:(o1 - r0) // 16, (q0 - c0) // 16:(q1 - c0) // 16]
        return out.contiguous()


def load_teacher(path) -> SamTeacher:
    """Build the frozen teacher from a user-supplied SAM checkpoint.

    Raises
    ------
    ModelError
        See :func:`read_sam_state`; also if the state dict does not load strictly.
    """
    path = Path(path)
    sd = read_sam_state(path)
    arch = detect_sam_arch(sd, str(path))
    try:
        sam = build_sam(arch)
        sam.load_state_dict(sd, strict=True)
    except (RuntimeError, ValueError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise ModelError(f"{path}: SAM checkpoint does not match the detected {arch['type']} architecture ({first[:200]})") from None
    decoder_state = {k: v for k, v in sd.items() if k.startswith(("prompt_encoder.", "mask_decoder."))}
    # identity: file name + content hash, never a machine path
    info = {"type": arch["type"], "file": path.name, "sha256": file_sha256(path), "bytes": path.stat().st_size,
            "encoder": arch["encoder"]}
    log.info("SAM teacher %s (%s, img_size %d) loaded from %s", arch["type"], _count(sam.image_encoder),
             arch["encoder"]["img_size"], path)
    return SamTeacher(sam.image_encoder, info, decoder_state, arch["decoder"])


def file_sha256(path) -> str:
    """Hex sha256 of a file's bytes (read in 4 MiB blocks)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _count(module: nn.Module) -> str:
    return f"{sum(p.numel() for p in module.parameters()) / 1e6:.1f} M params"


def build_tiny_sam_checkpoint(path, img_size: int = 256, seed: int = 0, *, embed_dim: int = 32, depth: int = 2,
                              num_heads: int = 2, window_size: int = 4, mlp_dim: int = 256) -> Path:
    """Write a small randomly initialised SAM (same key names as the official checkpoints).

    Image encoder: ViT with ``embed_dim`` width, ``depth`` blocks (the last one global attention,
    the others ``window_size`` windows), patch 16, input ``img_size``; prompt encoder and mask
    decoder at SAM's 256 width with a ``mlp_dim`` MLP. Written atomically (tmp + rename).
    """
    path = Path(path)
    arch = {"encoder": {"img_size": img_size, "patch_size": 16, "embed_dim": embed_dim, "depth": depth,
                        "num_heads": num_heads, "mlp_ratio": 4.0, "out_chans": 256, "qkv_bias": True,
                        "use_rel_pos": True, "window_size": window_size, "global_attn_indexes": [depth - 1]},
            "decoder": {"mlp_dim": mlp_dim, "depth": 2, "num_heads": 8, "iou_head_hidden_dim": 256,
                        "iou_head_depth": 3, "num_multimask_outputs": 3}}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sam = build_sam(arch)
        # SAM zero-initialises the relative position tables; give them values so detection and
        # strict loading are exercised on non-trivial tensors
        for name, prm in sam.named_parameters():
            if "rel_pos" in name or "pos_embed" in name:
                nn.init.normal_(prm, std=0.02)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    torch.save(sam.state_dict(), tmp)
    os.replace(tmp, path)
    return path
