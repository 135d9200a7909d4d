"""Inference API: :func:`load_model` -> :class:`Segmenter` (``segment`` / ``segment_batch``)."""

from __future__ import annotations

import threading
import time

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError, ModelError
from .cellsam import inference_copy
from .checkpoint import load_checkpoint
from .engine import build_engine
from .typehead import needs_embed
from .postprocess import PostprocessParams, instances_from_maps

PAD_MULTIPLE = 16


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` -> cuda if available else cpu; ``cuda`` without a GPU raises ModelError."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError("--device cuda requested but no CUDA device is available (use --device cpu)")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise ModelError(f"unknown device {device!r} (use auto, cpu or cuda)")
    return torch.device(device)


def _check_batch(images) -> np.ndarray:
    arr = np.asarray(images)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        raise InputError(f"expected uint8 images of shape (N, H, W, 3), got {arr.dtype} {arr.shape}")
    return arr


class Segmenter:
    """A loaded CellSAM model with its own metadata (µm/px, thresholds) and device.

    Attributes
    ----------
    mpp : float
        µm/px the model works at; ``segment_batch`` inputs must already be at this resolution.
    metadata : dict
        Checkpoint metadata (version, mode, postprocess thresholds, metrics...).
    """

    def __init__(self, model, metadata: dict, device: str = "auto", refine: bool = False,
                 engine: str = "auto", precision: str = "auto", threads: int | None = None) -> None:
        self.device = resolve_device(device)
        self.metadata = dict(metadata)
        self.mpp = float(metadata.get("mpp", 0.5))
        self.params = PostprocessParams.from_dict(metadata.get("postprocess"))
        self.refine = bool(refine)
        if self.refine and getattr(model, "mask_decoder", None) is None:
            raise ModelError("this checkpoint has no SAM mask decoder: refinement is not available")
        # a faster inference copy (BatchNorm folded, 1x1 convolutions as GEMMs); the caller's model is untouched
        self.model = inference_copy(model.eval()).to(self.device)
        if self.device.type == "cpu":
            self.model = self.model.to(memory_format=torch.channels_last)
        self.metadata["mode"] = self.model.mode
        # the network's runner (pipeline.model.engine): torch, ONNX Runtime or OpenVINO
        # a type head (pipeline.model.typehead) pools the stride-16 embedding over each instance
        self.type_head = getattr(self.model, "type_head", None)
        if self.type_head is not None:
            self.type_head = self.type_head.cpu().eval()
        # the quality model's patch CNN (pipeline.model.patchtyper) types each nucleus from its pixels
        self.patch_typer = getattr(self.model, "patch_typer", None)
        if (self.patch_typer is not None and self.type_head is not None
                and list(self.patch_typer.classes) != list(self.type_head.classes)):
            raise ModelError(f"checkpoint: the patch typer's classes ({', '.join(self.patch_typer.classes)}) "
                             f"differ from the type head's ({', '.join(self.type_head.classes)})")
        if self.patch_typer is not None:
            self.patch_typer = self.patch_typer.to(self.device).eval()
            if self.device.type == "cpu":
                self.patch_typer = self.patch_typer.to(memory_format=torch.channels_last)
        self.metadata["classes"] = self.class_names
        self.engine = build_engine(self.model, self.device, engine, precision, threads,
                                   with_embed=self.refine or (self.type_head is not None
                                                              and needs_embed(self.type_head.groups)))
        self.metadata["engine"] = self.engine.name
        if self.patch_typer is not None:
            self.metadata["patch_typer_engine"] = self.patch_typer.use_engine(engine, precision, threads)
        self.metadata["precision"] = self.engine.precision
        # serialises the network calls of threads sharing this segmenter (pipeline.infer workers):
        # one forward uses all intra-op threads; the decoding of one window overlaps the next forward
        self._lock = threading.Lock()

    @property
    def mode(self) -> str:
        return self.model.mode

    @property
    def class_names(self) -> list[str]:
        """Nucleus class names of the type head (index = column of ``class_probs``); [] without one."""
        if self.type_head is not None:
            return list(self.type_head.classes)
        return list(self.patch_typer.classes) if self.patch_typer is not None else []

    @property
    def reject_threshold(self) -> float | None:
        """The "not a nucleus" threshold in use: the patch typer's, else the type head's; None = no rejection."""
        for part in (self.patch_typer, self.type_head):
            thr = None if part is None else part.cfg.get("reject_threshold")
            if thr is not None:
                return float(thr)
        return None

    def set_reject_threshold(self, threshold: float) -> None:
        """Reject above ``threshold`` (1 = keep all) in every part that rejects (the patch typer and
        the type head, each where its threshold is set); where none does, in the patch typer, else in
        a type head with a reject output; a model without either keeps every instance."""
        parts = [p for p in (self.patch_typer, self.type_head) if p is not None and p.cfg.get("reject_threshold") is not None]
        if not parts:
            parts = [self.patch_typer] if self.patch_typer is not None else [
                h for h in (self.type_head,) if h is not None and h.cfg.get("reject")]
        for part in parts:
            part.cfg = {**part.cfg, "reject_threshold": float(threshold)}

    @property
    def typed(self) -> bool:
        """Whether the model types its nuclei (a type head and/or a patch typer)."""
        return self.type_head is not None or self.patch_typer is not None

    @property
    def rejects(self) -> bool:
        """Whether some part removes instances as "not a nucleus" (:attr:`reject_threshold` is set)."""
        return self.reject_threshold is not None

    def classify(self, image: np.ndarray, labels: np.ndarray, scores: np.ndarray, embed, mpp: float,
                 embed_scale: float = 1.0, timings: dict | None = None,
                 keep_rejected: bool = False) -> tuple[np.ndarray, ...]:
        """Typing step: class probabilities per instance, and removal of the instances whose
        "not a nucleus" probability exceeds the head's (or the patch typer's) ``reject_threshold``
        (renumbered 1..K'). With a patch typer its probabilities replace (``combine: typer``) or are
        averaged with (``mean``) the head's (:func:`pipeline.model.patchtyper.combine`).

        ``timings``: accumulates ``typer_s``, the patch typer's seconds (a network, counted as model time).

        ``keep_rejected``: keep every instance and say which would be removed (the whole-slide
        pipeline exports them apart, ``rejected/<id>.*``).

        Returns
        -------
        labels uint32 (H, W), scores float32 (K',), class_probs float32 (K', C); with
        ``keep_rejected`` also not_nucleus float32 (K,) (the largest "not a nucleus" probability of
        the parts that reject; zeros where none does) and rejected bool (K,), nothing removed.
        """
        from .typehead import instance_features

        k = int(labels.max()) if labels.size else 0
        keep = np.ones(k, bool)
        not_nucleus = np.zeros(k, np.float32)
        probs = None
        if self.type_head is not None:
            feats, cen = instance_features(labels, scores, image, embed, mpp, embed_scale, self.type_head.groups,
                                           with_centroids=True)
            probs, rej = self.type_head.predict(feats, cen, mpp)
            thr = self.type_head.cfg.get("reject_threshold")
            if thr is not None and len(rej):
                keep &= rej <= float(thr)
                not_nucleus = np.maximum(not_nucleus, rej)
        else:
            from .typehead import centroids_xy

            cen = centroids_xy(labels)
        if self.patch_typer is not None:
            from .patchtyper import combine

            with self._lock:  # the patch CNN uses every intra-op thread, like the network
                t0 = time.perf_counter()
                tprobs, trej = self.patch_typer.predict(image, cen, mpp)
                if timings is not None:
                    timings["typer_s"] = timings.get("typer_s", 0.0) + time.perf_counter() - t0
            probs = combine(probs, tprobs, self.patch_typer.cfg.get("combine", "typer"))
            thr = self.patch_typer.cfg.get("reject_threshold")
            if thr is not None and len(trej):
                keep &= trej <= float(thr)
                not_nucleus = np.maximum(not_nucleus, trej)
        flagged = (labels.astype(np.uint32, copy=False), np.asarray(scores, np.float32), probs,
                   not_nucleus.astype(np.float32), ~keep)
        return flagged if keep_rejected else remove_rejected(flagged)[:3]

    def forward(self, batch: np.ndarray) -> dict:
        """Run the network on ``uint8 (N, H, W, 3)``; returns numpy ``prob`` (N, H, W) float32,
        ``hv`` (N, C, H, W) float32 (C = 2: h, v; C = 3: h, v, distance map in [0, 1]) and the torch
        ``embed`` (for refinement; None unless the segmenter refines or runs torch)."""
        batch = _check_batch(batch)
        n, h, w, _ = batch.shape
        ph = (-h) % PAD_MULTIPLE
        pw = (-w) % PAD_MULTIPLE
        x = torch.from_numpy(np.array(batch, copy=True)).permute(0, 3, 1, 2).float()
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="reflect" if min(h, w) > max(ph, pw) else "replicate")
        maps, embed = self.engine.run(np.ascontiguousarray(x.numpy()))
        maps = torch.from_numpy(maps[:, :, :h, :w])
        prob = torch.sigmoid(maps[:, 0]).numpy()
        aux = maps[:, 1:]
        if aux.shape[1] == 3:
            aux = torch.cat([aux[:, :2], torch.sigmoid(aux[:, 2:])], 1)
        hv = np.ascontiguousarray(aux.numpy())
        return {"prob": prob, "hv": hv, "embed": embed, "padded_hw": (h + ph, w + pw)}

    def segment_batch(self, images, timings: dict | None = None,
                      keep_rejected: bool = False) -> list[tuple[np.ndarray, ...]]:
        """Segment tiles already at :attr:`mpp`.

        Parameters
        ----------
        images : ndarray of shape (N, H, W, 3), uint8
        timings : dict, optional
            Accumulates ``model_s`` and ``postprocess_s`` (seconds).
        keep_rejected : bool
            A model that :attr:`rejects`: keep the instances it would remove, flagged
            (:meth:`classify`); 5-tuples.

        Returns
        -------
        list of (labels uint32 (H, W), scores float32 (K,)), or with a type head of
        (labels, scores, class_probs float32 (K, C)) (row i = label i + 1, rows sum to 1); with
        ``keep_rejected`` on a model that rejects, (labels, scores, class_probs, not_nucleus
        float32 (K,), rejected bool (K,))
        """
        images = _check_batch(images)
        # On the CPU a batch brings no speed-up but multiplies activation memory: one tile per
        # forward there; on a GPU the whole batch goes through at once.
        step = images.shape[0] if self.device.type == "cuda" else 1
        results = []
        for start in range(0, images.shape[0], step):
            with self._lock:  # one network call at a time; decoding runs outside, beside the next forward
                t0 = time.perf_counter()
                out = self.forward(images[start:start + step])
                t1 = time.perf_counter()
            model_s = t1 - t0
            post_s = 0.0
            for i in range(out["prob"].shape[0]):
                t2 = time.perf_counter()
                lab, sc = instances_from_maps(out["prob"][i], out["hv"][i], self.mpp, self.params)
                post_s += time.perf_counter() - t2
                if self.refine:
                    from .refine import refine_and_fuse

                    with self._lock:  # the refinement runs SAM's prompt encoder + mask decoder
                        t2 = time.perf_counter()
                        lab, sc = refine_and_fuse(self.model, out["embed"][i:i + 1], lab, sc, out["prob"][i],
                                                  out["padded_hw"], self.mpp, self.metadata.get("refine", {}))
                        model_s += time.perf_counter() - t2
                if self.typed:
                    t2 = time.perf_counter()
                    emb = out["embed"][i] if out["embed"] is not None else None
                    typer = {}
                    results.append(self.classify(images[start + i], lab, sc, emb, self.mpp, timings=typer,
                                                 keep_rejected=keep_rejected and self.rejects))
                    post_s += time.perf_counter() - t2 - typer.get("typer_s", 0.0)
                    model_s += typer.get("typer_s", 0.0)  # the patch typer is a network too
                else:
                    results.append((lab, sc))
            if timings is not None:
                timings["model_s"] = timings.get("model_s", 0.0) + model_s
                timings["postprocess_s"] = timings.get("postprocess_s", 0.0) + post_s
        return results

    def predict_maps(self, image: np.ndarray, mpp: float, return_embed: bool = False):
        """Network maps for an image at ``mpp``, computed at the model's µm/px and resampled back to
        the image size: ``prob`` (H, W) and ``hv`` (C, H, W) (see :meth:`forward`); with
        ``return_embed`` also the network's embedding and the network pixels per image pixel."""
        image = _check_batch(image)[0]
        if mpp <= 0:
            raise InputError(f"µm/px must be > 0, got {mpp}")
        h, w = image.shape[:2]
        factor = mpp / self.mpp
        if abs(factor - 1.0) > 0.01:
            x = torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1)[None].float()  # inputs may be read-only
            size = (max(16, int(round(h * factor))), max(16, int(round(w * factor))))
            x = F.interpolate(x, size=size, mode="bilinear", antialias=factor < 1, align_corners=False)
            small = x.round().clamp(0, 255).to(torch.uint8)[0].permute(1, 2, 0).numpy()
        else:
            small = image
        out = self.forward(small[None])
        prob, hv = out["prob"][0], out["hv"][0]
        if small.shape[:2] != (h, w):
            t = torch.from_numpy(np.concatenate([prob[None], hv], 0))[None]
            t = F.interpolate(t, size=(h, w), mode="bilinear", align_corners=False)[0].numpy()
            prob, hv = t[0], t[1:]
        if return_embed:
            return prob, hv, out["embed"], small.shape[0] / h
        return prob, hv

    def segment(self, image: np.ndarray, mpp: float | None = None,
                keep_rejected: bool = False) -> tuple[np.ndarray, ...]:
        """Segment one RGB image at ``mpp`` µm/px (default: the model's); labels at the input size.

        Parameters
        ----------
        image : ndarray of shape (H, W, 3), uint8
        mpp : float, optional
            µm/px of ``image``. The model resamples internally to its own :attr:`mpp`.
        keep_rejected : bool
            A model that :attr:`rejects`: keep what it would remove, flagged (:meth:`classify`).

        Returns
        -------
        labels : ndarray of shape (H, W), uint32
        scores : ndarray of shape (K,), float32
        class_probs : ndarray of shape (K, C), float32
            A typed model only.
        not_nucleus, rejected : ndarray of shape (K,), float32 and bool
            With ``keep_rejected`` on a model that rejects only.
        """
        keep_rejected = bool(keep_rejected) and self.rejects
        mpp = self.mpp if mpp is None else float(mpp)
        if not mpp > 0:
            raise InputError(f"µm/px must be > 0, got {mpp}")
        if abs(mpp / self.mpp - 1.0) <= 0.01:
            return self.segment_batch(_check_batch(image), keep_rejected=keep_rejected)[0]
        if self.refine:
            # the SAM decoder works on the embedding of the tile at the model's µm/px: segment and
            # refine there, then bring the instances back to the input grid (nearest neighbour)
            from .resample import resample_image, resample_labels

            image = _check_batch(image)[0]
            res = self.segment_batch(resample_image(image, mpp / self.mpp)[None], keep_rejected=keep_rejected)[0]
            lab, sc = res[0], res[1]
            if len(res) >= 3:  # carry the per-instance arrays along with the instances that remain
                lab, idx = resample_labels(lab, np.arange(len(sc), dtype=np.float32), image.shape[:2])
                idx = idx.astype(np.int64)
                return (lab, np.asarray(sc, np.float32)[idx]) + tuple(np.asarray(a)[idx] for a in res[2:])
            return resample_labels(lab, sc, image.shape[:2])
        if self.typed:
            image = _check_batch(image)[0]
            prob, hv, embed, scale = self.predict_maps(image, mpp, return_embed=True)
            lab, sc = instances_from_maps(prob, hv, mpp, self.params)
            return self.classify(image, lab, sc, embed, mpp, scale, keep_rejected=keep_rejected)
        prob, hv = self.predict_maps(image, mpp)
        return instances_from_maps(prob, hv, mpp, self.params)


def remove_rejected(result: tuple) -> tuple:
    """``(labels, scores, class_probs, not_nucleus, rejected)`` of ``keep_rejected=True``
    (:meth:`Segmenter.classify`) -> ``(labels, scores, class_probs, not_nucleus)`` of the kept
    instances, labels renumbered 1..K' in order (what the model's own rejection returns)."""
    from .typehead import drop_instances

    labels, scores, probs, not_nucleus, rejected = result
    keep = ~np.asarray(rejected, bool)
    if keep.all():
        return labels, scores, probs, not_nucleus
    return drop_instances(labels, keep), np.asarray(scores)[keep], probs[keep], np.asarray(not_nucleus)[keep]


def load_model(path=None, device: str = "auto", refine: bool = False, teacher=None, engine: str = "auto",
               precision: str = "auto", min_score: float | None = None,
               reject_threshold: float | None = None) -> Segmenter:
    """Load a CellSAM checkpoint (default: the shipped weights) as a :class:`Segmenter`.

    ``teacher``: a SAM checkpoint path (or a loaded :class:`pipeline.model.teacher.SamTeacher`) for
    dual mode; it is attached only when the checkpoint has a fusion gate (arch ``fusion``). A dual
    checkpoint loaded without a teacher runs in lite mode (student embedding only), with a warning.
    ``engine`` / ``precision``: the network's runner (:func:`pipeline.model.engine.build_engine`).
    ``min_score``: overrides the checkpoint's minimum instance score (``PostprocessParams.min_score``;
    0 keeps every instance); ``None`` keeps the checkpoint's own.
    ``reject_threshold``: overrides the "not a nucleus" threshold of the patch typer (else of a type
    head with a reject output; 1 keeps every instance); ``None`` keeps the checkpoint's own (shipped 0.7).
    """
    import logging

    log = logging.getLogger(__name__)
    model, meta = load_checkpoint(path)
    if teacher is not None:
        from .teacher import SamTeacher, load_teacher

        t = teacher if isinstance(teacher, SamTeacher) else load_teacher(teacher)
        if model.fusion is None:
            log.warning("%s: lite checkpoint (no fusion gate): the SAM teacher is ignored", path or "default weights")
        else:
            want = (meta.get("teacher") or {}).get("type")
            if want and want != t.type:
                log.warning("checkpoint was trained with a %s teacher, got %s: fused features may be off", want, t.type)
            model.teacher = t
    elif model.fusion is not None:
        log.warning("%s: dual-mode checkpoint loaded without --teacher: running lite (student embedding only)",
                    path or "default weights")
    seg = Segmenter(model, meta, device=device, refine=refine, engine=engine, precision=precision)
    if min_score is not None:
        from dataclasses import replace

        seg.params = replace(seg.params, min_score=float(min_score))
    if reject_threshold is not None:
        seg.set_reject_threshold(float(reject_threshold))
    return seg
