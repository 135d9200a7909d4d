"""Every default of the pipeline, in one place (frozen dataclasses, one per stage).

The CLI, the Snakemake workflow (``workflows/schemas/config.schema.yaml``) and the library read
their defaults from here; nothing else redeclares them. Units are in the field names.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

from .errors import ConfigError


@dataclass(frozen=True)
class TissueConfig:
    """Tissue detection on a low-resolution thumbnail."""

    thumb_mpp: float = 8.0  # µm/px of the thumbnail the mask is computed on
    min_saturation: float = 0.05  # floor for the Otsu threshold on HSV saturation (0..1)
    max_value_black: float = 0.12  # pixels darker than this (HSV value) are not tissue (pen/black)
    min_area_um2: float = 20000.0  # connected tissue pieces smaller than this are dropped
    close_radius_px: int = 2  # morphological closing radius, thumbnail pixels


@dataclass(frozen=True)
class StoreConfig:
    """OME-Zarr (NGFF 0.4) tile store."""

    mpp: float = 0.5  # target µm/px of level 0 of the store
    chunk_px: int = 1024  # chunk edge (y, x); channel chunk is 3
    pyramid_levels: int = 4  # number of 2x levels including level 0
    workers: int = 2  # threads reading/writing chunks
    fill_value: int = 255  # absent chunks read as white


@dataclass(frozen=True)
class SegmentConfig:
    """Whole-slide segmentation over chunks."""

    # cores = the store's chunks (StoreConfig.chunk_px); each is read with a halo around it
    halo_px: int = 96  # context on each side: > largest nucleus + eps, and ~ the CNN receptive-field radius
    anchor_eps_px: float = 3.0  # anchors within core+eps are kept; dedup resolves the band
    batch_size: int = 4  # tiles per forward pass
    device: str = "auto"  # auto | cpu | cuda
    # network runner (pipeline.model.engine): auto | torch | onnxruntime | openvino; precision auto | fp32 | bf16
    engine: str = "auto"
    precision: str = "auto"
    workers: int = 2  # dask threads / reader threads
    refine: bool = False  # SAM-decoder refinement (see docs/model.md)
    # SAM ViT checkpoint (official format) for dual mode: the teacher attached to a dual checkpoint
    # (--teacher); recorded by file name + sha256, never by path
    teacher: str | None = None
    dedup_iou: float = 0.5  # IoU at/above which the lower-ranked duplicate is dropped
    min_area_um2: float = 3.0  # nuclei smaller than this are discarded
    # instances whose score (mean nucleus probability) is below this are dropped by the model's
    # decoding; None = the checkpoint's metadata.postprocess.min_score (shipped 0.82), 0 = keep all
    min_score: float | None = None
    # instances whose "not a nucleus" probability (the model's patch typer / type head) is above this
    # are dropped; None = the checkpoint's own (shipped 0.7), 1 = keep all
    reject_threshold: float | None = None
    # implausible objects (far outside nucleus size/shape: tissue folds, keratin, merged clumps) are
    # discarded per window, before dedup, and counted (summary "nuclei_dropped_implausible")
    max_area_um2: float = 200.0  # objects larger than this are not nuclei
    min_circularity: float = 0.1  # objects less circular than this are not nuclei
    # dedup: when the part of a losing instance not covered by the winner still holds a disk of
    # this diameter, the two windows disagree on the partition (merge vs split): that part is
    # kept as its own nucleus and the pair counted in summary "stitch_conflicts"
    conflict_min_width_um: float = 3.0
    # QuPath cells: grow each nucleus by this many µm (Voronoi-limited, clipped to tissue); 0 = off
    cell_expansion_um: float = 0.0
    geojson_plain: bool = False  # also write an uncompressed .geojson
    # the model sees only the part of each window within tissue_margin_px of the tissue mask
    # (aligned to 16 px); windows at the tissue's edge shrink, fully covered ones are unchanged
    crop_to_tissue: bool = True
    tissue_margin_px: int = 64


@dataclass(frozen=True)
class MppCheckConfig:
    """µm/px plausibility check after inference (:mod:`pipeline.mppcheck`, ``summary["mpp_check"]``)."""

    # median area of the detected nuclei expected on H&E (µm²; equivalent diameter 3.9-11.8 µm)
    median_area_um2: tuple = (12.0, 110.0)
    # the shipped model's median nucleus area at the right µm/px (geometric mean over 6 references)
    reference_area_um2: float = 27.0
    probe_tiles: int = 4  # tissue tiles the scale probe runs the model on (0 = no probe)
    probe_tile_px: int = 384  # edge of a probe tile, store pixels
    probe_factors: tuple = (0.5, 1.0, 2.0)  # hypotheses: a store pixel is really h x its declared size
    # plausible when lo <= h* <= hi; asymmetric: images of large nuclei (40x tumour tiles, the
    # synthetic slides) read h* 0.58-0.72 at their right µm/px, a 2x over-declared CMU-1 0.49-0.51
    probe_factor_range: tuple = (0.55, 1.5)
    min_nuclei: int = 30  # fewer nuclei: not judged


@dataclass(frozen=True)
class TrainConfig:
    """Training of the CellSAM dense heads (``cellsam train``)."""

    epochs: int = 60
    iters_per_epoch: int = 100
    batch_size: int = 8
    crop_px: int = 256
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_iters: int = 100
    mpp: float = 0.5  # µm/px the model is trained at
    seed: int = 0
    aug_strength: float = 1.0
    threads: int = 0  # 0 = torch default
    log_every: int = 20  # iterations between progress log lines
    grow_depth: int = 0  # extra zero-initialised residual blocks per stage (pipeline.model.cellsam.grown)
    ema: float = 0.0  # weight EMA decay per iteration (0 = off); validation and outputs use the EMA
    degrade: float = 0.0  # probability of an image-quality degradation per crop (pipeline.data.augment.degrade_image)


# SAM teacher (pipeline.model.teacher): one physical scale everywhere. Every window is cut into
# crops of SAM_TEACHER_TILE_PX model pixels, each resized by img_size / SAM_TEACHER_TILE_PX (4x for the
# official 1024-px SAMs: SAM sees 0.125 µm/px at the model's 0.5), and the embeddings are stitched
SAM_TEACHER_TILE_PX = 256
SAM_TEACHER_BATCH = 4  # SAM inputs per encoder call (memory bound: a ViT-H 1024 input needs ~2 GB)


# a model that rejects and removes more than this fraction of its detections as "not a nucleus"
# gets a warning after export (summary["rejected"]["fraction"]): keratin and debris are expected to
# be removed, real nuclei are not, and a typer that does not know the tissue removes many; review
# rejected/<id>.geojson.gz (measured: CMU-1 skin 0.33, mostly keratin; an H&E OME-TIFF 0.001; a
# head-and-neck frozen section 0.22, with small dark nuclei among them)
REJECTED_WARN_FRACTION = 0.2

# image sharpness of the tissue (pipeline.focus): scored per block of about FOCUS_BLOCK_UM square in
# every chunk's core at inference; blocks with less than FOCUS_MIN_TISSUE tissue are not scored; a block
# scoring below FOCUS_SOFT_BELOW is "soft" (out of focus or coarser than the model's resolution:
# measured 0.51-0.91 on sharp 20x/40x tiles, 0.32-0.46 blurred by 0.5 um, 0.21-0.26 by 1 um, 0.30-0.43
# for 1 um/px scans); more than FOCUS_WARN_FRACTION of the scored tissue soft gives a warning at export
FOCUS_BLOCK_UM = 128.0
FOCUS_MIN_TISSUE = 0.25
FOCUS_SOFT_BELOW = 0.4
FOCUS_WARN_FRACTION = 0.1

# compact resume state of a training run (``--resume-state FILE``, pipeline.training.loop): one file
# small enough to commit next to the code; larger parts (best weights, optimiser moments) are dropped
RESUME_STATE_MAX_MB = 15.0


@dataclass(frozen=True)
class DistillConfig:
    """Distillation / dual-mode training (``cellsam distill``, :mod:`pipeline.training.distill`)."""

    epochs: int = 20
    iters_per_epoch: int = 50
    batch_size: int = 8
    crop_px: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_iters: int = 50
    mpp: float = 0.5
    seed: int = 0
    dihedral: bool = True  # dihedral augmentation (crop + embedding grid); see module docstring
    aug_strength: float = 1.0  # dual mode: colour augmentation strength (pipeline.data.augment)
    threads: int = 0  # 0 = torch default
    max_tiles: int = 0  # 0 = every training tile; else the first N (quick runs)


@dataclass(frozen=True)
class RefinerConfig:
    """SAM-decoder refiner training (``cellsam distill --refiner``, :mod:`pipeline.training.refine_train`)."""

    epochs: int = 10
    iters_per_epoch: int = 40
    batch_size: int = 4
    crop_px: int = 256
    prompts_per_crop: int = 16
    lr: float = 3e-4
    weight_decay: float = 1e-4
    warmup_iters: int = 20
    seed: int = 0
    aug_strength: float = 1.0
    window_tokens: int = 8
    mlp_dim: int = 2048  # decoder MLP width when the decoder is new and not initialised from SAM
    min_area_px: int = 12
    threads: int = 0
    max_tiles: int = 0


@dataclass(frozen=True)
class EvaluateConfig:
    """Point-based scoring (``cellsam evaluate --points``, :func:`pipeline.metrics.match_points`)."""

    # a predicted centre matches a ground-truth point within this distance (CRCHisto protocol:
    # 6 px at 0.55 µm/px, Sirinukunwattana et al. 2016)
    point_radius_um: float = 3.3


@dataclass(frozen=True)
class Config:
    tissue: TissueConfig = field(default_factory=TissueConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    segment: SegmentConfig = field(default_factory=SegmentConfig)


def with_overrides(cfg, **overrides):
    """Return ``cfg`` with the non-``None`` ``overrides`` applied, validating names and signs.

    Raises
    ------
    ConfigError
        For an unknown field or a non-positive size/resolution.
    """
    names = {f.name for f in fields(cfg)}
    clean = {}
    for key, value in overrides.items():
        if value is None:
            continue
        if key not in names:
            raise ConfigError(f"unknown setting {key!r} for {type(cfg).__name__}")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if (key.endswith("_px") or key.endswith("mpp") or key in {"batch_size", "workers"}) and value <= 0:
                if key == "halo_px":
                    if value < 0:
                        raise ConfigError(f"{key} must be >= 0, got {value}")
                else:
                    raise ConfigError(f"{key} must be > 0, got {value}")
            if key == "cell_expansion_um" and not 0 <= value <= 100:
                raise ConfigError(f"{key} must be between 0 (off) and 100 µm, got {value}")
            if key == "min_score" and not 0 <= value <= 1:
                raise ConfigError(f"{key} must be between 0 (keep all) and 1, got {value}")
            if key == "reject_threshold" and not 0 <= value <= 1:
                raise ConfigError(f"{key} must be between 0 and 1 (keep all), got {value}")
        clean[key] = value
    return replace(cfg, **clean)
