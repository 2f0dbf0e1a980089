"""A model directory (model_final.pth + config.yaml + tokenizer) of the tiny test config, for the tests of
``PSALMPredictor.from_pretrained``, the demos and the browser test. Its weights are a seeded random
initialisation saved as a checkpoint: the tests check loading and the pipeline, not mask quality."""
import pathlib

import torch

from .conftest import REPO_ROOT

TINY = str(REPO_ROOT / "configs" / "tiny" / "Base-PSALM-tiny.yaml")
# 128 px and 16 generated tokens keep the demo tests fast; the tiny config's other sizes are unchanged
TINY_OPTS = ["MODEL.DEVICE", "cpu", "INPUT.IMAGE_SIZE", "128", "TEST.PSALM.MAX_NEW_TOKENS", "16"]


def make_tiny_model_dir(directory, tokenizer_cache, seed: int = 0) -> pathlib.Path:
    """Write a tiny model directory into ``directory`` and return it."""
    from psalm.config import get_psalm_cfg
    from psalm.model_dir import save_tokenizer_to
    from psalm.modeling.meta_arch import build_psalm_model
    from psalm.predictor import ensure_tokenizer

    out = pathlib.Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    cfg = ensure_tokenizer(get_psalm_cfg(TINY, TINY_OPTS), cache_dir=str(tokenizer_cache))
    torch.manual_seed(seed)
    model = build_psalm_model(cfg, device="cpu")
    torch.save({"model": {k: v.detach().clone() for k, v in model.state_dict().items()}}, out / "model_final.pth")
    save_tokenizer_to(cfg, out)
    cfg.defrost()
    cfg.MODEL.WEIGHTS = ""  # as detectron2's default_setup writes it for a run trained from scratch
    (out / "config.yaml").write_text(cfg.dump())
    return out
