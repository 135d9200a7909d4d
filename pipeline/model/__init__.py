"""CellSAM model package (see docs/model.md).

Public API used by the rest of the pipeline:

- :func:`load_model(path=None, device="auto", mode=None, refine=False)` -> :class:`Segmenter`
  (``path=None`` loads the shipped default weights ``pipeline/weights/cellsam_default.pt``).
- :meth:`Segmenter.segment(image_rgb, mpp)` -> ``(labels uint32 (H, W), scores float32 (K,))``
  where ``scores[i]`` is the score of label ``i + 1``; the image is resampled to the model's
  µm/px internally and the labels are returned at the input size.
- :meth:`Segmenter.segment_batch(images)` for a list/array of ``uint8 (H, W, 3)`` tiles already at
  ``Segmenter.mpp``; returns a list of ``(labels, scores)``.
"""

from .segmenter import Segmenter, load_model  # noqa: E402,F401
