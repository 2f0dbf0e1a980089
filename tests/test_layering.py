"""Package layering: shared vocabulary lives in psalm.structures, which every layer may import; the data
layer, the mask evaluators and the structures never import upwards (any import, also inside functions)."""

import ast

import pytest

from .conftest import REPO_ROOT

PSALM = REPO_ROOT / "psalm"


def _psalm_imports(path):
    """Absolute names of every psalm module ``path`` imports (module level or in a function)."""
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    package = parts[:-1] if parts[-1] != "__init__" else parts[:-1]
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                mod = ".".join(base + ((node.module,) if node.module else ()))
            else:
                mod = node.module
            names += [mod] + [f"{mod}.{a.name}" for a in node.names]
    return [n for n in names if n == "psalm" or n.startswith("psalm.")]


def _files(*rels):
    out = []
    for rel in rels:
        p = PSALM / rel
        out += sorted(p.rglob("*.py")) if p.is_dir() else [p]
    return out


@pytest.mark.parametrize(
    "files,forbidden",
    [
        (("structures",), ("psalm.",)),  # the lowest layer imports nothing from psalm
        (("data",), ("psalm.modeling",)),  # the data path (mappers, prompts, tokenizer) sits below the model
        (("evaluation/masks.py", "evaluation/davis.py"), ("psalm.data", "psalm.modeling")),
        (("checkpoint",), ("psalm.modeling", "psalm.data", "psalm.engine")),
    ],
)
def test_no_upward_imports(files, forbidden):
    bad = {}
    for path in _files(*files):
        hits = [
            n for n in _psalm_imports(path)
            if any(n.startswith(f) for f in forbidden) and not n.startswith("psalm.structures")
        ]
        if hits:
            bad[str(path.relative_to(REPO_ROOT))] = sorted(set(hits))
    assert not bad, f"imports going up: {bad}"


def test_one_definition_of_the_shared_vocabulary():
    """Task names and prompt types are defined once (psalm.structures.tasks); the old homes re-export it."""
    from psalm.data import visual_prompts
    from psalm.data.datasets import coco_interactive
    from psalm.modeling import tasks as modeling_tasks
    from psalm.structures import masks, tasks

    assert visual_prompts.PROMPT_TYPES is tasks.PROMPT_TYPES is coco_interactive.PROMPT_TYPES
    assert modeling_tasks.check_task is tasks.check_task and modeling_tasks.ALL_TASKS is tasks.ALL_TASKS
    assert visual_prompts.decode_rle is masks.decode_rle and visual_prompts.encode_rle is masks.encode_rle
    for path in _files("."):
        if path.name != "tasks.py" or "structures" not in path.parts:
            assert "PROMPT_TYPES = (" not in path.read_text(), path
