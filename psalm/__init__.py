"""psalm: PSALM (Pixelwise SegmentAtion with Large Multi-Modal Model) as a detectron2 project.

Importing the package is enough to use it with detectron2, as ``import mask2former`` is: it registers
the meta-architecture ``PSALM`` (``META_ARCH_REGISTRY``), the backbone ``PSALMSwinTransformer``
(``BACKBONE_REGISTRY``), the pixel decoder ``MSDeformAttnPixelDecoder`` and the transformer decoder
``PSALMMultiScaleMaskedTransformerDecoder`` (their registries in :mod:`psalm.modeling`) and every psalm
data set (``DatasetCatalog`` / ``MetadataCatalog``, under ``$DETECTRON2_DATASETS``; lazy, no file is
read). Then::

    import psalm
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    cfg = psalm.add_psalm_config(get_cfg())
    cfg.merge_from_file("configs/coco/psalm_swin_base_phi15.yaml")
    model = build_model(cfg)
"""

__version__ = "0.1.0"

try:
    import detectron2  # noqa: F401
except ImportError as e:  # no registry release: say how to get it instead of a bare ModuleNotFoundError
    raise ImportError(
        "psalm needs detectron2, which has no release on the package registry (pip cannot install it as a "
        "dependency). Run `bash scripts/install.sh` (it builds detectron2 from the pb1-detectron2 sdist with "
        "small patches), or build it from source into this environment: see the README, 'Installation'."
    ) from e

from . import modeling  # noqa: E402,F401  (registers the model components)
from .config import add_psalm_config, get_psalm_cfg  # noqa: E402
from .data import datasets  # noqa: E402,F401  (registers the data sets)

__all__ = ["add_psalm_config", "get_psalm_cfg", "modeling", "datasets", "__version__"]
