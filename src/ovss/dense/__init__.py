"""Dense-prediction plumbing shared by the methods: label decisions, resizing, windows, superpixels."""
