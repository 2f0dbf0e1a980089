"""Training starts from the right weights: MODEL.PSALM.INIT (strict by prefix), the frozen-random check,
the stage-2 recipe from upstream-format files through tools/train_net.py, MODEL.DEVICE checks."""
import importlib.util
import json
import sys

import pytest
import torch
from torch import nn

from psalm.checkpoint.init import InitWeightsError, parse_init_entries, plan_initialization

from ._engine_standin import StandInTrainer, standin_cfg
from .conftest import REPO_ROOT

TINY = str(REPO_ROOT / "configs" / "tiny" / "Base-PSALM-tiny.yaml")
STAGE2 = str(REPO_ROOT / "configs" / "coco" / "psalm_swin_base_phi15.yaml")


def _load_tool(name):
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ----------------------------------------------------------------------------- the plan (unit)
class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Linear(3, 4)
        self.head = nn.Linear(4, 2)
        self.extra = nn.Linear(2, 2)


def _shapes(m):
    return {k: tuple(v.shape) for k, v in m.state_dict().items()}


def _save(path, sd, **extra):
    torch.save({"model": sd, **extra}, path)
    return str(path)


def test_plan_takes_each_key_from_its_entry(tmp_path):
    a, b = _Net(), _Net()
    fa = _save(tmp_path / "a.pth", {k: v for k, v in a.state_dict().items() if k.startswith("backbone.")},
               allowed_missing=[])
    fb = _save(tmp_path / "b.pth", b.state_dict())  # a full model: only head.* is taken from it
    entries = parse_init_entries([[fa, "backbone."], [fb, "head."]])
    plan = plan_initialization(_shapes(_Net()), entries, random_patterns=["extra.*"])
    assert plan.source["backbone.weight"] == fa and plan.source["head.bias"] == fb
    assert sorted(plan.random_keys) == ["extra.bias", "extra.weight"]
    assert torch.equal(plan.state_dict["head.weight"], b.head.weight) and "extra.weight" not in plan.state_dict
    assert plan.ignored[fb] == 4  # backbone.* and extra.* of b.pth are not used


def test_plan_reports_every_problem(tmp_path):
    net = _Net()
    sd = dict(net.state_dict())
    del sd["backbone.bias"]
    sd["backbone.weight"] = torch.zeros(5, 3)
    sd["backbone.stray"] = torch.zeros(1)
    f = _save(tmp_path / "bad.pth", sd)
    entries = parse_init_entries([[f, "backbone."], [f, "head."]])
    with pytest.raises(InitWeightsError) as e:
        plan_initialization(_shapes(net), entries, random_patterns=["head.bias"])
    msg = str(e.value)
    assert "2 model key(s) come from no source" in msg and "extra: 2 key(s)" in msg
    assert "head.bias: MODEL.PSALM.INIT.WEIGHTS[1]" in msg and "MODEL.PSALM.INIT.RANDOM" in msg  # covered twice
    assert "backbone.bias (from" in msg  # missing from its file
    assert "backbone.stray (in" in msg  # unexpected
    assert "backbone.weight: (5, 3) vs (4, 3)" in msg  # mis-shaped
    assert "MODEL.PSALM.INIT.FROM_SCRATCH" in msg  # the fix


def test_allowed_missing_of_a_converter_output_starts_random(tmp_path):
    net = _Net()
    sd = {k: v for k, v in net.state_dict().items() if k != "head.bias"}
    f = _save(tmp_path / "conv.pth", sd, allowed_missing=["head.bias"])
    plan = plan_initialization(_shapes(net), parse_init_entries([[f, ""]]))
    assert plan.random_keys == ["head.bias"]


def test_bad_entries_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match=r"list \[file, prefix"):
        parse_init_entries(["checkpoints/m2f_swin_b.pth"])
    with pytest.raises(ValueError, match="must end with '.'"):
        parse_init_entries([[str(tmp_path / "x.pth"), "backbone"]])
    with pytest.raises(FileNotFoundError, match="convert_mask2former"):
        parse_init_entries([[str(tmp_path / "missing.pth"), "backbone."]])


