#!/usr/bin/env python
"""psalm: PSALM (ECCV 2024) as a detectron2 project. Distribution name ``psalm-d2``; import name ``psalm``.

Install with ``bash scripts/install.sh`` (see README); versions are pinned in scripts/constraints.txt.
``pip install -e .`` declares every runtime dependency that the package registry can provide, except:

* detectron2: it has no release on the registry. ``scripts/install.sh`` builds it from the ``pb1-detectron2``
  sdist with small patches, or build it from source (README, "GPU nodes"); ``import psalm`` without it fails
  with a message saying so;
* panopticapi-lite (PQ, the panoptic PNG format; used by detectron2's panoptic evaluator and our mapper):
  its metadata pins ``numpy<2``, which its code does not need, so declaring it would downgrade numpy.
  ``scripts/install.sh`` installs it with ``--no-deps``;
* torch-ms-deform-attn, the optional compiled deformable-attention kernel (built by ``scripts/install.sh``;
  the PyTorch implementation is used without it).

Extras: ``[demo]`` the web demo (``demo/app.py``: gradio), ``[metrics]`` the DAVIS J&F reference
(esdft-segmetric; the PQ reference is panopticapi-lite, see above), ``[test]`` pytest and selenium (the
browser test also needs Debian's chromium + chromium-driver: ``scripts/install_browser.sh``).
"""
from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "torch>=2.1",
    "torchvision",
    "numpy>=2",
    "pillow",
    "opencv-python",
    "scipy",
    "scikit-image",
    "transformers>=4.45",
    "tokenizers",
    "safetensors",
    "timm",
    "peft",
    "pycocotools",
    "lvis",
    "fvcore",
    "iopath",
    "tqdm",
    "tensorboard",
    "matplotlib",
    "pyyaml",
]
EXTRAS_REQUIRE = {
    "demo": ["gradio>=6"],
    "metrics": ["esdft-segmetric"],
    "test": ["pytest", "selenium"],
}

if __name__ == "__main__":
    setup(
        name="psalm-d2",
        version="0.1.0",
        description="PSALM: Pixelwise SegmentAtion with Large Multi-Modal Model, as a detectron2 project",
        license="Apache-2.0",
        python_requires=">=3.10",
        packages=find_packages(include=("psalm", "psalm.*")),
        package_data={"psalm": ["data/class_names/*.json", "assets/*"]},
        install_requires=INSTALL_REQUIRES,
        extras_require=EXTRAS_REQUIRE,
        entry_points={"console_scripts": ["psalm-collect-env=psalm.collect_env:main"]},
    )
