"""Running a segmentation network on a volume: input preparation on the network grid, slice-wise and sliding-window prediction, no-adaptation segmentation."""
