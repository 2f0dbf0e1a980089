"""PSALM data: the one dataset mapper, visual prompts, the multi-task sampler / loader.

Data-set registrations live in :mod:`psalm.data.datasets` (importing it registers them).
"""
from .mapper import PSALMDatasetMapper, preprocess_image, resize_pad_masks, resized_shape
from .samplers import MultiTaskBatchSampler, PSALMTrainLoader, build_psalm_train_loader

__all__ = [
    "PSALMDatasetMapper",
    "preprocess_image",
    "resize_pad_masks",
    "resized_shape",
    "MultiTaskBatchSampler",
    "PSALMTrainLoader",
    "build_psalm_train_loader",
]
