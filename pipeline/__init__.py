"""CellSAM whole-slide nucleus segmentation pipeline.

Stages (one module each, pure core + thin I/O shell):
``slide`` (reader) -> ``tissue`` -> ``store`` (OME-Zarr) -> ``infer`` (model over chunks)
-> ``stitch`` -> ``measure`` -> ``export`` (GeoJSON / GeoParquet / summary / QC).
"""

__version__ = "0.1.0"
