"""Experiment: nucleus-centre markers for the distance-map watershed (issue 13, item 4).

Step 1 (``--oracle``): on the validation split, how much AJI do *perfect* centre markers give
with the shipped network's foreground and distance map? (the ceiling of a centre head)
Step 2 (``--train``/``--eval``): a small centre head on the frozen network's stride-2 decoder
features, trained on the 39 training tiles; its peaks replace the distance-threshold markers.

Usage::

    python benchmarks/exp_centre.py --oracle                      # -> results/centre_oracle.json
    python benchmarks/exp_centre.py --train --iters 2000 --tag a  # head -> runs/centre_a.pt (resumable)
    python benchmarks/exp_centre.py --eval --tag a                # -> results/centre_a_eval_r2.0.json

Measured (docs/model_card.md, Ablation): perfect centre markers 0.656 AJI; the trained head's peaks
as markers 0.606; hybrid (peaks split the shipped distance markers) 0.619 vs 0.617: not shipped.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.data.datasets import builtin_samples, split_samples  # noqa: E402
from pipeline.metrics import aggregate, evaluate_pair  # noqa: E402
from pipeline.model import load_model  # noqa: E402
from pipeline.model.postprocess import (flood_from_markers, foreground_components, instances_from_maps,  # noqa: E402
                                        label_markers)

KEYS = ("aji", "pq", "dice", "pixel_precision", "pixel_recall")


def inner_points(lab: np.ndarray) -> np.ndarray:
    """(K, 2) row, col of the innermost pixel (max distance to the border) of each instance."""
    dt = ndi.distance_transform_edt(lab > 0)
    ids = np.unique(lab)
    ids = ids[ids > 0]
    pos = ndi.maximum_position(dt, lab, ids)
    return np.array(pos, np.int64).reshape(-1, 2)


def decode_marker_image(prob, dist, mpp, params, mk):
    """The shipped decoder's foreground and flooding (``pipeline.model.postprocess``) from the
    marker image ``mk`` instead of its distance-threshold markers: watershed of -dist inside the
    foreground; markers outside it dropped; components without a marker keep their own label."""
    comp = foreground_components(prob, mpp, params)
    mk = np.where(comp > 0, mk, 0).astype(np.uint32)
    return flood_from_markers(-dist.astype(np.float32), mk, comp, mpp, params)


def decode_with_markers(prob, dist, mpp, params, points_rc):
    """Foreground as shipped; markers = the given points (inside the foreground), flooding -dist;
    foreground components without a point keep their own label."""
    mk = np.zeros(prob.shape, np.int32)
    if len(points_rc):
        mk[points_rc[:, 0], points_rc[:, 1]] = np.arange(1, len(points_rc) + 1)
    return decode_marker_image(prob, dist, mpp, params, mk)


def peaks(cmap: np.ndarray, thr: float, radius_px: int) -> np.ndarray:
    """(K, 2) row, col of the local maxima of ``cmap`` (within ``radius_px``) that reach ``thr``."""
    mx = ndi.maximum_filter(cmap, size=2 * radius_px + 1)
    r, c = np.nonzero((cmap >= mx) & (cmap >= thr))
    return np.stack([r, c], 1)


class CentreHead(torch.nn.Module):
    """Centre logit at stride 2 from the decoder's stride-2 features (24), its full-resolution
    features pooled (16) and the pooled output maps (4)."""

    def __init__(self, cin=44, width=32):
        super().__init__()
        layers = []
        c = cin
        for d in (1, 2, 4):
            layers += [torch.nn.Conv2d(c, width, 3, padding=d, dilation=d), torch.nn.BatchNorm2d(width),
                       torch.nn.ReLU(inplace=True)]
            c = width
        layers += [torch.nn.Conv2d(width, 1, 1)]
        self.net = torch.nn.Sequential(*layers)
        torch.nn.init.constant_(self.net[-1].bias, -4.0)

    def forward(self, s2, full, maps):
        x = torch.cat([s2, F.avg_pool2d(full, 2), F.avg_pool2d(maps, 2)], 1)
        return self.net(x)


def frozen_features(model, x):
    """Frozen network pass: maps (N, 4, H, W) and the decoder's stride-2 and full-res features."""
    feats = {}
    h1 = model.decoder.refine2.register_forward_hook(lambda m, i, o: feats.__setitem__("s2", o))
    h2 = model.decoder.up1.register_forward_hook(lambda m, i, o: feats.__setitem__("full", o))
    try:
        with torch.no_grad():
            maps = model(x)["maps"]
    finally:
        h1.remove()
        h2.remove()
    return maps, feats["s2"], feats["full"]


def centre_target(lab: np.ndarray, sigma: float = 1.5) -> np.ndarray:
    """Gaussian peaks (stride-2 grid) at each instance's innermost pixel; (H/2, W/2) float32."""
    h, w = lab.shape[0] // 2, lab.shape[1] // 2
    t = np.zeros((h, w), np.float32)
    pts = inner_points(lab) // 2
    rad = int(3 * sigma)
    yy, xx = np.mgrid[-rad:rad + 1, -rad:rad + 1]
    g = np.exp(-(yy ** 2 + xx ** 2) / (2 * sigma * sigma)).astype(np.float32)
    for r, c in pts:
        r0, r1, c0, c1 = max(0, r - rad), min(h, r + rad + 1), max(0, c - rad), min(w, c + rad + 1)
        t[r0:r1, c0:c1] = np.maximum(t[r0:r1, c0:c1], g[r0 - r + rad:r1 - r + rad, c0 - c + rad:c1 - c + rad])
    return t


