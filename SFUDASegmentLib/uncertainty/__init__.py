"""Uncertainty measures of a segmentation, and what a reader is told about them.

Maps (one concept per module, arrays ``(C, *S)`` / ``(*S)``): ``entropy`` (voxel entropy),
``disagreement`` (source vs adapted prediction), ``ensemble`` (the entropy of the source and
adapted networks together), ``candidate_spread`` (the source model's segmentations of HEAL's
candidates), ``flip_tta`` (flip test-time augmentation),
``temperature`` (temperature scaling fitted on the source side), ``mahalanobis`` (embedding
distance to the source class Gaussians); ``maps`` adds them to a method's result. HEAL's NIG
variance stays in ``heal/denoising.py``.

Reading them: ``review_queue`` (the regions most likely to be wrong), ``reliability`` (measured
AUROC per method and map, put in words), ``review`` (both, for a result).
"""
