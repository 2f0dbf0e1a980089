import pathlib

import pytest
from detectron2.config import get_cfg

from psalm.config import add_psalm_config, get_psalm_cfg

from .conftest import REPO_ROOT

CONFIGS = sorted(str(p.relative_to(REPO_ROOT)) for p in (REPO_ROOT / "configs").rglob("*.yaml"))


def test_configs_found():
    assert "configs/coco/psalm_swin_base_phi15.yaml" in CONFIGS
    assert any(c.startswith("configs/tiny/") for c in CONFIGS)


@pytest.mark.parametrize("path", CONFIGS)
def test_every_yaml_loads(path):
    cfg = add_psalm_config(get_cfg())
    cfg.merge_from_file(str(REPO_ROOT / path))
    assert cfg.MODEL.META_ARCHITECTURE == "PSALM"
    assert cfg.MODEL.PSALM.NUM_MASK_TOKENS == cfg.MODEL.MASK_FORMER.NUM_OBJECT_QUERIES


def test_paper_model_config():
    cfg = get_psalm_cfg(str(REPO_ROOT / "configs/coco/psalm_swin_base_phi15.yaml"))
    assert cfg.MODEL.SWIN.DEPTHS == [2, 2, 18, 2]
    assert cfg.MODEL.PSALM.LLM.HIDDEN_SIZE == 2048
    assert cfg.MODEL.MASK_FORMER.DEC_LAYERS == 10
    assert cfg.INPUT.IMAGE_SIZE == 1024 and cfg.INPUT.PAD_VALUE == 128.0


def test_unknown_key_is_an_error_naming_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("MODEL:\n  PSALM:\n    NUM_MASK_TOKENZ: 3\n")
    with pytest.raises(KeyError, match="MODEL.PSALM.NUM_MASK_TOKENZ"):
        get_psalm_cfg(str(bad))


def test_add_psalm_config_is_idempotent():
    cfg = add_psalm_config(get_cfg())
    cfg.MODEL.PSALM.NUM_MASK_TOKENS = 7
    assert add_psalm_config(cfg).MODEL.PSALM.NUM_MASK_TOKENS == 7