def focal(logit, t, alpha=2.0, beta=4.0):
    p = torch.sigmoid(logit).clamp(1e-4, 1 - 1e-4)
    pos = t >= 0.999
    lpos = -((1 - p) ** alpha * torch.log(p))[pos].sum()
    lneg = -(((1 - t) ** beta) * p ** alpha * torch.log(1 - p))[~pos].sum()
    return (lpos + lneg) / pos.sum().clamp(min=1)


def train_frozen_head(args, seg, head, name: str, lr: float, seed: int, loss_fn):
    """Train ``head`` on the frozen network's features of augmented 256-px training crops (batch 8);
    ``loss_fn(head, s2, full, maps, labels)`` gives the loss. Resumable: ``runs/<name>.pt`` every 50
    iterations; iteration ``it`` draws its crops from ``default_rng([seed, it])``."""
    from pipeline.data.augment import augment
    from pipeline.training.loop import sampling_weights
    from pipeline.training.train import load_data

    torch.manual_seed(0)
    seg.model.eval()
    tiles, _ = load_data(args.data, seg.mpp, validation=True)
    w = sampling_weights(tiles)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=args.iters,
                                                pct_start=max(0.05, 4 / args.iters))
    ck = REPO / "runs" / f"{name}.pt"
    ck.parent.mkdir(exist_ok=True)
    start = 0
    if ck.exists():
        st = torch.load(ck, weights_only=True)
        head.load_state_dict(st["head"])
        opt.load_state_dict(st["opt"])
        sched.load_state_dict(st["sched"])
        start = int(st["it"])
    t0, run = time.perf_counter(), 0.0
    for it in range(start, args.iters):
        rng = np.random.default_rng([seed, it])
        imgs, labs = [], []
        for _ in range(8):
            d = tiles[int(rng.choice(len(tiles), p=w))]
            img, lab, _ = augment(rng, d["image"], d["labels"], d["hv"], 256, 1.0)
            imgs.append(img)
            labs.append(lab)
        x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float()
        maps, s2, full = frozen_features(seg.model, x)
        head.train()
        loss = loss_fn(head, s2, full, maps, labs)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        run = 0.98 * run + 0.02 * float(loss.detach()) if it > start else float(loss.detach())
        if (it + 1) % 50 == 0 or it + 1 == args.iters:
            torch.save({"head": head.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                        "it": it + 1}, ck)
            print(f"it {it + 1} loss {run:.4f} {time.perf_counter() - t0:.0f}s", flush=True)
    return head


def train_head(args, seg):
    def loss_fn(head, s2, full, maps, labs):
        return focal(head(s2, full, maps)[:, 0], torch.from_numpy(np.stack([centre_target(lab) for lab in labs])))

    return train_frozen_head(args, seg, CentreHead(), f"centre_{args.tag}", 2e-3, 0, loss_fn)


def at_image_size(maps, extra, size, hw) -> np.ndarray:
    """[prob, h, v, dist] of the network ``maps`` (N=1) followed by the ``extra`` channels (same
    grid), cropped to the unpadded network ``size`` and resampled to the image's ``hw``:
    float32 (4 + E, H, W)."""
    t = torch.cat([torch.sigmoid(maps[:, :1]), maps[:, 1:3], torch.sigmoid(maps[:, 3:4]), extra], 1)
    return F.interpolate(t[:, :, :size[0], :size[1]], size=hw, mode="bilinear", align_corners=False)[0].numpy()


def centre_maps(seg, head, img, mpp):
    """prob, hv (3, H, W) and the centre probability (H, W), all at the image's own size."""
    maps, s2, full, size = frozen_features_of(seg, img, mpp)
    with torch.no_grad():
        c = F.interpolate(head(s2, full, maps), scale_factor=2, mode="bilinear", align_corners=False)
    t = at_image_size(maps, torch.sigmoid(c), size, img.shape[:2])
    return t[0], t[1:4], t[4]


def hybrid_markers(prob, dist, cen, mpp, params, thr, radius_px):
    """The shipped distance-threshold markers (``label_markers``), except that a marker blob holding
    >= 2 centre peaks is replaced by those peaks (one 1-px marker each); a uint32 marker image."""
    mk = label_markers((foreground_components(prob, mpp, params) > 0) & (dist >= params.dist_threshold),
                       mpp, params)
    n = int(mk.max())
    pts = peaks(cen, thr, radius_px)
    blob = mk[pts[:, 0], pts[:, 1]] if len(pts) else np.zeros(0, np.int64)
    split = np.bincount(blob, minlength=n + 1) >= 2
    split[0] = False
    mk = np.where(split[mk], 0, mk)
    sel = pts[split[blob]] if len(pts) else pts
    mk[sel[:, 0], sel[:, 1]] = n + 1 + np.arange(len(sel), dtype=np.uint32)
    return mk


