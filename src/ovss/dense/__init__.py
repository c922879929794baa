"""Dense-prediction plumbing shared by the methods: label decisions, resizing, windows, superpixels, K-means,
SAM instance proposals."""
