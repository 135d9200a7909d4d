"""Inference engines: the CellSAM network's dense maps from PyTorch, ONNX Runtime or OpenVINO.

An :class:`Engine` runs the *network* only (``float32 (N, 3, H, W)`` RGB 0..255 -> the raw maps
``float32 (N, C, H, W)``: nucleus logit, h, v(, distance logit)) and, when asked, the 256-d
stride-16 embedding that SAM's prompt encoder + mask decoder consume (``--refine``). Decoding
(watershed), refinement and everything after stay in :mod:`pipeline.model.segmenter`, so every
engine feeds the same code.

Source of truth
    The ``.pt`` checkpoint. The ONNX graph is exported from the loaded inference copy at load time
    (legacy TorchScript exporter, opset 17, dynamic batch, height and width; about 1 s) and kept in
    memory: there is no second weights file to go stale.

Engines and precisions (``--engine``, ``--precision``; defaults in :class:`pipeline.config.SegmentConfig`)
    ``torch``        fp32 (eager, channels-last, BatchNorm folded); bf16 = CPU/CUDA autocast.
    ``onnxruntime``  fp32 (CPU execution provider; CUDA provider on a GPU when installed).
    ``openvino``     fp32 or bf16 (``INFERENCE_PRECISION_HINT``; bf16 runs on AVX-512-BF16/AMX units).
    ``auto``         on CUDA: torch (bf16/fp16 autocast as before). On the CPU: the first of
                     :data:`CPU_PREFERENCE` that is installed, supported by this CPU and passes the
                     load-time parity probe (:func:`parity_probe`); torch fp32 otherwise.

The speed order and the parity budget behind :data:`CPU_PREFERENCE` are measured by
``benchmarks/run.py --engines`` (results in ``benchmarks/results/engines.json``; README table).

Threads
    ONNX Runtime and OpenVINO get ``threads`` intra-op threads (default: ``torch.get_num_threads()``,
    i.e. the cores this process may use) and no inter-op parallelism; ONNX Runtime's thread pool does
    not spin, so the watershed decoding of one window runs beside the next forward on the same
    cores without oversubscription.
"""

from __future__ import annotations

import copy
import io
import logging
import warnings
from collections import OrderedDict

import numpy as np
import torch

from ..errors import ModelError

log = logging.getLogger(__name__)

ENGINES = ("auto", "torch", "onnxruntime", "openvino")
PRECISIONS = ("auto", "fp32", "bf16")
# measured CPU preference (fastest first) among (engine, precision) pairs within the parity budget
CPU_PREFERENCE = (("openvino", "bf16"), ("onnxruntime", "fp32"), ("torch", "fp32"))
ONNX_OPSET = 17
OPENVINO_SHAPE_CACHE = 4  # compiled static-shape models kept per engine (LRU; ~230 MB each at 1216²)
# load-time parity probe: largest allowed |Δ nucleus probability| against torch fp32 on the probe tile,
# and the largest allowed fraction of probe pixels whose foreground decision (p >= 0.5) flips
PROBE_MAX_PROB_DIFF = {"fp32": 1e-3, "bf16": 0.15}
PROBE_MAX_FLIP_FRACTION = {"fp32": 1e-4, "bf16": 5e-3}
_INSTALL_HINT = {"onnxruntime": "pip install onnxruntime", "openvino": "pip install openvino"}


class _MapsOnly(torch.nn.Module):
    """``CellSAM`` -> ``maps`` (and ``embed`` when ``with_embed``), the exportable part of the forward."""

    def __init__(self, model: torch.nn.Module, with_embed: bool) -> None:
        super().__init__()
        self.model = model
        self.with_embed = with_embed

    def forward(self, x: torch.Tensor):
        out = self.model(x)
        return (out["maps"], out["embed"]) if self.with_embed else out["maps"]


