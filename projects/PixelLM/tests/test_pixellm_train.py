"""The tiny config (random CLIP + tiny LLaMA with LoRA) trains on synthetic multi-target data on CPU
through psalm's trainer, registered through detectron2's META_ARCH_REGISTRY."""
import pathlib

import pytest
import torch

CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "pixellm_tiny.yaml"


@pytest.fixture(scope="module")
def tiny_cfg(tmp_path_factory, pixellm_tok_dir):
    from pixellm import get_pixellm_cfg

    tmp = tmp_path_factory.mktemp("pixellm_tiny")
    cfg = get_pixellm_cfg(str(CONFIG), ["OUTPUT_DIR", str(tmp / "out"), "MODEL.PIXELLM.TOKENIZER", str(pixellm_tok_dir),
                                        "MODEL.PIXELLM.MAX_NEW_TOKENS", "8",
                                        "DATASETS.SYNTHETIC.ROOT", str(tmp / "data"), "SOLVER.MAX_ITER", "3"])
    return cfg


def test_registry_builds_pixellm(tiny_cfg):
    from detectron2.modeling import build_model

    from pixellm.engine import prepare_pixellm_data_for_cfg

    prepare_pixellm_data_for_cfg(tiny_cfg)
    model = build_model(tiny_cfg)
    assert type(model).__name__ == "PixelLM"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    # official trainable set: LoRA + lm_head + embed_tokens + decoder + text_hidden_fcs + projectors
    assert any("lora_A" in n for n in trainable)
    assert any(n.endswith("embed_tokens.weight") for n in trainable)
    assert any(n.startswith("mask_decoder.") for n in trainable)
    assert not any(n.startswith(("vision_tower.", "image_feature_neck.", "prompt_encoder.")) for n in trainable)
    assert not any("q_proj.base_layer" in n for n in trainable)


def test_random_init_needs_opt_in():
    from pixellm import get_pixellm_cfg
    from pixellm.modeling.meta_arch import PixelLM

    cfg = get_pixellm_cfg(str(CONFIG), ["MODEL.PIXELLM.ALLOW_RANDOM_INIT", "False", "MODEL.PIXELLM.TOKENIZER", ""])
    with pytest.raises(ValueError, match="random weights"):
        PixelLM(cfg)


def test_tiny_training_runs_and_learns_codebook(tiny_cfg):
    from pixellm.engine import PixelLMTrainer

    torch.manual_seed(0)
    trainer = PixelLMTrainer(tiny_cfg)
    trainer.resume_or_load(resume=False)
    model = trainer.model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert any(n.startswith("mask_decoder.") for n in changed)
    assert any(n.startswith("text_hidden_fcs.") for n in changed)
    assert any("lora_B" in n for n in changed)
    assert not any(n.startswith("vision_tower.") for n in changed)
    import json

    lines = [json.loads(x) for x in pathlib.Path(tiny_cfg.OUTPUT_DIR, "metrics.json").read_text().splitlines()]
    train = [x for x in lines if "all/loss_ce" in x]
    assert len(train) == tiny_cfg.SOLVER.MAX_ITER
    assert all(k in train[0] for k in ("all/loss_ce", "all/loss_mask", "all/loss_dice"))
    results = trainer._last_eval_results["pixellm_synthetic_muse_val"]["muse"]
    assert results["without_gpt_scoring"] == 1.0 and 0.0 <= results["gIoU"] <= 100.0 and results["num_gt"] > 0


def test_synthetic_config_trains_on_its_mixture(tmp_path, pixellm_tok_dir):
    """The documented synthetic run's config (configs/pixellm_synthetic.yaml) as committed, on a tiny
    root: its three members (MUSE-format, referring, semantic) load and map, and two iterations train
    with its options (PROMPT_NORM batch)."""
    from pixellm import get_pixellm_cfg
    from pixellm.engine import PixelLMTrainer

    cfg_file = CONFIG.parent / "pixellm_synthetic.yaml"
    cfg = get_pixellm_cfg(str(cfg_file), [
        "OUTPUT_DIR", str(tmp_path / "out"), "MODEL.PIXELLM.TOKENIZER", str(pixellm_tok_dir),
        "DATASETS.SYNTHETIC.ROOT", str(tmp_path / "data"), "DATASETS.SYNTHETIC.NUM_TRAIN", "6",
        "DATASETS.SYNTHETIC.NUM_VAL", "2", "DATASETS.SYNTHETIC.NUM_TEST", "2", "SOLVER.MAX_ITER", "2", "SOLVER.WARMUP_ITERS", "0", "SOLVER.LOG_PERIOD", "1",
        "TEST.EVAL_PERIOD", "0", "DATALOADER.NUM_WORKERS", "0", "MODEL.DEVICE", "cpu"])
    assert "psalm_synthetic_train_semantic" in cfg.DATASETS.TRAIN
    assert len(cfg.DATASETS.TRAIN_RATIOS) == len(cfg.DATASETS.TRAIN)
    torch.manual_seed(0)
    trainer = PixelLMTrainer(cfg)
    trainer.resume_or_load(resume=False)
    assert trainer.model.prompt_norm is not None
    before = trainer.model.prompt_norm.running_mean.clone()
    trainer.train()
    assert not torch.equal(trainer.model.prompt_norm.running_mean, before)  # batch statistics were used
    import json

    lines = [json.loads(x) for x in pathlib.Path(cfg.OUTPUT_DIR, "metrics.json").read_text().splitlines()]
    assert len([x for x in lines if "all/loss_dice" in x]) == 2
