"""Benchmark suite: end-to-end ``cellsam segment`` on large realistic slides, stitch + export at
1 M nuclei, model-forward throughput. Writes ``benchmarks/results/latest.json`` + ``latest.md``.

What is measured (details and targets: ``benchmarks/README.md``)
----------------------------------------------------------------
``e2e`` (per slide size x model)
    ``cellsam segment SLIDE -o OUTDIR`` in a subprocess, fresh OUTDIR, on a slide from
    ``benchmarks/make_slide.py`` (real H&E tissue, ~50 % tissue, 0.5 µm/px; generated once into
    ``benchmarks/data/``, generation time not counted). Wall time of the subprocess, its peak RSS
    (``ru_maxrss`` of the process from ``wait4``, and the sampled RSS sum of its process tree),
    CPU seconds (-> ``cpu_share`` = cores actually obtained), and from its ``summary.json``: tissue
    mm², nuclei, the per-stage ``timings_s``. Derived: ``s_per_mm2`` (wall / tissue mm²),
    ``store_mpx_per_s`` (store px of the tissue chunks / wall), ``overhead_ratio`` = (wall -
    model_s) / model_s, and the stage breakdown.
``stitch_export`` (``--nuclei``, default 1 M and 3 M: the memory curve)
    The chunk-file generator and the streamed stitch + GeoJSON.gz + GeoParquet worker of
    ``benchmarks/bench_postmodel.py`` (``--worker gen-big`` / ``--worker big``, the code path of
    ``cellsam export``), each in its own subprocess: seconds per step and the worker's peak RSS.
``forward``
    Model forward pass alone on ``batch`` real-tissue windows of the pipeline's window size
    (chunk + 2 x halo of ``pipeline.config``: 1216² px with chunk 1024, halo 96), torch threads =
    ``--threads``: median seconds and Mpx/s of window pixels.

The machine may be shared (see ``machine.loadavg_*`` and ``cpu_share``): compare ratios measured
in one run, not seconds across runs.

Usage::

    python benchmarks/run.py [--quick] [--sizes 10000,30000] [--model default|PATH|classical[,...]]
        [--device cpu|cuda] [--batch-size N] [--nuclei 1000000] [--out benchmarks/results/latest.json]
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata as md
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
RESULTS = BENCH / "results"
SCHEMA_VERSION = 1


def window_px() -> int:
    """Inference window edge of the pipeline's defaults: chunk + 2 x halo (store px)."""
    sys.path.insert(0, str(ROOT))
    from pipeline.config import SegmentConfig, StoreConfig

    return int(StoreConfig().chunk_px + 2 * SegmentConfig().halo_px)

QUICK_SIZE = 4096
QUICK_NUCLEI = 200_000  # 1 M takes > 10 min on 2 shared, loaded cores (see README)
FULL_SIZES = (10_000, 30_000, 100_000)

#: Targets (README.md). CPU ones assume 2 cores and the default model at 0.5 µm/px.
TARGETS = {
    "cpu_wall_s_per_mm2": 5.0,
    "overhead_ratio": 0.25,
    "peak_rss_gb_100k": 3.0,
    "stitch_export_1m_s": 60.0,
    "stitch_export_1m_rss_gb": 2.0,
    "gpu_s_per_mm2": 0.1,
    "gpu_busy_pct": 80.0,
}

log = logging.getLogger("benchmarks.run")


# ----------------------------------------------------------------------------------------------
# Machine and process measurement


