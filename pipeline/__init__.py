"""Seamline pipeline: one image from its pixels to merged polygons on disk.

Stages are plain functions on NumPy arrays and Shapely geometries; only ``pipeline.graph``
knows about Dask.
"""
