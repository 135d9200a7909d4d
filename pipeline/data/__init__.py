"""Annotated nucleus data: readers (label images, ImageScope XML, QuPath GeoJSON), datasets, augmentation."""