def machine_info() -> dict:
    """CPU model, cores, RAM, versions, date, git revision, load."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram_gb = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram_gb = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass

    def version(dist):
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            return None

    def git(*args):
        try:
            return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "ram_gb": ram_gb,
        "python": platform.python_version(),
        "torch": version("torch"),
        "numpy": version("numpy"),
        "platform": platform.platform(),
        "date_utc": dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat(),
        "git_commit": git("rev-parse", "--short", "HEAD"),
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no", "--", "pipeline")),
        "loadavg_start": [round(v, 2) for v in os.getloadavg()],
        "gpu": gpu_name(),
    }


def gpu_name() -> str | None:
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out or None


class GpuSampler:
    """Samples ``nvidia-smi`` GPU utilisation (%) every ``period_s`` in a thread."""

    def __init__(self, period_s: float = 0.5):
        self.period_s = period_s
        self.samples: list[tuple[float, float, float]] = []  # (t, util %, memory MiB)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            try:
                out = subprocess.run(
                    ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits"],
                    capture_output=True, text=True, timeout=10,
                ).stdout.strip().splitlines()
                if out:
                    util, mem = (float(v) for v in out[0].split(",")[:2])
                    self.samples.append((time.perf_counter(), util, mem))
            except (OSError, subprocess.SubprocessError, ValueError):
                pass
            self._stop.wait(self.period_s)

    def __enter__(self):
        if shutil.which("nvidia-smi"):
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=15)

    def busy_pct(self, t0: float | None = None, t1: float | None = None) -> float | None:
        vals = [u for t, u, _ in self.samples if (t0 is None or t >= t0) and (t1 is None or t <= t1)]
        return round(statistics.fmean(vals), 1) if vals else None

    def peak_mem_gb(self) -> float | None:
        return round(max(m for _, _, m in self.samples) / 1024, 2) if self.samples else None


def _vm_hwm_bytes(pid: int) -> int:
    """Peak resident set size of the process's current address space (``VmHWM``), 0 if unknown."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def run_measured(cmd: list[str], *, env: dict | None = None, cwd: str | None = None, log_path: Path | None = None,
                 poll_s: float = 0.25) -> dict:
    """Run ``cmd``; wall time, exit code, peak RSS (``ru_maxrss`` and sampled process-tree sum), CPU s.

    Returns
    -------
    dict
        ``rc``, ``wall_s``, ``t_start`` / ``t_end`` (``perf_counter``), ``peak_rss_gb`` (VmHWM; largest
        single-process high-water mark, from ``wait4``), ``peak_tree_rss_gb`` (largest sampled sum
        over the process tree), ``cpu_s`` (user + system of the process and its waited children),
        ``cpu_share`` (cpu_s / wall_s: cores obtained on average).
    """
    import psutil

    out = open(log_path, "wb") if log_path else subprocess.DEVNULL
    try:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
        try:
            ps = psutil.Process(proc.pid)
        except psutil.Error:
            ps = None
        peak_tree = 0
        peak_hwm = 0
        while True:
            pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
            if pid == proc.pid:
                break
            peak_hwm = max(peak_hwm, _vm_hwm_bytes(proc.pid))
            if ps is not None:
                try:
                    procs = [ps, *ps.children(recursive=True)]
                    total = 0
                    for p in procs:
                        try:
                            total += p.memory_info().rss
                        except psutil.Error:
                            pass
                    peak_tree = max(peak_tree, total)
                except psutil.Error:
                    pass
            time.sleep(poll_s)
        t1 = time.perf_counter()
        proc.returncode = os.waitstatus_to_exitcode(status)
    finally:
        if log_path:
            out.close()
    wall = t1 - t0
    cpu = ru.ru_utime + ru.ru_stime
    return {
        "rc": proc.returncode,
        "wall_s": round(wall, 3),
        "t_start": t0,
        "t_end": t1,
        # VmHWM of the child's own address space (ru_maxrss after fork+exec would also count the
        # parent's RSS at fork time); ru_maxrss only if the child ended before the first sample
        "peak_rss_gb": round((peak_hwm / 2**30) if peak_hwm else ru.ru_maxrss / 2**20, 3),
        "peak_tree_rss_gb": round(peak_tree / 2**30, 3),
        "cpu_s": round(cpu, 2),
        "cpu_share": round(cpu / wall, 3) if wall > 0 else None,
    }


def _tail(path: Path, n: int = 3) -> str:
    try:
        lines = path.read_text(errors="replace").replace("\r", "\n").splitlines()
    except OSError:
        return ""
    return " | ".join(line.strip() for line in lines[-n:] if line.strip())


# ----------------------------------------------------------------------------------------------
# End to end


def _model_arg(spec: str) -> list[str]:
    return [] if spec == "default" else ["--model", spec]


def _model_label(spec: str) -> str:
    return spec if spec in ("default", "quality", "classical") else Path(spec).name