def test_frozen_part_left_random_is_an_error_unless_from_scratch(tmp_path):
    net = _Net()
    f = _save(tmp_path / "h.pth", {k: v for k, v in net.state_dict().items() if not k.startswith("backbone.")})
    entries = parse_init_entries([[f, "head.", "extra."]])
    frozen = ["backbone.weight", "backbone.bias"]
    with pytest.raises(InitWeightsError, match=r"FROZEN parameter\(s\) would stay randomly initialised"):
        plan_initialization(_shapes(net), entries, random_patterns=["backbone.*"], frozen=frozen)
    plan = plan_initialization(_shapes(net), entries, random_patterns=["backbone.*"], frozen=frozen,
                               frozen_random=["backbone.*"])
    assert sorted(plan.random_keys) == frozen[::-1]
    plan = plan_initialization(_shapes(net), entries, from_scratch=True, frozen=frozen)
    assert sorted(plan.random_keys) == frozen[::-1]


# ----------------------------------------------------------------------------- the trainer
def test_training_refuses_a_frozen_random_backbone(tmp_path):
    """The engine stand-in has a frozen backbone; nothing initialises it: training must not start."""
    cfg = standin_cfg(tmp_path)
    cfg.MODEL.PSALM.INIT.FROM_SCRATCH = False
    trainer = StandInTrainer(cfg)
    with pytest.raises(InitWeightsError) as e:
        trainer.resume_or_load(resume=False)
    msg = str(e.value)
    assert "FROZEN" in msg and "backbone: 2 key(s)" in msg and "MODEL.PSALM.INIT.WEIGHTS" in msg


def test_synthetic_main_job_says_it_trains_from_scratch():
    from psalm.config import get_psalm_cfg

    cfg = get_psalm_cfg(str(REPO_ROOT / "configs/tiny/psalm_synthetic.yaml"))
    assert cfg.MODEL.PSALM.INIT.FROM_SCRATCH and not cfg.MODEL.PSALM.INIT.WEIGHTS


def test_model_device_cuda_without_cuda_is_an_error():
    from psalm.config import get_psalm_cfg
    from psalm.engine import resolve_device

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    cfg = get_psalm_cfg(TINY, ["MODEL.DEVICE", "cuda"])
    with pytest.raises(ValueError, match="CUDA is not available.*MODEL.DEVICE cpu"):
        resolve_device(cfg)
    train_net = _load_tool("train_net")
    args = train_net.default_argument_parser().parse_args(["--config-file", TINY, "MODEL.DEVICE", "cuda"])
    with pytest.raises(ValueError, match="CUDA is not available"):
        train_net.setup(args)
    assert resolve_device(get_psalm_cfg(TINY, ["MODEL.DEVICE", "cpu"])) == "cpu"


# ----------------------------------------------------------------------------- the stage-2 recipe
@pytest.fixture(scope="module")
def stage2_files(tmp_path_factory):
    """The three stage-2 inputs written from upstream formats, as MODEL_ZOO.md describes, at tiny sizes:
    a Mask2Former detectron2 .pkl -> tools/convert_mask2former.py, an HF phi-1_5 directory ->
    tools/convert_phi.py (+ tokenizer), and a stage-1 checkpoint (model_final.pth with projector.*)."""
    from safetensors.torch import save_file

    from psalm.data.tokenizer import build_tiny_tokenizer

    from .test_mask2former_converter import _make_pkl_state, _write_pkl
    from .test_phi_converter import phi15_config, phi15_state_dict

    tmp = tmp_path_factory.mktemp("stage2")
    pkl, m2f_truth = _make_pkl_state()
    src = _write_pkl(tmp / "model_final_54b88a.pkl", pkl)
    assert _load_tool("convert_mask2former").main(
        ["--input", str(src), "--output", str(tmp / "m2f_swin_b.pth"), "--config-file", TINY]) == 0

    hf = tmp / "phi-1_5"
    hf.mkdir()
    tok = build_tiny_tokenizer(num_merges=128, add_psalm_tokens=False)  # + [PAD], [SEG] = 387: the tiny vocabulary
    tok.save_pretrained(str(hf))
    (hf / "config.json").write_text(json.dumps(phi15_config(len(tok) + 7)))
    save_file(phi15_state_dict(len(tok) + 7), str(hf / "model.safetensors"))
    sys.path.insert(0, str(REPO_ROOT / "tools"))
    try:
        import convert_phi
    finally:
        sys.path.pop(0)
    assert convert_phi.main(["--hf-dir", str(hf), "--output", str(tmp / "phi15_psalm.pth"),
                             "--save-tokenizer", str(tmp / "tokenizer"), "--config-file", TINY]) == 0

    from psalm.config import get_psalm_cfg
    from psalm.modeling.meta_arch import build_psalm_model

    torch.manual_seed(5)
    stage1 = build_psalm_model(get_psalm_cfg(TINY, ["MODEL.DEVICE", "cpu", "MODEL.PSALM.TOKENIZER",
                                                    str(tmp / "tokenizer")]))
    (tmp / "stage1").mkdir()
    torch.save({"model": stage1.state_dict(), "iteration": 4649}, tmp / "stage1" / "model_final.pth")
    return {"dir": tmp, "m2f_truth": m2f_truth, "stage1": stage1.state_dict()}


