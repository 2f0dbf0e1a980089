"""One prompt builder for every task: task inputs -> official prompt string -> token ids.

The strings are the official ones (``MODEL.PSALM.PROMPT_STYLE = "official"``; spec 1.4), rendered
with the official LLaMA-2-style chat template (``conv_llava_phi``)::

    [INST] <<SYS>>\\n{SYSTEM}\\n<</SYS>>\\n\\n{human} [/INST] {gpt} <|endoftext|>

Further rounds append ``<|endoftext|>[INST] {human} [/INST] {gpt} <|endoftext|>``.

=================  ================================================================================
task               human / gpt
=================  ================================================================================
panoptic,          ``This is an image <image>, Please do Panoptic Segmentation.`` +
instance,          ``\\nThis is all the candidate categories: <cls>, <cls>, ..., <cls>.\\n`` (K+1
semantic           ``<cls>``, the last class being ``background``) / ``\\nSure, the segmentation result is <seg>``
referring, gres    ``This is an image <image>, Please doing Referring Segmentation according to the
                   following instruction:\\n<refer>`` / ``\\nSure, the segmentation result is <seg>``
interactive        ``This is an image <image>, Please segment by given regions`` +
                   ``\\nThis is all regions: `` + ``' <region>,' * (R-1) + ' <region>.'`` + ``\\n`` / ``\\n[SEG]<seg>``
instruction,       the sample's conversation (LLaVA JSON turns); ``<image>`` moved to the start of
caption            its turn followed by ``\\n`` (official ``preprocess_multimodal``)
=================  ================================================================================

Tokenisation (official ``tokenizer_special_tokens``): the prompt is split on the placeholders
``<image> <seg> <cls> <region> <refer>``, which become the negative ids of :data:`PLACEHOLDER_IDS`;
every text chunk is encoded separately with ``add_special_tokens=False`` (so ``<|endoftext|>`` and
``[SEG]`` are single tokens). A ``<cls>`` stands for ``encode(name) + [SEG]``; the ``<refer>``
stands for ``encode(''.join(f' {s}.' for s in sentences)) + [SEG]``.

Labels (official ``preprocess_llama2``, ``phi`` version): every token is ``IGNORE_INDEX`` except the
answers: in each round, from the last token of ``"[/INST] "`` (the space) through the round's closing
``<|endoftext|>``. Placeholders inside an answer keep their negative id (``<seg>``); the
:class:`~psalm.modeling.sequence.SequenceAssembler` turns every spliced position into
``IGNORE_INDEX``. When the per-round lengths disagree with the full tokenisation the official code
ignores the whole sample; so does this one, with a warning.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import re
from typing import Mapping, Sequence

import numpy as np
import torch

from psalm.structures import tasks as T

logger = logging.getLogger(__name__)

__all__ = [
    "IGNORE_INDEX",
    "IMAGE_TOKEN_INDEX",
    "SEG_TOKEN_INDEX",
    "CLS_TOKEN_INDEX",
    "REGION_TOKEN_INDEX",
    "REFER_TOKEN_INDEX",
    "PLACEHOLDER_IDS",
    "SYSTEM_PROMPT",
    "BACKGROUND_CLASS",
    "merge_sentences",
    "TokenizedPrompt",
    "PromptBuilder",
    "build_prompt_builder",
    "prompt_for_input",
    "check_prompt_matches",
]

IGNORE_INDEX = -100
IMAGE_TOKEN_INDEX = -200
SEG_TOKEN_INDEX = -201  # the Q mask tokens
CLS_TOKEN_INDEX = -202  # one class-name span
REGION_TOKEN_INDEX = -203  # one pooled visual-prompt feature
REFER_TOKEN_INDEX = -204  # the referring-expression span
PLACEHOLDER_IDS = {
    "<image>": IMAGE_TOKEN_INDEX,
    "<seg>": SEG_TOKEN_INDEX,
    "<cls>": CLS_TOKEN_INDEX,
    "<region>": REGION_TOKEN_INDEX,
    "<refer>": REFER_TOKEN_INDEX,
}
_PLACEHOLDER_RE = re.compile("(" + "|".join(re.escape(p) for p in PLACEHOLDER_IDS) + ")")

SYSTEM_PROMPT = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that "
    "the user provides, and assist the user with a variety of tasks using natural language."
)
BACKGROUND_CLASS = "background"
EOS = "<|endoftext|>"  # the template's separators (conv_llava_phi: sep = sep2 = <|endoftext|>)
_INST_END = "[/INST] "

_CATEGORY_HUMAN = "This is an image <image>, Please do Panoptic Segmentation."
_REFER_HUMAN = "This is an image <image>, Please doing Referring Segmentation according to the following instruction:"
_REGION_HUMAN = "This is an image <image>, Please segment by given regions"
_SEG_ANSWER = "\nSure, the segmentation result is <seg>"


def merge_sentences(sentences: Sequence[str]) -> str:
    """All sentences of a referring sample as one expression (official): ``''.join(f' {s}.')``."""
    if isinstance(sentences, str) or not sentences or not all(isinstance(s, str) and s for s in sentences):
        raise ValueError(f"sentences must be a non-empty list of non-empty strings, got {sentences!r}")
    return "".join(f" {s}." for s in sentences)


@dataclasses.dataclass
class TokenizedPrompt:
    """One sample's prompt, tokenised, with the pieces that replace its placeholders.

    Attributes:
        task: the task name.
        text: the rendered prompt (with placeholders).
        input_ids: [T] long; placeholders are the negative :data:`PLACEHOLDER_IDS`.
        labels: [T] long; ``IGNORE_INDEX`` outside the answers (LM loss targets).
        class_token_ids: category tasks: K+1 tensors (prompt order), each ``encode(name) + [SEG]``.
        class_order: category tasks: [K+1] long; prompt position i shows canonical class
            ``class_order[i]`` (identity unless shuffled; canonical = ``class_names + [background]``).
        refer_token_ids: sentence tasks: [n] long, ``encode(expression) + [SEG]``.
        num_regions: interactive: number of ``<region>`` placeholders (R).
        class_names: category tasks: the K names it was built from (canonical order, no background).
        sentences: sentence tasks: the sentences it was built from.
        generation: built with ``add_generation_prompt`` (language tasks at inference).
    """

    task: str
    text: str
    input_ids: torch.Tensor
    labels: torch.Tensor
    class_token_ids: list[torch.Tensor] | None = None
    class_order: torch.Tensor | None = None
    refer_token_ids: torch.Tensor | None = None
    num_regions: int = 0
    class_names: tuple[str, ...] | None = None
    sentences: tuple[str, ...] | None = None
    generation: bool = False

    @property
    def num_classes(self) -> int:
        """K+1 (with ``background``), 0 for non-category prompts."""
        return 0 if self.class_token_ids is None else len(self.class_token_ids)

    @property
    def restore_index(self) -> torch.Tensor | None:
        """[K+1]: canonical class j is at prompt position ``restore_index[j]`` (argsort of ``class_order``).

        ``embeddings_prompt_order[:, restore_index]`` is in canonical order.
        """
        return None if self.class_order is None else torch.argsort(self.class_order)

    @property
    def class_name_ids(self) -> torch.Tensor | None:
        """All class spans concatenated (official ``class_name_ids``)."""
        return None if self.class_token_ids is None else torch.cat(self.class_token_ids)

    @property
    def cls_indices(self) -> torch.Tensor | None:
        """Prompt-order class index (0-based) of every token of :attr:`class_name_ids` (official)."""
        if self.class_token_ids is None:
            return None
        return torch.cat([torch.full((len(t),), i, dtype=torch.long) for i, t in enumerate(self.class_token_ids)])


class PromptBuilder:
    """Builds the official prompt of any task and tokenises it (:class:`TokenizedPrompt`).

    Args:
        tokenizer: the PSALM tokenizer (:func:`psalm.data.tokenizer.load_tokenizer`), with ``[SEG]``.
        seg_token: the class / expression terminator and region-answer token (``[SEG]``).
        model_max_length: prompts are limited to this many ids before splicing (official 2048):
            language-model prompts are truncated (official collator), segmentation prompts raise.
        style: ``"official"`` (the only style: the strings the released weights were trained with).
    """

    def __init__(self, tokenizer, seg_token: str = "[SEG]", model_max_length: int = 2048, style: str = "official"):
        if style != "official":
            raise ValueError(f"unknown prompt style {style!r}; only 'official' is implemented")
        self.tokenizer = tokenizer
        self.seg_token = seg_token
        self.model_max_length = int(model_max_length)
        ids = tokenizer.encode(seg_token, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"{seg_token!r} must be one token in the tokenizer (got {ids}); use load_tokenizer")
        self.seg_token_id = ids[0]
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._name_cache: dict[str, torch.Tensor] = {}

    @classmethod
    def from_config(cls, cfg, tokenizer) -> "PromptBuilder":
        return cls(
            tokenizer,
            seg_token=cfg.MODEL.PSALM.SEG_TOKEN,
            model_max_length=cfg.MODEL.PSALM.MODEL_MAX_LENGTH,
            style=cfg.MODEL.PSALM.PROMPT_STYLE,
        )

    # ------------------------------------------------------------------------------ rendering

    @staticmethod
    def render_conversation(turns: Sequence[tuple[str, str]]) -> str:
        """Official LLaMA-2 rendering of alternating (human, gpt) turns; a trailing human turn gives
        a generation prompt ending in ``[/INST]``."""
        out = ""
        for i, (role, msg) in enumerate(turns):
            if role != ("human" if i % 2 == 0 else "gpt"):
                raise ValueError(f"turn {i} is from {role!r}; turns must alternate human, gpt, human, ...")
            if i == 0:
                msg = f"<<SYS>>\n{SYSTEM_PROMPT}\n<</SYS>>\n\n" + msg
            out += f"{EOS}[INST] {msg} [/INST]" if i % 2 == 0 else f" {msg} {EOS}"
        return out[len(EOS) :]

    def render(
        self,
        task: str,
        num_classes: int | None = None,
        num_regions: int | None = None,
        conversation: Sequence[dict] | None = None,
        add_generation_prompt: bool = False,
    ) -> str:
        """The prompt string with placeholders (``num_classes`` counts ``background``)."""
        T.check_task(task)
        if T.is_category_task(task):
            if not num_classes or num_classes < 2:
                raise ValueError(f"{task}: need at least one class name plus background, got num_classes={num_classes}")
            human = (
                _CATEGORY_HUMAN
                + "\nThis is all the candidate categories: "
                + "<cls>, " * (num_classes - 1)
                + "<cls>.\n"
            )
            turns = [("human", human), ("gpt", _SEG_ANSWER)]
        elif T.is_sentence_task(task):
            turns = [("human", _REFER_HUMAN + "\n<refer>"), ("gpt", _SEG_ANSWER)]
        elif T.is_region_task(task):
            if not num_regions or num_regions < 1:
                raise ValueError(f"{task}: need at least one region (visual prompt), got {num_regions}")
            regions = " <region>," * (num_regions - 1) + " <region>."
            turns = [
                ("human", _REGION_HUMAN + f"\nThis is all regions: {regions}\n"),
                ("gpt", f"\n{self.seg_token}<seg>"),
            ]
        else:
            turns = self._conversation_turns(conversation)
        if add_generation_prompt:
            if turns[-1][0] == "gpt":
                turns = turns[:-1]
            if T.is_segmentation_task(task):
                raise ValueError(f"add_generation_prompt is for language tasks, not {task!r}")
        return self.render_conversation(turns)

    @staticmethod
    def _conversation_turns(conversation) -> list[tuple[str, str]]:
        if not conversation:
            raise ValueError("language tasks need a non-empty 'conversation' (list of {'from', 'value'})")
        turns = [(t["from"], t["value"]) for t in conversation]
        if turns[0][0] != "human":  # official: a conversation starting with gpt loses that turn
            turns = turns[1:]
        if not turns:
            raise ValueError("the conversation has no human turn")
        if not any("<image>" in v for _, v in turns):
            turns[0] = (turns[0][0], "<image>\n" + turns[0][1])
        # official preprocess_multimodal: <image> goes to the start of its turn, then a newline
        return [
            (r, ("<image>\n" + v.replace("<image>", "").strip()).strip() if "<image>" in v else v) for r, v in turns
        ]

    # ----------------------------------------------------------------------------- tokenising

    def encode_text(self, text: str) -> list[int]:
        """Official ``tokenizer_special_tokens``: placeholders -> negative ids, chunks encoded separately."""
        ids: list[int] = []
        for chunk in _PLACEHOLDER_RE.split(text):
            if chunk in PLACEHOLDER_IDS:
                ids.append(PLACEHOLDER_IDS[chunk])
            elif chunk:
                ids.extend(self.tokenizer.encode(chunk, add_special_tokens=False))
        return ids

    def _labels(self, text: str, ids: list[int]) -> list[int]:
        """Official ``preprocess_llama2`` (phi version) answer masking, by per-round token counts."""
        labels = list(ids)
        cur, n_round = 0, 0
        for rnd in text.split(EOS):
            if rnd == "":
                continue
            parts = rnd.split(_INST_END)
            if len(parts) != 2:
                break
            n_instr = len(self.encode_text(parts[0] + _INST_END))
            n_ignore = n_instr if n_round else n_instr - 1  # later rounds also ignore the leading separator
            labels[cur : cur + n_ignore] = [IGNORE_INDEX] * len(labels[cur : cur + n_ignore])
            cur += len(self.encode_text(rnd)) + (2 if n_round else 1)
            n_round += 1
        labels[cur:] = [IGNORE_INDEX] * len(labels[cur:])
        if cur != len(ids):
            logger.warning(
                "tokenization mismatch (%d vs %d tokens): the sample's labels are all ignored", cur, len(ids)
            )
            labels = [IGNORE_INDEX] * len(ids)
        return labels

    def _encode_prompt(self, text: str, supervised: bool) -> tuple[torch.Tensor, torch.Tensor]:
        key = text if supervised else "\0gen\0" + text
        hit = self._cache.get(key)
        if hit is None:
            ids = self.encode_text(text)
            labels = self._labels(text, ids) if supervised else [IGNORE_INDEX] * len(ids)
            hit = (torch.tensor(ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long))
            if len(self._cache) > 4096:
                self._cache.clear()
            self._cache[key] = hit
        return hit[0].clone(), hit[1].clone()

    def _encode_name(self, name: str) -> torch.Tensor:
        hit = self._name_cache.get(name)
        if hit is None:
            if not isinstance(name, str) or not name:
                raise ValueError(f"class names must be non-empty strings, got {name!r}")
            hit = torch.tensor(
                self.tokenizer.encode(name, add_special_tokens=False) + [self.seg_token_id], dtype=torch.long
            )
            if len(self._name_cache) > 65536:
                self._name_cache.clear()
            self._name_cache[name] = hit
        return hit

    def build(
        self,
        task: str,
        class_names: Sequence[str] | None = None,
        sentences: Sequence[str] | None = None,
        num_regions: int | None = None,
        conversation: Sequence[dict] | None = None,
        shuffle_classes: bool = False,
        generator: torch.Generator | None = None,
        add_generation_prompt: bool = False,
        class_order: Sequence[int] | None = None,
    ) -> TokenizedPrompt:
        """Build one sample's :class:`TokenizedPrompt`.

        Args:
            task: a name from :mod:`psalm.structures.tasks`.
            class_names: category tasks: the K class names; ``background`` is appended.
            sentences: referring / gres: the sentences, merged with :func:`merge_sentences`.
            num_regions: interactive: R (one ``<region>`` per visual prompt).
            conversation: instruction / caption: LLaVA turns ``[{"from": "human"|"gpt", "value": str}]``.
            shuffle_classes: present the K+1 classes in a random order (official training); the
                order is recorded in ``class_order`` to restore the canonical order after pooling.
            generator: RNG for the shuffle (default: torch's global RNG).
            add_generation_prompt: language tasks at inference: drop a trailing answer and end the
                prompt with ``[/INST]``; labels are all ignored.
            class_order: category tasks: an explicit presentation order (a permutation of the K+1
                canonical indices, e.g. drawn by the mapper from its per-sample RNG); overrides
                ``shuffle_classes``.
        """
        T.check_task(task)
        class_token_ids = refer_ids = None
        n_regions = 0
        if not T.is_category_task(task):
            class_order = None
        if T.is_category_task(task):
            if class_names is None or isinstance(class_names, str) or len(class_names) == 0:
                raise ValueError(f"{task}: class_names must be a non-empty list of names, got {class_names!r}")
            names = list(class_names) + [BACKGROUND_CLASS]
            n = len(names)
            if class_order is not None:
                class_order = torch.as_tensor(class_order, dtype=torch.long)
                if class_order.shape != (n,) or not torch.equal(torch.sort(class_order).values, torch.arange(n)):
                    raise ValueError(
                        f"class_order must be a permutation of range({n}) (K + background), got {class_order.tolist()}"
                    )
            elif shuffle_classes:
                class_order = torch.randperm(n, generator=generator)
            else:
                class_order = torch.arange(n)
            class_token_ids = [self._encode_name(names[i]) for i in class_order.tolist()]
            text = self.render(task, num_classes=n)
        elif T.is_sentence_task(task):
            refer_ids = torch.tensor(
                self.tokenizer.encode(merge_sentences(sentences), add_special_tokens=False) + [self.seg_token_id],
                dtype=torch.long,
            )
            text = self.render(task)
        elif T.is_region_task(task):
            n_regions = int(num_regions or 0)
            text = self.render(task, num_regions=n_regions)
        else:
            text = self.render(task, conversation=conversation, add_generation_prompt=add_generation_prompt)
        supervised = not add_generation_prompt
        input_ids, labels = self._encode_prompt(text, supervised)
        if len(input_ids) > self.model_max_length:
            if T.is_segmentation_task(task):
                raise ValueError(
                    f"{task} prompt has {len(input_ids)} ids before splicing, more than MODEL.PSALM.MODEL_MAX_LENGTH="
                    f"{self.model_max_length}; raise the limit"
                )
            input_ids, labels = input_ids[: self.model_max_length], labels[: self.model_max_length]
        return TokenizedPrompt(
            task=task,
            text=text,
            input_ids=input_ids,
            labels=labels,
            class_token_ids=class_token_ids,
            class_order=class_order,
            refer_token_ids=refer_ids,
            num_regions=n_regions,
            class_names=tuple(class_names) if class_token_ids is not None else None,
            sentences=tuple(sentences) if refer_ids is not None else None,
            generation=bool(add_generation_prompt) and T.is_lm_task(task),
        )

    def spliced_length(self, prompt: TokenizedPrompt, num_image_tokens: int, num_mask_tokens: int) -> int:
        """Length of ``prompt`` after :class:`~psalm.modeling.sequence.SequenceAssembler` splices it: every
        ``<image>`` becomes ``num_image_tokens`` (N), ``<seg>`` ``num_mask_tokens`` (Q), each ``<cls>`` its class
        span, ``<refer>`` the expression span, ``<region>`` one token."""
        ids = prompt.input_ids
        n = int(ids.numel())
        n += int((ids == IMAGE_TOKEN_INDEX).sum()) * (int(num_image_tokens) - 1)
        n += int((ids == SEG_TOKEN_INDEX).sum()) * (int(num_mask_tokens) - 1)
        if prompt.class_token_ids is not None:
            n += sum(len(t) for t in prompt.class_token_ids) - int((ids == CLS_TOKEN_INDEX).sum())
        if prompt.refer_token_ids is not None:
            n += len(prompt.refer_token_ids) - int((ids == REFER_TOKEN_INDEX).sum())
        return n


_BUILDERS: dict[tuple, PromptBuilder] = {}


def build_prompt_builder(cfg) -> PromptBuilder:
    """The :class:`PromptBuilder` of a config (its tokenizer from :func:`psalm.data.tokenizer.build_tokenizer`),
    one per process for the same tokenizer settings (the mappers of every data set share it)."""
    from .tokenizer import build_tokenizer

    p = cfg.MODEL.PSALM
    path = pathlib.Path(p.TOKENIZER or p.LLM.NAME_OR_PATH)
    stamp = tuple((f.name, f.stat().st_mtime_ns, f.stat().st_size) for f in sorted(path.glob("*")) if f.is_file())
    key = (str(path.resolve()), stamp, p.PAD_TOKEN, p.SEG_TOKEN, int(p.MODEL_MAX_LENGTH), int(p.LLM.VOCAB_SIZE),
           p.PROMPT_STYLE)
    if key not in _BUILDERS:
        _BUILDERS[key] = PromptBuilder.from_config(cfg, build_tokenizer(cfg))
    return _BUILDERS[key]


def prompt_for_input(
    builder: PromptBuilder,
    x: Mapping,
    *,
    shuffle_classes: bool = False,
    rng: np.random.Generator | None = None,
    generation: bool = False,
    where: str = "input",
) -> TokenizedPrompt:
    """The :class:`TokenizedPrompt` of one model input dict (docs/DESIGN.md, "Model input"): the ONE place
    that reads a sample's prompt fields. Used by the mapper (data path, loader workers) and by the model
    for inputs that arrive without a ``"prompt"`` (the predictor, hand-made dicts).

    Args:
        builder: the :class:`PromptBuilder`.
        x: the input dict: ``task`` and its fields (``class_names``; ``sentences``; ``region_masks``
            [R, S, S]; ``conversation``).
        shuffle_classes: category tasks: a random class order (official training).
        rng: the shuffle's RNG (the mapper's per-sample ``numpy.random.Generator``); None: torch's
            global RNG.
        generation: language tasks: a generation prompt (inference).
        where: names the sample in error messages.
    """
    task = T.check_task(x["task"])
    if T.is_category_task(task):
        names = x.get("class_names")
        if not names:
            raise ValueError(f"{where} ({task}) needs 'class_names' (the K category names)")
        order = None
        if shuffle_classes and rng is not None:
            order = rng.permutation(len(names) + 1)
        return builder.build(task, class_names=names, shuffle_classes=shuffle_classes, class_order=order)
    if T.is_sentence_task(task):
        return builder.build(task, sentences=x.get("sentences"))
    if T.is_region_task(task):
        if "region_masks" not in x:
            raise ValueError(f"{where} (interactive) needs 'region_masks' [R, S, S] (one per visual prompt)")
        return builder.build(task, num_regions=int(x["region_masks"].shape[0]))
    return builder.build(task, conversation=x.get("conversation"), add_generation_prompt=generation)


def check_prompt_matches(prompt, x: Mapping, generation: bool = False, where: str = "input") -> None:
    """Raise unless the prebuilt ``x["prompt"]`` (``prompt``) was built for this input as it is now: same task,
    class names, sentences, region count, and (language tasks) generation or training form."""
    if not isinstance(prompt, TokenizedPrompt):
        raise TypeError(f"{where}: 'prompt' must be a TokenizedPrompt (psalm.data.prompt), got {type(prompt).__name__}")
    task = T.check_task(x["task"])
    problems = []
    if prompt.task != task:
        problems.append(f"it is a {prompt.task!r} prompt, the input's task is {task!r}")
    elif T.is_category_task(task) and prompt.class_names != tuple(x.get("class_names") or ()):
        problems.append("its class names differ from the input's 'class_names'")
    elif T.is_sentence_task(task) and prompt.sentences != tuple(x.get("sentences") or ()):
        problems.append("its sentences differ from the input's 'sentences'")
    elif T.is_region_task(task) and prompt.num_regions != int(x["region_masks"].shape[0]):
        problems.append(f"it has {prompt.num_regions} regions, the input {int(x['region_masks'].shape[0])} 'region_masks'")
    elif T.is_lm_task(task) and prompt.generation != bool(generation):
        problems.append("it is a " + ("generation" if prompt.generation else "training") + " prompt, this call needs a "
                        + ("generation" if generation else "training") + " one")
    if problems:
        raise ValueError(
            f"{where}: the prebuilt 'prompt' does not belong to it: {problems[0]}. Drop 'prompt' when you change "
            "an input's task fields (the model then builds it), or map the sample again"
        )
