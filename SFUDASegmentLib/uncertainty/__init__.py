"""Uncertainty measures of a segmentation: voxel entropy and the maps built on it."""
