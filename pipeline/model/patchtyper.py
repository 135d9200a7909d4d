"""Patch typer: a small CNN that types each nucleus from the pixels around it (inference side).

The type head (:mod:`pipeline.model.typehead`) sees hand-made per-instance features; on held-out
CRCHisto they cap its classification at weighted F1 0.74, while a CNN that sees a patch of pixels
around the nucleus reaches 0.78 (docs/model_card.md, "Nucleus types"). The patch typer is that CNN,
part of the checkpoints of both shipped models: a small one at half resolution in the default (lite)
model, mostly a filter of what is not a nucleus, and a 4x wider one at full resolution in the named
``quality`` model (``--model quality``).

For every instance a ``patch_px`` x ``patch_px`` RGB patch at ``mpp`` µm/px (a fixed physical scale,
whatever the image's µm/px) is taken around its centroid, reflected at the image border: sampled
bilinearly at the exact centroid (``sampler: bilinear``, :func:`sample_patches`), or cropped at the
nearest whole pixel and resized to ``mpp`` in one batched call (``sampler: crop``,
:func:`crop_patches`, about half the time). The network returns ``C`` class logits and, last, one "not a nucleus" logit. The
configuration lives in the checkpoint's ``arch["patch_typer"]``::

    {"classes": [...], "patch_px": 40, "mpp": 0.55, "width": 32,
     "sampler": "bilinear" | "crop",  # absent = bilinear (the quality model's typer)
     "combine": "typer" | "mean",   # class probabilities: the typer's, or the mean with the head's
     "reject_threshold": null | t}  # drop instances whose typer p(not a nucleus) exceeds t
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

#: patches per forward call (bounds the activation memory: ~60 MB at width 32)
CHUNK = 512
#: OpenVINO runs chunks padded to a multiple of this many patches (a few static shapes)
PAD_PATCHES = 64
#: max |softmax difference| of OpenVINO against torch on the parity probe
PARITY_TOL = 0.05


def _block(i: int, o: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True))


class PatchTyper(nn.Module):
    """7 conv-BN-ReLU blocks (``width`` .. 4 ``width`` channels), 3 max-pools, global average
    pooling, dropout and a linear layer: ``float32 (N, 3, P, P)`` RGB in [0, 1] -> ``(N, C + 1)``."""

    def __init__(self, cfg: dict) -> None:
        super().__init__()
        self.cfg = dict(cfg)
        self.classes = [str(c) for c in cfg["classes"]]
        self.patch_px = int(cfg.get("patch_px", 40))
        self.mpp = float(cfg.get("mpp", 0.55))
        self.sampler = str(cfg.get("sampler", "bilinear"))
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown patch-typer sampler {self.sampler!r} ({' or '.join(SAMPLERS)})")
        w = int(cfg.get("width", 32))
        self.net = nn.Sequential(_block(3, w), _block(w, w), nn.MaxPool2d(2), _block(w, 2 * w),
                                 _block(2 * w, 2 * w), nn.MaxPool2d(2), _block(2 * w, 4 * w), nn.MaxPool2d(2),
                                 _block(4 * w, 4 * w), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                 nn.Dropout(float(cfg.get("dropout", 0.3))), nn.Linear(4 * w, len(self.classes) + 1))

        self._runner = None  # set by use_engine(); None = this module in torch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def use_engine(self, engine: str = "auto", precision: str = "auto", threads: int | None = None) -> str:
        """Run :meth:`predict` through OpenVINO (bf16 on a bf16-capable CPU: ~4x torch fp32 here)
        when ``engine`` is ``auto`` or ``openvino``, it is installed, the typer is on the CPU and
        its outputs pass a parity probe against torch; otherwise torch. Returns what it runs on."""
        self._runner = None
        dev = self.net[-1].weight.device
        if engine not in ("auto", "openvino") or dev.type != "cpu":
            return "torch/fp32"
        from .engine import available, cpu_has_bf16

        if not available("openvino"):
            return "torch/fp32"
        prec = precision if precision in ("fp32", "bf16") else ("bf16" if cpu_has_bf16() else "fp32")
        runner = _OpenVinoTyper(self, prec, int(threads or torch.get_num_threads()))
        probe = torch.from_numpy(np.random.default_rng(0).random((8, 3, self.patch_px, self.patch_px),
                                                                 np.float32))
        with torch.inference_mode():
            ref = torch.softmax(self(probe), 1).numpy()
        got = torch.softmax(torch.from_numpy(runner(probe.numpy())), 1).numpy()
        if not np.abs(got - ref).max() <= PARITY_TOL:
            return "torch/fp32"
        self._runner = runner
        return f"openvino/{prec}"

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        if self._runner is not None:
            return torch.from_numpy(self._runner(x.numpy()))
        return self(x.contiguous(memory_format=torch.channels_last))

    @torch.inference_mode()
    def predict(self, image: np.ndarray, centroids_xy: np.ndarray, mpp: float) -> tuple[np.ndarray, np.ndarray]:
        """Class and "not a nucleus" probabilities of the nuclei centred at ``centroids_xy``.

        Parameters
        ----------
        image : ndarray of shape (H, W, 3), uint8
        centroids_xy : ndarray of shape (K, 2), float
            (x, y) centroids in px of ``image``.
        mpp : float
            µm/px of ``image``.

        Returns
        -------
        class_probs : ndarray of shape (K, C), float32
            Softmax over the ``C`` classes only (rows sum to 1).
        p_reject : ndarray of shape (K,), float32
            Softmax probability of the last ("not a nucleus") output.
        """
        k = len(centroids_xy)
        if k == 0:
            return self.predict_patches(torch.zeros(0, 3, self.patch_px, self.patch_px))
        dev = self.net[-1].weight.device
        if self.sampler == "crop":
            x = crop_patches(image, centroids_xy, self.mpp / mpp, self.patch_px).to(dev).float().div_(255)
            return self.predict_patches(x)
        img = torch.from_numpy(np.array(image[..., :3], np.uint8)).to(dev).permute(2, 0, 1)[None].float().div_(255)
        out = [self.predict_patches(sample_patches(img, centroids_xy[s:s + CHUNK], self.mpp / mpp, self.patch_px))
               for s in range(0, k, CHUNK)]
        return np.concatenate([o[0] for o in out]), np.concatenate([o[1] for o in out])

    @torch.inference_mode()
    def predict_patches(self, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`predict` on patches already sampled: ``float32 (N, 3, P, P)`` RGB in [0, 1] ->
        ``class_probs`` float32 (N, C), ``p_reject`` float32 (N,); ``CHUNK`` patches per call."""
        c = len(self.classes)
        if len(x) == 0:
            return np.zeros((0, c), np.float32), np.zeros(0, np.float32)
        logits = torch.cat([self._logits(x[s:s + CHUNK]) for s in range(0, len(x), CHUNK)]).float().cpu()
        return (torch.softmax(logits[:, :c], 1).numpy().astype(np.float32),
                torch.softmax(logits, 1)[:, c].numpy().astype(np.float32))


