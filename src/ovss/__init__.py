"""ovss: training-free open-vocabulary semantic segmentation with diffusion models.

    import ovss
    seg = ovss.create("faseg", models="tiny")
    out = seg.segment("cat.jpg", classes=["cat", "sofa"])
"""
from ovss.registry import create, list_methods, register
from ovss.result import Segmentation

__version__ = "0.1.0"
__all__ = ["create", "list_methods", "register", "Segmentation", "__version__"]
