"""Images in (any mode, dtype or orientation -> RGB) and segmentations out (PNGs, overlays, JSON)."""
from ovss.io.images import IMAGE_EXTENSIONS, ImageInput, ImageLoadError, expand_inputs, is_image_file, load_image
from ovss.io.outputs import atomic_path, atomic_write, label_image, sanitize_name, save_segmentation, write_json

__all__ = [
    "IMAGE_EXTENSIONS", "ImageInput", "ImageLoadError", "expand_inputs", "is_image_file", "load_image",
    "atomic_path", "atomic_write", "label_image", "sanitize_name", "save_segmentation", "write_json",
]
