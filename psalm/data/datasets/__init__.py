"""Registration of every PSALM data set with detectron2's ``DatasetCatalog`` / ``MetadataCatalog``.

Importing this package registers all names under ``$DETECTRON2_DATASETS`` (default ``./datasets``).
Registration is lazy: files are read only by ``DatasetCatalog.get(name)``, and a missing file raises
:class:`MissingDatasetFileError` naming the file and the prepare step. Call
``register_all_psalm_datasets(root)`` to re-register every name under another root.

Every data set's metadata has ``task`` and ``evaluator_type`` (see ``psalm.evaluation.build_evaluator``;
MUSE's task and evaluator type ``muse`` belong to the projects that map and evaluate it, psalm's model has none);
category data sets also ``prompt_class_names`` (the K prompt strings, contiguous-id order, no
background) and ``prompt_is_thing`` (K bools). (detectron2 renames a metadata key ``class_names`` to
``thing_classes``, hence the prefix.)
Layout, sources and prepare commands: ``datasets/README.md``.
"""
from ._common import MissingDatasetFileError, datasets_root, registered_psalm_names
from .ade20k import register_ade20k
from .cityscapes import register_cityscapes
from .coco import register_coco
from .coco_interactive import register_coco_interactive
from .davis import register_davis
from .grefcoco import register_grefcoco
from .llava import register_llava
from .lvis import register_lvis
from .muse import register_muse
from .pascal import register_pascal
from .refcoco import register_refcoco
from .synthetic import register_synthetic

__all__ = ["MissingDatasetFileError", "register_all_psalm_datasets", "registered_psalm_names", "datasets_root"]


def register_all_psalm_datasets(root: str | None = None) -> list[str]:
    """(Re-)register every psalm data set under ``root`` (default ``$DETECTRON2_DATASETS``); returns the names."""
    for register in (
        register_coco,
        register_refcoco,
        register_grefcoco,
        register_coco_interactive,
        register_ade20k,
        register_cityscapes,
        register_pascal,
        register_davis,
        register_lvis,
        register_llava,
        register_muse,
        register_synthetic,
    ):
        register(root)
    return registered_psalm_names()


register_all_psalm_datasets()
