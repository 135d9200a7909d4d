"""`cellsam infer` (placeholder: being implemented)."""


def register(sub):
    p = sub.add_parser("infer", help="(not yet implemented)")
    p.set_defaults(func=run)


def run(args):
    raise NotImplementedError("infer")