def e2e(slide: Path, slide_info: dict, spec: str, args, workdir: Path, extra: tuple = (), tag: str = "") -> dict:
    """One ``cellsam segment`` run (``extra``: more CLI flags, ``tag``: their label); see the module docstring."""
    label = _model_label(spec)
    outdir = workdir / f"seg_{slide_info['size_px'][0]}_{label}{tag}"
    shutil.rmtree(outdir, ignore_errors=True)
    cmd = [sys.executable, "-m", "pipeline.cli", "--quiet", "segment", str(slide), "-o", str(outdir),
           *_model_arg(spec), "--device", args.device, *extra]
    if args.batch_size:
        cmd += ["--batch-size", str(args.batch_size)]
    if args.workers:
        cmd += ["--workers", str(args.workers)]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    log_path = workdir / f"{outdir.name}.log"
    log.info("e2e: %s (%s) with model %s", slide.name, "x".join(map(str, slide_info["size_px"])), label)
    with GpuSampler() as gpu:
        m = run_measured(cmd, env=env, cwd=str(ROOT), log_path=log_path)
    res = {
        "slide": slide.name,
        "size_px": slide_info["size_px"],
        "slide_mpx": round(slide_info["size_px"][0] * slide_info["size_px"][1] / 1e6, 2),
        "model": label,
        "device": args.device,
        "batch_size": args.batch_size,
        **{k: v for k, v in m.items() if k not in ("t_start", "t_end")},
    }
    summaries = sorted(outdir.glob("*.summary.json"))
    if m["rc"] != 0 or not summaries:
        res["error"] = f"exit {m['rc']}: {_tail(log_path)}"
        log.error("e2e %s %s failed: %s", slide.name, label, res["error"])
        return res
    summary = json.loads(summaries[0].read_text())
    timings = summaries[0].with_name(summaries[0].name.replace(".summary.json", ".timings.json"))
    t = json.loads(timings.read_text()).get("timings_s", {}) if timings.exists() else summary.get("timings_s", {})
    chunk_px = int(summary.get("parameters", {}).get("store", {}).get("chunk_px") or 0)
    mm2 = float(summary.get("tissue_area_mm2") or 0.0)
    wall = m["wall_s"]
    model_s = float(t.get("model_s", 0.0))
    res.update({
        "tissue_area_mm2": round(mm2, 3),
        "tissue_chunks": summary.get("tissue_chunks"),
        "chunk_px": chunk_px,
        "nuclei": summary.get("nuclei"),
        "model_info": summary.get("model"),
        "timings_s": t,
        "s_per_mm2": round(wall / mm2, 3) if mm2 > 0 else None,
        "cpu_s_per_mm2": round(m["cpu_s"] / mm2, 3) if mm2 > 0 else None,
        "store_mpx": round((summary.get("tissue_chunks") or 0) * chunk_px * chunk_px / 1e6, 2),
        # classical runs in parallel threads (model_s summed over them): no forward pass to compare with
        "overhead_ratio": round((wall - model_s) / model_s, 3) if model_s > 0 and label != "classical" else None,
        "stages_s": stage_breakdown(t, wall),
        # megapixels of the inference windows and of the tissue boxes the network actually saw
        "window_mpx": t.get("window_mpx"),
        "model_mpx": t.get("model_mpx"),
    })
    res["store_mpx_per_s"] = round(res["store_mpx"] / wall, 3) if wall > 0 else None
    res["slide_mpx_per_s"] = round(res["slide_mpx"] / wall, 3) if wall > 0 else None
    if gpu.samples:
        # infer phase: after start-up (wall - total_s) and the tile stage
        t_infer0 = m["t_start"] + max(wall - float(t.get("total_s", wall)), 0.0) + float(t.get("tile_s", 0.0))
        res["gpu_busy_pct_infer"] = gpu.busy_pct(t_infer0, t_infer0 + float(t.get("infer_s", 0.0)))
        res["gpu_busy_pct_total"] = gpu.busy_pct()
        res["gpu_peak_mem_gb"] = gpu.peak_mem_gb()
    if not args.keep:
        shutil.rmtree(outdir, ignore_errors=True)
    log.info("e2e: %s %s: %.1f s, %.2f s/mm², %s nuclei, peak RSS %.2f GB, CPU share %.2f", slide.name, label, wall,
             res["s_per_mm2"] or 0, res["nuclei"], res["peak_rss_gb"], res["cpu_share"] or 0)
    return res


