"""Benchmark data: class-name lists (with named alternative spellings) and dataset readers."""
from ovss.data.datasets import LayoutError, Sample, SegDataset, get_dataset, list_datasets
from ovss.data.names import DATASET_CLASSES, NAME_SETS, class_names, list_name_sets

__all__ = [
    "DATASET_CLASSES", "NAME_SETS", "LayoutError", "Sample", "SegDataset", "class_names", "get_dataset",
    "list_datasets", "list_name_sets",
]
