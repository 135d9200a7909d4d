"""Bad-input matrix for `cellsam segment`, through the real CLI in subprocesses.

Every bad input must give exactly one line ``cellsam: error: ...`` on stderr (``--quiet``) that
names the file/option and the problem, a non-zero exit code, no traceback, nothing under a final
output name (no final files, no complete tile store) and, in a shared cohort output directory,
no change to the other slide's results. An all-white slide is not an error: valid empty outputs.

The independent CLI runs are started together by one module fixture (they share the cohort
output directory, so concurrent failures next to a finished slide are covered too); each test
then checks one result. Full disk and read-only outputs use small tmpfs mounts (root only; the
tests skip where mounting is not permitted).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import REPO, shared_file
from pipeline.errors import ConfigError, InputError, ModelError, OutputError, SlideReadError
from pipeline.paths import slide_paths

MPP = 0.5
GOOD = "good"  # the finished slide of the cohort directory
CLASSICAL = ["--model", "classical", "--halo", "40"]


def cli_argv(*args) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", "--quiet", *map(str, args)]


def run_cli(*args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(cli_argv(*args), cwd=REPO, capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(res, *names, code=None):
    """Exactly one ``cellsam: error:`` line naming each of ``names``; non-zero exit; no traceback."""
    assert res.returncode != 0, res.stderr
    if code is not None:
        assert res.returncode == code, (res.returncode, res.stderr)
    assert "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("cellsam: error: "), lines[0]
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


def assert_no_outputs(outdir: Path, slide_id: str):
    """Nothing of ``slide_id`` under a final name: no final files, no temp files, no complete store."""
    from pipeline.errors import StoreError
    from pipeline.store import open_store

    sp = slide_paths(outdir, slide_id)
    for path in [*sp.finals(), sp.geojson]:
        assert not path.exists(), path
    if outdir.is_dir():
        assert not [p.name for p in outdir.iterdir() if p.name.startswith(f"{slide_id}.")]
    if sp.store.exists():
        with pytest.raises(StoreError):
            open_store(sp.store)
    if sp.workdir.exists():
        assert not list(sp.workdir.rglob("*.tmp-*"))


def snapshot(outdir: Path, slide_id: str) -> dict:
    """Content hash and mtime of every file of ``slide_id`` (finals and work directory)."""
    sp = slide_paths(outdir, slide_id)
    files = [p for p in [*sp.finals(), sp.geojson] if p.exists()] + [p for p in sp.workdir.rglob("*") if p.is_file()]
    return {str(p.relative_to(outdir)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns) for p in files}


@contextlib.contextmanager
def tmpfs(path: Path, size: str, *, read_only: bool = False):
    """Mount a tmpfs of ``size`` at ``path`` (skip the test if that is not permitted)."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root")
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if read_only else "")
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


