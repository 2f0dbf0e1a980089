#!/usr/bin/env python
"""PSALM web demo (Gradio): upload or pick an image, choose a task, see the overlay, download the result.

    .venv/bin/python demo/app.py --model output/tiny_synthetic            # the README main job's model
    .venv/bin/python demo/app.py --model checkpoints/psalm --opts MODEL.DEVICE cuda
    .venv/bin/python demo/app.py --config-file CFG --opts MODEL.WEIGHTS W.pth MODEL.PSALM.TOKENIZER TOK

Then open http://127.0.0.1:7860. Tasks: panoptic / instance / semantic (editable class names),
referring and generalized referring (a sentence), interactive (points, boxes and scribbles clicked on
the image or typed), chat (a question). Results: the overlay with labels and scores, the masks as a
label PNG (value k = segment k), the result JSON, both downloadable.

Everything goes through :class:`psalm.predictor.PSALMPredictor` and the demo CLI's helpers
(``demo/demo.py``: model options, prompt parsing, result files) and :func:`psalm.utils.draw_prediction`.
Without a model the page says how to get one instead of drawing random masks. Bad input (no image,
a file that is not an image, empty text, no classes, a prompt outside the image) gets a message on the
page; unexpected errors are logged on the server with their traceback and reported in one line.

The handlers (:class:`DemoSession`) are plain Python, tested without a browser (tests/test_app.py);
tests/test_browser.py drives the page in headless Chromium.
"""
from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import logging
import os
import pathlib
import sys
import tempfile
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np

logger = logging.getLogger("psalm.demo.app")

_HERE = pathlib.Path(__file__).resolve().parent
REPO_ROOT = _HERE.parent


def _load_demo_cli():
    """demo/demo.py as a module (demo/ is not a package): its model options and helpers are shared."""
    name = "psalm_demo_cli"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, _HERE / "demo.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


demo_cli = _load_demo_cli()

TASK_LABELS = {
    "referring": "Referring (a sentence)",
    "gres": "Generalized referring (zero, one or many targets)",
    "interactive": "Interactive (clicks, boxes, scribbles)",
    "panoptic": "Panoptic (class names)",
    "instance": "Instance (class names)",
    "semantic": "Semantic (class names)",
    "instruction": "Chat (a question)",
}
CLICK_MODES = ("point", "box", "scribble")
PROMPT_HELP = "one prompt per line: 'point X,Y', 'box X0,Y0,X1,Y1' or 'scribble X,Y X,Y ...' (pixels, x right, y down)"


class DemoInputError(ValueError):
    """Bad user input; the message is shown on the page."""


