"""tools/compare_official.py: the side-by-side benchmark against the official PSALM code.

Unit tests (default run, no official code needed): argument validation, the comparison functions on
synthetic arrays, the JSON line's fields, the data-set writer and the weight randomiser. The
end-to-end run at ``--size tiny`` needs the official environment (docs/PERFORMANCE.md, "Side by side
with the official code"): set ``PSALM_OFFICIAL_DIR`` (the extracted official tree) and
``PSALM_OFFICIAL_PYTHONPATH`` (stubs:site:tree); it is skipped otherwise.
"""
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "compare_official.py"


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("compare_official", TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _fake_official_env(tmp_path):
    tree = tmp_path / "official"
    (tree / "psalm/model/language_model").mkdir(parents=True)
    (tree / "psalm/model/language_model/llava_phi.py").write_text("")
    stubs, site = tmp_path / "stubs", tmp_path / "site"
    stubs.mkdir()
    (stubs / "MultiScaleDeformableAttention.py").write_text("")
    (site / "transformers").mkdir(parents=True)
    return tree, f"{stubs}{os.pathsep}{site}{os.pathsep}{tree}"


# ------------------------------------------------------------------------------ argument checks
def _args(tool, argv):
    return tool.get_parser().parse_args(argv)


def test_missing_official_dir_says_how_to_build_it(tool, tmp_path, monkeypatch):
    monkeypatch.delenv("PSALM_OFFICIAL_DIR", raising=False)
    monkeypatch.delenv("PSALM_OFFICIAL_PYTHONPATH", raising=False)
    with pytest.raises(tool.UsageError, match="official-dir.*required.*PERFORMANCE.md.*git --git-dir"):
        tool.validate(_args(tool, []))
    with pytest.raises(tool.UsageError, match=r"no psalm/model/language_model/llava_phi.py.*d5dbfda.*archive"):
        tool.validate(_args(tool, ["--official-dir", str(tmp_path / "nowhere"), "--official-python-path", "x"]))


def test_official_python_path_checks(tool, tmp_path):
    tree, pp = _fake_official_env(tmp_path)
    args = _args(tool, ["--official-dir", str(tree), "--official-python-path", pp])
    tool.validate(args)
    assert args.official_python_path.split(os.pathsep)[-1] == str(tree.resolve())
    with pytest.raises(tool.UsageError, match="do not exist"):
        tool.validate(_args(tool, ["--official-dir", str(tree), "--official-python-path", str(tmp_path / "no")]))
    with pytest.raises(tool.UsageError, match="MultiScaleDeformableAttention"):
        tool.validate(_args(tool, ["--official-dir", str(tree), "--official-python-path", str(tree)]))
    with pytest.raises(tool.UsageError, match="required"):
        tool.validate(_args(tool, ["--official-dir", str(tree), "--official-python-path", ""]))


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--tasks", "instance"], "not supported"),
        (["--tasks", "referring", "referring"], "twice"),
        (["--images", "0"], "images must be >= 1"),
        (["--warmup", "-1"], "warmup"),
        (["--threads", "0"], "threads"),
    ],
)
def test_bad_arguments(tool, tmp_path, extra, message):
    tree, pp = _fake_official_env(tmp_path)
    with pytest.raises(tool.UsageError, match=message):
        tool.validate(_args(tool, ["--official-dir", str(tree), "--official-python-path", pp] + extra))


