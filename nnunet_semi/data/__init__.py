"""nnU-Net data plumbing: dataset folders, unlabeled preprocessing, labeled splits, the two-view loader."""
