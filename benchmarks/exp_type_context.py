"""Experiment behind the second stage of the type head (built since: `TypeHead` `stage2`): radii of the neighbours' classes.

Usage::

    python benchmarks/exp_type_context.py   # -> benchmarks/results/type_context.{json,md}

Stage 1 is the shipped head's recipe (same features, ``fit_head``). Stage 2 appends, for each
nucleus, the mean stage-1 output (4 class probabilities x (1 - p_reject), p_reject) of the other
nuclei within two radii, and is fitted the same way. On the 64 training tiles the stage-1 outputs
are cross-fitted (4 folds by tile) so that stage 2 learns from outputs like those it will see on
new tiles. Scored on the 16 held-out CRCHisto tiles with the point protocol (3.3 µm).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import torch
from scipy.spatial import cKDTree

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from eval_types import DATA, tile_names  # noqa: E402
from pipeline.data.classes import ClassVocabulary  # noqa: E402
from pipeline.model.checkpoint import DEFAULT_WEIGHTS, load_checkpoint  # noqa: E402
from pipeline.model.segmenter import Segmenter  # noqa: E402
from pipeline.training.typehead import CRCHISTO_MPP, CRCHISTO_VAL_TILES, crchisto_examples, fit_head, score_tiles  # noqa: E402

RADII_UM = ((12.0, 30.0), (25.0, 60.0), (50.0, 100.0), (25.0, 100.0))


def outputs(head, examples):
    res = []
    for e in examples:
        p, r = head.predict(e.features)
        res.append(np.concatenate([p * (1 - r[:, None]), r[:, None]], 1))
    return res


def neighbour_classes(ex, p, radii_um, mpp=CRCHISTO_MPP):
    tree = cKDTree(ex.centroids)
    cols = []
    for r in radii_um:
        m = np.zeros((len(p), p.shape[1]))
        for i, js in enumerate(tree.query_ball_point(ex.centroids, r / mpp)):
            js = [j for j in js if j != i]
            if js:
                m[i] = p[js].mean(0)
        cols.append(m)
    return np.concatenate(cols, 1).astype(np.float32)


def main() -> int:
    torch.set_num_threads(1)
    root = DATA / "nuclei" / "crchisto"
    model, meta = load_checkpoint(DEFAULT_WEIGHTS)
    vocab = ClassVocabulary.crchisto()
    seg = Segmenter(model, meta, device="cpu", engine="torch")
    groups = model.type_head.groups
    names = tile_names(root)
    tr = crchisto_examples(seg, root, vocab, [n for n in names if n not in CRCHISTO_VAL_TILES], groups=groups)
    va = crchisto_examples(seg, root, vocab, [n for n in names if n in CRCHISTO_VAL_TILES], groups=groups)
    c = len(vocab)
    oof = [None] * len(tr)
    for f in range(4):
        h = fit_head([e for i, e in enumerate(tr) if i % 4 != f], vocab.names, reject=True, groups=groups)
        hold = [i for i in range(len(tr)) if i % 4 == f]
        for i, p in zip(hold, outputs(h, [tr[i] for i in hold])):
            oof[i] = p
    h1 = fit_head(tr, vocab.names, reject=True, groups=groups)
    pva = outputs(h1, va)
    s1 = score_tiles(h1, va, c, None)
    res = {"stage1": {"weighted_type_f1": round(s1["weighted_f1"], 4), "type_accuracy": round(s1["type_accuracy"], 4)},
           "stage2": {}}
    for radii in RADII_UM:
        tr2 = [dataclasses.replace(e, features=np.concatenate([e.features, neighbour_classes(e, p, radii)], 1))
               for e, p in zip(tr, oof)]
        va2 = [dataclasses.replace(e, features=np.concatenate([e.features, neighbour_classes(e, p, radii)], 1))
               for e, p in zip(va, pva)]
        s = score_tiles(fit_head(tr2, vocab.names, reject=True, groups=groups), va2, c, None)
        res["stage2"][f"{radii[0]:g}/{radii[1]:g} um"] = {"weighted_type_f1": round(s["weighted_f1"], 4),
                                                          "type_accuracy": round(s["type_accuracy"], 4)}
        print(radii, res["stage2"][f"{radii[0]:g}/{radii[1]:g} um"], flush=True)
    out = ROOT / "benchmarks" / "results" / "type_context"
    out.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    lines = ["| head | weighted type F1 | type accuracy |", "|---|---|---|",
             f"| stage 1 (shipped recipe) | {res['stage1']['weighted_type_f1']} | {res['stage1']['type_accuracy']} |"]
    lines += [f"| stage 2, neighbours' classes within {k} | {v['weighted_type_f1']} | {v['type_accuracy']} |"
              for k, v in res["stage2"].items()]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
