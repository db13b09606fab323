"""Tasks built on the explanation API: segmentation (and later multi-label, points, words)."""