def test_main_returns_2_with_the_message(tool, tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("PSALM_OFFICIAL_DIR", raising=False)
    assert tool.main(["--official-dir", str(tmp_path)]) == 2
    assert "docs/PERFORMANCE.md" in caplog.text


def test_size_choices(tool):
    with pytest.raises(SystemExit):
        tool.get_parser().parse_args(["--size", "huge"])
    assert set(tool.SIZES) == {"tiny", "full"}


# ------------------------------------------------------------------------------ comparison
def test_mask_iou(tool):
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    assert tool.mask_iou(a, b) == 1.0  # both empty
    a[:2] = True
    assert tool.mask_iou(a, b) == 0.0
    b[1:3] = True
    assert tool.mask_iou(a, b) == pytest.approx(4 / 12)
    assert tool.mask_iou(a, a) == 1.0
    with pytest.raises(ValueError, match="shapes differ"):
        tool.mask_iou(a, np.zeros((3, 4), bool))


def test_referring_agreement(tool):
    m = np.zeros((8, 8), bool)
    m[:4] = True
    half = m.copy()
    half[:, 4:] = False
    off = [{"top1_query": 3, "top1_mask": m, "top1_score": 0.5}, {"top1_query": 1, "top1_mask": m, "top1_score": 0.2}]
    ours = [{"top1_query": 3, "top1_mask": m, "top1_score": 0.5 + 1e-7},
            {"top1_query": 2, "top1_mask": half, "top1_score": 0.25}]
    r = tool.referring_agreement(off, ours)
    assert r["top1_query_agreement"] == 0.5
    assert r["top1_mask_iou_mean"] == pytest.approx(0.75)
    assert r["top1_mask_iou_min"] == pytest.approx(0.5)
    assert r["top1_score_max_abs_diff"] == pytest.approx(0.05)
    with pytest.raises(ValueError, match="same, non-zero"):
        tool.referring_agreement(off, ours[:1])


def test_panoptic_agreement(tool):
    seg = np.zeros((4, 6), np.int32)
    seg[:, :3] = 1
    seg[:, 3:] = 2
    info = [{"id": 1, "isthing": True, "category_id": 0}, {"id": 2, "isthing": False, "category_id": 2}]
    sem = np.zeros((4, 6), np.int32)
    prob = np.full((4, 6), 0.5, np.float32)
    same = {"panoptic_seg": seg, "segments_info": info, "sem_argmax": sem, "sem_max": prob}
    r = tool.panoptic_agreement([same], [dict(same)])
    assert r["panoptic_pixel_agreement_mean"] == 1.0 and r["segments_info_equal"] == 1.0
    assert r["segments_matched"] == 1.0 and r["num_segments_official"] == [2]
    assert r["sem_seg_argmax_agreement_mean"] == 1.0 and r["sem_seg_max_prob_max_abs_diff"] == 0.0
    # psalm loses the stuff segment and one column of the thing; class map differs on one row
    seg2 = seg.copy()
    seg2[:, 3:] = 0
    sem2 = sem.copy()
    sem2[0] = 1
    other = {"panoptic_seg": seg2, "segments_info": info[:1], "sem_argmax": sem2, "sem_max": prob + 0.25}
    r = tool.panoptic_agreement([same], [other])
    assert r["panoptic_pixel_agreement_mean"] == pytest.approx(0.5)
    assert r["segments_info_equal"] == 0.0
    assert r["segments_matched"] == pytest.approx(0.5)
    assert r["num_segments_psalm"] == [1]
    assert r["sem_seg_argmax_agreement_mean"] == pytest.approx(0.75)
    assert r["sem_seg_max_prob_max_abs_diff"] == pytest.approx(0.25)
    empty = {"panoptic_seg": np.zeros((4, 6), np.int32), "segments_info": [], "sem_argmax": sem, "sem_max": prob}
    assert tool.panoptic_agreement([empty], [dict(empty)])["segments_matched"] == 1.0


def test_timing_record_fields(tool):
    official = {"seconds": [3.0, 1.0, 2.0], "backbone_runs": [2, 2, 2], "llm_length": 186,
                "peak_rss_mb": 900.0, "rss_after_load_mb": 800.0}
    ours = {"seconds": [0.5, 1.0, 2.0], "backbone_runs": [1, 1, 1], "llm_length": 186,
            "peak_rss_mb": 850.0, "rss_after_load_mb": 790.0}
    rec = tool.timing_record("referring", official, ours, {"top1_query_agreement": 1.0}, {"size": "tiny"})
    for key in ("task", "official_s_per_image", "psalm_s_per_image", "ratio_official_over_psalm",
                "official_peak_rss_mb", "psalm_peak_rss_mb", "memory_kind", "official_backbone_runs_per_image",
                "psalm_backbone_runs_per_image", "top1_query_agreement", "size", "images"):
        assert key in rec, key
    assert rec["official_s_per_image"] == 2.0 and rec["psalm_s_per_image"] == 1.0  # medians
    assert rec["ratio_official_over_psalm"] == 2.0
    assert rec["official_backbone_runs_per_image"] == 2.0 and rec["psalm_backbone_runs_per_image"] == 1.0
    assert rec["images"] == 3 and rec["memory_kind"] == "cpu_max_rss"
    json.dumps(rec)  # one JSON line
    with pytest.raises(ValueError, match="no timed image"):
        tool.timing_record("referring", dict(official, seconds=[]), ours, {})


# ------------------------------------------------------------------------------ ours: data, weights
def test_dataset_in_official_formats(tool, tmp_path):
    prompts = tool.write_dataset(tmp_path, 2, tool.SIZES["tiny"])
    assert len(prompts["images"]) == 2 and prompts["class_names"] == ["person", "car", "tree-merged"]
    assert prompts["is_thing"] == [True, True, False]
    pan = json.loads((tmp_path / "annotations" / "panoptic_val2017.json").read_text())
    assert len(pan["annotations"]) == 2 and len(pan["categories"]) == 3
    refs = json.loads((tmp_path / "refcoco_val.json").read_text())
    assert refs[0]["instruction"][0]["sent"] and len(refs[0]["anns"][0]["segmentation"][0]) >= 6
    from PIL import Image

    img = np.array(Image.open(tmp_path / "val2017" / "000000000000.jpg"))
    assert img.shape == (96, 128, 3) and img.dtype == np.uint8
    ids = np.array(Image.open(tmp_path / "panoptic_val2017" / "000000000000.png")).astype(np.int64)
    ids = ids[..., 0] + 256 * ids[..., 1]
    assert set(np.unique(ids)) <= {0, 1, 2, 3}
    again = tmp_path / "again"
    tool.write_dataset(again, 2, tool.SIZES["tiny"])
    assert (again / "val2017" / "000000000001.jpg").read_bytes() == (tmp_path / "val2017" / "000000000001.jpg").read_bytes()


def test_randomize_is_seeded_and_order_free(tool):
    import torch

    def state():
        return {"a.weight": torch.zeros(4, 3), "norm.weight": torch.zeros(5), "a.bias": torch.zeros(4),
                "bn.running_var": torch.zeros(4), "idx": torch.zeros(3, dtype=torch.long), "seg_query": torch.zeros(2, 3)}

    s1, s2 = state(), dict(reversed(list(state().items())))
    tool.randomize_(s1, 7)
    tool.randomize_(s2, 7)
    for k in s1:
        assert torch.equal(s1[k], s2[k]), k
    assert torch.equal(s1["idx"], torch.zeros(3, dtype=torch.long))
    assert (s1["bn.running_var"] >= 0.5).all() and (s1["norm.weight"] - 1).abs().max() < 1
    s3 = state()
    tool.randomize_(s3, 8)
    assert not torch.equal(s1["a.weight"], s3["a.weight"])


# ------------------------------------------------------------------------------ end to end (official env)
_OFFICIAL_DIR = os.environ.get("PSALM_OFFICIAL_DIR")
_OFFICIAL_PP = os.environ.get("PSALM_OFFICIAL_PYTHONPATH")


@pytest.mark.skipif(
    not (_OFFICIAL_DIR and _OFFICIAL_PP),
    reason="needs the official PSALM environment: set PSALM_OFFICIAL_DIR (the extracted zamling/PSALM d5dbfda "
    "tree) and PSALM_OFFICIAL_PYTHONPATH (stubs:site:tree); recipe in docs/PERFORMANCE.md, "
    "'Side by side with the official code'",
)
@pytest.mark.slow
def test_tiny_end_to_end(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(TOOL), "--size", "tiny", "--images", "2", "--work-dir", str(tmp_path),
           "--official-dir", _OFFICIAL_DIR, "--official-python-path", _OFFICIAL_PP]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(REPO), timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    assert [r["task"] for r in lines] == ["referring", "panoptic"], proc.stdout  # stdout: only the JSON lines
    for r in lines:
        assert r["inputs_equal"] is True
        assert r["official_backbone_runs_per_image"] == 2.0 and r["psalm_backbone_runs_per_image"] == 1.0
        assert r["official_llm_length"] == r["psalm_llm_length"]
        assert r["official_s_per_image"] > 0 and r["psalm_s_per_image"] > 0 and r["ratio_official_over_psalm"] > 0
        assert r["official_versions"]["transformers"] == "4.36.2"
    ref, pan = lines
    assert ref["top1_query_agreement"] == 1.0 and ref["top1_mask_iou_min"] == 1.0
    assert ref["top1_score_max_abs_diff"] < 1e-4
    assert pan["panoptic_pixel_agreement_min"] == 1.0 and pan["segments_info_equal"] == 1.0
    assert pan["sem_seg_argmax_agreement_mean"] == 1.0 and pan["sem_seg_max_prob_max_abs_diff"] < 1e-4
