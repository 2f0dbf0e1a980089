"""Model directories (psalm.model_dir): PSALMPredictor.from_pretrained(dir), MODEL.WEIGHTS DIR, and the
trainer's OUTPUT_DIR holding config.yaml + tokenizer + weights."""
import importlib.util
import shutil

import pytest
import torch

from .conftest import REPO_ROOT
from .tiny_model_dir import TINY, TINY_OPTS, make_tiny_model_dir


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    base = tmp_path_factory.mktemp("model_dir")
    return make_tiny_model_dir(base / "tiny", base / "tok_cache")


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def _assert_loaded(predictor, path):
    saved = _weights(path)
    state = predictor.model.state_dict()
    assert set(saved) == set(state)
    for k, v in saved.items():
        torch.testing.assert_close(state[k], v, rtol=0, atol=0, msg=k)


def test_from_pretrained_loads_the_directory(model_dir, tmp_path):
    from psalm.predictor import PSALMPredictor

    # a moved directory works: the paths in config.yaml are not used, the files next to it are
    moved = shutil.copytree(model_dir, tmp_path / "moved")
    predictor = PSALMPredictor.from_pretrained(moved, device="cpu")
    assert predictor.cfg.MODEL.WEIGHTS == str(moved / "model_final.pth")
    assert predictor.cfg.MODEL.PSALM.TOKENIZER == str(moved)
    _assert_loaded(predictor, moved / "model_final.pth")
    out = predictor(torch.zeros(60, 80, 3, dtype=torch.uint8).numpy(), task="interactive", points=[(10, 10)])
    assert tuple(out["instances"].pred_masks.shape) == (1, 60, 80)


def test_model_weights_may_name_the_directory(model_dir):
    from psalm.config import get_psalm_cfg
    from psalm.model_dir import apply_model_dir_weights
    from psalm.predictor import PSALMPredictor

    cfg = get_psalm_cfg(TINY, TINY_OPTS + ["MODEL.WEIGHTS", str(model_dir)])
    apply_model_dir_weights(cfg)
    assert cfg.MODEL.WEIGHTS == str(model_dir / "model_final.pth")
    assert cfg.MODEL.PSALM.TOKENIZER == str(model_dir)
    # PSALMPredictor takes the directory as MODEL.WEIGHTS too
    cfg2 = get_psalm_cfg(TINY, TINY_OPTS + ["MODEL.WEIGHTS", str(model_dir), "MODEL.PSALM.TOKENIZER", str(model_dir)])
    _assert_loaded(PSALMPredictor(cfg2), model_dir / "model_final.pth")


def test_bad_directories_say_what_is_wrong(model_dir, tmp_path):
    from psalm.config import get_psalm_cfg
    from psalm.model_dir import apply_model_dir_weights, model_dir_cfg, resolve_weights

    with pytest.raises(FileNotFoundError, match="(?s)does not exist.*train the README main job"):
        model_dir_cfg(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.yaml"):
        model_dir_cfg(tmp_path / "empty")
    unfinished = shutil.copytree(model_dir, tmp_path / "unfinished")
    (unfinished / "model_final.pth").rename(unfinished / "model_0000499.pth")
    (unfinished / "last_checkpoint").write_text("model_0000499.pth")
    with pytest.raises(FileNotFoundError, match="(?s)no model_final.pth.*model_0000499.pth.*training not finished"):
        model_dir_cfg(unfinished)
    assert resolve_weights(unfinished / "model_0000499.pth") == str(unfinished / "model_0000499.pth")
    # a config.yaml with a key this version does not know
    stale = shutil.copytree(model_dir, tmp_path / "stale")
    (stale / "config.yaml").write_text((stale / "config.yaml").read_text() + "NOT_A_KEY: 1\n")
    with pytest.raises(ValueError, match="does not match this version of psalm"):
        model_dir_cfg(stale)
    # a different tokenizer than the one stored with the weights
    other = tmp_path / "other_tok"
    other.mkdir()
    (other / "tokenizer.json").write_text("{}")
    cfg = get_psalm_cfg(TINY, TINY_OPTS + ["MODEL.WEIGHTS", str(model_dir), "MODEL.PSALM.TOKENIZER", str(other)])
    with pytest.raises(ValueError, match="differs from the tokenizer stored with the weights"):
        apply_model_dir_weights(cfg)


def test_train_net_output_dir_is_a_model_directory(model_dir, tmp_path):
    """tools/train_net.py's setup writes config.yaml (detectron2) and the tokenizer into OUTPUT_DIR; with the
    trainer's model_final.pth the directory loads with from_pretrained. MODEL.WEIGHTS DIR is resolved."""
    from detectron2.engine import default_argument_parser

    spec = importlib.util.spec_from_file_location("psalm_train_net_tool", REPO_ROOT / "tools" / "train_net.py")
    train_net = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_net)
    out = tmp_path / "run"
    args = default_argument_parser().parse_args(
        ["--config-file", TINY, *TINY_OPTS, "MODEL.PSALM.TOKENIZER", str(model_dir), "MODEL.WEIGHTS", str(model_dir),
         "OUTPUT_DIR", str(out)])
    cfg = train_net.setup(args)
    assert cfg.MODEL.WEIGHTS == str(model_dir / "model_final.pth")
    assert (out / "config.yaml").is_file()
    assert (out / "tokenizer.json").read_bytes() == (model_dir / "tokenizer.json").read_bytes()
    shutil.copyfile(model_dir / "model_final.pth", out / "model_final.pth")  # what the trainer writes at the end
    from psalm.model_dir import model_dir_cfg

    loaded = model_dir_cfg(out)
    assert loaded.MODEL.WEIGHTS == str(out / "model_final.pth") and loaded.MODEL.PSALM.TOKENIZER == str(out)
