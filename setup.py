#!/usr/bin/env python
"""psalm: PSALM (ECCV 2024) as a detectron2 project. Distribution name ``psalm-d2``; import name ``psalm``.

Install with ``bash scripts/install.sh`` (see README); dependencies are pinned in scripts/constraints.txt.
"""
from setuptools import find_packages, setup

setup(
    name="psalm-d2",
    version="0.1.0",
    description="PSALM: Pixelwise SegmentAtion with Large Multi-Modal Model, as a detectron2 project",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=("psalm", "psalm.*")),
    package_data={"psalm": ["data/class_names/*.json", "assets/*"]},
    install_requires=[
        "torch>=2.1",
        "torchvision",
        "transformers>=4.45",
        "timm",
        "pycocotools",
        "fvcore",
        "opencv-python",
        "scipy",
        "safetensors",
        "tqdm",
    ],
    entry_points={"console_scripts": ["psalm-collect-env=psalm.collect_env:main"]},
)
