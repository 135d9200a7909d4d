"""`cellsam export` (placeholder: being implemented)."""


def register(sub):
    p = sub.add_parser("export", help="(not yet implemented)")
    p.set_defaults(func=run)


def run(args):
    raise NotImplementedError("export")
