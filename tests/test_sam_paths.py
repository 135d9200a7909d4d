"""The SAM paths (issue 13, item 1): refinement at any µm/px, one teacher scale, the windowed decoder
equal to segment_anything's own MaskDecoder, dual mode through every entry point."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.data.readers import read_image
from pipeline.model import load_model
from pipeline.model.checkpoint import DEFAULT_WEIGHTS, load_checkpoint, save_checkpoint
from pipeline.model.refine import attach_sam_decoder, build_sam_decoder, decode_windows
from pipeline.model.resample import resample_image, resample_labels
from pipeline.model.teacher import build_tiny_sam_checkpoint, load_teacher, teacher_tiles

from conftest import shared_file


@pytest.fixture(scope="module")
def tile():
    """A real CPM-15 20x (0.5 µm/px) tile, 192 x 192 px with nuclei."""
    return np.ascontiguousarray(read_image(shared_file("nuclei/cpm15/images/image06.png"))[100:292, 80:272])


@pytest.fixture(scope="module")
def tiny_sam(tmp_path_factory):
    # 512-px SAM input: with the 256-px teacher crops SAM sees every region upsampled 2x
    return build_tiny_sam_checkpoint(tmp_path_factory.mktemp("sam") / "tiny_sam.pth", img_size=512)


# --------------------------------------------------------------------------------------------------
# one physical scale for the teacher


def test_teacher_tiles_cover_each_axis_once():
    assert teacher_tiles(192, 256) == [(0, 192, 0, 192)]
    assert teacher_tiles(512, 256) == [(0, 256, 0, 256), (256, 512, 256, 512)]
    # 640 = 2 crops + a last crop aligned to the edge; the overlap [384, 512) is split at 448
    assert teacher_tiles(640, 256) == [(0, 256, 0, 256), (256, 512, 256, 448), (384, 640, 448, 640)]
    for n in (16, 256, 272, 1216, 1232):
        t = teacher_tiles(n, 256)
        owned = [o for _, _, a, b in t for o in range(a, b)]
        assert owned == list(range(n)) and all(a >= s and b <= e and e - s <= 256 for s, e, a, b in t)


def test_a_region_gets_the_same_teacher_features_in_a_training_crop_and_in_a_slide_window(tiny_sam):
    from pipeline.model.cellsam import PIXEL_MEAN, PIXEL_STD
    from pipeline.training.distill import cut_crop

    teacher = load_teacher(tiny_sam)
    assert teacher.scale == 2.0 and teacher.info["tile_px"] == 256
    img = read_image(shared_file("nuclei/cpm15/images/image06.png"))  # 392 x 459 at 0.5 µm/px
    window = np.full((512, 640, 3), 255, np.uint8)  # a slide window with the tile somewhere inside
    window[60:60 + img.shape[0], 150:150 + img.shape[1]] = img
    mean = torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(PIXEL_STD).view(1, 3, 1, 1)

    def emb(a):
        return teacher((torch.from_numpy(a).permute(2, 0, 1)[None].float() - mean) / std)[0].numpy()

    whole = emb(window)
    assert whole.shape == (256, 32, 40)
    # the window's crop at (256, 0) and its last, overlapping crop at (0, 384), each cut as a
    # distillation training crop (256 px) and encoded alone
    for (r, c), (rows, cols) in {(256, 0): (slice(0, 16), slice(0, 16)),
                                 (0, 384): (slice(0, 16), slice(4, 16))}.items():
        crop = emb(cut_crop(window, r, c, 256))
        inside = whole[:, r // 16:r // 16 + 16, c // 16:c // 16 + 16]
        np.testing.assert_allclose(inside[:, rows, cols], crop[:, rows, cols], rtol=1e-4, atol=1e-5)
    # (the old rule, long side -> SAM's img_size, encoded this window at 0.8x and the crop at 2x:
    # every feature differed)
    assert not np.allclose(whole[:, 16:32, 0:16], whole[:, 0:16, 0:16], atol=1e-3)


# --------------------------------------------------------------------------------------------------
# the windowed decoder is SAM's MaskDecoder


def test_decode_windows_equals_segment_anythings_mask_decoder_on_a_full_window():
    torch.manual_seed(0)
    pe, md = build_sam_decoder({"mlp_dim": 64})
    pe.eval(), md.eval()
    gh, gw, hw = 8, 10, (128, 160)
    embed = torch.randn(1, 256, gh, gw)
    points = torch.tensor([[30.0, 40.0], [100.0, 90.0], [5.0, 120.0]])
    boxes = torch.tensor([[20.0, 28.0, 44.0, 50.0], [80.0, 70.0, 120.0, 110.0], [0.0, 100.0, 14.0, 127.0]])
    windows = np.array([[0, 0, gh, gw]] * 3, np.int64)
    with torch.no_grad():
        logits, iou = decode_windows(pe, md, embed, pe.pe_layer((gh, gw)), windows, points, boxes, hw)
        # segment_anything's own path (Sam.forward): prompt encoder at this image size, then MaskDecoder
        pe.input_image_size, pe.image_embedding_size = hw, (gh, gw)
        sparse, dense = pe(points=(points[:, None, :], torch.ones(3, 1)), boxes=boxes, masks=None)
        ref_masks, ref_iou = md(image_embeddings=embed, image_pe=pe.get_dense_pe(), sparse_prompt_embeddings=sparse,
                                dense_prompt_embeddings=dense, multimask_output=True)
    assert logits.shape == ref_masks.shape == (3, 3, 4 * gh, 4 * gw)
    torch.testing.assert_close(logits, ref_masks, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(iou, ref_iou, rtol=1e-4, atol=1e-5)
    assert logits.abs().max() > 0.1  # not a trivially zero output


# --------------------------------------------------------------------------------------------------
# refinement at any input µm/px


@pytest.fixture(scope="module")
def refiner_ckpt(tmp_path_factory):
    """Shipped weights + a small random SAM decoder whose masks always win the fusion (so the
    refined output visibly differs from the dense one)."""
    model, meta = load_checkpoint(DEFAULT_WEIGHTS)
    torch.manual_seed(0)
    attach_sam_decoder(model, {"mlp_dim": 64})
    meta = {**meta, "refine": {"t_iou": -10.0, "t_agree": 0.0}}
    path = tmp_path_factory.mktemp("refiner") / "refiner.pt"
    save_checkpoint(path, model, meta)
    return path


def test_resample_labels_keeps_ids_consistent():
    lab = np.array([[0, 1, 1, 2], [3, 3, 0, 2]], np.uint32)
    out, sc = resample_labels(lab, np.array([0.1, 0.2, 0.3], np.float32), (4, 8))
    assert out.shape == (4, 8) and set(np.unique(out)) == {0, 1, 2, 3}
    np.testing.assert_array_equal(out[::2, ::2], lab)
    small, sc2 = resample_labels(lab, np.array([0.1, 0.2, 0.3], np.float32), (1, 2))
    # pixel centres (row 1; cols 1, 3) pick ids 3 and 2; id 1 vanishes, the rest is renumbered
    assert small.tolist() == [[1, 2]] and sc2.tolist() == pytest.approx([0.3, 0.2])


@pytest.mark.parametrize("factor", [2.0, 0.75])
def test_refine_works_at_any_input_mpp(refiner_ckpt, tile, factor):
    plain = load_model(refiner_ckpt, device="cpu")
    ref = load_model(refiner_ckpt, device="cpu", refine=True)
    image = resample_image(tile, factor)  # the same tissue at 0.5 / factor µm/px
    mpp = 0.5 / factor
    lab, sc = ref.segment(image, mpp)[:2]
    assert lab.shape == image.shape[:2] and lab.dtype == np.uint32
    k = int(lab.max())
    assert k > 5 and sc.shape == (k,) and set(np.unique(lab)) == set(range(k + 1))
    # refinement ran (before the fix it was silently skipped: the output equalled the dense one)
    dense = plain.segment(image, mpp)[0]
    assert not np.array_equal(lab, dense)
    # it is the refined segmentation at the model's µm/px brought back to the input grid
    small = resample_image(image, 1 / factor)
    want, want_sc = resample_labels(*ref.segment(small, 0.5)[:2], image.shape[:2])
    np.testing.assert_array_equal(lab, want)
    np.testing.assert_array_equal(sc, want_sc)


# --------------------------------------------------------------------------------------------------
# dual mode (--teacher) through segment / infer / predict and the workflow


@pytest.fixture(scope="module")
def dual_ckpt(tmp_path_factory, tiny_sam):
    """Shipped weights + a (zero-initialised, g = 0.5) fusion gate: a dual checkpoint."""
    from pipeline.model.cellsam import GatedFusion

    model, meta = load_checkpoint(DEFAULT_WEIGHTS)
    model.fusion = GatedFusion()
    model.arch["fusion"] = True
    path = tmp_path_factory.mktemp("dual") / "dual.pt"
    save_checkpoint(path, model, {**meta, "mode": "dual", "teacher": load_teacher(tiny_sam).info})
    return path


def test_dual_mode_through_segment_records_the_teachers_identity_not_its_path(tmp_path, dual_ckpt, tiny_sam):
    import json

    from pipeline.cli import main
    from pipeline.infer import read_chunks_meta
    from pipeline.model.teacher import file_sha256
    from pipeline.paths import slide_paths
    from pipeline.synthetic import write_synthetic_slide

    slide = write_synthetic_slide(tmp_path / "syn.tif", size_px=(900, 1000), mpp=0.5, seed=3)
    out = tmp_path / "out"
    args = ["--quiet", "segment", str(slide), "-o", str(out), "--model", str(dual_ckpt), "--device", "cpu",
            "--engine", "torch", "--workers", "1"]
    assert main(args + ["--teacher", str(tiny_sam)]) == 0
    sp = slide_paths(out, "syn")
    meta = read_chunks_meta(sp.chunks)
    info = meta["model"]
    assert info["mode"] == "dual" and info["teacher_file"] == tiny_sam.name
    assert info["teacher_sha256"] == file_sha256(tiny_sam) and info["teacher_tile_px"] == 256
    summary = json.loads(sp.summary.read_text())
    assert summary["model"]["teacher_sha256"] == info["teacher_sha256"] and summary["nuclei"] > 0
    for text in (json.dumps(meta), sp.summary.read_text()):
        assert str(tiny_sam.parent) not in text and str(tmp_path) not in text  # no machine paths
    # without the teacher the same checkpoint runs lite, under another model identity
    out2 = tmp_path / "out2"
    assert main(["--quiet", "segment", str(slide), "-o", str(out2), "--model", str(dual_ckpt), "--device", "cpu",
                 "--engine", "torch", "--workers", "1"]) == 0
    lite = read_chunks_meta(slide_paths(out2, "syn").chunks)["model"]
    assert lite["mode"] == "lite" and "teacher_sha256" not in lite


def test_dual_mode_through_infer_and_predict(tmp_path, dual_ckpt, tiny_sam, tile, capsys):
    import tifffile
    from PIL import Image

    from pipeline.cli import main
    from pipeline.errors import ModelError
    from pipeline.infer import resolve_model

    src = tmp_path / "tile.png"
    Image.fromarray(tile).save(src)
    for name, extra in (("dual.tif", ["--teacher", str(tiny_sam)]), ("lite.tif", [])):
        assert main(["--quiet", "predict", str(src), "-o", str(tmp_path / name), "--model", str(dual_ckpt),
                     "--device", "cpu", *extra]) == 0
    dual, lite = tifffile.imread(tmp_path / "dual.tif"), tifffile.imread(tmp_path / "lite.tif")
    assert dual.shape == tile.shape[:2] and dual.max() > 5
    assert not np.array_equal(dual, lite)  # the teacher's embedding was fused in
    # the library path that `cellsam infer` uses
    m = resolve_model(str(dual_ckpt), device="cpu", refine=False, store_mpp=0.5, teacher=str(tiny_sam))
    assert m.info["mode"] == "dual" and m.info["teacher_file"] == tiny_sam.name
    with pytest.raises(ModelError, match="classical"):
        resolve_model("classical", device="cpu", refine=False, store_mpp=0.5, teacher=str(tiny_sam))
    # a missing teacher file: one line, the model-error exit code
    rc = main(["infer", str(tmp_path / "nostore.ome.zarr"), "-o", str(tmp_path / "c"), "--model", str(dual_ckpt),
               "--teacher", str(tmp_path / "missing.pth")])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc != 0 and err.startswith("cellsam: error:")


def test_dual_mode_through_evaluate(tmp_path, dual_ckpt, tiny_sam, tile, capsys):
    import json

    import tifffile
    from PIL import Image

    from pipeline.cli import main
    from pipeline.data.readers import read_labels
    from pipeline.model.teacher import file_sha256

    images, truth = tmp_path / "images", tmp_path / "truth"
    images.mkdir(), truth.mkdir()
    Image.fromarray(tile).save(images / "image06.png")
    lab = read_labels(shared_file("nuclei/cpm15/labels/image06.tif"))[100:292, 80:272]
    tifffile.imwrite(truth / "image06.tif", lab.astype(np.uint32))
    out = tmp_path / "res.json"
    rc = main(["--quiet", "evaluate", "--pred", str(tmp_path / "pred"), "--truth", str(truth), "--images", str(images),
               "--model", str(dual_ckpt), "--teacher", str(tiny_sam), "--device", "cpu", "-o", str(out)])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert doc["model"] == {"model": "dual.pt", "mode": "dual", "refine": False, "teacher_file": tiny_sam.name,
                            "teacher_sha256": file_sha256(tiny_sam)}
    assert (tmp_path / "pred" / "image06.tif").exists() and 0.3 < doc["overall"]["aji"] <= 1
    capsys.readouterr()
    rc = main(["evaluate", "--pred", str(tmp_path / "pred"), "--truth", str(truth), "--teacher", str(tiny_sam)])
    assert rc == 2 and "--images" in capsys.readouterr().err
