"""Whole-slide inference: run a segmentation model over the tissue chunks of an OME-Zarr store.

Stage ``infer``: ``store.ome.zarr`` -> ``chunks/<row>_<col>.parquet`` (one file per tissue chunk).

Grid
    The *cores* are the store's chunks (``attrs["chunk_px"]``): chunk ``(row, col)`` covers the
    half-open store-pixel box ``[row*c, min((row+1)*c, H)) x [col*c, min((col+1)*c, W))``. Each
    core is read with ``SegmentConfig.halo_px`` of context on every side; outside the slide the
    window is white (``store.read_window``), so every window has the same size
    ``chunk_px + 2*halo_px`` and windows batch. Only the chunks listed in
    ``attrs["tissue_chunks"]`` are processed.

Per chunk
    With ``SegmentConfig.crop_to_tissue`` the model sees only :func:`model_box` of the window: the
    bounding box of the store's tissue mask (``labels/tissue``) in the window, grown by
    ``tissue_margin_px``; at the tissue's edge that skips most of the background (about a quarter
    of all window pixels on the benchmark slides), inside the tissue the box is the whole window.
    model -> ``(labels uint32 (H, W), scores float32 (K,))`` -> :func:`pipeline.stitch.extract_chunk_instances`
    (drops truncated masks, keeps instances whose anchor lies in the core + eps, polygonizes in
    store pixels, measures) -> ``chunks/<row>_<col>.parquet`` written atomically (temp + rename).
    A chunk without nuclei still gets a (zero-row) file: the file's existence means "done".

Resume
    A rerun skips chunks whose parquet exists. ``chunks/_meta.json`` records everything the
    chunk files depend on (store identity, model identity, halo, eps, min area, chunk, mpp); if it
    differs from the current run, the stale chunk files are removed first.

Scheduling
    Batches of ``batch_size`` chunks are dask tasks (``read -> model -> extract -> write``), run
    by the threaded scheduler with ``workers`` threads, or by a ``dask.distributed`` scheduler
    (``scheduler="tcp://host:port"``; the model is then loaded once per worker process through a
    cached loader). The network forward is serialized per process (one forward at a time, using
    all intra-op threads or the GPU): the shipped segmenter holds its own lock around the forward
    only, so the watershed decoding of one window runs beside the next forward; a user model
    without ``thread_safe`` is called under a per-process lock. Other threads read the next windows
    and polygonize the previous ones,
    so at most ``workers * batch_size`` windows are in memory (the bounded prefetch queue):
    memory does not grow with the slide.

Determinism
    Chunk files depend only on the store, the model and the parameters: the batches are formed
    from the sorted chunk list, results are written per chunk, nothing depends on thread timing.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .config import SegmentConfig
from .errors import InputError, ModelError, StoreError
from .paths import atomic_write, public_value
from .testhooks import pause_point

log = logging.getLogger(__name__)

META_NAME = "_meta.json"
TIMINGS_NAME = "_timings.json"  # stage timings of the last run (the only non-deterministic file)
PROBE_NAME = "_mpp_probe.json"  # the model's scale probe on a few tissue tiles (pipeline.mppcheck)
META_SCHEMA_VERSION = 1
CLASSICAL = "classical"  # model spec: the classical (non-learned) baseline segmenter
TIMING_KEYS = ("read_s", "model_s", "postprocess_s", "extract_s", "focus_s", "write_s")

# One forward pass at a time per process (the GPU); models flagged thread-safe skip it.
_MODEL_LOCK = threading.Lock()


# --------------------------------------------------------------------------------------------
# Pure core: grid and batches
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChunkWindow:
    """Geometry of one chunk, in store pixels (row, col).

    Attributes
    ----------
    chunk_rc : (int, int)
        Chunk index (row, col) in the store's chunk grid.
    core_box_rc : (int, int, int, int)
        ``(row0, col0, row1, col1)`` half-open core box, clipped to the store.
    window_origin_rc : (int, int)
        Store pixel of the window's top-left pixel (may be negative at the slide border).
    window_px : int
        Edge of the square read window, ``chunk_px + 2 * halo_px``. The model sees the whole
        window (white outside the store); its labels are cropped to :meth:`clipped_box_rc`
        before extraction, so masks are only ever cut at the slide edge.
    """

    chunk_rc: tuple[int, int]
    core_box_rc: tuple[int, int, int, int]
    window_origin_rc: tuple[int, int]
    window_px: int

    def clipped_box_rc(self, shape_rc: Sequence[int]) -> tuple[int, int, int, int]:
        """The part of the window inside the store, ``(row0, col0, row1, col1)`` half-open."""
        r0, c0 = self.window_origin_rc
        return (
            max(r0, 0),
            max(c0, 0),
            min(r0 + self.window_px, int(shape_rc[0])),
            min(c0 + self.window_px, int(shape_rc[1])),
        )


def chunk_windows(
    shape_rc: Sequence[int], chunk_px: int, halo_px: int, chunks_rc: Sequence[Sequence[int]]
) -> list[ChunkWindow]:
    """Windows of the given chunks, sorted by (row, col).

    Parameters
    ----------
    shape_rc : (int, int)
        Store level-0 shape (rows, cols), store pixels.
    chunk_px : int
        Chunk (core) edge, store pixels.
    halo_px : int
        Context read on every side of the core, store pixels.
    chunks_rc : sequence of (int, int)
        Chunk indices to process.

    Raises
    ------
    StoreError
        If a chunk index lies outside the store.
    """
    height, width = int(shape_rc[0]), int(shape_rc[1])
    n_rows = -(-height // chunk_px)
    n_cols = -(-width // chunk_px)
    out = []
    for row, col in sorted({(int(r), int(c)) for r, c in chunks_rc}):
        if not (0 <= row < n_rows and 0 <= col < n_cols):
            raise StoreError(f"tissue chunk ({row}, {col}) outside the {n_rows}x{n_cols} chunk grid of the store")
        r0, c0 = row * chunk_px, col * chunk_px
        core = (r0, c0, min(r0 + chunk_px, height), min(c0 + chunk_px, width))
        out.append(ChunkWindow((row, col), core, (r0 - halo_px, c0 - halo_px), chunk_px + 2 * halo_px))
    return out


def model_box(tissue: np.ndarray, margin_px: int, multiple: int = 16,
              half_or_whole: bool = False) -> tuple[int, int, int, int] | None:
    """The part of a window the model runs on: the bounding box of the window's tissue pixels,
    grown by ``margin_px`` and outward to multiples of ``multiple``, clipped to the window.

    Parameters
    ----------
    tissue : ndarray of shape (H, W), bool
        Tissue mask of the window (window pixels).
    margin_px : int
        Context kept around the tissue, window pixels.
    multiple : int
        Alignment of the box edges (the network's stride).
    half_or_whole : bool
        Snap each side of the box to either half the window (aligned to ``multiple``, placed to
        cover the tissue span, inside the window) or the whole window: at most four box shapes per
        window size, for engines that compile one static-shape model per input shape
        (OpenVINO, ``Engine.static_shapes``), whose memory grows with every shape kept.

    Returns
    -------
    (row0, col0, row1, col1) or None
        Half-open box in window pixels; ``None`` if the window holds no tissue.
    """
    rows = np.flatnonzero(tissue.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(tissue.any(axis=0))

    def span(idx: np.ndarray, size: int) -> tuple[int, int]:
        lo = max(0, (int(idx[0]) - margin_px) // multiple * multiple)
        hi = min(size, -(-(int(idx[-1]) + 1 + margin_px) // multiple) * multiple)
        if half_or_whole:
            half = size // 2 // multiple * multiple
            if half <= 0 or hi - lo > half:
                return 0, size
            lo = min(lo, size - half)
            return lo, lo + half
        return lo, hi

    (r0, r1), (c0, c1) = span(rows, tissue.shape[0]), span(cols, tissue.shape[1])
    return r0, c0, r1, c1


def make_batches(items: Sequence[Any], batch_size: int) -> list[list[Any]]:
    """Split ``items`` into consecutive batches of at most ``batch_size``."""
    return [list(items[i : i + batch_size]) for i in range(0, len(items), batch_size)]


def chunk_path(chunks_dir: str | os.PathLike, chunk_rc: Sequence[int]) -> Path:
    """``chunks_dir/<row>_<col>.parquet``."""
    return Path(chunks_dir) / f"{int(chunk_rc[0])}_{int(chunk_rc[1])}.parquet"


def parse_chunk_name(name: str) -> tuple[int, int] | None:
    """``"3_7.parquet"`` -> ``(3, 7)``; anything else -> ``None``."""
    if not name.endswith(".parquet"):
        return None
    parts = name[: -len(".parquet")].split("_")
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        return None
    return int(parts[0]), int(parts[1])


# --------------------------------------------------------------------------------------------
# Model boundary: a callable ``segment_batch(images uint8 (N,H,W,3)) -> [(labels, scores)]``
# --------------------------------------------------------------------------------------------


class Model:
    """A segmentation callable plus what the pipeline needs to know about it.

    Parameters
    ----------
    segment_batch : callable
        ``segment_batch(images uint8 (N, H, W, 3)[, timings=dict]) -> list of (labels uint32 (H, W),
        scores float32 (K,))`` where ``scores[i]`` belongs to label ``i + 1``.
    mpp : float or None
        µm/px the model expects its input at; ``None`` = any (the store's mpp is used).
    info : dict
        JSON-serializable identity (name, version, weights hash...), recorded in ``_meta.json``
        and the summary; a change invalidates existing chunk files.
    thread_safe : bool
        If False (default), calls are serialized per process.
    static_shapes : bool
        The network compiles one model per input shape (OpenVINO): tissue boxes are snapped to
        half or whole windows (:func:`model_box`) so that few shapes occur.
    class_names : sequence of str
        Nucleus classes of a type head (display names, in output-channel order); empty = no type
        head. With a head, ``segment_batch`` returns 3-tuples ``(labels, scores, class_probs
        float32 (K, C))``, row ``i`` for label ``i + 1``, ``C = len(class_names)``. The names
        are part of the model identity (``info["classes"]``): a changed head invalidates chunks.
    rejects : bool
        The model removes instances as "not a nucleus" (a typed model only). It is called with
        ``keep_rejected=True`` and returns 5-tuples ``(labels, scores, class_probs, not_nucleus
        float32 (K,), rejected bool (K,))``: nothing removed, the chunk tables flag them
        (:func:`pipeline.stitch.chunk_schema` ``reject``) and the export writes them apart.
    """

    def __init__(self, segment_batch: Callable, *, mpp: float | None, info: dict, thread_safe: bool = False,
                 static_shapes: bool = False, class_names=(), rejects: bool = False):
        self.segment_batch = segment_batch
        self.class_names = tuple(str(n) for n in (class_names or ()))
        if self.class_names:
            info = {**info, "classes": list(self.class_names)}
        self.rejects = bool(rejects)
        if self.rejects and not self.class_names:
            raise ModelError("a model that rejects instances must have class_names (it types its nuclei)")
        if self.rejects:
            info = {**info, "flags_rejected": True}  # chunk tables with the reject columns
        self.static_shapes = static_shapes  # the network compiles per input shape: few box shapes (model_box)
        self.mpp = mpp
        self.info = info
        self.thread_safe = thread_safe
        try:
            params = inspect.signature(segment_batch).parameters
            self.accepts_timings = "timings" in params or any(
                p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()
            )
        except (TypeError, ValueError):  # builtins without a signature
            self.accepts_timings = False

    def __call__(self, images: np.ndarray, timings: dict) -> list[tuple[np.ndarray, np.ndarray]]:
        start = time.perf_counter()
        extra = {"keep_rejected": True} if self.rejects else {}
        if self.accepts_timings:
            out = self.segment_batch(images, timings=timings, **extra)
        else:
            out = self.segment_batch(images, **extra)
            timings["model_s"] = timings.get("model_s", 0.0) + time.perf_counter() - start
        out = list(out)
        if len(out) != len(images):
            raise ModelError(f"model returned {len(out)} results for a batch of {len(images)} tiles")
        return out


def classical_segment_batch(mpp: float) -> Callable:
    """Batch wrapper around the classical segmenter :func:`pipeline.baseline.segment_classical`."""
    from .baseline import segment_classical

    def segment_batch(images):
        return [segment_classical(np.asarray(img), mpp) for img in images]

    return segment_batch


@functools.lru_cache(maxsize=4)
def _load_model_cached(spec: str | None, device: str, refine: bool, classical_mpp: float | None,
                       engine: str = "auto", precision: str = "auto", teacher: str | None = None,
                       min_score: float | None = None, reject_threshold: float | None = None) -> Model:
    """Load a model once per process (dask workers reuse it across tasks)."""
    if spec == CLASSICAL:
        return Model(
            classical_segment_batch(classical_mpp),
            mpp=None,
            info={"name": CLASSICAL, "module": "pipeline.baseline"},
            thread_safe=True,
        )
    from .model import load_model  # heavy import (torch) only when needed
    from .model.checkpoint import resolve_weights

    seg = load_model(spec, device=device, refine=refine, engine=engine, precision=precision, teacher=teacher,
                     min_score=min_score)
    if reject_threshold is not None and not seg.rejects:
        # a head with a reject output but no threshold of its own: the override turns rejection on.
        # A model that rejects keeps its own rule here: the chunks flag by it and carry the
        # probability, and the export applies the override (pipeline.assemble.split_rejected)
        seg.set_reject_threshold(float(reject_threshold))
    model = _wrap_segmenter(seg)
    model.info["min_score"] = float(seg.params.min_score)  # in the chunk meta: a change recomputes
    if seg.reject_threshold is not None:
        model.info["reject_threshold"] = seg.reject_threshold
    weights = resolve_weights(spec)
    model.info["weights_file"] = weights.name
    model.info["weights_sha256"] = _sha256(weights)
    attached = getattr(getattr(seg, "model", None), "teacher", None)
    if attached is not None and seg.mode == "dual":  # dual mode: the SAM teacher's identity (never a path)
        model.info["teacher_file"] = attached.info["file"]
        model.info["teacher_sha256"] = attached.info["sha256"]
        model.info["teacher_type"] = attached.info["type"]
        model.info["teacher_tile_px"] = attached.info["tile_px"]
    return model


def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _wrap_segmenter(seg: Any) -> Model:
    meta = dict(getattr(seg, "metadata", {}) or {})
    info = {k: v for k, v in meta.items() if isinstance(v, (str, int, float, bool)) and k not in {"path", "device"}}
    info = public_value(info)  # e.g. "init": a training machine's absolute path -> the file name
    info.setdefault("name", type(seg).__name__)
    mpp = getattr(seg, "mpp", None)
    # a Segmenter serialises its own network calls and decodes outside its lock: thread safe
    safe = getattr(seg, "_lock", None) is not None
    static = bool(getattr(getattr(seg, "engine", None), "static_shapes", False))
    classes = getattr(seg, "class_names", None) or meta.get("classes") or ()
    return Model(seg.segment_batch, mpp=float(mpp) if mpp is not None else None, info=info, thread_safe=safe,
                 static_shapes=static, class_names=classes, rejects=bool(getattr(seg, "rejects", False)))


def resolve_model(model: Any, *, device: str, refine: bool, store_mpp: float, engine: str = "auto",
                  precision: str = "auto", teacher: Any = None, min_score: float | None = None,
                  reject_threshold: float | None = None) -> Model:
    """Turn a model spec into a :class:`Model`.

    Parameters
    ----------
    model : None, str, path, Model, object with ``segment_batch`` or callable
        ``None`` = the shipped default weights; ``"classical"`` = the classical baseline; a path =
        a checkpoint for :func:`pipeline.model.load_model`; an object with ``segment_batch`` (a
        ``Segmenter``); a plain callable ``segment_batch(images) -> [(labels, scores)]``.
    device, refine, engine, precision
        Passed to :func:`pipeline.model.load_model` (engine/precision: :mod:`pipeline.model.engine`).
    store_mpp : float
        µm/px of the store (used by resolution-agnostic models).
    teacher : path, optional
        SAM ViT checkpoint for a dual checkpoint (:func:`pipeline.model.load_model`); its file name
        and sha256 go into ``Model.info`` (``teacher_file``, ``teacher_sha256``).
    min_score : float, optional
        Minimum instance score of a checkpoint's decoding (``PostprocessParams.min_score``);
        ``None`` = the checkpoint's own (shipped: 0.82), 0 = keep every instance. Recorded as
        ``Model.info["min_score"]``. Ignored for the classical model and for model objects.
    reject_threshold : float, optional
        "Not a nucleus" threshold for a checkpoint whose type head has a reject output but no
        threshold of its own (it turns rejection on). A checkpoint that already rejects (both
        shipped models, 0.7) keeps its own: the chunk files do not depend on the override, which
        the export applies (:func:`pipeline.assemble.split_rejected`). Recorded as
        ``Model.info["reject_threshold"]`` for models that reject. Ignored like ``min_score``.
    """
    if isinstance(model, Model):
        return model
    if model is None or isinstance(model, (str, os.PathLike)):
        spec = None if model is None else str(model)
        if spec not in (None, CLASSICAL):
            from .model.checkpoint import NAMED_WEIGHTS, resolve_weights

            if not resolve_weights(spec).exists():
                raise ModelError(f"{spec}: model checkpoint not found (use a .pt file, a shipped model: "
                                 f"{', '.join(NAMED_WEIGHTS)}, 'classical', or omit --model)")
        if teacher is not None and spec == CLASSICAL:
            raise ModelError("--teacher applies to a dual CellSAM checkpoint, not to the classical model")
        return _load_model_cached(spec, device, bool(refine), float(store_mpp) if spec == CLASSICAL else None,
                                  str(engine), str(precision), None if teacher is None else str(teacher),
                                  None if min_score is None or spec == CLASSICAL else float(min_score),
                                  None if reject_threshold is None or spec == CLASSICAL else float(reject_threshold))
    if hasattr(model, "segment_batch"):
        return _wrap_segmenter(model)
    if callable(model):
        name = getattr(model, "__qualname__", type(model).__name__)
        return Model(model, mpp=None, info={"name": f"callable:{name}"},
                     class_names=getattr(model, "class_names", None) or ())
    raise ModelError(f"unsupported model spec {model!r}")


# --------------------------------------------------------------------------------------------
# I/O shell
# --------------------------------------------------------------------------------------------


def _open_store_cached(store_path: str):
    """``open_store`` once per process and store version (dask workers reuse the handle)."""
    try:
        stamp = (Path(store_path) / ".zattrs").stat().st_mtime_ns
    except OSError:
        stamp = None
    return _open_store_versioned(store_path, stamp)


@functools.lru_cache(maxsize=8)
def _open_store_versioned(store_path: str, stamp: int | None):
    from .store import open_store

    return open_store(store_path)


def _write_table_atomic(table: Any, path: Path) -> None:
    import pyarrow.parquet as pq

    atomic_write(path, lambda tmp: pq.write_table(table, tmp, compression="zstd"))


def process_batch(
    store_path: str,
    windows: Sequence[ChunkWindow],
    chunks_dir: str,
    model_spec: Any,
    cfg: SegmentConfig,
) -> dict:
    """Read, segment, extract and write one batch of chunks (one dask task).

    Returns
    -------
    dict
        ``{"chunks": n, "instances": n, "timings_s": {...}}``.
    """
    from .focus import FOCUS_KEY, encode_core_focus
    from .stitch import extract_chunk_instances
    from .store import read_tissue_window, read_window

    group, attrs = _open_store_cached(str(store_path))
    mpp = float(attrs["mpp"])
    model = resolve_model(model_spec, device=cfg.device, refine=cfg.refine, store_mpp=mpp, engine=cfg.engine,
                          precision=cfg.precision, teacher=cfg.teacher, min_score=cfg.min_score,
                          reject_threshold=cfg.reject_threshold)
    timings = dict.fromkeys(TIMING_KEYS, 0.0)

    t0 = time.perf_counter()
    side = windows[0].window_px
    images = np.empty((len(windows), side, side, 3), np.uint8)
    boxes: list[tuple[int, int, int, int] | None] = []
    tissues = np.empty((len(windows), side, side), bool)  # for the model box and the focus score
    for i, w in enumerate(windows):
        images[i] = read_window(group, w.window_origin_rc[0], w.window_origin_rc[1], side, side)
        tissues[i] = read_tissue_window(group, w.window_origin_rc[0], w.window_origin_rc[1], side, side)
        if cfg.crop_to_tissue:
            boxes.append(model_box(tissues[i], cfg.tissue_margin_px, half_or_whole=model.static_shapes))
        else:
            boxes.append((0, 0, side, side))
    timings["read_s"] += time.perf_counter() - t0
    # pixels through the network vs whole windows (deterministic; reported with the timings)
    timings["window_mpx"] = len(windows) * side * side / 1e6
    timings["model_mpx"] = sum((b[2] - b[0]) * (b[3] - b[1]) for b in boxes if b is not None) / 1e6

    model_timings: dict = {}
    results = _run_model_on_boxes(model, images, boxes, model_timings)
    timings["model_s"] += float(model_timings.get("model_s", 0.0))
    timings["postprocess_s"] += float(model_timings.get("postprocess_s", 0.0))

    n_inst = 0
    shape_rc = tuple(int(v) for v in attrs["shape_rc"])
    for w, img, tissue, res in zip(windows, images, tissues, results):
        labels, scores = res[0], res[1]
        class_probs = res[2] if model.class_names else None
        not_nucleus, rejected = (res[3], res[4]) if model.rejects else (None, None)
        t0 = time.perf_counter()
        (r0, c0, r1, c1) = w.clipped_box_rc(shape_rc)
        dr, dc = r0 - w.window_origin_rc[0], c0 - w.window_origin_rc[1]
        table = extract_chunk_instances(
            np.ascontiguousarray(labels[dr : dr + r1 - r0, dc : dc + c1 - c0]),
            np.asarray(scores, np.float32),
            np.ascontiguousarray(img[dr : dr + r1 - r0, dc : dc + c1 - c0]),
            window_origin_rc=(r0, c0),
            core_box_rc=w.core_box_rc,
            store_shape_rc=shape_rc,
            mpp=mpp,
            eps_px=cfg.anchor_eps_px,
            min_area_um2=cfg.min_area_um2,
            max_area_um2=cfg.max_area_um2,
            min_circularity=cfg.min_circularity,
            chunk_rc=w.chunk_rc,
            class_probs=class_probs,
            class_names=model.class_names,
            not_nucleus=not_nucleus,
            rejected=rejected,
        )
        t1 = time.perf_counter()
        cr0, cc0, cr1, cc1 = w.core_box_rc
        core = np.s_[cr0 - w.window_origin_rc[0]: cr1 - w.window_origin_rc[0],
                     cc0 - w.window_origin_rc[1]: cc1 - w.window_origin_rc[1]]
        md = dict(table.schema.metadata or {})
        md[FOCUS_KEY] = encode_core_focus(img[core], tissue[core], mpp)
        table = table.replace_schema_metadata(md)
        t2 = time.perf_counter()
        _write_table_atomic(table, chunk_path(chunks_dir, w.chunk_rc))
        timings["extract_s"] += t1 - t0
        timings["focus_s"] += t2 - t1
        timings["write_s"] += time.perf_counter() - t2
        n_inst += len(table)
    return {"chunks": len(windows), "instances": n_inst, "timings_s": timings}


def _run_model_on_boxes(model: Model, images: np.ndarray, boxes: list, timings: dict) -> list:
    """Run ``model`` on each window's ``box`` (windows with equal box shapes batched together) and
    paste the labels back into full-window label images (0 outside the box).

    Returns ``(labels, scores)`` per window, or ``(labels, scores, class_probs (K, C) float32)``
    for a model with a type head (:attr:`Model.class_names`), + ``(not_nucleus (K,), rejected
    (K,))`` for a model that :attr:`Model.rejects`."""
    results: list = [None] * len(images)
    groups: dict = {}
    n_cls = len(model.class_names)
    n_out = 5 if model.rejects else 3 if n_cls else 2
    for i, box in enumerate(boxes):
        if box is None:
            empty = (np.zeros(images.shape[1:3], np.uint32), np.zeros(0, np.float32))
            results[i] = empty + ((np.zeros((0, n_cls), np.float32),) if n_cls else ()) + (
                (np.zeros(0, np.float32), np.zeros(0, bool)) if model.rejects else ())
        else:
            groups.setdefault((box[2] - box[0], box[3] - box[1]), []).append(i)
    for idx in groups.values():
        crops = np.stack([images[i, boxes[i][0]:boxes[i][2], boxes[i][1]:boxes[i][3]] for i in idx])
        if model.thread_safe:
            out = model(crops, timings)
        else:
            with _MODEL_LOCK:
                out = model(crops, timings)
        for i, res in zip(idx, out):
            if len(res) != n_out:
                raise ModelError(f"model returned {len(res)}-tuples; a model with "
                                 + ("rejection must return (labels, scores, class_probs, not_nucleus, rejected)"
                                    if model.rejects else
                                    f"classes {list(model.class_names)} must return (labels, scores, class_probs)"
                                    if n_cls else "no class_names must return (labels, scores)"))
            labels, scores = res[0], res[1]
            r0, c0, r1, c1 = boxes[i]
            labels = np.asarray(labels)
            if labels.shape != (r1 - r0, c1 - c0) or labels.dtype != np.uint32:
                raise ModelError(f"model returned labels {labels.dtype}{labels.shape} for a {(r1 - r0, c1 - c0)} "
                                 "tile (need uint32 of the tile size)")
            if labels.shape != images.shape[1:3]:
                full = np.zeros(images.shape[1:3], np.uint32)
                full[r0:r1, c0:c1] = labels
                labels = full
            if n_cls:
                probs = np.asarray(res[2], np.float32)
                if probs.ndim != 2 or probs.shape[1] != n_cls:
                    raise ModelError(f"model returned class_probs of shape {probs.shape}; need (K, {n_cls}) for "
                                     f"classes {list(model.class_names)}")
                results[i] = (labels, scores, probs) + (tuple(res[3:5]) if model.rejects else ())
            else:
                results[i] = (labels, scores)
    return results


def chunks_meta(attrs: dict, model: Model, cfg: SegmentConfig) -> dict:
    """Everything the chunk files depend on (compared on resume)."""
    return {
        "schema_version": META_SCHEMA_VERSION,
        "store": {
            "slide_id": attrs.get("slide_id"),
            "source_sha256": attrs.get("source_sha256"),
            "mpp": float(attrs["mpp"]),
            "shape_rc": [int(v) for v in attrs["shape_rc"]],
            "chunk_px": int(attrs["chunk_px"]),
        },
        "model": model.info,
        "refine": bool(cfg.refine),
        "halo_px": int(cfg.halo_px),
        "anchor_eps_px": float(cfg.anchor_eps_px),
        "min_area_um2": float(cfg.min_area_um2),
        "max_area_um2": float(cfg.max_area_um2),
        "min_circularity": float(cfg.min_circularity),
        "tissue_margin_px": int(cfg.tissue_margin_px) if cfg.crop_to_tissue else None,
    }


def _write_json_atomic(obj: Any, path: Path) -> None:
    text = json.dumps(obj, indent=2, sort_keys=True) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def prepare_chunks_dir(chunks_dir: Path, meta: dict) -> set[tuple[int, int]]:
    """Create ``chunks_dir``, drop stale files, record ``_meta.json``; return the chunks already done.

    Leftover temp files of killed runs are removed. If ``_meta.json`` is missing or differs from
    ``meta`` every chunk file is removed (logged), since it was computed with other parameters.
    """
    chunks_dir.mkdir(parents=True, exist_ok=True)
    for tmp in chunks_dir.glob("*.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and _pid_alive(int(pid)):
            continue  # another live process is writing it
        tmp.unlink(missing_ok=True)
    done = {rc for rc in (parse_chunk_name(p.name) for p in chunks_dir.iterdir()) if rc is not None}
    meta_path = chunks_dir / META_NAME
    old = None
    if meta_path.exists():
        try:
            old = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            old = None
    if old != meta:
        if done:
            log.warning(
                "infer: %d chunk files in %s were computed with other parameters/model; recomputing", len(done), chunks_dir
            )
            for rc in done:
                chunk_path(chunks_dir, rc).unlink(missing_ok=True)
            done = set()
        _write_json_atomic(meta, meta_path)
    return done


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _progress(total: int, quiet: bool):
    from .progress import Progress  # a bar on a terminal, a line per 10 % in logs

    return Progress(total, "infer", "chunk", quiet=bool(quiet))


def _run_threaded(tasks, workers: int, on_done: Callable[[dict], None]) -> None:
    import dask
    from dask.callbacks import Callback

    keys = {t.key for t in tasks}

    class _Progress(Callback):
        def _posttask(self, key, result, dsk, state, worker_id):
            if key in keys:
                on_done(result)

    with _Progress():
        dask.compute(*tasks, scheduler="threads", num_workers=workers)


def _run_distributed(tasks, address: str, on_done: Callable[[dict], None]) -> None:
    try:
        from distributed import Client, as_completed
    except ImportError as exc:  # pragma: no cover - distributed is a dependency
        raise InputError(f"--scheduler {address}: dask.distributed is not installed") from exc
    try:
        client = Client(address, timeout="30s", set_as_default=False)
    except (OSError, TimeoutError) as exc:
        raise InputError(f"--scheduler {address}: cannot connect to the dask scheduler ({exc})") from exc
    try:
        futures = client.compute(list(tasks))
        for fut in as_completed(futures, loop=client.loop):
            on_done(fut.result())
    finally:
        client.close()


def run_infer(
    store_path: str | os.PathLike,
    chunks_dir: str | os.PathLike,
    *,
    model: Any = None,
    cfg: SegmentConfig = SegmentConfig(),
    scheduler: str | None = None,
    quiet: bool = False,
) -> dict:
    """Segment every tissue chunk of a store into ``chunks_dir`` (resumable).

    Parameters
    ----------
    store_path : path
        OME-Zarr store written by ``cellsam tile`` (complete).
    chunks_dir : path
        Output directory for ``<row>_<col>.parquet`` files and ``_meta.json``.
    model : see :func:`resolve_model`
        ``None`` = shipped default weights, ``"classical"``, a checkpoint path, a ``Segmenter`` or a
        callable.
    cfg : SegmentConfig
        ``halo_px``, ``anchor_eps_px``, ``min_area_um2``, ``batch_size``, ``workers``, ``device``,
        ``refine``.
    scheduler : str, optional
        Address of a ``dask.distributed`` scheduler; default: local threads.
    quiet : bool
        No progress bar.

    Returns
    -------
    dict
        ``chunks_total``, ``chunks_reused``, ``chunks_processed``, ``instances`` (candidates
        written in this run), ``model`` (identity), ``timings_s`` (per stage, summed over threads,
        plus ``wall_s``).

    Raises
    ------
    StoreError
        Missing/incomplete store, or a store resolution the model cannot use.
    ModelError
        Missing checkpoint or a model returning malformed output.
    """
    import dask

    from .store import _fix_malloc_mmap_threshold

    t_start = time.perf_counter()
    _fix_malloc_mmap_threshold()  # multi-MB window buffers: keep peak RSS flat over many chunks
    # absolute paths: dask.distributed workers may run in another working directory
    store_path = os.path.abspath(store_path)
    chunks_dir = Path(chunks_dir).absolute()
    group, attrs = _open_store_cached(store_path)
    store_mpp = float(attrs["mpp"])
    if cfg.teacher:  # workers may run in another working directory (the path is never recorded)
        cfg = replace(cfg, teacher=os.path.abspath(cfg.teacher))
    resolved = resolve_model(model, device=cfg.device, refine=cfg.refine, store_mpp=store_mpp, engine=cfg.engine,
                             precision=cfg.precision, teacher=cfg.teacher, min_score=cfg.min_score,
                             reject_threshold=cfg.reject_threshold)
    if resolved.mpp is not None and abs(resolved.mpp - store_mpp) > 1e-3 * resolved.mpp:
        raise StoreError(
            f"{store_path}: store is at {store_mpp:g} µm/px but the model expects {resolved.mpp:g} µm/px; "
            f"re-tile with `cellsam tile --mpp {resolved.mpp:g}`"
        )
    chunk_px = int(attrs["chunk_px"])
    windows = chunk_windows(attrs["shape_rc"], chunk_px, int(cfg.halo_px), attrs.get("tissue_chunks", []))
    meta = chunks_meta(attrs, resolved, cfg)
    done = prepare_chunks_dir(chunks_dir, meta)
    todo = [w for w in windows if w.chunk_rc not in done]
    reused = len(windows) - len(todo)
    log.info(
        "infer: %d tissue chunks of %d px (+%d px halo), %d already done, model %s",
        len(windows),
        chunk_px,
        cfg.halo_px,
        reused,
        resolved.info.get("name"),
    )

    totals = dict.fromkeys(TIMING_KEYS, 0.0)
    counts = {"chunks": 0, "instances": 0}
    # Distributed workers get the spec (a path or name, loaded once per worker by the cached
    # loader) instead of the weights; in-process threads share the already loaded model.
    spec = resolved
    if scheduler and (model is None or isinstance(model, (str, os.PathLike))):
        spec = None if model is None else str(model)
        if spec is not None and spec != "classical":
            spec = os.path.abspath(spec)  # workers may run in another working directory
    batches = make_batches(todo, max(1, int(cfg.batch_size)))
    task = dask.delayed(process_batch)
    tasks = [task(store_path, b, str(chunks_dir), spec, cfg, dask_key_name=f"infer-batch-{i}") for i, b in enumerate(batches)]
    with _progress(len(todo), quiet) as bar:

        def on_done(result: dict) -> None:
            counts["chunks"] += result["chunks"]
            counts["instances"] += result["instances"]
            for k, v in result["timings_s"].items():
                totals[k] = totals.get(k, 0.0) + v
            bar.update(result["chunks"])
            if counts["chunks"] < len(todo):
                pause_point("infer")  # crash tests only (pipeline.testhooks)

        if tasks:
            if scheduler:
                _run_distributed(tasks, scheduler, on_done)
            else:
                _run_threaded(tasks, max(1, int(cfg.workers)), on_done)
    wall = time.perf_counter() - t_start
    totals = {k: round(v, 3) for k, v in totals.items()}
    totals["wall_s"] = round(wall, 3)
    log.info(
        "infer: %d chunks segmented, %d candidate nuclei in %.1f s (read %.1f, model %.1f, post %.1f, extract %.1f, "
        "write %.1f s); the model saw %.1f of %.1f window Mpx",
        counts["chunks"],
        counts["instances"],
        wall,
        *(totals.get(k, 0.0) for k in TIMING_KEYS),
        totals.get("model_mpx", 0.0),
        totals.get("window_mpx", 0.0),
    )
    _write_json_atomic({"infer_s": totals["wall_s"], **{k: totals[k] for k in TIMING_KEYS},
                        **{k: totals[k] for k in ("window_mpx", "model_mpx") if k in totals}}, chunks_dir / TIMINGS_NAME)
    _write_json_atomic(mpp_probe(group, attrs, resolved), chunks_dir / PROBE_NAME)
    return {
        "chunks_total": len(windows),
        "chunks_reused": reused,
        "chunks_processed": counts["chunks"],
        "instances": counts["instances"],
        "model": resolved.info,
        "model_mpp": resolved.mpp,
        "timings_s": totals,
    }


def mpp_probe(group, attrs: dict, model: Model) -> dict | None:
    """The µm/px scale probe (:func:`pipeline.mppcheck.probe_images`) of ``model`` on a few tissue
    tiles of the store; None without tissue, or for a model without ``segment(image, mpp)`` (the
    classical baseline, plain callables)."""
    from .config import MppCheckConfig
    from .mppcheck import probe_grid_mpp, probe_images, probe_tiles_from_store

    cfg = MppCheckConfig()
    segment = getattr(getattr(model.segment_batch, "__self__", None), "segment", None)  # a Segmenter's
    mx, my = attrs.get("slide_mpp_x"), attrs.get("slide_mpp_y")
    grid = probe_grid_mpp(float(attrs["mpp"]), (float(mx) * float(my)) ** 0.5 if mx and my else float(attrs["mpp"]))
    tiles = probe_tiles_from_store(group, attrs, cfg, grid) if segment is not None else []
    if not tiles:
        return None
    t0 = time.perf_counter()
    try:
        with _MODEL_LOCK:
            probe = probe_images(tiles, segment, grid, cfg)
    except (ValueError, ModelError) as exc:
        log.info("µm/px scale probe skipped: %s", exc)
        return None
    log.info("µm/px scale probe: %d tiles, median nucleus area %s µm² at x%s (%.1f s)", probe["tiles"],
             probe["median_area_um2"], probe["factors"], time.perf_counter() - t0)
    return probe


def list_chunk_files(chunks_dir: str | os.PathLike) -> dict[tuple[int, int], Path]:
    """Chunk files present in ``chunks_dir``, keyed by (row, col)."""
    chunks_dir = Path(chunks_dir)
    if not chunks_dir.is_dir():
        return {}
    out = {}
    for p in chunks_dir.iterdir():
        rc = parse_chunk_name(p.name)
        if rc is not None:
            out[rc] = p
    return dict(sorted(out.items()))


def read_chunks_meta(chunks_dir: str | os.PathLike) -> dict:
    """``chunks_dir/_meta.json``.

    Raises
    ------
    InputError
        If it is missing or unreadable (not an ``infer`` output directory).
    """
    path = Path(chunks_dir) / META_NAME
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: missing; {chunks_dir} is not the output of `cellsam infer`") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: unreadable ({exc}); rerun `cellsam infer`") from None


__all__ = [
    "CLASSICAL",
    "ChunkWindow",
    "Model",
    "chunk_path",
    "chunk_windows",
    "list_chunk_files",
    "make_batches",
    "read_chunks_meta",
    "resolve_model",
    "run_infer",
]
