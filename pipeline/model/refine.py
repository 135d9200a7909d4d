"""SAM prompt-encoder + mask-decoder refinement of the dense instances, and mask fusion (docs/model.md).

Refinement (optional, off by default; ``Segmenter(refine=True)`` / ``--refine``):

1. every dense instance becomes a prompt: one positive point (its centroid, or the instance pixel
   nearest to it when the centroid falls outside) + its bounding box (SAM's (x, y) pixel frame of
   the padded tile);
2. **local-window decoding**: SAM's two-way transformer attends over a window of the 256-d
   stride-16 embedding around the instance (``window_tokens`` = 8 tokens = 128 px by default,
   enlarged for large instances) with the *global* positional encoding sliced to the window, so a
   prompt costs O(window) instead of O(tile); prompts are decoded in batches;
3. of SAM's 3 multimask outputs the one with the best predicted IoU is kept; its stride-4 logits
   are upsampled x4 (bilinear) to tile pixels;
4. **mask fusion**: instances are visited by decreasing dense score (ties: label id). The decoder
   mask replaces the dense mask when ``pred_iou >= t_iou`` AND ``IoU(decoder, dense) >= t_agree``;
   otherwise the dense mask is kept. The chosen mask is clipped to pixels not claimed by a
   higher-scoring instance; a decoder mask that ends up below ``min_area_um2`` falls back to the
   clipped dense mask, and an instance below it is dropped. Output labels are renumbered in raster
   order of their first pixel, scores = mean nucleus probability over the final mask (the same
   definition as :mod:`pipeline.model.postprocess`).

The thresholds (:class:`RefineParams`) live in the checkpoint metadata (``refine``).
:func:`pipeline.training.refine_train.train_refiner` trains the prompt encoder + mask decoder on
frozen embeddings (training lives in :mod:`pipeline.training`; this module is inference only).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi

from .student import EMBED_DIM, EMBED_STRIDE

SAM_DECODER_DEFAULT = {"mlp_dim": 2048, "depth": 2, "num_heads": 8, "iou_head_hidden_dim": 256,
                       "iou_head_depth": 3, "num_multimask_outputs": 3}


@dataclass(frozen=True)
class RefineParams:
    t_iou: float = 0.7  # minimum predicted IoU of the decoder mask
    t_agree: float = 0.5  # minimum IoU(decoder mask, dense instance)
    window_tokens: int = 8  # decoding window edge, embedding tokens (x16 px)
    batch: int = 64  # prompts per decoder call
    min_area_um2: float = 3.0  # final instances smaller than this are dropped

    @classmethod
    def from_dict(cls, d: dict | None) -> "RefineParams":
        types = {f.name: type(f.default) for f in fields(cls)}
        return cls(**{k: types[k](v) for k, v in (d or {}).items() if k in types})

    def to_dict(self) -> dict:
        return asdict(self)


def build_sam_decoder(cfg: dict | None = None):
    """SAM's prompt encoder + mask decoder at CellSAM's embedding width (256).

    Parameters
    ----------
    cfg : dict, optional
        Overrides of :data:`SAM_DECODER_DEFAULT` (``mlp_dim``, ``depth``, ``num_heads``,
        ``iou_head_hidden_dim``, ``iou_head_depth``, ``num_multimask_outputs``).

    Returns
    -------
    (PromptEncoder, MaskDecoder)
        ``segment_anything`` modules with the official parameter names (so SAM's own decoder weights
        load into them). Their nominal ``image_embedding_size`` / ``input_image_size`` (64, 1024) are
        not used: :func:`decode_prompts` takes the actual tile size at call time.
    """
    from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer

    c = {**SAM_DECODER_DEFAULT, **(cfg or {})}
    pe = PromptEncoder(embed_dim=EMBED_DIM, image_embedding_size=(64, 64), input_image_size=(1024, 1024),
                       mask_in_chans=16)
    md = MaskDecoder(
        num_multimask_outputs=int(c["num_multimask_outputs"]),
        transformer=TwoWayTransformer(depth=int(c["depth"]), embedding_dim=EMBED_DIM, mlp_dim=int(c["mlp_dim"]),
                                      num_heads=int(c["num_heads"])),
        transformer_dim=EMBED_DIM, iou_head_depth=int(c["iou_head_depth"]),
        iou_head_hidden_dim=int(c["iou_head_hidden_dim"]))
    return pe, md


def attach_sam_decoder(model, cfg: dict | None = None, init_state: dict | None = None) -> None:
    """Give ``model`` (a CellSAM) a SAM prompt encoder + mask decoder (in place; sets ``arch``).

    ``init_state``: SAM ``prompt_encoder.*`` / ``mask_decoder.*`` tensors (e.g. ``SamTeacher.decoder_state``)
    loaded strictly; ``cfg`` must then match them (``SamTeacher.decoder_cfg``).
    """
    cfg = {**SAM_DECODER_DEFAULT, **(cfg or {})}
    pe, md = build_sam_decoder(cfg)
    if init_state:
        pe.load_state_dict({k[len("prompt_encoder."):]: v for k, v in init_state.items() if k.startswith("prompt_encoder.")})
        md.load_state_dict({k[len("mask_decoder."):]: v for k, v in init_state.items() if k.startswith("mask_decoder.")})
    dev = next(model.parameters()).device
    model.prompt_encoder, model.mask_decoder = pe.to(dev), md.to(dev)
    model.arch["sam_decoder"] = True
    model.arch["sam_decoder_cfg"] = cfg


# --------------------------------------------------------------------------------------------------
# prompts and windowed decoding (torch)


def instance_prompts(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Point + box prompts of instances ``1..K``.

    Parameters
    ----------
    labels : ndarray of shape (H, W), uint32
        Instances 1..K (every id present), 0 = background.

    Returns
    -------
    points_xy : ndarray of shape (K, 2), float32
        (x = col, y = row) of the centroid, or of the instance pixel nearest to it.
    boxes_xyxy : ndarray of shape (K, 4), float32
        (x0, y0, x1, y1), inclusive pixel extremes.
    boxes_rc : ndarray of shape (K, 4), int64
        (row0, col0, row1, col1), exclusive ends.
    """
    k = int(labels.max())
    objs = ndi.find_objects(labels, max_label=k)
    points = np.zeros((k, 2), np.float32)
    boxes = np.zeros((k, 4), np.float32)
    brc = np.zeros((k, 4), np.int64)
    for i, sl in enumerate(objs):
        if sl is None:
            continue
        m = labels[sl] == i + 1
        rr, cc = np.nonzero(m)
        r, c = rr.mean(), cc.mean()
        ri, ci = int(round(r)), int(round(c))
        if not (0 <= ri < m.shape[0] and 0 <= ci < m.shape[1] and m[ri, ci]):
            j = int(np.argmin((rr - r) ** 2 + (cc - c) ** 2))
            ri, ci = int(rr[j]), int(cc[j])
        points[i] = (sl[1].start + ci, sl[0].start + ri)
        boxes[i] = (sl[1].start, sl[0].start, sl[1].stop - 1, sl[0].stop - 1)
        brc[i] = (sl[0].start, sl[1].start, sl[0].stop, sl[1].stop)
    return points, boxes, brc