def _stage2_init_opts(files):
    """The stage-2 config's MODEL.PSALM.INIT with its file names mapped to the tiny files."""
    from psalm.config import get_psalm_cfg

    init = get_psalm_cfg(STAGE2).MODEL.PSALM.INIT
    where = {"m2f_swin_b.pth": files["dir"] / "m2f_swin_b.pth", "phi15_psalm.pth": files["dir"] / "phi15_psalm.pth",
             "model_final.pth": files["dir"] / "stage1" / "model_final.pth"}
    entries = [[str(where[e[0].rsplit("/", 1)[-1]]), *e[1:]] for e in init.WEIGHTS]
    return ["MODEL.PSALM.INIT.WEIGHTS", str(entries), "MODEL.PSALM.INIT.RANDOM", str(list(init.RANDOM))]


def test_stage2_recipe_initialises_every_part_from_its_file(stage2_files):
    from psalm.checkpoint.init import read_weights_file
    from psalm.config import get_psalm_cfg
    from psalm.engine import PSALMTrainer
    from psalm.modeling.meta_arch import build_psalm_model

    d = stage2_files["dir"]
    cfg = get_psalm_cfg(TINY, ["MODEL.DEVICE", "cpu", "MODEL.PSALM.TOKENIZER", str(d / "tokenizer"),
                               *_stage2_init_opts(stage2_files)])
    torch.manual_seed(0)
    model = build_psalm_model(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = PSALMTrainer.initialize_weights(cfg, model)
    after = model.state_dict()
    phi = read_weights_file(str(d / "phi15_psalm.pth"))[0]
    m2f, m2f_absent = read_weights_file(str(d / "m2f_swin_b.pth"))
    for k, v in after.items():
        if k.startswith(("backbone.", "pixel_decoder.", "predictor.")) and k not in m2f_absent:
            assert torch.equal(v, stage2_files["m2f_truth"][k]), k
        elif k.startswith("llm."):
            assert torch.equal(v, phi[k]), k
        elif k.startswith("projector."):
            assert torch.equal(v, stage2_files["stage1"][k]), k
        else:  # new in stage 2, or absent from the Mask2Former file by design
            assert k in plan.random_keys and torch.equal(v, before[k]), k
    assert set(plan.random_keys) == set(m2f_absent) | {k for k in after if k.startswith(
        ("mask_tokens", "mask_token_projector.", "class_projector.", "refer_projector.", "region_projector."))}


def test_stage2_recipe_trains_through_train_net(stage2_files, tmp_path):
    """The README's training command with the stage-2 INIT section (tiny files): the frozen Swin after two
    iterations is exactly Mask2Former's; without the INIT section training refuses to start."""
    train_net = _load_tool("train_net")
    d = stage2_files["dir"]
    data = tmp_path / "data"
    base = ["--config-file", TINY, "MODEL.DEVICE", "cpu", "MODEL.PSALM.TOKENIZER", str(d / "tokenizer"),
            "DATASETS.SYNTHETIC.ROOT", str(data), "DATASETS.SYNTHETIC.NUM_TRAIN", "4",
            "DATASETS.SYNTHETIC.NUM_VAL", "1", "DATASETS.SYNTHETIC.IMAGE_SIZE", "64", "INPUT.IMAGE_SIZE", "64",
            "DATASETS.TRAIN", '("psalm_synthetic_train_referring",)', "DATASETS.TRAIN_TASKS", '["referring"]',
            "DATASETS.TRAIN_RATIOS", "[1.0]", "DATASETS.TEST", "()", "DATASETS.TEST_TASKS", "[]",
            "SOLVER.MAX_ITER", "2", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.CHECKPOINT_PERIOD", "0"]
    with pytest.raises(InitWeightsError, match=r"FROZEN parameter\(s\).*\n.*backbone"):
        train_net.main(train_net.default_argument_parser().parse_args(base + ["OUTPUT_DIR", str(tmp_path / "none")]))
    out = tmp_path / "stage2"
    train_net.main(train_net.default_argument_parser().parse_args(base + _stage2_init_opts(stage2_files) +
                                                       ["OUTPUT_DIR", str(out)]))
    final = torch.load(out / "model_final.pth", weights_only=True)["model"]
    backbone = [k for k in final if k.startswith("backbone.")]
    assert backbone and all(torch.equal(final[k], stage2_files["m2f_truth"][k]) for k in backbone)


def test_docs_describe_the_stage2_recipe_the_tests_run():
    """docs/TRAINING.md shows the stage-2 config's INIT section verbatim; README, MODEL_ZOO.md and the
    converters name the same files (one name per file everywhere)."""
    import re

    import yaml

    from psalm.config import get_psalm_cfg

    cfg = get_psalm_cfg(STAGE2)
    training = (REPO_ROOT / "docs" / "TRAINING.md").read_text()
    section = training[training.index("### Initial weights"):]
    block = re.search(r"```yaml\n(.*?)```", section, re.S).group(1)
    shown = yaml.safe_load(block)["MODEL"]["PSALM"]
    assert shown["INIT"]["WEIGHTS"] == [list(e) for e in cfg.MODEL.PSALM.INIT.WEIGHTS]
    assert shown["INIT"]["RANDOM"] == list(cfg.MODEL.PSALM.INIT.RANDOM)
    assert shown["TOKENIZER"] == cfg.MODEL.PSALM.TOKENIZER
    files = [e[0] for e in cfg.MODEL.PSALM.INIT.WEIGHTS]
    stage1 = get_psalm_cfg(str(REPO_ROOT / "configs/stage1/psalm_stage1_projector.yaml"))
    assert {e[0] for e in stage1.MODEL.PSALM.INIT.WEIGHTS} <= set(files)
    assert files[2] == stage1.OUTPUT_DIR + "/model_final.pth"
    docs = {name: (REPO_ROOT / name).read_text() for name in ("README.md", "MODEL_ZOO.md", "docs/TRAINING.md")}
    for name, text in docs.items():
        for f in files:
            assert f in text, (name, f)
    for tool, f in (("convert_mask2former", files[0]), ("convert_phi", files[1])):
        assert f"--output {f}" in (REPO_ROOT / "MODEL_ZOO.md").read_text()
        assert f in (REPO_ROOT / "tools" / f"{tool}.py").read_text()


def test_stage2_config_covers_the_full_size_model_exactly_once(tmp_path, monkeypatch):
    """The full-size model (built on the meta device) against the stage-2 INIT section: the Mask2Former
    file as the converter makes it from a Swin-B .pkl's key set, Phi's keys, a stage-1 checkpoint. Every
    key is covered once; the config without its INIT section refuses the frozen random Swin."""
    import psalm.checkpoint.init as init_module
    from psalm.checkpoint.mask2former import convert_mask2former_state_dict
    from psalm.checkpoint.vision_keys import _relative_position_index
    from psalm.config import get_psalm_cfg
    from psalm.modeling.meta_arch import build_psalm_model

    from .test_mask2former_converter import _to_pkl_name

    cfg = get_psalm_cfg(STAGE2)
    model = build_psalm_model(cfg, device="meta")
    sd = model.state_dict()
    pkl = {n: v for k, v in sd.items() if (n := _to_pkl_name(k)) is not None}
    for i, stage in enumerate(model.backbone.model.swin.encoder.layers):
        for j, _ in enumerate(stage.blocks):
            base = f"backbone.model.swin.encoder.layers.{i}.blocks.{j}.attention."
            for p in ("weight", "bias"):
                pkl[f"backbone.layers.{i}.blocks.{j}.attn.qkv.{p}"] = torch.cat(
                    [sd[f"{base}{n}.{p}"] for n in ("q_proj", "k_proj", "v_proj")])
            pkl[f"backbone.layers.{i}.blocks.{j}.attn.relative_position_index"] = _relative_position_index(12)
    pkl["sem_seg_head.predictor.class_embed.weight"] = torch.empty(134, 256, device="meta")
    conv = convert_mask2former_state_dict(pkl)
    contents = {
        "m2f_swin_b.pth": (conv.state_dict, conv.allowed_missing),
        "phi15_psalm.pth": ({k: v for k, v in sd.items() if k.startswith("llm.")}, []),
        "model_final.pth": (dict(sd), []),  # a stage-1 checkpoint holds the whole model
    }
    entries = []
    for e in cfg.MODEL.PSALM.INIT.WEIGHTS:
        placeholder = tmp_path / e[0].rsplit("/", 1)[-1]
        placeholder.write_bytes(b"")
        entries.append([str(placeholder), *e[1:]])
    monkeypatch.setattr(init_module, "read_weights_file", lambda path: contents[path.rsplit("/", 1)[-1]])
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(n.startswith("backbone.") for n in frozen)
    plan = plan_initialization(shapes, parse_init_entries(entries), random_patterns=list(cfg.MODEL.PSALM.INIT.RANDOM),
                               frozen=frozen)
    assert set(plan.source) == set(sd)
    new = {k for k in sd if k.split(".")[0] in ("mask_tokens", "mask_token_projector", "class_projector",
                                                 "refer_projector", "region_projector")}
    assert set(plan.random_keys) == new | set(conv.allowed_missing)
    assert all(k.startswith(("predictor.class_head", "predictor.refer_head", "predictor.region_head",
                             "pixel_decoder.")) for k in conv.allowed_missing)
    with pytest.raises(InitWeightsError, match=r"FROZEN parameter\(s\)[^\n]*\n\s+backbone: \d+ key"):
        plan_initialization(shapes, [], frozen=frozen)  # the config as it was: no initial weights at all


def test_init_error_carries_the_strict_report(tmp_path):
    from psalm.checkpoint import IncompatibleKeysError

    net = _Net()
    sd = {k: v for k, v in net.state_dict().items() if k != "head.bias"}
    sd["head.weight"] = torch.zeros(3, 4)
    f = _save(tmp_path / "x.pth", sd)
    with pytest.raises(IncompatibleKeysError) as e:
        plan_initialization(_shapes(net), parse_init_entries([[f, "backbone.", "head."]]),
                            random_patterns=["backbone.*"], frozen=["extra.weight"])
    err = e.value
    assert sorted(err.report.missing) == ["extra.bias", "extra.weight", "head.bias"]
    assert err.report.mismatched == [("head.weight", (3, 4), (2, 4))]
    assert err.covered_twice == ["backbone.bias", "backbone.weight"] and err.frozen_random == ["extra.weight"]


def test_llm_loaded_at_build_counts_as_its_source(stage2_files, tmp_path):
    """MODEL.PSALM.LLM.NAME_OR_PATH with weights (loaded when the model is built) covers llm.*; a second
    source for llm.* is 'covered twice'."""
    from psalm.checkpoint.init import llm_weights_dir
    from psalm.config import get_psalm_cfg

    d = stage2_files["dir"]
    assert llm_weights_dir(get_psalm_cfg(TINY, ["MODEL.PSALM.LLM.NAME_OR_PATH", str(d / "phi-1_5")])) == str(
        d / "phi-1_5")
    (tmp_path / "config_only").mkdir()
    (tmp_path / "config_only" / "config.json").write_text("{}")
    assert llm_weights_dir(get_psalm_cfg(TINY, ["MODEL.PSALM.LLM.NAME_OR_PATH", str(tmp_path / "config_only")])) == ""
    shapes = {"llm.a": (2,), "head.b": (1,)}
    f = _save(tmp_path / "llm.pth", {"llm.a": torch.zeros(2)})
    plan = plan_initialization(shapes, [], prebuilt={"llm.": "NAME_OR_PATH"}, random_patterns=["head.*"])
    assert plan.source["llm.a"] == "NAME_OR_PATH" and "llm.a" not in plan.random_keys
    with pytest.raises(InitWeightsError, match="llm.a: NAME_OR_PATH, MODEL.PSALM.INIT.WEIGHTS"):
        plan_initialization(shapes, parse_init_entries([[f, "llm."]]), prebuilt={"llm.": "NAME_OR_PATH"},
                            random_patterns=["head.*"])
