"""Evaluation: confusion-matrix metrics and the benchmark protocols (geometry, mean, vocabulary)."""
from ovss.eval.metrics import ConfusionMatrix, image_iou, per_image_miou
from ovss.eval.protocols import PROTOCOLS, Protocol, get_protocol

__all__ = ["PROTOCOLS", "ConfusionMatrix", "Protocol", "get_protocol", "image_iou", "per_image_miou"]
