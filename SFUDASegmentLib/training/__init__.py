"""Source-side training of the segmentation network: patch sampling, augmentation, losses, EMA, the training loop."""