class Evil:
    """Pickles to ``os.system("touch <marker>")``: runs code on load unless the loader refuses it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# ---------------------------------------------------------------------------------------------
# inputs


def make_inputs(d: Path) -> dict:
    """Bad (and one empty) inputs: name -> path."""
    from pipeline.synthetic import write_synthetic_slide

    cmu = shared_file("slides/CMU-1-Small-Region.svs").read_bytes()
    paths = {
        "missing": d / "missing.svs",
        "zero_byte": d / "zero_byte.svs",
        "truncated": d / "truncated.svs",
        "not_a_slide": d / "not_a_slide.svs",
        "png": d / "photo.png",
        "no_mpp": shared_file("slides/TCGA-CR-7395-01A-01-TS1.svs"),
    }
    paths["zero_byte"].write_bytes(b"")
    paths["truncated"].write_bytes(cmu[: len(cmu) // 2])
    paths["not_a_slide"].write_text("slide_id,path\nA,a.svs\n" * 200)  # a CSV renamed .svs
    Image.new("RGB", (400, 300), (200, 120, 170)).save(paths["png"], format="PNG")
    paths["white"] = write_synthetic_slide(d / "white.tif", size_px=(500, 600), mpp=MPP, n_regions=0)
    return paths


def make_checkpoints(d: Path, marker: Path) -> dict:
    """Corrupt or alien ``--model`` files: name -> path."""
    torch = pytest.importorskip("torch")
    ckpts = {name: d / f"{name}.pt" for name in ("random_bytes", "zip_not_torch", "other_dict", "evil_torch", "evil_pickle")}
    ckpts["random_bytes"].write_bytes(hashlib.sha512(b"x").digest() * 64)
    with zipfile.ZipFile(ckpts["zip_not_torch"], "w") as zf:
        zf.writestr("weights/readme.txt", "not a torch archive")
    torch.save({"epoch": 3, "weights": torch.zeros(4)}, ckpts["other_dict"])
    torch.save({"format": "cellsam-checkpoint", "arch": Evil(marker)}, ckpts["evil_torch"])
    with open(ckpts["evil_pickle"], "wb") as fh:  # a plain pickle (protocol 2), as torch.load also accepts
        pickle.dump({"format": "cellsam-checkpoint", "arch": Evil(marker)}, fh, protocol=2)
    return ckpts


SLIDE_CASES = {  # name -> (exit code, substring of the message besides the file name)
    "missing": (InputError.exit_code, "no such file"),
    "zero_byte": (SlideReadError.exit_code, "empty file"),
    "truncated": (SlideReadError.exit_code, "truncated or corrupt"),
    "not_a_slide": (SlideReadError.exit_code, "not a slide"),
    "png": (SlideReadError.exit_code, "not a slide"),
    "no_mpp": (SlideReadError.exit_code, "--slide-mpp"),
}
CKPT_CASES = {
    "random_bytes": "not a loadable CellSAM checkpoint",
    "zip_not_torch": "not a PyTorch checkpoint archive",
    "other_dict": "missing format marker",
    "evil_torch": "unsafe pickle",
    "evil_pickle": "unsafe pickle",
}
VALUE_CASES = {  # name -> (extra args, exit code, substring)
    "negative_chunk": (["--chunk", "-256"], ConfigError.exit_code, "chunk_px must be > 0, got -256"),
    "zero_batch_size": (["--batch-size", "0"], ConfigError.exit_code, "batch_size must be > 0, got 0"),
    "negative_halo": (["--halo", "-1"], ConfigError.exit_code, "halo_px must be >= 0, got -1"),
    "zero_workers": (["--workers", "0"], ConfigError.exit_code, "workers must be > 0, got 0"),
    "bad_device": (["--device", "tpu"], 2, "--device: invalid choice: 'tpu'"),
    "non_integer_chunk": (["--chunk", "big"], 2, "--chunk: invalid int value: 'big'"),
}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """A cohort output directory holding one finished slide, and every bad run made into it."""
    from pipeline.synthetic import write_synthetic_slide

    root = tmp_path_factory.mktemp("robust")
    good = write_synthetic_slide(root / f"{GOOD}.tif", size_px=(600, 700), mpp=MPP, seed=5, tissue_scale=0.35)
    outdir = root / "cohort"
    res = run_cli("segment", good, "-o", outdir, "--chunk", 256, *CLASSICAL)
    assert res.returncode == 0, res.stderr
    assert json.loads(slide_paths(outdir, GOOD).summary.read_text())["nuclei"] > 10
    before = snapshot(outdir, GOOD)

    (root / "in").mkdir()
    inputs = make_inputs(root / "in")
    marker = root / "PWNED"
    ckpts = make_checkpoints(root / "in", marker)
    runs = {f"slide:{k}": ["segment", inputs[k], "-o", outdir, *CLASSICAL] for k in [*SLIDE_CASES, "white"]}
    runs.update({f"ckpt:{k}": ["segment", good, "-o", outdir, "--slide-id", f"ck_{k}", "--model", p] for k, p in ckpts.items()})
    runs.update(
        {f"value:{k}": ["segment", good, "-o", outdir, "--slide-id", f"v_{k}", "--model", "classical", *extra]
         for k, (extra, _, _) in VALUE_CASES.items()}
    )
    with ThreadPoolExecutor(max_workers=4) as pool:  # independent processes, partly concurrent
        futures = {name: pool.submit(run_cli, *args) for name, args in runs.items()}
        results = {name: f.result() for name, f in futures.items()}
    return {"outdir": outdir, "before": before, "inputs": inputs, "ckpts": ckpts, "marker": marker, "results": results}


@pytest.mark.parametrize("case", list(SLIDE_CASES))
def test_bad_slide(cohort, case):
    code, problem = SLIDE_CASES[case]
    path = cohort["inputs"][case]
    assert_one_line_error(cohort["results"][f"slide:{case}"], str(path), problem, code=code)
    assert_no_outputs(cohort["outdir"], path.name.split(".")[0])


@pytest.mark.parametrize("case", list(CKPT_CASES))
def test_bad_checkpoint(cohort, case):
    path = cohort["ckpts"][case]
    assert_one_line_error(cohort["results"][f"ckpt:{case}"], str(path), CKPT_CASES[case], code=ModelError.exit_code)
    assert_no_outputs(cohort["outdir"], f"ck_{case}")
    assert not slide_paths(cohort["outdir"], f"ck_{case}").workdir.exists()  # refused before any work
    if case.startswith("evil"):
        assert not cohort["marker"].exists(), "the pickle's code ran: weights_only=True was not used"


@pytest.mark.parametrize("case", list(VALUE_CASES))
def test_bad_value(cohort, case):
    _, code, problem = VALUE_CASES[case]
    assert_one_line_error(cohort["results"][f"value:{case}"], problem, code=code)
    assert_no_outputs(cohort["outdir"], f"v_{case}")
    assert not slide_paths(cohort["outdir"], f"v_{case}").workdir.exists()


def test_white_slide_gives_valid_empty_outputs(cohort):
    import geopandas as gpd

    res = cohort["results"]["slide:white"]
    assert res.returncode == 0 and res.stderr == "", res.stderr
    sp = slide_paths(cohort["outdir"], "white")
    summary = json.loads(sp.summary.read_text(encoding="utf-8"))
    assert summary["nuclei"] == 0 and summary["tissue_chunks"] == 0 and "no tissue" in summary["note"]
    assert json.loads(gzip.decompress(sp.geojson_gz.read_bytes())) == {"type": "FeatureCollection", "features": []}
    assert len(gpd.read_parquet(sp.parquet)) == 0 and pq.read_schema(sp.parquet).metadata[b"geo"]
    with Image.open(sp.qc_png) as im:
        assert im.format == "PNG" and min(im.size) > 50


def test_cohort_neighbour_unaffected(cohort):
    """All the failures above happened in the same output directory: the finished slide is untouched."""
    assert len(cohort["results"]) == len(SLIDE_CASES) + 1 + len(CKPT_CASES) + len(VALUE_CASES)
    assert snapshot(cohort["outdir"], GOOD) == cohort["before"]
    leftovers = [p for p in cohort["outdir"].rglob("*.tmp-*")]
    assert not leftovers


# ---------------------------------------------------------------------------------------------
# unwritable output, full disk


def test_unwritable_output_dir(cohort, tmp_path):
    good = cohort["outdir"].parent / f"{GOOD}.tif"
    blocker = tmp_path / "plainfile"
    blocker.write_text("a regular file")
    for outdir in (blocker, blocker / "sub"):  # root ignores chmod; a path through a file fails for root too
        res = run_cli("segment", good, "-o", outdir, *CLASSICAL)
        assert_one_line_error(res, str(blocker), "Not a directory", code=OutputError.exit_code)
    assert blocker.read_text() == "a regular file"
    with tmpfs(tmp_path / "ro", "1m", read_only=True) as ro:
        res = run_cli("segment", good, "-o", ro / "out", *CLASSICAL)
        assert_one_line_error(res, str(ro / "out"), "Read-only file system", code=OutputError.exit_code)


def test_full_disk_during_export(cohort, tmp_path):
    """Store and chunk files fit, the exports do not: one OutputError line, no final file left."""
    good = cohort["outdir"].parent / f"{GOOD}.tif"
    done = slide_paths(cohort["outdir"], GOOD)
    with tmpfs(tmp_path / "disk", "1m") as disk:
        sp = slide_paths(disk / "out", GOOD)
        shutil.copytree(done.chunks, sp.chunks)  # finished chunk files: only the export remains
        free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
        (disk / "filler").write_bytes(b"\0" * (free - 16 * 1024))  # 16 KiB left
        res = run_cli("segment", good, "-o", sp.outdir, "--store", done.store, "--chunk", 256, *CLASSICAL)
        line = assert_one_line_error(res, f"{sp.outdir}/{GOOD}.", "No space left on device", code=OutputError.exit_code)
        assert line.startswith("cellsam: error: cannot write ")
        assert_no_outputs(sp.outdir, GOOD)
        assert sorted(p.name for p in sp.chunks.glob("*.parquet")) == sorted(p.name for p in done.chunks.glob("*.parquet"))
        # with space again, the same command completes from the chunk files, equal to the cohort's run
        (disk / "filler").unlink()
        res = run_cli("segment", good, "-o", sp.outdir, "--store", done.store, "--chunk", 256, *CLASSICAL)
        assert res.returncode == 0, res.stderr
        for a, b in zip([sp.geojson_gz, sp.parquet, sp.qc_png], [done.geojson_gz, done.parquet, done.qc_png]):
            assert a.read_bytes() == b.read_bytes(), a.name
    assert snapshot(cohort["outdir"], GOOD) == cohort["before"]


def test_full_disk_during_tiling(cohort, tmp_path):
    good = cohort["outdir"].parent / f"{GOOD}.tif"
    with tmpfs(tmp_path / "tiny", "64k") as disk:
        res = run_cli("segment", good, "-o", disk / "out", "--chunk", 256, *CLASSICAL)
        assert_one_line_error(res, "store.ome.zarr", "No space left on device", code=OutputError.exit_code)
        assert_no_outputs(disk / "out", GOOD)
        assert not slide_paths(disk / "out", GOOD).store.exists()
        assert not list((disk / "out").rglob("*.tmp-*"))
