"""Put a newly trained network into the shipped checkpoints, keeping their type heads and patch typers.

    python benchmarks/graft_network.py NEW.pt [--models default,quality] [--dry-run]

``NEW.pt`` is the output of ``cellsam train --init default ...`` (network + tuned decoding, no type
head: fine-tuning drops it). The shipped type head and patch typers read only what the instances
give them (mask morphology, colour, neighbours; RGB patches at the centroids), never the network's
embedding, so they stay valid on a new network; they are copied tensor for tensor. What is taken
from ``NEW.pt``: the student, the dense decoder and the other network parts, ``metadata.postprocess``,
``validation``, ``epoch``, ``train_config`` and the identity of the run's start (``init``). The
previous network's identity is kept as ``metadata.network_previous`` (sha256 of the file it came
from). Writes ``pipeline/weights/cellsam_<model>.pt`` atomically (``save_checkpoint``).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.model.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402

WEIGHTS = ROOT / "pipeline" / "weights"
NETWORK_META = ("postprocess", "validation", "epoch", "train_config", "init", "init_sha256", "mpp")
HEADS = ("type_head", "patch_typer")


def graft(new_path: Path, donor_path: Path, out: Path, dry_run: bool = False) -> dict:
    new, new_meta = load_checkpoint(new_path)
    donor, meta = load_checkpoint(donor_path)
    if new_meta.get("mpp") != meta.get("mpp"):
        raise SystemExit(f"{new_path}: trained at {new_meta.get('mpp')} µm/px, {donor_path} at {meta.get('mpp')}")
    arch = {**new.arch}
    for k in HEADS:
        arch.pop(k, None)
        if donor.arch.get(k):
            arch[k] = donor.arch[k]
    new.arch = arch
    new.type_head = donor.type_head
    new.patch_typer = donor.patch_typer
    out_meta = {k: v for k, v in meta.items() if k not in NETWORK_META}
    out_meta.update({k: new_meta[k] for k in NETWORK_META if k in new_meta})
    out_meta["network_previous"] = {"sha256": hashlib.sha256(donor_path.read_bytes()).hexdigest(),
                                    "epoch": meta.get("epoch"), "validation": meta.get("validation")}
    if not dry_run:
        save_checkpoint(out, new.eval(), out_meta)
    return out_meta


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("new", type=Path)
    ap.add_argument("--models", default="default,quality")
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args(argv)
    for name in args.models.split(","):
        path = WEIGHTS / f"cellsam_{name}.pt"
        meta = graft(args.new, path, path, args.dry_run)
        print(f"{'would write' if args.dry_run else 'wrote'} {path}: postprocess {meta['postprocess']}, "
              f"validation AJI {meta.get('validation', {}).get('aji')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
