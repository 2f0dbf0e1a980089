"""Meta-architectures (detectron2 ``META_ARCH_REGISTRY``)."""

from .psalm import PSALM, build_psalm_model, parameter_counts

__all__ = ["PSALM", "build_psalm_model", "parameter_counts"]
