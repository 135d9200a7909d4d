"""Training lives in pipeline.training; pipeline.model (inference) never imports it."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pipeline

PKG = Path(pipeline.__file__).resolve().parent
MODEL = PKG / "model"


def _model_modules() -> list[str]:
    return sorted(f"pipeline.model.{p.stem}" for p in MODEL.glob("*.py") if p.stem != "__init__")


def _imported(path: Path) -> set[str]:
    """Absolute names of every module ``path`` imports (relative imports resolved)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    here = ["pipeline", "model"] if path.stem == "__init__" else ["pipeline", "model", path.stem]
    pkg = here if path.stem == "__init__" else here[:-1]
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg[: len(pkg) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)
    return names


def _is_training(name: str) -> bool:
    return name == "pipeline.train" or name.startswith(("pipeline.train.", "pipeline.training"))


def test_no_module_of_pipeline_model_imports_training(tmp_path):
    files = sorted(MODEL.glob("*.py"))
    assert len(files) >= 8
    bad = {p.name: sorted(n for n in _imported(p) if _is_training(n)) for p in files}
    assert not any(bad.values()), bad
    # the checker resolves relative and lazy (in-function) imports: it would catch these
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from ..training.loop import fit\n    from .. import train\n")
    assert sorted(n for n in _imported(probe) if _is_training(n)) == ["pipeline.train", "pipeline.training.loop",
                                                                     "pipeline.training.loop.fit"]


def test_importing_pipeline_model_loads_no_training_module():
    mods = ["pipeline.model", *_model_modules()]
    code = ("import json, sys\n" + "".join(f"import {m}\n" for m in mods)
            + "print(json.dumps(sorted(m for m in sys.modules if m.startswith('pipeline'))))\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=PKG.parent)
    assert res.returncode == 0, res.stderr
    loaded = json.loads(res.stdout.strip().splitlines()[-1])
    assert "pipeline.model.segmenter" in loaded and "pipeline.model.teacher" in loaded
    assert not [m for m in loaded if _is_training(m)], loaded


def test_training_package_holds_every_loop():
    import pipeline.training.distill as d
    import pipeline.training.refine_train as r
    import pipeline.training.train as t
    from pipeline.training import loop

    assert t.train and d.distill and d.train_dual and r.train_refiner and loop.fit
    assert not (PKG / "train.py").exists() and not (MODEL / "distill.py").exists()
    assert not (MODEL / "refine_train.py").exists()
