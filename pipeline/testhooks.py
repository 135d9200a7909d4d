"""Test-only pause points for crash/resume tests (``CELLSAM_TEST_PAUSE_AT``).

With ``CELLSAM_TEST_PAUSE_AT=<point>`` in the environment, a process reaching
``pause_point("<point>")`` prints ``cellsam: test pause at <point>`` on stderr and sleeps (up to
an hour), so that a test can SIGKILL it at a known stage (``tests/test_crash_resume.py``).
Without the variable (always, outside tests) it does nothing. Points:

``tile``
    :func:`pipeline.store.write_store`: level-0 chunks written to ``<store>.tmp-<pid>``; pyramid
    levels, attributes and the rename to the final name still pending.
``infer``
    :func:`pipeline.infer.run_infer`: the first batch of chunk files written, more pending.
``export``
    :func:`pipeline.segment.run_export`: the first strip of nuclei written to the temporaries of
    ``<id>.geojson.gz`` and ``<id>.nuclei.parquet``; their renames, the QC image and the summary
    still pending.
``train``
    :func:`pipeline.training.train.train`: the first epoch's run state (``last.pt``, ``log.csv``,
    the compact ``--resume-state`` file) written, more epochs pending.
"""

from __future__ import annotations

import os
import sys
import time

ENV = "CELLSAM_TEST_PAUSE_AT"
POINTS = ("tile", "infer", "export", "train")


def pause_point(name: str) -> None:
    """Sleep here if ``CELLSAM_TEST_PAUSE_AT`` names this point (see module docstring)."""
    if os.environ.get(ENV) != name:
        return
    sys.stderr.write(f"cellsam: test pause at {name}\n")
    sys.stderr.flush()
    time.sleep(3600)