def prompt_windows(boxes_rc: np.ndarray, grid_hw: tuple[int, int], window_tokens: int) -> np.ndarray:
    """Decoding windows ``(K, 4)`` int64 ``(tok_row0, tok_col0, n_rows, n_cols)`` in embedding tokens:
    at least ``window_tokens`` and the instance box + 1 token each side, centred, inside the grid."""
    gh, gw = grid_hw
    s = EMBED_STRIDE
    out = np.zeros((len(boxes_rc), 4), np.int64)
    for i, (r0, c0, r1, c1) in enumerate(boxes_rc):
        nh = min(gh, max(window_tokens, -(-(r1 - r0) // s) + 2))
        nw = min(gw, max(window_tokens, -(-(c1 - c0) // s) + 2))
        tr = int(np.clip(round((r0 + r1) / 2 / s - nh / 2), 0, gh - nh))
        tc = int(np.clip(round((c0 + c1) / 2 / s - nw / 2), 0, gw - nw))
        out[i] = (tr, tc, nh, nw)
    return out


def _sparse_embeddings(pe, points_xy: torch.Tensor, boxes_xyxy: torch.Tensor, input_hw) -> torch.Tensor:
    """= ``PromptEncoder.forward(points=(p, 1), boxes=b, masks=None)[0]`` with the tile's own
    ``input_hw`` (no attribute mutation, so concurrent calls are safe). ``(B, 3, 256)``."""
    pt = pe.pe_layer.forward_with_coords(points_xy[:, None, :] + 0.5, input_hw) + pe.point_embeddings[1].weight
    corners = pe.pe_layer.forward_with_coords((boxes_xyxy + 0.5).reshape(-1, 2, 2), input_hw)
    corners = corners + torch.stack([pe.point_embeddings[2].weight[0], pe.point_embeddings[3].weight[0]])[None]
    return torch.cat([pt, corners], 1)


def decode_windows(pe, md, embed: torch.Tensor, dense_pe: torch.Tensor, windows, points_xy: torch.Tensor,
                   boxes_xyxy: torch.Tensor, input_hw) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode prompts that share one window size.

    Parameters
    ----------
    embed : Tensor of shape (B_img, 256, gh, gw)
        Image embeddings; ``windows[:, 4]`` (optional 5th column) selects the image of each prompt.
    dense_pe : Tensor of shape (256, gh, gw)
        Global positional encoding of the grid.
    windows : ndarray of shape (B, 4) or (B, 5), int64
        ``(tok_row0, tok_col0, n_rows, n_cols[, image])``, all with the same ``n_rows, n_cols``.
    points_xy, boxes_xyxy : Tensor of shape (B, 2), (B, 4)
        Prompts in padded-tile pixels.

    Returns
    -------
    logits : Tensor of shape (B, M, 4 * n_rows, 4 * n_cols)
        Stride-4 mask logits of SAM's M multimask outputs (window frame).
    iou : Tensor of shape (B, M)
        Predicted IoU of each output.
    """
    nh, nw = int(windows[0, 2]), int(windows[0, 3])
    img = windows[:, 4] if windows.shape[1] > 4 else np.zeros(len(windows), np.int64)
    src = torch.stack([embed[j, :, r:r + nh, c:c + nw] for (r, c), j in zip(windows[:, :2], img)])
    pos = torch.stack([dense_pe[:, r:r + nh, c:c + nw] for r, c in windows[:, :2]])
    sparse = _sparse_embeddings(pe, points_xy, boxes_xyxy, input_hw)
    b = sparse.shape[0]
    tokens = torch.cat([md.iou_token.weight, md.mask_tokens.weight], 0)[None].expand(b, -1, -1)
    tokens = torch.cat([tokens, sparse], 1)
    src = src + pe.no_mask_embed.weight.reshape(1, -1, 1, 1)
    hs, src = md.transformer(src, pos, tokens)
    iou_out = hs[:, 0]
    mask_out = hs[:, 1:1 + md.num_mask_tokens]
    up = md.output_upscaling(src.transpose(1, 2).reshape(b, EMBED_DIM, nh, nw))
    hyper = torch.stack([mlp(mask_out[:, i]) for i, mlp in enumerate(md.output_hypernetworks_mlps)], 1)
    _, c, uh, uw = up.shape
    masks = (hyper @ up.reshape(b, c, uh * uw)).reshape(b, -1, uh, uw)
    iou = md.iou_prediction_head(iou_out)
    return masks[:, 1:], iou[:, 1:]


def window_groups(windows: np.ndarray) -> list[np.ndarray]:
    """Indices of prompts grouped by window size, in a deterministic order."""
    keys = windows[:, 2] * 100000 + windows[:, 3]
    return [np.nonzero(keys == k)[0] for k in np.unique(keys)]


# --------------------------------------------------------------------------------------------------
# fusion (numpy)


def fuse_instances(labels: np.ndarray, scores: np.ndarray, prob: np.ndarray, dec_masks: list,
                   dec_iou: np.ndarray, params: RefineParams, mpp: float) -> tuple[np.ndarray, np.ndarray]:
    """Mask fusion rule (see module docstring).

    Parameters
    ----------
    labels : ndarray of shape (H, W), uint32
        Dense instances 1..K.
    scores : ndarray of shape (K,), float32
    prob : ndarray of shape (H, W), float32
        Nucleus probability.
    dec_masks : list of K (row0, col0, mask bool (h, w)) or None
        Decoder mask of instance ``i + 1`` placed at (row0, col0) of the tile (clipped to it).
    dec_iou : ndarray of shape (K,), float32
        Predicted IoU of each decoder mask.

    Returns
    -------
    labels : ndarray of shape (H, W), uint32
        Non-overlapping instances 1..K' numbered in raster order of their first pixel.
    scores : ndarray of shape (K',), float32
        Mean ``prob`` over each instance.
    """
    k = int(labels.max())
    min_px = max(1, int(round(params.min_area_um2 / (mpp * mpp))))
    out = np.zeros(labels.shape, np.uint32)
    order = np.lexsort((np.arange(k), -np.asarray(scores, np.float64)))
    objs = ndi.find_objects(labels, max_label=k)
    nxt = 0
    for i in order:
        dense_sl = objs[i]
        if dense_sl is None:
            continue
        cand = None
        if dec_masks[i] is not None and dec_iou[i] >= params.t_iou:
            r0, c0, dm = dec_masks[i]
            r1, c1 = r0 + dm.shape[0], c0 + dm.shape[1]
            rr0, cc0 = min(r0, dense_sl[0].start), min(c0, dense_sl[1].start)
            rr1, cc1 = max(r1, dense_sl[0].stop), max(c1, dense_sl[1].stop)
            sl = (slice(rr0, rr1), slice(cc0, cc1))
            d = np.zeros((rr1 - rr0, cc1 - cc0), bool)
            d[r0 - rr0:r1 - rr0, c0 - cc0:c1 - cc0] = dm
            s = labels[sl] == i + 1
            union = np.count_nonzero(d | s)
            agree = np.count_nonzero(d & s) / union if union else 0.0
            if agree >= params.t_agree:
                cand = (sl, d)
        dense = (dense_sl, labels[dense_sl] == i + 1)
        for sl, m in ([cand] if cand is not None else []) + [dense]:
            free = m & (out[sl] == 0)
            if np.count_nonzero(free) >= min_px:
                nxt += 1
                out[sl][free] = nxt
                break
    return renumber(out, prob)


def renumber(lab: np.ndarray, prob: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Renumber 1..K in raster order of first pixel; scores = mean ``prob`` per instance."""
    flat = lab.ravel()
    ids, first = np.unique(flat, return_index=True)
    keep = ids > 0
    ids, first = ids[keep], first[keep]
    if ids.size == 0:
        return np.zeros(lab.shape, np.uint32), np.zeros(0, np.float32)
    lut = np.zeros(int(flat.max()) + 1, np.uint32)
    lut[ids[np.argsort(first, kind="stable")]] = np.arange(1, ids.size + 1, dtype=np.uint32)
    lab = lut[lab]
    n = ids.size
    sums = np.bincount(lab.ravel(), weights=prob.ravel().astype(np.float64), minlength=n + 1)
    cnts = np.bincount(lab.ravel(), minlength=n + 1)
    return lab, (sums[1:] / np.maximum(cnts[1:], 1)).astype(np.float32)


# --------------------------------------------------------------------------------------------------
# entry point used by the Segmenter


@torch.inference_mode()
def decoder_masks(model, embed: torch.Tensor, labels: np.ndarray, padded_hw, params: RefineParams):
    """Best decoder mask of every instance of ``labels`` (list of (row0, col0, bool mask) clipped to
    the tile, or None) and its predicted IoU ``(K,) float32``."""
    k = int(labels.max())
    h, w = labels.shape
    points, boxes, brc = instance_prompts(labels)
    gh, gw = int(embed.shape[-2]), int(embed.shape[-1])
    windows = prompt_windows(brc, (gh, gw), params.window_tokens)
    pe, md = model.prompt_encoder, model.mask_decoder
    dev = embed.device
    embed = embed.float()
    dense_pe = pe.pe_layer((gh, gw)).to(dev)
    input_hw = (int(padded_hw[0]), int(padded_hw[1]))
    masks: list = [None] * k
    ious = np.zeros(k, np.float32)
    for grp in window_groups(windows):
        for s in range(0, len(grp), params.batch):
            idx = grp[s:s + params.batch]
            logits, iou = decode_windows(pe, md, embed, dense_pe, windows[idx],
                                         torch.from_numpy(points[idx]).to(dev), torch.from_numpy(boxes[idx]).to(dev),
                                         input_hw)
            best = iou.argmax(1)
            sel = logits[torch.arange(len(idx), device=dev), best][:, None]
            full = F.interpolate(sel.float(), scale_factor=4, mode="bilinear", align_corners=False)[:, 0] > 0
            full = full.cpu().numpy()
            best_iou = iou.gather(1, best[:, None])[:, 0].float().cpu().numpy()
            for j, i in enumerate(idx):
                r0, c0 = int(windows[i, 0]) * EMBED_STRIDE, int(windows[i, 1]) * EMBED_STRIDE
                m = full[j][: max(0, h - r0), : max(0, w - c0)]
                masks[i] = (r0, c0, np.ascontiguousarray(m))
                ious[i] = best_iou[j]
    return masks, ious


def refine_and_fuse(model, embed: torch.Tensor, labels: np.ndarray, scores: np.ndarray, prob: np.ndarray,
                    padded_hw, mpp: float, cfg: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Refine dense instances with the SAM decoder and fuse the masks.

    Parameters
    ----------
    model : CellSAM
        With ``prompt_encoder`` / ``mask_decoder``.
    embed : Tensor of shape (1, 256, Hp/16, Wp/16)
        The (fused) image embedding of the padded tile.
    labels : ndarray of shape (H, W), uint32
        Dense instances 1..K (H <= Hp, W <= Wp; the tile is the top-left of the padded tile).
    scores : ndarray of shape (K,), float32
    prob : ndarray of shape (H, W), float32
    padded_hw : (int, int)
        ``(Hp, Wp)``, multiples of 16.
    mpp : float
        µm/px of the tile.
    cfg : dict, optional
        :class:`RefineParams` overrides (checkpoint metadata ``refine``).

    Returns
    -------
    labels : ndarray of shape (H, W), uint32
    scores : ndarray of shape (K',), float32
    """
    params = RefineParams.from_dict(cfg)
    if int(labels.max()) == 0:
        return labels, scores
    masks, ious = decoder_masks(model, embed, labels, padded_hw, params)
    return fuse_instances(labels, scores, prob, masks, ious, params, mpp)
