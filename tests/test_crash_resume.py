"""SIGKILL `cellsam segment` during tiling, mid-inference and during export, then rerun.

The kill points are made deterministic by ``CELLSAM_TEST_PAUSE_AT`` (:mod:`pipeline.testhooks`):
the process announces the pause on stderr and sleeps there until it is killed. While the killed
run and the rerun execute, a watcher thread polls the output directory and opens every file that
appears under a final name (chunk parquet files, tile store, GeoJSON.gz, GeoParquet, QC PNG,
summary): none may ever be incomplete. After the rerun the outputs equal an uninterrupted run's
byte for byte (the summary included; ``<id>.timings.json`` holds the one non-deterministic part
documented in :mod:`pipeline.segment`).
"""

from __future__ import annotations

import gzip
import io
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import REPO
from pipeline.paths import slide_paths
from pipeline.testhooks import ENV as PAUSE_ENV

MPP = 0.5
SID = "crash"
ARGS = ["--model", "classical", "--chunk", "256", "--halo", "40", "--workers", "1", "--batch-size", "1"]


def cli_argv(*args) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", "--quiet", *map(str, args)]


def finals_bytes(outdir: Path) -> dict:
    sp = slide_paths(outdir, SID)
    return {p.name: p.read_bytes() for p in (sp.geojson_gz, sp.parquet, sp.qc_png)}


def summary_wo_timings(outdir: Path) -> dict:
    sp = slide_paths(outdir, SID)
    s = json.loads(sp.summary.read_text(encoding="utf-8"))
    assert "timings_s" not in s and "total_s" in json.loads(sp.timings.read_text(encoding="utf-8"))["timings_s"]
    return s


class Watcher(threading.Thread):
    """Opens every file under a final name as soon as it appears (and again whenever it changes)."""

    def __init__(self, outdir: Path):
        super().__init__(daemon=True)
        self.sp = slide_paths(outdir, SID)
        self.stop = threading.Event()
        self.seen: dict = {}  # path -> (inode, mtime_ns, size) last validated
        self.problems: list[str] = []
        self.checked = 0

    def _check(self, path: Path, kind: str) -> None:
        try:
            st = path.stat()
            key = (st.st_ino, st.st_mtime_ns, st.st_size)
            if self.seen.get(path) == key:
                return
            data = path.read_bytes() if kind != "store" else None
            if kind == "gz":
                fc = json.loads(gzip.decompress(data))
                assert fc["type"] == "FeatureCollection"
            elif kind == "parquet":
                pq.read_table(io.BytesIO(data))
            elif kind == "png":
                with Image.open(io.BytesIO(data)) as im:
                    im.load()
            elif kind == "json":
                json.loads(data)
            elif kind == "store":
                from pipeline.store import open_store

                open_store(path)
        except FileNotFoundError:
            return  # removed between listing and reading (e.g. replaced by a rerun): not a torn file
        except Exception as exc:  # noqa: BLE001 - any failure to open is a finding
            self.problems.append(f"{path.name}: {type(exc).__name__}: {exc}")
            return
        self.seen[path] = key
        self.checked += 1

    def scan(self) -> None:
        sp = self.sp
        for path, kind in ((sp.geojson_gz, "gz"), (sp.parquet, "parquet"), (sp.qc_png, "png"), (sp.summary, "json")):
            if path.exists():
                self._check(path, kind)
        if sp.chunks.is_dir():
            for path in sp.chunks.glob("*.parquet"):
                self._check(path, "parquet")
        if (sp.store / ".zgroup").exists():
            self._check(sp.store, "store")

    def run(self) -> None:
        while not self.stop.is_set():
            self.scan()
            time.sleep(0.005)

    def finish(self) -> None:
        """Stop polling and scan once more (the files written last are checked too)."""
        self.stop.set()
        self.join(timeout=10)
        self.scan()

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.join(timeout=10)