class _OpenVinoTyper:
    """The typer (BatchNorm folded) exported to ONNX and compiled by OpenVINO, one static shape per
    padded chunk size: ``float32 (N, 3, P, P) -> logits (N, C + 1)``."""

    def __init__(self, typer: PatchTyper, precision: str, threads: int) -> None:
        import copy
        import io
        import warnings

        import openvino as ov

        from .cellsam import fold_batchnorm
        from .engine import ONNX_OPSET

        net = copy.deepcopy(typer.net).eval().to(memory_format=torch.contiguous_format)
        fold_batchnorm(list(net.modules()))  # a no-op on an inference copy's typer (already folded)
        buf = io.BytesIO()
        x = torch.zeros(PAD_PATCHES, 3, typer.patch_px, typer.patch_px)
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # exporter deprecation notes: the parity probe checks the result
            torch.onnx.export(net, (x,), buf, input_names=["patches"], output_names=["logits"],
                              dynamic_axes={"patches": {0: "n"}}, opset_version=ONNX_OPSET, dynamo=False)
        self._core, self._onnx = ov.Core(), buf.getvalue()
        self._config = {"INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
                        "INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY",
                        "ENABLE_CPU_PINNING": False}
        self._requests: dict = {}

    def __call__(self, x: np.ndarray) -> np.ndarray:
        n = len(x)
        m = -(-n // PAD_PATCHES) * PAD_PATCHES
        if m != n:
            x = np.concatenate([x, np.zeros((m - n, *x.shape[1:]), np.float32)])
        req = self._requests.get(m)
        if req is None:
            import openvino as ov

            model = self._core.read_model(self._onnx, ov.Tensor(np.empty(0, np.uint8)))
            model.reshape({0: list(x.shape)})
            req = self._requests[m] = self._core.compile_model(model, "CPU", self._config).create_infer_request()
        req.infer({0: np.ascontiguousarray(x, np.float32)})
        return np.array(req.get_output_tensor(0).data, np.float32, copy=True)[:n]


def crop_patches(image: np.ndarray, centroids_xy, px_per_patch_px: float, size: int) -> torch.Tensor:
    """``size`` x ``size`` patches: a whole-pixel crop around each centroid, resized to the patch scale.

    Each patch is the ``M`` x ``M`` window of ``image`` (``M = round(size * px_per_patch_px)``)
    around the centroid rounded to the nearest pixel, reflected at the image border, then all of them
    are resized to ``size`` x ``size`` in one batched, antialiased bilinear call. A patch depends
    only on the pixels around its nucleus, never on where the image window starts (tiled runs agree),
    and it takes about half the time of :func:`sample_patches` (21 vs 46 ms for 1,528 patches of a
    1216² window, 20 px at 2.2 image px per patch px).

    Parameters
    ----------
    image : ndarray of shape (H, W, 3), uint8
    centroids_xy : array-like of shape (K, 2)
        (x, y) patch centres in px of ``image`` (pixel centres at integers).
    px_per_patch_px : float
        Image pixels per patch pixel (as :func:`sample_patches`).
    size : int
        Patch side (patch pixels).

    Returns
    -------
    torch.Tensor of shape (K, 3, size, size), uint8
    """
    from numpy.lib.stride_tricks import sliding_window_view

    cen = np.asarray(centroids_xy, np.float64).reshape(-1, 2)
    if len(cen) == 0:
        return torch.zeros((0, 3, size, size), dtype=torch.uint8)
    m = max(1, int(round(size * float(px_per_patch_px))))
    h, w = image.shape[:2]
    img = np.asarray(image[..., :3], dtype=np.uint8)
    img = np.pad(img, ((m, m), (m, m), (0, 0)), mode="reflect" if min(h, w) > m else "edge")
    view = sliding_window_view(img, (m, m), axis=(0, 1))  # (H + m + 1, W + m + 1, 3, m, m)
    x0 = np.floor(cen[:, 0] + 0.5).astype(np.int64) - m // 2 + m
    y0 = np.floor(cen[:, 1] + 0.5).astype(np.int64) - m // 2 + m
    crops = torch.from_numpy(np.ascontiguousarray(view[y0.clip(0, view.shape[0] - 1), x0.clip(0, view.shape[1] - 1)]))
    if m == size:
        return crops
    # uint8 in, uint8 out: torch's integer antialiased kernel (rounds), ~1.6x its float path here
    return torch.cat([F.interpolate(crops[s:s + CHUNK], size=(size, size), mode="bilinear", align_corners=False,
                                    antialias=m > size) for s in range(0, len(crops), CHUNK)])


#: patch samplers of the typer's ``cfg["sampler"]``
SAMPLERS = ("bilinear", "crop")


def sample_patches(image: torch.Tensor, centroids_xy, px_per_patch_px: float, size: int) -> torch.Tensor:
    """Bilinear ``size`` x ``size`` patches of ``image`` centred on the centroids.

    Parameters
    ----------
    image : torch.Tensor of shape (1, 3, H, W), float
    centroids_xy : array-like of shape (K, 2)
        (x, y) patch centres in px of ``image`` (pixel centres at integers).
    px_per_patch_px : float
        Image pixels per patch pixel (``patch µm/px / image µm/px``, inverted: 0.55 µm patch pixels
        on a 0.5 µm/px image -> 1.1).
    size : int
        Patch side (patch pixels).

    Returns
    -------
    torch.Tensor of shape (K, 3, size, size), float32
        Reflected at the image border.
    """
    _, ch, h, w = image.shape
    cen = torch.as_tensor(np.asarray(centroids_xy, np.float64), dtype=torch.float64)
    k = cen.shape[0]
    off = (torch.arange(size, dtype=torch.float64) - (size - 1) / 2) * float(px_per_patch_px)
    gx = cen[:, 0, None, None] + off[None, None, :]  # (K, 1, S)
    gy = cen[:, 1, None, None] + off[None, :, None]  # (K, S, 1)
    grid = torch.stack([((2 * gx + 1) / w - 1).expand(k, size, size), ((2 * gy + 1) / h - 1).expand(k, size, size)], -1)
    out = F.grid_sample(image.float(), grid.reshape(1, k * size, size, 2).float().to(image.device), mode="bilinear",
                        padding_mode="reflection", align_corners=False)  # (1, 3, K * S, S)
    return out.reshape(ch, k, size, size).permute(1, 0, 2, 3)


def combine(head_probs: np.ndarray | None, typer_probs: np.ndarray, rule: str) -> np.ndarray:
    """Final class probabilities: ``"typer"`` -> the typer's; ``"mean"`` -> the mean of the head's
    and the typer's (the typer's alone without a head)."""
    if rule == "mean" and head_probs is not None and len(head_probs) == len(typer_probs):
        return ((np.asarray(head_probs, np.float32) + typer_probs) / 2).astype(np.float32)
    if rule not in ("typer", "mean"):
        raise ValueError(f"unknown patch-typer combine rule {rule!r} (typer or mean)")
    return typer_probs
