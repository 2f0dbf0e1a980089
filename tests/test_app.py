"""demo/app.py's handlers without a browser (DemoSession: prompts from clicks, every task, result files,
bad input, no model) and the Gradio page's wiring (built, not served). tests/test_browser.py drives the page."""
import importlib.util
import json

import numpy as np
import pytest
from PIL import Image

from .conftest import REPO_ROOT
from .tiny_model_dir import make_tiny_model_dir

SAMPLE = str(REPO_ROOT / "demo" / "sample.jpg")


@pytest.fixture(scope="module")
def app():
    spec = importlib.util.spec_from_file_location("psalm_demo_app", REPO_ROOT / "demo" / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    base = tmp_path_factory.mktemp("app")
    return make_tiny_model_dir(base / "model", base / "tok_cache")


@pytest.fixture(scope="module")
def session(app, model_dir, tmp_path_factory):
    s, kwargs = app.make_session(app.get_parser().parse_args(["--model", str(model_dir)]))
    assert s.predictor is not None and kwargs["examples"][-1].endswith("sample.jpg")
    s.output_root = str(tmp_path_factory.mktemp("app_runs"))
    return s


def test_clicks_make_points_boxes_and_scribbles(app):
    add = app.DemoSession.add_click
    text, state = add("", {}, "point", 10.4, 20.6)
    assert text == "point 10,21" and state == {}
    text, state = add(text, state, "box", 100, 80)
    assert text == "point 10,21" and state["corner"] == [100.0, 80.0]  # first corner pending
    text, state = add(text, state, "box", 40, 120)
    assert text.splitlines()[-1] == "box 40,80,100,120" and "corner" not in state
    text, state = add(text, state, "scribble", 1, 2)
    text, state = add(text, state, "scribble", 3, 4)
    assert text.splitlines()[-1] == "scribble 1,2 3,4"
    state.pop("scribble_open")  # "Finish scribble"
    text, state = add(text, state, "scribble", 5, 6)
    assert text.splitlines()[-2:] == ["scribble 1,2 3,4", "scribble 5,6"]
    assert app.DemoSession.undo(text).splitlines()[-1] == "scribble 1,2 3,4"
    assert app.parse_prompt_lines(text) == {"points": [[10.0, 21.0]], "boxes": [[40.0, 80.0, 100.0, 120.0]],
                                            "scribbles": [[[1.0, 2.0], [3.0, 4.0]], [[5.0, 6.0]]]}
    with pytest.raises(ValueError, match="line 2: .*'boxx 1,2,3,4' is not a prompt"):
        app.parse_prompt_lines("point 1,2\nboxx 1,2,3,4")
    with pytest.raises(ValueError, match="line 1: a box must be 4 comma-separated numbers"):
        app.parse_prompt_lines("box 1,2")


def test_canvas_shows_the_prompts(session, tmp_path):
    plain = session.draw_prompts(SAMPLE, "")
    drawn = session.draw_prompts(SAMPLE, "point 100,100\nbox 10,10,200,150", pending=[300, 200])
    assert plain.shape == drawn.shape == (320, 480, 3)
    changed = np.any(plain != drawn, axis=2)
    assert changed[100, 100] and changed[200, 300] and changed[10, 100]  # point, pending corner, box edge
    assert not changed[300, 450]
    # a small image is shown enlarged by a whole factor; the prompts stay at their image pixels
    small = tmp_path / "small.png"
    Image.fromarray(np.full((100, 128, 3), 90, np.uint8)).save(small)
    assert session.canvas_scale(str(small)) == 3
    plain, drawn = session.draw_prompts(str(small), ""), session.draw_prompts(str(small), "point 20,30")
    assert plain.shape == drawn.shape == (300, 384, 3)
    assert np.any(plain[90, 60] != drawn[90, 60]) and np.all(plain[270, 350] == drawn[270, 350])


@pytest.mark.parametrize("task,fields,n_check", [
    ("referring", {"text": "the white cup"}, 1),
    ("gres", {"text": "the white cup"}, None),
    ("interactive", {"prompt_text": "point 240,150\nbox 150,40,330,260\nscribble 10,10 100,50"}, 3),
    ("panoptic", {"classes": "cup, saucer, table", "stuff": "table"}, None),
    ("instance", {"classes": "cup, spoon"}, None),
    ("semantic", {"classes": "cup, table"}, None),
])
def test_every_task_returns_overlay_json_and_masks(session, task, fields, n_check):
    calls = []
    overlay, record, files, summary = session.predict(SAMPLE, task, progress=lambda f, desc="": calls.append(f),
                                                      **fields)
    assert overlay.shape == (320, 480, 3) and overlay.dtype == np.uint8
    assert [p.rsplit("/", 1)[-1] for p in files] == ["result.json", "result_masks.png", "result_overlay.png"]
    assert json.loads(open(files[0]).read()) == record and record["task"] == task
    masks = np.asarray(Image.open(files[1]))
    assert masks.shape == (320, 480)
    ids = {s["id"] for s in record["segments"]}
    assert set(np.unique(masks).tolist()) <= {0} | ids
    if n_check is not None:
        assert len(record["segments"]) == n_check
    if task == "interactive":
        assert sorted(s["label"] for s in record["segments"]) == ["box", "point", "scribble"]
    if task in ("panoptic", "instance", "semantic"):
        assert {s["label"] for s in record["segments"]} <= set(fields["classes"].replace(" ", "").split(","))
    assert np.array_equal(np.asarray(Image.open(files[2]).convert("RGB")), overlay)
    assert calls[0] < calls[-1] == 1.0 and summary


def test_chat_returns_the_answer(session):
    overlay, record, files, summary = session.predict(SAMPLE, "instruction", question="What is in the image?")
    assert isinstance(record["text"], str) and record["segments"] == [] and len(files) == 2  # no masks PNG
    assert "answer" in summary


@pytest.mark.parametrize("task,fields,message", [
    ("referring", {"text": "   "}, "referring expression is empty"),
    ("panoptic", {"classes": " , "}, "needs class names"),
    ("panoptic", {"classes": "cup", "stuff": "sky"}, r"stuff classes \['sky'\] are not among"),
    ("interactive", {"prompt_text": ""}, "no interactive prompt: click on the image"),
    ("interactive", {"prompt_text": "point 5000,10"}, "outside the 480x320"),
    ("instruction", {"question": ""}, "question is empty"),
])
def test_bad_input_gets_a_clear_message(session, task, fields, message):
    with pytest.raises(ValueError, match=message):
        session.predict(SAMPLE, task, **fields)


def test_bad_files(session, tmp_path):
    with pytest.raises(ValueError, match="no image: upload one"):
        session.predict(None, "referring", text="x")
    fake = tmp_path / "notes.png"
    fake.write_text("not an image")
    with pytest.raises(ValueError, match="'notes.png' could not be read as an image"):
        session.predict(str(fake), "referring", text="x")


def test_without_a_model_the_page_says_how_to_get_one(app, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s, kwargs = app.make_session(app.get_parser().parse_args([]))
    assert s.predictor is None and kwargs == {}
    assert "train the README main job" in s.no_model_reason and "convert_official.py" in s.no_model_reason
    with pytest.raises(ValueError, match="train the README main job"):
        s.predict(SAMPLE, "referring", text="the cup")
    s2, _ = app.make_session(app.get_parser().parse_args(["--model", str(tmp_path / "missing")]))
    assert s2.predictor is None and "does not exist" in s2.no_model_reason
    page = app.build_app(s)
    texts = [b.value for b in page.blocks.values() if getattr(b, "elem_id", None) == "psalm-no-model"]
    assert texts and "No model loaded" in texts[0]


def test_page_wiring(app, session):
    """The page's handlers turn bad input into a message (no exception reaches Gradio)."""
    page = app.build_app(session, classes=["cup"], examples=[SAMPLE])
    ids = {getattr(b, "elem_id", None) for b in page.blocks.values()}
    assert {"psalm-upload", "psalm-canvas", "psalm-task", "psalm-run", "psalm-overlay", "psalm-json",
            "psalm-downloads", "psalm-status", "psalm-prompts"} <= ids
    run = next(fn for fn in page.fns.values() if fn.name == "on_run")
    overlay, record, files, status = run.fn(None, "referring", "", "", "x", "", "", 0.0, progress=lambda *a, **k: None)
    assert overlay is None and status.startswith("**Error:** no image")
    overlay, record, files, status = run.fn(SAMPLE, "referring", "", "", "the cup", "", "", 0.0,
                                            progress=lambda *a, **k: None)
    assert overlay.shape == (320, 480, 3) and status.startswith("**Done:**") and len(files) == 3