def run_until_pause(slide: Path, outdir: Path, point: str, timeout: float = 300) -> subprocess.Popen:
    """Start `cellsam segment` paused at ``point``; return once it sits there (still alive)."""
    env = {**os.environ, PAUSE_ENV: point}
    proc = subprocess.Popen(cli_argv("segment", slide, "-o", outdir, *ARGS), cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(ln) for ln in proc.stderr], daemon=True).start()
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=0.5)
        except queue.Empty:
            if proc.poll() is not None:
                break
            continue
        seen.append(line)
        if line.strip() == f"cellsam: test pause at {point}":
            return proc
    proc.kill()
    proc.wait()
    pytest.fail(f"never reached pause point {point!r} (exit {proc.returncode}): {''.join(seen)[-2000:]}")


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    from pipeline.synthetic import write_synthetic_slide

    return write_synthetic_slide(tmp_path_factory.mktemp("slide") / f"{SID}.tif", size_px=(1000, 1100), mpp=MPP, seed=3)


@pytest.fixture(scope="module")
def reference(slide, tmp_path_factory):
    """Uninterrupted run with the same arguments."""
    out = tmp_path_factory.mktemp("ref")
    res = subprocess.run(cli_argv("segment", slide, "-o", out, *ARGS), cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    s = summary_wo_timings(out)
    assert s["nuclei"] > 50 and s["tissue_chunks"] >= 4
    return out


def rerun_and_compare(slide: Path, outdir: Path, reference: Path, watcher: Watcher) -> None:
    res = subprocess.run(cli_argv("segment", slide, "-o", outdir, *ARGS), cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    watcher.finish()
    assert finals_bytes(outdir) == finals_bytes(reference)
    assert summary_wo_timings(outdir) == summary_wo_timings(reference)
    assert not list(outdir.rglob("*.tmp-*")), "temp files of the killed run left behind"
    assert not watcher.problems, watcher.problems
    assert watcher.checked >= 4 + summary_wo_timings(reference)["tissue_chunks"]


def test_kill_during_tiling(slide, reference, tmp_path):
    from pipeline.errors import StoreError
    from pipeline.store import open_store

    out = tmp_path / "out"
    sp = slide_paths(out, SID)
    with Watcher(out) as watcher:
        proc = run_until_pause(slide, out, "tile")
        tmp_store = sp.store.with_name(f"{sp.store.name}.tmp-{proc.pid}")
        level0 = [p for p in (tmp_store / "0").rglob("*") if p.is_file() and not p.name.startswith(".")]
        assert level0, "no level-0 chunk written before the pause"
        kill(proc)
        assert not sp.store.exists()
        with pytest.raises(StoreError, match="incomplete|no tile store"):
            open_store(tmp_store)  # the dead writer's half store does not pass for a store
        assert not sp.chunks.exists() and not any(p.exists() for p in sp.finals())
        rerun_and_compare(slide, out, reference, watcher)
    assert not tmp_store.exists()


def test_kill_mid_inference(slide, reference, tmp_path):
    out = tmp_path / "out"
    sp = slide_paths(out, SID)
    total = summary_wo_timings(reference)["tissue_chunks"]
    with Watcher(out) as watcher:
        proc = run_until_pause(slide, out, "infer")
        kill(proc)
        done = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in sp.chunks.glob("*.parquet")}
        assert 1 <= len(done) < total
        assert not any(p.exists() for p in sp.finals())
        store_stamp = (sp.store / ".zattrs").stat().st_mtime_ns
        rerun_and_compare(slide, out, reference, watcher)
    # the rerun reused the store and the finished chunk files instead of rewriting them
    assert (sp.store / ".zattrs").stat().st_mtime_ns == store_stamp
    now = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in sp.chunks.glob("*.parquet")}
    assert len(now) == total and {k: now[k] for k in done} == done


def test_kill_during_export(slide, reference, tmp_path):
    out = tmp_path / "out"
    sp = slide_paths(out, SID)
    out.mkdir()
    # an older complete output set is present: the killed export must not leave it looking complete
    sp.summary.write_bytes(slide_paths(reference, SID).summary.read_bytes())
    with Watcher(out) as watcher:
        proc = run_until_pause(slide, out, "export")
        kill(proc)
        # paused mid-stream: the exports exist only as temporaries of the killed process
        assert sp.geojson_gz.with_name(f"{sp.geojson_gz.name}.tmp-{proc.pid}").exists()
        assert sp.parquet.with_name(f"{sp.parquet.name}.tmp-{proc.pid}").exists()
        assert not sp.summary.exists(), "a killed export left a summary: the set would look complete"
        assert not sp.geojson_gz.exists() and not sp.parquet.exists() and not sp.qc_png.exists()
        rerun_and_compare(slide, out, reference, watcher)