STAGES = ("startup", "tile", "read", "model", "postprocess", "extract_measure", "chunk_write", "infer_wall", "stitch",
          "export", "qc")


def stage_breakdown(t: dict, wall_s: float) -> dict:
    """Stage seconds from a summary's ``timings_s``.

    The infer stages (``read``..``chunk_write``) are summed over worker threads, so they can add
    up to more than the infer wall time; ``startup`` = process start, imports and model loading
    (subprocess wall - ``total_s``).
    """
    g = lambda k: float(t.get(k, 0.0))  # noqa: E731
    return {
        "startup": round(max(wall_s - g("total_s"), 0.0), 3),
        "tile": g("tile_s"),  # slide read + tissue detection + store write
        "read": g("read_s"),  # window reads from the store
        "model": g("model_s"),  # forward pass (classical: the whole classical segmenter)
        "postprocess": g("postprocess_s"),  # maps -> instance labels
        "extract_measure": g("extract_s"),  # polygonize + per-nucleus measurements
        "chunk_write": g("write_s"),
        "infer_wall": g("infer_s"),
        "stitch": g("stitch_s"),
        "export": g("export_s"),  # GeoJSON.gz + GeoParquet
        "qc": g("qc_s"),
    }


# ----------------------------------------------------------------------------------------------
# Stitch + export at scale (bench_postmodel.py workers)


def stitch_export(n: int, workdir: Path) -> dict:
    """1 M-nucleus stitch + export through ``bench_postmodel.py``'s workers (see module doc)."""
    script = BENCH / "bench_postmodel.py"
    res: dict = {"nuclei_requested": n, "generator": "benchmarks/bench_postmodel.py gen-big / big"}
    if not script.exists():
        res["error"] = f"{script} missing"
        return res
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    table = workdir / f"chunks_{n}"  # a directory of chunk files
    steps = {}
    for worker, extra in (("gen-big", ["--n", str(n)]), ("big", [])):
        result = workdir / f"{worker}.json"
        log_path = workdir / f"{worker}.log"
        cmd = [sys.executable, str(script), "--worker", worker, "--table", str(table), "--result", str(result),
               "--tmp", str(workdir), *extra]
        log.info("stitch_export: %s (%d nuclei)", worker, n)
        m = run_measured(cmd, env=env, cwd=str(workdir), log_path=log_path)
        steps[worker] = {k: v for k, v in m.items() if k not in ("t_start", "t_end")}
        if m["rc"] != 0 or not result.exists():
            res["error"] = f"{worker}: exit {m['rc']}: {_tail(log_path)}"
            res["steps"] = steps
            return res
        steps[worker]["result"] = json.loads(result.read_text())
    big = steps["big"]["result"]
    res.update({
        "instances": big.get("instances"),
        "nuclei": big.get("nuclei"),
        "mode": big.get("mode"),
        "chunk_files": big.get("chunk_files"),
        "peak_cached_rows": big.get("peak_cached_rows"),
        "stitch_s": big.get("stitch_s"),
        "export_s": big.get("export_s"),
        "stitch_export_s": big.get("stitch_export_s"),
        "process_wall_s": steps["big"]["wall_s"],
        "peak_rss_gb": steps["big"]["peak_rss_gb"],
        "cpu_s": steps["big"]["cpu_s"],
        "cpu_share": steps["big"]["cpu_share"],
        "geojson_gz_mb": big.get("geojson_gz_mb"),
        "geoparquet_mb": big.get("geoparquet_mb"),
        "generate_s": steps["gen-big"]["wall_s"],
    })
    import shutil

    shutil.rmtree(table, ignore_errors=True)
    log.info("stitch_export: %s nuclei: stitch+export %.1f s, peak RSS %.2f GB", res["nuclei"],
             res["stitch_export_s"] or 0, res["peak_rss_gb"])
    return res


# ----------------------------------------------------------------------------------------------
# Forward throughput (worker runs in a subprocess)


