"""The lowest psalm layer: vocabulary and data formats shared by data, modeling, evaluation, checkpoint,
inference and the predictor. It imports nothing from psalm, so every package may import it.

* :mod:`psalm.structures.tasks`: task names, their condition kinds, the visual-prompt types;
* :mod:`psalm.structures.masks`: COCO RLE / polygon helpers and the disk structuring element.
"""