def export_onnx(model: torch.nn.Module, with_embed: bool = False) -> bytes:
    """ONNX bytes of ``model``'s network forward (dynamic ``N``, ``H``, ``W``; ``H, W`` multiples of 16).

    Parameters
    ----------
    model : CellSAM
        An eval-mode (inference-copy) lite model on the CPU; a dual model (SAM teacher attached)
        is refused: the ViT teacher runs in torch only.
    with_embed : bool
        Also output ``embed`` ``(N, 256, H/16, W/16)`` (SAM refinement).
    """
    if getattr(model, "teacher", None) is not None and getattr(model, "fusion", None) is not None:
        raise ModelError("dual mode (SAM teacher) runs with --engine torch only")
    if next(model.parameters()).device.type != "cpu":  # export a CPU copy; the caller's model stays put
        model = copy.deepcopy(model).cpu()
    wrapper = _MapsOnly(model, with_embed).eval()
    names = ["maps", "embed"] if with_embed else ["maps"]
    dyn = {"image": {0: "n", 2: "h", 3: "w"}, "maps": {0: "n", 2: "h", 3: "w"}}
    if with_embed:
        dyn["embed"] = {0: "n", 2: "h16", 3: "w16"}
    buf = io.BytesIO()
    example = torch.zeros(1, 3, 64, 64)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # exporter deprecation / tracer notes: the parity probe checks the result
        torch.onnx.export(wrapper, (example,), buf, input_names=["image"], output_names=names,
                          dynamic_axes=dyn, opset_version=ONNX_OPSET, dynamo=False, do_constant_folding=True)
    return buf.getvalue()


class Engine:
    """Runs the network. Subclasses implement :meth:`run`.

    Attributes
    ----------
    name : str
        ``torch``, ``onnxruntime`` or ``openvino``.
    precision : str
        ``fp32`` or ``bf16`` (torch on CUDA: ``amp``).
    """

    name = "?"
    precision = "fp32"
    static_shapes = False  # True: one compiled model per input shape (callers keep the shapes few)

    def run(self, x: np.ndarray) -> tuple[np.ndarray, torch.Tensor | None]:
        """``float32 (N, 3, H, W)`` (RGB 0..255, ``H, W`` multiples of 16, C-contiguous) ->
        ``(maps float32 (N, C, H, W), embed (N, 256, H/16, W/16) torch tensor or None)``."""
        raise NotImplementedError

    def describe(self) -> dict:
        return {"engine": self.name, "precision": self.precision}


class TorchEngine(Engine):
    name = "torch"

    def __init__(self, model: torch.nn.Module, device: torch.device, precision: str = "fp32") -> None:
        self.model = model
        self.device = device
        if precision not in ("fp32", "bf16"):
            raise ModelError(f"--engine torch: unknown precision {precision!r} (use fp32 or bf16)")
        # CUDA always ran under autocast (bf16 where supported, else fp16): keep it
        self.precision = "amp" if device.type == "cuda" else precision

    def _autocast(self):
        if self.device.type == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            return torch.autocast("cuda", dtype=dtype)
        if self.precision == "bf16":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return torch.autocast("cpu", enabled=False)

    @torch.inference_mode()
    def run(self, x: np.ndarray):
        t = torch.from_numpy(x).to(self.device)
        if self.device.type == "cpu":
            t = t.contiguous(memory_format=torch.channels_last)
        with self._autocast():
            out = self.model(t)
        maps = out["maps"].float()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return maps.cpu().numpy(), out["embed"]


class OnnxRuntimeEngine(Engine):
    name = "onnxruntime"

    def __init__(self, onnx: bytes, device: torch.device, precision: str, threads: int, with_embed: bool) -> None:
        ort = _import("onnxruntime")
        if precision != "fp32":
            raise ModelError(f"--engine onnxruntime supports --precision fp32 only, got {precision!r} "
                             "(bf16: use --engine openvino)")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.log_severity_level = 3
        providers = ["CPUExecutionProvider"]
        if device.type == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise ModelError("--engine onnxruntime on CUDA needs onnxruntime-gpu (pip install onnxruntime-gpu)")
            providers.insert(0, "CUDAExecutionProvider")
        self.session = ort.InferenceSession(onnx, sess_options=opts, providers=providers)
        self.precision = precision
        self.with_embed = with_embed

    def run(self, x: np.ndarray):
        outs = self.session.run(None, {"image": np.ascontiguousarray(x, dtype=np.float32)})
        embed = torch.from_numpy(outs[1]) if self.with_embed else None
        return outs[0], embed