def worker_forward(args) -> dict:
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from pipeline.model.segmenter import Segmenter, load_model

    spec = args.fwd_model
    if spec == "random":
        from pipeline.model.cellsam import DEFAULT_ARCH, CellSAM

        seg = Segmenter(CellSAM(DEFAULT_ARCH).eval(), {"mpp": 0.5}, device=args.device)
    else:
        seg = load_model(None if spec == "default" else spec, device=args.device)
    rng = np.random.default_rng(0)
    win_px = window_px()
    if args.slide:
        import openslide

        with openslide.OpenSlide(args.slide) as s:
            w, h = s.dimensions
            imgs = []
            for i in range(args.fwd_batch):
                x = int((w - win_px) * (0.3 + 0.4 * rng.random()))
                y = int((h - win_px) * (0.3 + 0.4 * rng.random()))
                imgs.append(np.asarray(s.read_region((x, y), 0, (win_px, win_px)).convert("RGB")))
        batch = np.stack(imgs)
    else:
        batch = rng.integers(0, 256, (args.fwd_batch, win_px, win_px, 3), dtype=np.uint8)
    seg.forward(batch[:1, :256, :256])  # warm-up (lazy init, allocator), small
    if args.fwd_repeats > 1:
        seg.forward(batch)  # full-size warm-up
    times = []
    for _ in range(max(1, args.fwd_repeats)):
        t0 = time.perf_counter()
        seg.forward(batch)
        if seg.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    sec = statistics.median(times)
    mpx = batch.shape[0] * win_px * win_px / 1e6
    return {
        "model": spec,
        "mode": seg.mode,
        "device": str(seg.device),
        "threads": args.threads,
        "batch": int(batch.shape[0]),
        "window_px": win_px,
        "repeats": len(times),
        "batch_s": round(sec, 3),
        "mpx_per_s": round(mpx / sec, 4),
        "s_per_window": round(sec / batch.shape[0], 3),
        "input": "benchmark slide windows" if args.slide else "random pixels",
    }


