"""Shared test fixtures.

Real data lives in ``../shared/data`` (relative to the repository root) and is never copied
into the repository. With ``CI=true`` a missing file is a failure; elsewhere tests skip.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CELLSAM_SHARED_DATA", REPO.parent / "shared" / "data"))
SLIDES = SHARED / "slides"
NUCLEI = SHARED / "nuclei"
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def shared_file(relpath: str) -> Path:
    """Path of a file under ``../shared/data``; skip (or fail in CI) if it is not there."""
    path = SHARED / relpath
    if not path.exists():
        msg = f"shared data file missing: {path}"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)
    return path


@pytest.fixture
def shared():
    return shared_file


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:  # pragma: no cover
        has_cuda = False
    if not has_cuda:
        skip = pytest.mark.skip(reason="no CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
