"""`cellsam train-types`: learn the user's nucleus classes on a frozen network (new type head only).

See :mod:`pipeline.training.user_classes` for the data layout and docs/model.md, "Training your
own classes".
"""

from __future__ import annotations


def register(sub):
    from .argtypes import positive_float

    p = sub.add_parser("train-types", help="learn your own nucleus classes (new type head, segmentation unchanged)",
                       description="Fit a new nucleus type head for the classes of your annotations on the frozen "
                                   "network of --init (default: the shipped weights) and write a checkpoint with "
                                   "the same segmentation and the new class names. Takes seconds per image.")
    p.add_argument("--data", required=True, metavar="DIR",
                   help="images (<stem>.png/.tif/.jpg, or in images/) with <stem>.geojson (QuPath export, "
                        "classified points/polygons) or <stem>.csv (x_px,y_px,class) next to them or in "
                        "labels/, points/ or annotations/; or labels/<stem>.tif + types/<stem>.png (label + type "
                        "images, HoVer-Net/PanNuke style; see --type-names)")
    p.add_argument("-o", "--output", required=True, metavar="CKPT", help="checkpoint to write")
    p.add_argument("--mpp", required=True, type=positive_float, help="µm/px of the images")
    p.add_argument("--init", default="default", help="checkpoint whose network is kept ('default' = shipped weights)")
    p.add_argument("--classes", default=None, metavar="A,B,...",
                   help="expected class names, in this order (default: the names found, sorted); others are errors")
    p.add_argument("--reject", action="store_true",
                   help="also learn 'not a nucleus' from unannotated predictions (only when every nucleus is annotated)")
    p.add_argument("--type-names", default=None, metavar="1=A,2=B",
                   help="names of the type ids of label + type image pairs (default: DIR/type_names.json)")
    p.add_argument("--epochs", type=int, default=300, help="head fitting epochs (full batch; default 300)")
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    p.set_defaults(func=run)


def run(args):
    from ..training.user_classes import train_types

    classes = [c.strip() for c in args.classes.split(",") if c.strip()] if args.classes else None
    summary = train_types(args.data, args.output, args.mpp, init=args.init, classes=classes, reject=args.reject,
                          epochs=args.epochs, device=args.device, type_names=args.type_names)
    counts = summary["trained_on"]["matched_instances"]
    print(f"wrote {args.output} (classes: " + ", ".join(f"{n} [{counts[n]}]" for n in summary["classes"]) + ")")
    return 0