def forward_throughput(spec: str, args, slide: Path | None, workdir: Path) -> dict:
    result = workdir / "forward.json"
    log_path = workdir / "forward.log"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "forward", "--result", str(result),
           "--fwd-model", spec, "--device", args.device, "--batch", str(args.fwd_batch), "--threads", str(args.threads),
           "--repeats", str(args.fwd_repeats)]
    if slide:
        cmd += ["--slide", str(slide)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    log.info("forward: model %s, batch %d x %d², %s", _model_label(spec), args.fwd_batch, window_px(), args.device)
    m = run_measured(cmd, env=env, cwd=str(ROOT), log_path=log_path)
    if m["rc"] != 0 or not result.exists():
        return {"model": _model_label(spec), "error": f"exit {m['rc']}: {_tail(log_path)}"}
    res = json.loads(result.read_text())
    res["model"] = _model_label(spec)
    res["peak_rss_gb"] = m["peak_rss_gb"]
    res["cpu_share"] = m["cpu_share"]
    log.info("forward: %.3f Mpx/s (%.2f s per batch)", res["mpx_per_s"], res["batch_s"])
    return res


# ----------------------------------------------------------------------------------------------
# Report


def _fmt(v, nd=2):
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def targets_check(res: dict) -> list[dict]:
    """Each target with the measured value (``None`` where not measured in this run)."""
    rows = []
    gpu = res["args"]["device"] == "cuda"
    ok_runs = [r for r in res.get("e2e", []) if "error" not in r]
    learned = [r for r in ok_runs if r["model"] != "classical"]
    if learned:
        if gpu:
            worst = max(r["s_per_mm2"] for r in learned)
            rows.append({"target": "GPU s/mm² (end to end)", "limit": TARGETS["gpu_s_per_mm2"], "value": worst})
            busy = [r.get("gpu_busy_pct_infer") for r in learned if r.get("gpu_busy_pct_infer") is not None]
            rows.append({"target": "GPU busy % during infer (min)", "limit": TARGETS["gpu_busy_pct"],
                         "value": min(busy) if busy else None, "higher_is_better": True})
        else:
            worst = max(r["s_per_mm2"] for r in learned)
            rows.append({"target": "CPU s/mm² (end to end, worst size)", "limit": TARGETS["cpu_wall_s_per_mm2"], "value": worst})
        rows.append({"target": "overhead ratio (worst size)", "limit": TARGETS["overhead_ratio"],
                     "value": max(r["overhead_ratio"] for r in learned)})
    big = [r for r in ok_runs if r["size_px"][0] >= 100_000]
    rows.append({"target": "peak RSS GB, 100k² slide", "limit": TARGETS["peak_rss_gb_100k"],
                 "value": max((max(r["peak_rss_gb"], r["peak_tree_rss_gb"]) for r in big), default=None)})
    se = res.get("stitch_export") or {}
    n = se.get("nuclei") or 0
    suffix = "" if n >= 900_000 else f" (measured at {n} nuclei)" if n else ""
    partial = bool(suffix)  # a smaller run is reported, but does not decide the 1 M target
    rows.append({"target": "stitch+export 1 M nuclei, s" + suffix, "limit": TARGETS["stitch_export_1m_s"],
                 "value": se.get("stitch_export_s"), "partial": partial})
    rows.append({"target": "stitch+export 1 M nuclei, peak RSS GB" + suffix,
                 "limit": TARGETS["stitch_export_1m_rss_gb"], "value": se.get("peak_rss_gb"), "partial": partial})
    for r in rows:
        v = r["value"]
        if v is None or r.get("partial"):
            r["met"] = None
        else:
            r["met"] = bool(v >= r["limit"]) if r.get("higher_is_better") else bool(v <= r["limit"])
    return rows


def markdown(res: dict) -> str:
    m = res["machine"]
    lines = [
        f"# Benchmark results ({'quick' if res['args']['quick'] else 'full'})",
        "",
        f"- date (UTC): {m['date_utc']}, git {m['git_commit']}{' (pipeline/ modified)' if m['git_dirty'] else ''}",
        f"- CPU: {m['cpu']}, {m['cores']} cores ({m['cores_usable']} usable), RAM {m['ram_gb']} GB; GPU: {m['gpu'] or 'none'}",
        f"- Python {m['python']}, torch {m['torch']}, numpy {m['numpy']}; device {res['args']['device']}",
        f"- load average at start {m['loadavg_start']}, at end {m.get('loadavg_end')}",
    ]
    if res["args"].get("note"):
        lines.append(f"- note: {res['args']['note']}")
    lines += [f"- suite wall time: {res.get('suite_wall_s', 0):.0f} s", ""]
    runs = res.get("e2e", [])
    if runs:
        lines += [
            "## End to end (`cellsam segment`)",
            "",
            "| slide | model | tissue mm² | chunks | nuclei | wall s | s/mm² | CPU s/mm² | store Mpx/s | overhead "
            "| peak RSS GB (proc / tree) | CPU share | network Mpx / window Mpx |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in runs:
            size = "x".join(str(v) for v in r["size_px"])
            if "error" in r:
                lines.append(f"| {size} | {r['model']} | error: {r['error'][:120]} ||||||||||")
                continue
            lines.append(
                f"| {size} | {r['model']} | {_fmt(r['tissue_area_mm2'])} | {r['tissue_chunks']} | {r['nuclei']} | "
                f"{_fmt(r['wall_s'], 1)} | {_fmt(r['s_per_mm2'])} | {_fmt(r['cpu_s_per_mm2'])} | "
                f"{_fmt(r['store_mpx_per_s'], 3)} | "
                f"{_fmt(r['overhead_ratio'], 3)} | {_fmt(r['peak_rss_gb'])} / {_fmt(r['peak_tree_rss_gb'])} | "
                f"{_fmt(r['cpu_share'])} | {_fmt(r.get('model_mpx'), 1)} / {_fmt(r.get('window_mpx'), 1)} |"
            )
        lines += ["", "Stage seconds (infer stages summed over worker threads; share = stage / wall):", ""]
        keys = list(STAGES) if any("stages_s" in r for r in runs) else []
        if keys:
            lines.append("| slide | model | " + " | ".join(keys) + " |")
            lines.append("|---|---|" + "---|" * len(keys))
            for r in runs:
                if "stages_s" not in r:
                    continue
                size = "x".join(str(v) for v in r["size_px"])
                cells = [f"{r['stages_s'].get(k, 0.0):.1f} ({100 * r['stages_s'].get(k, 0.0) / r['wall_s']:.0f} %)" for k in keys]
                lines.append(f"| {size} | {r['model']} | " + " | ".join(cells) + " |")
        gpu_runs = [r for r in runs if r.get("gpu_busy_pct_infer") is not None]
        for r in gpu_runs:
            lines.append(f"- GPU busy {r['model']} {r['size_px'][0]}²: {r['gpu_busy_pct_infer']} % during infer, "
                         f"{r['gpu_busy_pct_total']} % over the run, peak {r['gpu_peak_mem_gb']} GB")
        lines.append("")
    curve = res.get("stitch_export_curve") or ([res["stitch_export"]] if res.get("stitch_export") else [])
    if curve:
        lines += ["## Stitch + export at scale (synthetic chunk files, streamed strip by strip)", "",
                  "| nuclei | candidates | chunk files | stitch s (scan + dedup) | export s (strips + GeoJSON.gz + "
                  "GeoParquet) | stitch+export s | peak RSS GB | most rows held | CPU share |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for se in curve:
            if "error" in se:
                lines.append(f"| {se.get('nuclei_requested')} | error: {se['error']} | | | | | | | |")
                continue
            lines.append(
                f"| {se.get('nuclei')} | {se.get('instances')} | {se.get('chunk_files')} | {_fmt(se.get('stitch_s'), 1)} | "
                f"{_fmt(se.get('export_s'), 1)} | {_fmt(se.get('stitch_export_s'), 1)} | {_fmt(se.get('peak_rss_gb'))} | "
                f"{se.get('peak_cached_rows', '–')} | {_fmt(se.get('cpu_share'))} |")
        lines.append("")
    fw = res.get("forward")
    if fw:
        lines += ["## Model forward throughput", ""]
        if "error" in fw:
            lines.append(f"error: {fw['error']}")
        else:
            lines.append(
                f"{fw['model']} ({fw['mode']}, {fw['device']}, {fw['threads']} threads): batch {fw['batch']} x "
                f"{fw['window_px']}² in {fw['batch_s']:.2f} s = **{fw['mpx_per_s']:.3f} Mpx/s** "
                f"({fw['s_per_window']:.2f} s per window, median of {fw['repeats']}, {fw['input']}, CPU share "
                f"{_fmt(fw.get('cpu_share'))})"
            )
        lines.append("")
    lines += ["## Targets", "", "| target | limit | measured | met |", "|---|---|---|---|"]
    for t in res.get("targets", []):
        met = {True: "yes", False: "no", None: "not measured"}[t["met"]]
        lines.append(f"| {t['target']} | {t['limit']} | {_fmt(t['value'], 3)} | {met} |")
    lines.append("")
    return "\n".join(lines)


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------


def _sizes(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        if part:
            out.append(int(float(part[:-1]) * 1000) if part.endswith("k") else int(part))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help=f"{QUICK_SIZE}² slide end to end, stitch+export of {QUICK_NUCLEI} nuclei, forward throughput")
    ap.add_argument("--sizes", default=None, help="slide edges, px (default: 10000,30000,100000; --quick: 4096)")
    ap.add_argument("--model", default=None,
                    help="comma list of default|classical|CKPT (default: default; --quick: default,classical)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--batch-size", type=int, default=None, help="cellsam --batch-size (default: the pipeline's)")
    ap.add_argument("--workers", type=int, default=None, help="cellsam --workers (default: the pipeline's)")
    ap.add_argument("--nuclei", default=None,
                    help="stitch+export benchmark sizes, comma-separated (default 1000000,3000000: the memory "
                         "curve; --quick 200000; 0: skip)")
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--skip-forward", action="store_true")
    ap.add_argument("--fwd-batch", "--batch", dest="fwd_batch", type=int, default=4, help="forward-throughput batch")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the forward-throughput worker")
    ap.add_argument("--fwd-repeats", "--repeats", dest="fwd_repeats", type=int, default=None,
                    help="timed forward batches (median); > 1 adds a full-size warm-up batch (default 3, --quick 1)")
    ap.add_argument("--seed", type=int, default=0, help="benchmark slide seed")
    ap.add_argument("--keep", action="store_true", help="keep the segment outputs (benchmarks/data/runs)")
    ap.add_argument("--note", default="", help="free text recorded with the machine (e.g. other load)")
    ap.add_argument("--out", default=str(RESULTS / "latest.json"), help="JSON result; markdown next to it (.md)")
    ap.add_argument("--worker", choices=["forward"], help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--fwd-model", help=argparse.SUPPRESS)
    ap.add_argument("--slide", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        res = worker_forward(args)
        Path(args.result).write_text(json.dumps(res))
        return 0

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    sizes = _sizes(args.sizes) if args.sizes else ([QUICK_SIZE] if args.quick else list(FULL_SIZES))
    models = [m.strip() for m in (args.model or ("default,classical" if args.quick else "default")).split(",") if m.strip()]
    if args.nuclei is None:
        args.nuclei = str(QUICK_NUCLEI) if args.quick else "1000000,3000000"
    args.nuclei = [int(v) for v in str(args.nuclei).split(",") if int(v) > 0]
    if args.fwd_repeats is None:
        args.fwd_repeats = 1 if args.quick else 3
    for spec in models:
        if spec not in ("default", "quality", "classical") and not Path(spec).exists():
            print(f"run.py: error: --model {spec}: checkpoint not found", file=sys.stderr)
            return 2
    if args.device == "cuda" and not gpu_name():
        log.warning("--device cuda but nvidia-smi is not available: GPU busy %% will not be measured")

    sys.path.insert(0, str(BENCH))
    import make_slide

    t_suite = time.perf_counter()
    res = {"schema_version": SCHEMA_VERSION, "machine": machine_info(), "targets_def": TARGETS,
           "args": {"quick": args.quick, "sizes": sizes, "models": [_model_label(m) for m in models],
                    "device": args.device, "batch_size": args.batch_size, "workers": args.workers,
                    "nuclei": args.nuclei, "seed": args.seed, "note": args.note},
           "slides": [], "e2e": []}
    runs_dir = make_slide.DATA_DIR / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)

    def save():
        res["machine"]["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
        res["suite_wall_s"] = round(time.perf_counter() - t_suite, 1)
        res["targets"] = targets_check(res)
        _write_atomic(out, json.dumps(res, indent=2, sort_keys=True) + "\n")
        _write_atomic(out.with_suffix(".md"), markdown(res))

    first_slide = None
    if not args.skip_e2e:
        for size in sizes:
            t0 = time.perf_counter()
            slide, info = make_slide.ensure_slide(size, seed=args.seed)
            log.info("slide %s ready (%.0f s): tissue %.0f %%, %d levels, %.0f MB", slide.name,
                     time.perf_counter() - t0, 100 * info["tissue_fraction"], info["levels"], info["bytes"] / 1e6)
            res["slides"].append(info)
            first_slide = first_slide or slide
            for spec in models:
                res["e2e"].append(e2e(slide, info, spec, args, runs_dir))
                save()
    if args.nuclei:
        res["stitch_export_curve"] = []
        for n in args.nuclei:
            with tempfile.TemporaryDirectory(prefix="stitch-", dir=runs_dir) as tmp:
                res["stitch_export_curve"].append(stitch_export(n, Path(tmp)))
            # the target is about 1 M nuclei: report the run closest to it
            res["stitch_export"] = min(res["stitch_export_curve"], key=lambda r: abs(r["nuclei_requested"] - 1_000_000))
            save()
    if not args.skip_forward:
        learned = [m for m in models if m != "classical"]
        spec = learned[0] if learned else "default"
        if spec == "default":
            weights = ROOT / "pipeline" / "weights" / "cellsam_default.pt"
            if not weights.exists():
                log.warning("shipped weights %s missing: forward throughput with random weights (same architecture)", weights)
                spec = "random"
        with tempfile.TemporaryDirectory(prefix="forward-", dir=runs_dir) as tmp:
            res["forward"] = forward_throughput(spec, args, first_slide, Path(tmp))
        save()
    save()
    print(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