class OpenVinoEngine(Engine):
    name = "openvino"
    static_shapes = True

    def __init__(self, onnx: bytes, device: torch.device, precision: str, threads: int, with_embed: bool) -> None:
        ov = _import("openvino")
        if device.type != "cpu":
            raise ModelError("--engine openvino runs on the CPU only (use --device cpu)")
        if precision not in ("fp32", "bf16"):
            raise ModelError(f"--engine openvino: unknown precision {precision!r} (use fp32 or bf16)")
        core = ov.Core()
        if precision == "bf16" and "BF16" not in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
            raise ModelError("--precision bf16: this CPU has no bf16 units (AVX-512-BF16/AMX); use fp32")
        self._core, self._onnx = core, onnx
        self._config = {
            "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
            "INFERENCE_NUM_THREADS": int(threads),
            "NUM_STREAMS": 1,
            "PERFORMANCE_HINT": "LATENCY",
            "ENABLE_CPU_PINNING": False,  # the decoding threads share these cores
        }
        # one compiled model per input shape: OpenVINO's CPU plugin runs a static-shape model
        # 2-4x faster than the dynamic one (measured, 1216² window), and compiles one in ~0.2 s
        self._requests: OrderedDict = OrderedDict()
        self.precision = precision
        self.with_embed = with_embed

    def _request(self, shape: tuple):
        req = self._requests.get(shape)
        if req is None:
            import openvino as ov

            model = self._core.read_model(self._onnx, ov.Tensor(np.empty(0, np.uint8)))
            model.reshape({0: list(shape)})
            req = self._core.compile_model(model, "CPU", self._config).create_infer_request()
            self._requests[shape] = req
            while len(self._requests) > OPENVINO_SHAPE_CACHE:
                self._requests.popitem(last=False)
        else:
            self._requests.move_to_end(shape)
        return req

    def run(self, x: np.ndarray):
        x = np.ascontiguousarray(x, dtype=np.float32)
        req = self._request(tuple(x.shape))
        req.infer({0: x})
        maps = np.array(req.get_output_tensor(0).data, dtype=np.float32, copy=True)
        embed = None
        if self.with_embed:
            embed = torch.from_numpy(np.array(req.get_output_tensor(1).data, dtype=np.float32, copy=True))
        return maps, embed


def _import(name: str):
    try:
        return __import__(name)
    except ImportError:
        raise ModelError(f"--engine {name} is not installed ({_INSTALL_HINT[name]})") from None


def available(name: str) -> bool:
    """Is the engine's runtime importable here?"""
    if name == "torch":
        return True
    try:
        __import__(name)
    except ImportError:
        return False
    return True