# ----------------------------------------------------------------------------------------- prompts text
def parse_prompt_lines(text: str) -> dict:
    """The interactive prompt box -> ``PSALMPredictor`` keywords (``points``, ``boxes``, ``scribbles``).

    Each line is one region. The masks come in the predictor's region order (points, then scribbles,
    then boxes; the result JSON labels each with its kind). Raises DemoInputError naming the line for
    anything else.
    """
    prompt: dict = {}
    for n, raw in enumerate((text or "").splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        kind, _, rest = line.partition(" ")
        fields = rest.split()
        try:
            if kind == "point" and len(fields) == 1:
                prompt.setdefault("points", []).append(demo_cli._numbers(fields[0], 2, "a point"))
            elif kind == "box" and len(fields) == 1:
                prompt.setdefault("boxes", []).append(demo_cli._numbers(fields[0], 4, "a box"))
            elif kind == "scribble" and fields:
                prompt.setdefault("scribbles", []).append([demo_cli._numbers(f, 2, "a scribble vertex") for f in fields])
            else:
                raise ValueError(f"{line!r} is not a prompt")
        except ValueError as e:
            raise DemoInputError(f"interactive prompt line {n}: {e}; {PROMPT_HELP}") from None
    return prompt


def _regions_in_order(text: str) -> list:
    """(kind, data) per prompt line, in line order (for drawing the pending prompts)."""
    out = []
    for key, values in parse_prompt_lines(text).items():
        out.extend((key, v) for v in values)
    return out


def _fmt(v: float) -> str:
    return str(int(round(float(v))))


# ----------------------------------------------------------------------------------------- the handlers
class DemoSession:
    """The demo's handlers, independent of Gradio (one instance serves the page).

    Args:
        predictor: a ready :class:`PSALMPredictor`, or None when no model could be loaded.
        no_model_reason: the message shown instead of results when ``predictor`` is None.
        output_root: where each run's downloadable files go (a fresh folder per run).
    """

    def __init__(self, predictor=None, no_model_reason: str = "", output_root: Optional[str] = None):
        self.predictor = predictor
        self.no_model_reason = no_model_reason
        self.output_root = output_root or tempfile.mkdtemp(prefix="psalm_app_")

    # ---------------------------------------------------------------- image
    def load(self, path: Optional[str]) -> np.ndarray:
        """A user file -> uint8 RGB, or DemoInputError saying what is wrong."""
        if not path:
            raise DemoInputError("no image: upload one or pick an example first")
        try:
            return demo_cli.load_image(path)
        except (ValueError, OSError) as e:
            raise DemoInputError(f"{os.path.basename(str(path))!r} could not be read as an image ({e}); "
                                 "upload a PNG, JPEG, BMP, TIFF or WebP file") from None

    def draw_prompts(self, path: Optional[str], prompt_text: str, pending: Optional[Sequence[float]] = None):
        """The image with the interactive prompts drawn on it (what the user clicks on), enlarged by the
        whole factor :meth:`canvas_scale` (a click at canvas pixel p is image pixel p / factor)."""
        image = self.load(path)
        scale = int(demo_cli.overlay_scale(image.shape[:2]))
        prompt = parse_prompt_lines(prompt_text)
        if pending is not None:
            prompt.setdefault("points", []).append(list(pending))
        if not prompt:
            return np.repeat(np.repeat(image, scale, axis=0), scale, axis=1)
        import torch
        from detectron2.structures import Instances

        regions = demo_cli.parse_visual_prompts(image.shape[:2], **prompt)
        none = Instances(image.shape[:2], pred_masks=torch.zeros((0, *image.shape[:2]), dtype=torch.bool),
                         scores=torch.zeros(0))  # no masks yet: only the prompts are drawn
        return demo_cli.draw_prediction(image, {"instances": none}, "interactive", regions=regions, scale=scale)

    def canvas_scale(self, path: Optional[str]) -> int:
        """The whole factor by which :meth:`draw_prompts` enlarges this image (small images are shown larger)."""
        return int(demo_cli.overlay_scale(self.load(path).shape[:2]))

    # ---------------------------------------------------------------- clicks
    @staticmethod
    def add_click(prompt_text: str, state: dict, mode: str, x: float, y: float) -> Tuple[str, dict]:
        """A click at (x, y) in image pixels: a point, a box corner (two clicks make a box) or the next
        scribble vertex (a scribble goes on until "Finish scribble" or another mode). Returns the new
        prompt text and state."""
        if mode not in CLICK_MODES:
            raise DemoInputError(f"unknown click mode {mode!r}; use one of {CLICK_MODES}")
        state = dict(state or {})
        lines = [ln for ln in (prompt_text or "").splitlines() if ln.strip()]
        xy = f"{_fmt(x)},{_fmt(y)}"
        if mode != "box":
            state.pop("corner", None)
        if mode != "scribble":
            state.pop("scribble_open", None)
        if mode == "point":
            lines.append(f"point {xy}")
        elif mode == "box":
            if state.get("corner") is None:
                state["corner"] = [float(x), float(y)]
            else:
                (x0, y0), x1, y1 = state.pop("corner"), float(x), float(y)
                lines.append(f"box {_fmt(min(x0, x1))},{_fmt(min(y0, y1))},{_fmt(max(x0, x1))},{_fmt(max(y0, y1))}")
        else:
            if state.get("scribble_open") and lines and lines[-1].startswith("scribble "):
                lines[-1] = f"{lines[-1]} {xy}"
            else:
                lines.append(f"scribble {xy}")
                state["scribble_open"] = True
        return "\n".join(lines), state

    @staticmethod
    def undo(prompt_text: str) -> str:
        lines = [ln for ln in (prompt_text or "").splitlines() if ln.strip()]
        return "\n".join(lines[:-1])

    # ---------------------------------------------------------------- prediction
    def build_prompt(self, task: str, classes: str, stuff: str, text: str, prompt_text: str, question: str) -> dict:
        """The predictor keywords of ``task`` from the page's fields (DemoInputError when one is missing)."""
        if task in demo_cli.CATEGORY_TASKS:
            names = demo_cli.split_names(classes)
            if not names:
                raise DemoInputError(f"task {task!r} needs class names: type them comma-separated, e.g. 'cat, dog, grass'")
            stuff_names = demo_cli.split_names(stuff) if task == "panoptic" else []
            unknown = sorted(set(stuff_names) - set(names))
            if unknown:
                raise DemoInputError(f"stuff classes {unknown} are not among the class names {names}")
            return {"classes": names, "is_thing": [n not in stuff_names for n in names]}
        if task in demo_cli.SENTENCE_TASKS:
            if not (text or "").strip():
                raise DemoInputError("the referring expression is empty: type what to segment, e.g. 'the red circle'")
            return {"text": text.strip()}
        if task == "interactive":
            prompt = parse_prompt_lines(prompt_text)
            if not prompt:
                raise DemoInputError("no interactive prompt: click on the image (or type " + PROMPT_HELP + ")")
            return prompt
        if task == "instruction":
            if not (question or "").strip():
                raise DemoInputError("the question is empty: type a question about the image")
            return {"question": question.strip()}
        raise DemoInputError(f"unknown task {task!r}; use one of {list(TASK_LABELS)}")

    def predict(self, path: Optional[str], task: str, classes: str = "", stuff: str = "", text: str = "",
                prompt_text: str = "", question: str = "", threshold: float = 0.0,
                progress: Optional[Callable] = None) -> Tuple[np.ndarray, dict, List[str], str]:
        """Run one request. Returns (overlay uint8 RGB, result record, [result.json, masks.png, overlay.png]
        paths, a one-line summary). Raises DemoInputError (or ValueError / FileNotFoundError from the
        predictor) for bad input, and a DemoInputError with how to get a model when there is none."""
        step = progress or (lambda *a, **k: None)
        if self.predictor is None:
            raise DemoInputError(self.no_model_reason or demo_cli.no_model_message())
        step(0.05, desc="reading the image")
        image = self.load(path)
        prompt = self.build_prompt(task, classes, stuff, text, prompt_text, question)
        regions = demo_cli.parse_visual_prompts(image.shape[:2], **prompt) if task == "interactive" else None
        step(0.2, desc=f"running PSALM ({task})")
        prediction = self.predictor(image, task=task, **prompt)
        step(0.8, desc="drawing the overlay")
        shown = demo_cli.filter_instances(prediction, float(threshold or 0.0))
        overlay = demo_cli.draw_prediction(image, shown, task, class_names=prompt.get("classes"), regions=regions,
                                           sentence=prompt.get("text"), scale=demo_cli.overlay_scale(image.shape[:2]))
        out_dir = tempfile.mkdtemp(prefix="run_", dir=self.output_root)
        stem = os.path.join(out_dir, "result")
        files = demo_cli.write_result_files(stem, shown, task, prompt, regions)
        from PIL import Image

        Image.fromarray(overlay).save(stem + "_overlay.png")
        files.append(stem + "_overlay.png")
        with open(files[0], encoding="utf-8") as f:
            record = json.load(f)
        summary = demo_cli._summary(task, shown)
        step(1.0, desc="done")
        logger.info("%s on %s: %s", task, os.path.basename(str(path)), summary)
        return overlay, record, files, summary


# ----------------------------------------------------------------------------------------- defaults
def default_vocabulary(cfg) -> Tuple[List[str], List[str]]:
    """(class names, stuff names) of the model's data sets, from their registered metadata
    (``prompt_class_names`` / ``prompt_is_thing``), or ([], []) when none is known."""
    try:
        import psalm.data.datasets  # noqa: F401  (registers the data sets and their metadata)
        from detectron2.data import MetadataCatalog

        for name in (*cfg.DATASETS.TEST, *cfg.DATASETS.TRAIN):
            meta = MetadataCatalog.get(name)
            names = meta.get("prompt_class_names")
            if names:
                is_thing = meta.get("prompt_is_thing") or [True] * len(names)
                return list(names), [n for n, t in zip(names, is_thing) if not t]
    except Exception as e:  # a missing optional data set must not stop the demo
        logger.info("no default class names from the config's data sets: %s", e)
    return [], []


def default_examples(cfg, limit: int = 3) -> List[str]:
    """demo/sample.jpg and up to ``limit`` images of the model's held-out data (its DATASETS.TEST)."""
    out = [str(_HERE / "sample.jpg")]
    try:
        import psalm.data.datasets  # noqa: F401
        from detectron2.data import MetadataCatalog

        for name in cfg.DATASETS.TEST:
            root = MetadataCatalog.get(name).get("image_root")
            if root and os.path.isdir(root):
                files = sorted(f for f in glob.glob(os.path.join(root, "*")) if f.lower().endswith(demo_cli.IMAGE_EXTS))
                if files:
                    return files[:limit] + out
    except Exception as e:
        logger.info("no held-out example images from the config's data sets: %s", e)
    return out


# ----------------------------------------------------------------------------------------- the page
def build_app(session: DemoSession, *, classes: Sequence[str] = (), stuff: Sequence[str] = (),
              examples: Sequence[str] = (), model_info: str = ""):
    """The Gradio Blocks of the demo (not launched)."""
    import gradio as gr

    def shown_error(e: Exception) -> str:
        return f"**Error:** {e}"

    def on_image(path):
        try:
            return session.draw_prompts(path, ""), "", {}, "Image loaded. " + (
                "Choose a task and press Run." if session.predictor is not None else session.no_model_reason)
        except ValueError as e:
            return None, "", {}, shown_error(e)

    def on_click(path, prompt_text, state, mode, evt: gr.SelectData):
        try:
            scale = session.canvas_scale(path)  # canvas pixels -> image pixels
            x, y = evt.index[0] / scale, evt.index[1] / scale
            prompt_text, state = session.add_click(prompt_text, state, mode, x, y)
            canvas = session.draw_prompts(path, prompt_text, state.get("corner"))
            msg = "First box corner set: click the opposite corner." if state.get("corner") else \
                f"Added a {mode} click at ({_fmt(x)}, {_fmt(y)})."
            return canvas, prompt_text, state, msg
        except ValueError as e:
            return gr.skip(), gr.skip(), gr.skip(), shown_error(e)
        except Exception as e:  # never a stack trace on the page; the server log has it
            logger.exception("the click handler failed")
            return gr.skip(), gr.skip(), gr.skip(), f"**Internal error** ({type(e).__name__}: {e})."

    # this module uses postponed annotations: give Gradio the class itself, it injects the click by type
    on_click.__annotations__["evt"] = gr.SelectData

    def on_prompts_edited(path, prompt_text):
        try:
            return session.draw_prompts(path, prompt_text), ""
        except ValueError as e:
            return gr.skip(), shown_error(e)

    def on_undo(path, prompt_text):
        prompt_text = session.undo(prompt_text)
        try:
            return session.draw_prompts(path, prompt_text), prompt_text, {}, "Removed the last prompt."
        except ValueError as e:
            return gr.skip(), prompt_text, {}, shown_error(e)

    def on_clear(path):
        try:
            return session.draw_prompts(path, ""), "", {}, "Prompts cleared."
        except ValueError as e:
            return None, "", {}, shown_error(e)

    def on_run(path, task, classes_text, stuff_text, text, prompt_text, question, threshold,
               progress=gr.Progress()):
        try:
            overlay, record, files, summary = session.predict(path, task, classes_text, stuff_text, text, prompt_text,
                                                              question, threshold, progress=progress)
        except (ValueError, FileNotFoundError) as e:
            return None, None, None, shown_error(e)
        except Exception as e:  # never a stack trace on the page; the server log has it
            logger.exception("the demo failed on %s / %s", path, task)
            return None, None, None, f"**Internal error** ({type(e).__name__}: {e}); the server log has the details."
        answer = f"\n\n**Answer:** {record['text']}" if "text" in record else ""
        return overlay, record, files, f"**Done:** {summary}.{answer}"

    def on_task(task):
        cat, sent, inter, chat = (task in demo_cli.CATEGORY_TASKS, task in demo_cli.SENTENCE_TASKS,
                                  task == "interactive", task == "instruction")
        return (gr.update(visible=cat), gr.update(visible=task == "panoptic"), gr.update(visible=sent),
                gr.update(visible=inter), gr.update(visible=chat))

    with gr.Blocks(title="PSALM demo", analytics_enabled=False) as app:
        gr.Markdown("# PSALM: one model, many segmentation tasks\n" + (model_info or ""), elem_id="psalm-header")
        if session.predictor is None:
            gr.Markdown(f"**No model loaded.** {session.no_model_reason}", elem_id="psalm-no-model")
        state = gr.State({})
        with gr.Row():
            with gr.Column():
                upload = gr.File(label="Image (upload, or pick an example below)", file_types=["image"],
                                 type="filepath", elem_id="psalm-upload")
                canvas = gr.Image(label="Click here to add interactive prompts", type="numpy", interactive=False,
                                  elem_id="psalm-canvas", buttons=[])
                if examples:
                    gr.Examples(examples=[[e] for e in examples], inputs=[upload], label="Examples")
            with gr.Column():
                task = gr.Radio([(label, key) for key, label in TASK_LABELS.items()], value="referring",
                                label="Task", elem_id="psalm-task")
                classes_box = gr.Textbox(value=", ".join(classes), label="Class names (comma-separated; any names)",
                                         visible=False, elem_id="psalm-classes")
                stuff_box = gr.Textbox(value=", ".join(stuff), label="Stuff classes among them (the rest are things)",
                                       visible=False, elem_id="psalm-stuff")
                text = gr.Textbox(label="Referring expression", placeholder="e.g. the red circle", elem_id="psalm-text")
                with gr.Group(visible=False) as interactive_group:
                    mode = gr.Radio(list(CLICK_MODES), value="point", label="A click on the image adds a",
                                    elem_id="psalm-click-mode")
                    prompts = gr.Textbox(label="Interactive prompts (" + PROMPT_HELP + ")", lines=3,
                                         elem_id="psalm-prompts")
                    with gr.Row():
                        finish = gr.Button("Finish scribble", size="sm")
                        undo = gr.Button("Undo", size="sm")
                        clear = gr.Button("Clear prompts", size="sm")
                question = gr.Textbox(label="Question", placeholder="What is in the image?", visible=False,
                                      elem_id="psalm-question")
                threshold = gr.Slider(0.0, 1.0, value=0.0, step=0.05, label="Hide instances scoring below",
                                      elem_id="psalm-threshold")
                run = gr.Button("Run", variant="primary", elem_id="psalm-run")
        status = gr.Markdown("Upload an image or pick an example.", elem_id="psalm-status")
        with gr.Row():
            overlay = gr.Image(label="Result", type="numpy", interactive=False, elem_id="psalm-overlay", format="png")
            with gr.Column():
                record = gr.JSON(label="Result (JSON)", elem_id="psalm-json")
                files = gr.File(label="Downloads: result JSON, masks PNG (value k = segment k), overlay PNG",
                                file_count="multiple", interactive=False, elem_id="psalm-downloads")

        upload.change(on_image, [upload], [canvas, prompts, state, status])
        canvas.select(on_click, [upload, prompts, state, mode], [canvas, prompts, state, status])
        prompts.blur(on_prompts_edited, [upload, prompts], [canvas, status])
        finish.click(lambda s: {k: v for k, v in (s or {}).items() if k != "scribble_open"}, [state], [state])
        undo.click(on_undo, [upload, prompts], [canvas, prompts, state, status])
        clear.click(on_clear, [upload], [canvas, prompts, state, status])
        task.change(on_task, [task], [classes_box, stuff_box, text, interactive_group, question])
        run.click(on_run, [upload, task, classes_box, stuff_box, text, prompts, question, threshold],
                  [overlay, record, files, status], concurrency_limit=1)
    return app


# ----------------------------------------------------------------------------------------- main
def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="PSALM web demo (Gradio)")
    demo_cli.add_model_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--classes", nargs="+", help="default class names (default: those of the model's data sets)")
    p.add_argument("--stuff", nargs="+", default=None, help="which default classes are stuff")
    p.add_argument("--examples", nargs="+", help="example images / globs (default: demo/sample.jpg + held-out images)")
    p.add_argument("--opts", default=[], nargs=argparse.REMAINDER, help="config overrides: KEY VALUE pairs")
    return p


def make_session(args) -> Tuple[DemoSession, dict]:
    """The session for the parsed command line, and build_app's keyword arguments. A missing model is
    not fatal: the page then says how to get one."""
    try:
        cfg = demo_cli.setup_cfg(args)
        predictor = demo_cli.PSALMPredictor(cfg)
    except (ValueError, FileNotFoundError) as e:
        logger.error("%s", e)
        return DemoSession(None, str(e)), {}
    classes, stuff = default_vocabulary(cfg)
    if args.classes:
        classes, stuff = demo_cli.split_names(args.classes), []
    if args.stuff is not None:
        stuff = demo_cli.split_names(args.stuff)
    examples = demo_cli.expand_inputs(args.examples) if args.examples else default_examples(cfg)
    source = args.model or cfg.MODEL.WEIGHTS or "random weights (--random-weights: meaningless masks)"
    info = f"Model: `{source}` on {cfg.MODEL.DEVICE}."
    return DemoSession(predictor), {"classes": classes, "stuff": stuff, "examples": examples, "model_info": info}


def launch(app, host: str, port: Optional[int], prevent_thread_lock: bool = False):
    """Serve the page (no telemetry; system fonts, so nothing is fetched from outside)."""
    import gradio as gr

    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
    return app.queue().launch(server_name=host, server_port=port, prevent_thread_lock=prevent_thread_lock,
                              theme=theme, ssr_mode=False, show_error=False, quiet=True)


def main(argv=None) -> int:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    args = get_parser().parse_args(argv)
    demo_cli.setup_logger(name="psalm")
    session, kwargs = make_session(args)
    if session.predictor is None:
        print(session.no_model_reason, file=sys.stderr)
    launch(build_app(session, **kwargs), args.host, args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
