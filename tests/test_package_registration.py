"""``import psalm`` registers everything detectron2 needs (as ``import mask2former`` does)."""
import subprocess
import sys

from .conftest import REPO_ROOT

_SCRIPT = r"""
import sys
import psalm  # the only psalm import: everything below must be registered by it

from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog
from detectron2.modeling import BACKBONE_REGISTRY, META_ARCH_REGISTRY, build_model

registries = {
    "META_ARCH": (META_ARCH_REGISTRY, "PSALM"),
    "BACKBONE": (BACKBONE_REGISTRY, "PSALMSwinTransformer"),
    "PIXEL_DECODER": (psalm.modeling.PIXEL_DECODER_REGISTRY, "MSDeformAttnPixelDecoder"),
    "TRANSFORMER_DECODER": (psalm.modeling.TRANSFORMER_DECODER_REGISTRY, "PSALMMultiScaleMaskedTransformerDecoder"),
}
for what, (registry, name) in registries.items():
    assert name in registry, (what, name)
for name in ("coco_2017_val_panoptic_psalm", "refcoco_unc_val", "psalm_synthetic_val_panoptic", "davis17_val"):
    assert name in DatasetCatalog.list(), name

cfg = psalm.add_psalm_config(get_cfg())
cfg.merge_from_file(sys.argv[1])
cfg.MODEL.DEVICE = "cpu"
cfg.MODEL.PSALM.TOKENIZER = sys.argv[2]
model = build_model(cfg)  # detectron2's own builder
assert type(model).__name__ == "PSALM", type(model)
print("OK", sum(p.numel() for p in model.parameters()))
"""


def test_import_psalm_registers_model_and_data_sets(tmp_path):
    from psalm.config import get_psalm_cfg
    from psalm.predictor import ensure_tokenizer

    tiny = str(REPO_ROOT / "configs/tiny/Base-PSALM-tiny.yaml")
    tok = ensure_tokenizer(get_psalm_cfg(tiny), cache_dir=str(tmp_path)).MODEL.PSALM.TOKENIZER
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, tiny, tok], cwd=str(tmp_path), capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("OK ")
