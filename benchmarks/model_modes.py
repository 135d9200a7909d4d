"""CPU throughput and parameter counts of the CellSAM modes (lite / dual with a tiny SAM teacher /
refined), written to ``benchmarks/results/model_modes.json``.

Input: a 512x512 tile of ``../shared/data/slides/CMU-1-Small-Region.svs`` (0.499 µm/px, used as
0.5). Each mode runs ``--repeats`` times after one warm-up; the median is reported as Mpx/s of
input tile. The refined mode adds, to the lite forward pass, the SAM-decoder refinement + mask
fusion of the tile's dense instances; with untrained (random) weights the network finds no
instances, so the refinement is timed on the instances of the classical baseline of the same tile
(the number of instances is reported: refinement cost is linear in it).

Usage::

    python benchmarks/model_modes.py [--model CKPT] [--threads 2] [--repeats 3] [--vit-b]

``--vit-b`` also times one tile through a randomly initialised full-size ViT-B teacher (slow on CPU).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
SLIDE = Path(os.environ.get("CELLSAM_SHARED_DATA", ROOT.parent / "shared" / "data")) / "slides" / "CMU-1-Small-Region.svs"


def _params(module) -> int:
    return int(sum(p.numel() for p in module.parameters())) if module is not None else 0


def _tile(size: int) -> np.ndarray:
    import openslide

    with openslide.OpenSlide(str(SLIDE)) as s:
        w, h = s.dimensions
        img = s.read_region(((w - size) // 2, (h - size) // 2), 0, (size, size)).convert("RGB")
    return np.asarray(img, dtype=np.uint8)


def _time(fn, repeats: int) -> float:
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="CellSAM checkpoint (default: random lite weights)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--vit-b", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "model_modes.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from pipeline.baseline import segment_classical
    from pipeline.model.cellsam import DEFAULT_ARCH, CellSAM, GatedFusion
    from pipeline.model.checkpoint import load_checkpoint
    from pipeline.model.refine import attach_sam_decoder, refine_and_fuse
    from pipeline.model.segmenter import Segmenter
    from pipeline.model.teacher import build_tiny_sam_checkpoint, load_teacher

    img = _tile(args.size)
    mpx = img.shape[0] * img.shape[1] / 1e6
    if args.model:
        base, meta = load_checkpoint(args.model)
    else:
        base, meta = CellSAM(DEFAULT_ARCH).eval(), {"mpp": 0.5}
    meta = {**meta, "mpp": 0.5}
    res = {"tile_px": list(img.shape[:2]), "threads": args.threads, "torch": torch.__version__,
           "cpu": platform.processor() or platform.machine(), "weights": args.model or "random", "modes": {}}

    # lite
    lite = Segmenter(copy.deepcopy(base), meta, device="cpu")
    t = _time(lambda: lite.segment_batch(img[None]), args.repeats)
    res["modes"]["lite"] = {"s_per_tile": round(t, 4), "mpx_per_s": round(mpx / t, 3),
                            "params_student": _params(base.student), "params_dense_decoder": _params(base.decoder)}

    # dual, tiny teacher at SAM's 1024 input (every 256-px crop of the tile upsampled 4x, as for ViT-B)
    with tempfile.TemporaryDirectory() as tmp:
        tiny = load_teacher(build_tiny_sam_checkpoint(Path(tmp) / "tiny.pth", img_size=1024))
    dual_model = copy.deepcopy(base)
    if dual_model.fusion is None:
        dual_model.fusion = GatedFusion()
        dual_model.arch["fusion"] = True
    dual_model.teacher = tiny
    dual = Segmenter(dual_model, meta, device="cpu")
    t = _time(lambda: dual.segment_batch(img[None]), args.repeats)
    res["modes"]["dual_tiny_teacher"] = {"s_per_tile": round(t, 4), "mpx_per_s": round(mpx / t, 3),
                                         "params_teacher": _params(tiny), "params_fusion": _params(dual_model.fusion),
                                         "teacher": tiny.info["encoder"]}

    # refined: lite + SAM decoder refinement of the dense instances
    ref_model = copy.deepcopy(base)
    if ref_model.mask_decoder is None:
        attach_sam_decoder(ref_model)
    ref = Segmenter(ref_model, meta, device="cpu", refine=True)
    out = ref.forward(img[None])
    lab, sc = ref.segment_batch(img[None])[0][:2]
    source = "model"
    if lab.max() == 0:
        lab, sc = segment_classical(img, 0.5)
        source = "classical baseline"
    t_ref = _time(lambda: refine_and_fuse(ref.model, out["embed"], lab, sc, out["prob"][0], out["padded_hw"], 0.5,
                                          {"t_iou": 0.0, "t_agree": 0.0}), args.repeats)
    t_lite = res["modes"]["lite"]["s_per_tile"]
    res["modes"]["refined"] = {"s_per_tile": round(t_lite + t_ref, 4), "mpx_per_s": round(mpx / (t_lite + t_ref), 3),
                               "refine_s_per_tile": round(t_ref, 4), "instances": int(lab.max()),
                               "instances_from": source, "ms_per_instance": round(1000 * t_ref / max(1, lab.max()), 3),
                               "params_prompt_encoder": _params(ref_model.prompt_encoder),
                               "params_mask_decoder": _params(ref_model.mask_decoder)}

    if args.vit_b:
        from segment_anything import sam_model_registry

        with tempfile.TemporaryDirectory() as tmp:
            p = Path(tmp) / "vit_b.pth"
            torch.save(sam_model_registry["vit_b"](checkpoint=None).state_dict(), p)
            vb = load_teacher(p)
        x = torch.randn(1, 3, *img.shape[:2])
        with torch.inference_mode():
            t = _time(lambda: vb(x), 1)
        res["modes"]["teacher_vit_b_only"] = {"s_per_tile": round(t, 3), "mpx_per_s": round(mpx / t, 4),
                                              "params_teacher": _params(vb)}
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(res, indent=2) + "\n")
    os.replace(tmp, out_path)
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
