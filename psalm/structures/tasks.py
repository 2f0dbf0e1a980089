"""Task names, what each task needs from the model, and the visual-prompt types of the interactive task.

Shared vocabulary of every layer (data mapping, sampling, modeling, evaluation, predictor), so it lives
in :mod:`psalm.structures`, which imports nothing from psalm. Every sample carries a ``task`` string
(``docs/DESIGN.md``, "Tasks"). The task decides the prompt (:mod:`psalm.data.prompt`), which
condition embeddings are read from the LLM (:mod:`psalm.modeling.conditions`), which score head and loss
are used and how predictions are post-processed.

=============  ===========  ==========================================================================
task           condition    prompt
=============  ===========  ==========================================================================
panoptic       category     K class names + ``background`` (``<cls>`` placeholders)
instance       category     same as panoptic (the official code uses the panoptic wording)
semantic       category     same as panoptic (official open-vocabulary semantic evaluation)
referring      sentence     one ``<refer>`` span: all sentences merged as ``''.join(f' {s}.')``
gres           sentence     as referring; the target may be empty (generalized referring)
interactive    region       one ``<region>`` token per visual prompt
instruction    none         LLaVA chat conversation; language-model loss / ``generate``
caption        none         stage-1 image-text alignment; language-model loss
=============  ===========  ==========================================================================
"""

from __future__ import annotations

__all__ = [
    "PANOPTIC",
    "INSTANCE",
    "SEMANTIC",
    "REFERRING",
    "GRES",
    "INTERACTIVE",
    "INSTRUCTION",
    "CAPTION",
    "ALL_TASKS",
    "CATEGORY_TASKS",
    "SENTENCE_TASKS",
    "REGION_TASKS",
    "LM_TASKS",
    "SEGMENTATION_TASKS",
    "check_task",
    "is_category_task",
    "is_sentence_task",
    "is_region_task",
    "is_lm_task",
    "is_segmentation_task",
    "condition_type",
    "PROMPT_TYPES",
]

PANOPTIC = "panoptic"
INSTANCE = "instance"
SEMANTIC = "semantic"
REFERRING = "referring"
GRES = "gres"
INTERACTIVE = "interactive"
INSTRUCTION = "instruction"
CAPTION = "caption"

CATEGORY_TASKS = (PANOPTIC, INSTANCE, SEMANTIC)
SENTENCE_TASKS = (REFERRING, GRES)
REGION_TASKS = (INTERACTIVE,)
LM_TASKS = (INSTRUCTION, CAPTION)
SEGMENTATION_TASKS = CATEGORY_TASKS + SENTENCE_TASKS + REGION_TASKS
ALL_TASKS = SEGMENTATION_TASKS + LM_TASKS

# visual prompts of the interactive task (COCO-Interactive's four kinds; the official builder's names)
PROMPT_TYPES = ("point", "scribble", "box", "mask")


def check_task(task: str) -> str:
    """Return ``task`` if it is a known task name, else raise ``ValueError`` listing the valid ones."""
    if task not in ALL_TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(ALL_TASKS)}")
    return task


def is_category_task(task: str) -> bool:
    """panoptic / instance / semantic: class-name prompt, category condition, softmax over K+1."""
    return check_task(task) in CATEGORY_TASKS


def is_sentence_task(task: str) -> bool:
    """referring / gres: one sentence condition, sigmoid score per query."""
    return check_task(task) in SENTENCE_TASKS


def is_region_task(task: str) -> bool:
    """interactive: one region condition per visual prompt, sigmoid score per (region, query)."""
    return check_task(task) in REGION_TASKS


def is_lm_task(task: str) -> bool:
    """instruction / caption: language-model loss (training) or text generation (inference)."""
    return check_task(task) in LM_TASKS


def is_segmentation_task(task: str) -> bool:
    """Every task that produces masks (uses the mask tokens and the mask decoder)."""
    return check_task(task) in SEGMENTATION_TASKS


def condition_type(task: str) -> str | None:
    """``"category"``, ``"sentence"``, ``"region"`` or ``None`` (language-model tasks)."""
    task = check_task(task)
    if task in CATEGORY_TASKS:
        return "category"
    if task in SENTENCE_TASKS:
        return "sentence"
    if task in REGION_TASKS:
        return "region"
    return None
