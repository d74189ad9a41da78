"""Glue between the library and 3D Slicer: MRML nodes, background jobs, Qt-free panel logic. Imports Slicer lazily."""
