"""`cellsam cohort` (placeholder: being implemented)."""


def register(sub):
    p = sub.add_parser("cohort", help="(not yet implemented)")
    p.set_defaults(func=run)


def run(args):
    raise NotImplementedError("cohort")