def probe_tile(size: int = 128, seed: int = 0) -> np.ndarray:
    """A fixed synthetic H&E-like probe ``float32 (1, 3, size, size)`` (RGB 0..255): pink
    background with dark-purple discs, so the nucleus probability spans 0..1."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    img = np.empty((size, size, 3), np.float32)
    img[:] = (235, 190, 215)
    for _ in range(size * size // 400):
        cy, cx = rng.uniform(0, size, 2)
        r = rng.uniform(3, 7)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        img[disc] = (90 + rng.uniform(-20, 20), 50 + rng.uniform(-15, 15), 140 + rng.uniform(-20, 20))
    img += rng.normal(0, 6, img.shape).astype(np.float32)
    return np.ascontiguousarray(np.clip(img, 0, 255).transpose(2, 0, 1)[None])


def parity_probe(engine: Engine, reference: Engine, x: np.ndarray | None = None) -> dict:
    """Compare ``engine`` with ``reference`` (torch fp32) on the probe tile: largest nucleus-probability
    difference and fraction of pixels whose ``p >= 0.5`` decision flips. Returns the numbers and ``ok``."""
    x = probe_tile() if x is None else x
    a = 1 / (1 + np.exp(-reference.run(x)[0][:, 0]))
    b = 1 / (1 + np.exp(-engine.run(x)[0][:, 0]))
    diff = float(np.abs(a - b).max())
    flips = float(np.mean((a >= 0.5) != (b >= 0.5)))
    prec = "bf16" if engine.precision == "bf16" else "fp32"
    ok = diff <= PROBE_MAX_PROB_DIFF[prec] and flips <= PROBE_MAX_FLIP_FRACTION[prec]
    return {"max_prob_diff": diff, "flip_fraction": flips, "ok": bool(ok)}


def build_engine(model: torch.nn.Module, device: torch.device, engine: str = "auto", precision: str = "auto",
                 threads: int | None = None, with_embed: bool = False) -> Engine:
    """The engine that runs ``model`` (an eval inference copy already on ``device``).

    Parameters
    ----------
    engine : {"auto", "torch", "onnxruntime", "openvino"}
    precision : {"auto", "fp32", "bf16"}
        ``auto`` = bf16 where the chosen engine is OpenVINO on a bf16-capable CPU (``engine="auto"``) or
        ``engine="openvino"``; fp32 otherwise.
    threads : int, optional
        Intra-op threads for ONNX Runtime / OpenVINO (default ``torch.get_num_threads()``).
    with_embed : bool
        The engine must also return the SAM embedding (refinement).

    Raises
    ------
    ModelError
        Unknown engine or precision, an engine that is not installed, or one that cannot run here
        (explicit choices only; ``auto`` falls back to torch fp32).
    """
    if engine not in ENGINES:
        raise ModelError(f"unknown engine {engine!r} (use one of {', '.join(ENGINES)})")
    if precision not in PRECISIONS:
        raise ModelError(f"unknown precision {precision!r} (use one of {', '.join(PRECISIONS)})")
    threads = int(threads or torch.get_num_threads())
    dual = getattr(model, "teacher", None) is not None and getattr(model, "fusion", None) is not None
    if engine == "torch" or (engine == "auto" and (device.type == "cuda" or dual)):
        return TorchEngine(model, device, "fp32" if precision == "auto" else precision)
    if dual:
        raise ModelError(f"--engine {engine}: dual mode (SAM teacher) runs with --engine torch only")
    if engine != "auto":
        prec = precision if precision != "auto" else ("bf16" if engine == "openvino" and cpu_has_bf16() else "fp32")
        return _make(engine, export_onnx(model, with_embed), device, prec, threads, with_embed)
    # auto on the CPU: measured preference, installed, supported, and within the parity probe
    reference = TorchEngine(model, device, "fp32")
    onnx = None
    for name, prec in CPU_PREFERENCE:
        if precision != "auto" and prec != precision:
            continue
        if name == "torch":
            return reference if prec == "fp32" else TorchEngine(model, device, prec)
        if not available(name) or (prec == "bf16" and not cpu_has_bf16()):
            continue
        try:
            onnx = onnx if onnx is not None else export_onnx(model, with_embed)
            candidate = _make(name, onnx, device, prec, threads, with_embed)
        except Exception as exc:  # noqa: BLE001 - auto tries the next engine
            log.warning("engine %s/%s unavailable (%s): trying the next one", name, prec, str(exc).splitlines()[0][:120])
            continue
        check = parity_probe(candidate, reference)
        if check["ok"]:
            return candidate
        log.warning("engine %s/%s failed the parity probe (max Δp %.3g, flips %.2g): trying the next one",
                    name, prec, check["max_prob_diff"], check["flip_fraction"])
    return reference


def _make(name: str, onnx: bytes, device, precision: str, threads: int, with_embed: bool) -> Engine:
    cls = {"onnxruntime": OnnxRuntimeEngine, "openvino": OpenVinoEngine}[name]
    return cls(onnx, device, precision, threads, with_embed)


def cpu_has_bf16() -> bool:
    """Does this CPU have bf16 units (as OpenVINO sees them)?"""
    if not available("openvino"):
        return False
    import openvino as ov

    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