def load_head(head: torch.nn.Module, name: str) -> torch.nn.Module:
    """``head`` with the weights of ``runs/<name>.pt``, in eval mode."""
    head.load_state_dict(torch.load(REPO / "runs" / f"{name}.pt", weights_only=True)["head"])
    return head.eval()


def validation_tiles(data):
    """(sample, image, true labels) of the fixed validation split, in its order."""
    for s in split_samples(builtin_samples(data))[1]:
        img, lab = s.load()
        yield s, img, lab


def eval_head(args, seg):
    head = load_head(CentreHead(), f"centre_{args.tag}")
    per = {}
    for s, img, lab in validation_tiles(args.data):
        prob, hv, cen = centre_maps(seg, head, img, s.mpp)
        r = max(1, int(round(args.radius_um / s.mpp)))
        per.setdefault("shipped", {})[s.name] = evaluate_pair(lab, instances_from_maps(prob, hv, s.mpp, seg.params)[0])
        for thr in (0.2, 0.3, 0.4, 0.5):
            per.setdefault(f"centre_{thr}", {})[s.name] = evaluate_pair(
                lab, decode_with_markers(prob, hv[2], s.mpp, seg.params, peaks(cen, thr, r)))
            per.setdefault(f"hybrid_{thr}", {})[s.name] = evaluate_pair(
                lab, decode_marker_image(prob, hv[2], s.mpp, seg.params,
                                         hybrid_markers(prob, hv[2], cen, s.mpp, seg.params, thr, r)))
        print(s.name, {k: round(v[s.name]["aji"], 3) for k, v in per.items()}, flush=True)
    write_rows(per, REPO / "benchmarks" / "results" / f"centre_{args.tag}_eval_r{args.radius_um}.json")


def frozen_features_of(seg, img, mpp):
    """:func:`frozen_features` of an RGB image at ``mpp``, resampled to the model's µm/px and
    padded as ``Segmenter.predict_maps`` does; also returns the unpadded network size."""
    h, w = img.shape[:2]
    factor = mpp / seg.mpp
    x = torch.from_numpy(np.array(img, copy=True)).permute(2, 0, 1)[None].float()
    size = (max(16, int(round(h * factor))), max(16, int(round(w * factor))))
    if abs(factor - 1) > 0.01:
        x = F.interpolate(x, size=size, mode="bilinear", antialias=factor < 1, align_corners=False).round().clamp(0, 255)
    ph, pw = (-size[0]) % 16, (-size[1]) % 16
    return (*frozen_features(seg.model, F.pad(x, (0, pw, 0, ph), mode="reflect")), size)


def write_rows(per: dict, out: Path) -> dict:
    """Aggregate per-variant, per-tile metrics, print them and write ``out`` (JSON)."""
    rows = {}
    for k, v in per.items():
        agg = aggregate(v)
        rows[k] = {m: round(agg[m], 4) for m in KEYS}
        print(k, rows[k])
    out.write_text(json.dumps({"rows": rows, "per_image": {k: {n: round(x["aji"], 4) for n, x in v.items()}
                                                           for k, v in per.items()}}, indent=1))
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "nuclei"))
    ap.add_argument("--oracle", action="store_true")
    ap.add_argument("--tag", default="oracle")
    ap.add_argument("--train", action="store_true")
    ap.add_argument("--iters", type=int, default=1500)
    ap.add_argument("--eval", action="store_true")
    ap.add_argument("--radius-um", type=float, default=2.0)
    args = ap.parse_args()
    seg = load_model(engine="torch")
    if args.train:
        train_head(args, seg)
        return
    if args.eval:
        eval_head(args, seg)
        return
    per = {"shipped": {}, "oracle_points": {}, "dist_peaks": {}, "true_foreground": {}}
    for s, img, lab in validation_tiles(args.data):
        prob, hv = seg.predict_maps(img, s.mpp)
        per["shipped"][s.name] = evaluate_pair(lab, instances_from_maps(prob, hv, s.mpp, seg.params)[0])
        per["oracle_points"][s.name] = evaluate_pair(lab, decode_with_markers(prob, hv[2], s.mpp, seg.params,
                                                                              inner_points(lab)))
        r = max(1, int(round(2.0 / s.mpp)))
        per["dist_peaks"][s.name] = evaluate_pair(lab, decode_with_markers(
            prob, hv[2], s.mpp, seg.params, peaks(ndi.gaussian_filter(hv[2], 1.0 / s.mpp), 0.3, r)))
        # true foreground (as a probability map), the shipped distance markers and flooding
        per["true_foreground"][s.name] = evaluate_pair(
            lab, instances_from_maps((lab > 0).astype(np.float32), hv, s.mpp, seg.params)[0])
        print(s.name, {k: round(v[s.name]["aji"], 3) for k, v in per.items()}, flush=True)
    write_rows(per, REPO / "benchmarks" / "results" / f"centre_{args.tag}.json")

if __name__ == "__main__":
    main()
