#!/usr/bin/env python
"""Make the ``pb1-detectron2==0.6`` sdist (detectron2 v0.6 Python sources, no C++ sources) install
and run with today's numpy / Pillow / setuptools.

Every edit is an exact text replacement that must match exactly as often as expected; anything else
means the sdist is not the one this script was written for, and the script fails loudly rather than
produce a half-patched detectron2. See ``../shared/INSTALL_NOTES.md`` and README "Installation".

Usage: python scripts/patch_detectron2.py path/to/unpacked/pb1-detectron2-0.6
"""
import pathlib
import re
import sys

# (relative file, old, new, expected count). Counts are per file.
_EDITS = [
    ("setup.py", "ext_modules=get_extensions(),", "ext_modules=[],", 1),
    ("setup.py", '"black==21.4b2",', '"black",', 1),
    ("detectron2/data/transforms/transform.py", "interp=Image.LINEAR", "interp=Image.BILINEAR", 1),
    ("detectron2/model_zoo/model_zoo.py", "import pkg_resources\n", "", 1),
    (
        "detectron2/model_zoo/model_zoo.py",
        'pkg_resources.resource_filename(\n        "detectron2.model_zoo", os.path.join("configs", config_path)\n    )',
        'os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", config_path)',
        1,
    ),
    ("detectron2/evaluation/coco_evaluation.py", "use_fast_impl=True,", "use_fast_impl=False,", 2),
]

# numpy >= 1.24 removed the deprecated aliases; (file, count) of ``np.<alias>`` uses, 19 in 7 files.
_NP_ALIASES = {
    "detectron2/evaluation/pascal_voc_evaluation.py": 2,
    "detectron2/evaluation/sem_seg_evaluation.py": 7,
    "detectron2/structures/masks.py": 3,
    "detectron2/data/datasets/pascal_voc.py": 1,
    "detectron2/data/build.py": 2,
    "detectron2/utils/visualizer.py": 3,
    "detectron2/utils/video_visualizer.py": 1,
}
_NP_RE = re.compile(r"\bnp\.(int|float|bool|str|object)\b(?![_0-9])")

_C_PLACEHOLDER = '''"""Placeholder for detectron2's compiled ops (not built in the psalm install; see psalm's README).

PSALM uses none of them. Anything that needs one gets a clear error instead of an ImportError at
import time of unrelated modules.
"""


def get_compiler_version():
    return "not compiled (psalm patched sdist build)"


def get_cuda_version():
    return "not compiled (psalm patched sdist build)"


def has_cuda():
    return False


PSALM_PATCHED_SDIST = True


def __getattr__(name):
    raise RuntimeError(
        f"detectron2._C.{name} is unavailable: this detectron2 was installed from the patched "
        "pb1-detectron2 sdist without C++/CUDA ops. Install detectron2 from source to use it."
    )
'''


def _replace(root: pathlib.Path, rel: str, old: str, new: str, expected: int) -> None:
    path = root / rel
    text = path.read_text()
    found = text.count(old)
    if found != expected:
        raise SystemExit(f"patch_detectron2: {rel}: expected {expected} x {old!r}, found {found}")
    path.write_text(text.replace(old, new))


def main(argv):
    if len(argv) != 2:
        raise SystemExit(__doc__)
    root = pathlib.Path(argv[1])
    if not (root / "setup.py").is_file() or not (root / "detectron2").is_dir():
        raise SystemExit(f"patch_detectron2: {root} is not an unpacked pb1-detectron2 sdist")
    if (root / "detectron2" / "_C.py").exists():
        raise SystemExit(f"patch_detectron2: {root} is already patched; unpack a fresh copy")
    for rel, old, new, n in _EDITS:
        _replace(root, rel, old, new, n)
    total = 0
    for rel, n in _NP_ALIASES.items():
        path = root / rel
        text, found = _NP_RE.subn(lambda m: m.group(1), path.read_text())
        if found != n:
            raise SystemExit(f"patch_detectron2: {rel}: expected {n} numpy aliases, found {found}")
        path.write_text(text)
        total += found
    left = [str(p) for p in (root / "detectron2").rglob("*.py") if _NP_RE.search(p.read_text())]
    if left:
        raise SystemExit(f"patch_detectron2: unexpected numpy aliases left in {left}")
    (root / "detectron2" / "_C.py").write_text(_C_PLACEHOLDER)
    print(f"patch_detectron2: {len(_EDITS)} edits + {total} numpy aliases + _C placeholder applied")


if __name__ == "__main__":
    main(sys.argv)
