"""PixelLM prompts: the llava_v1 conversation, ``<image>`` splitting, answer labels, codebook text.

One builder for training, teacher-forced evaluation, generation and the predictor:

    "{SYSTEM} USER: <im_start><image><im_end>\\n{question} ASSISTANT: {answer}</s>"

``<image>`` becomes ``IMAGE_TOKEN_INDEX`` (-200): the text around it is tokenised chunk by chunk
with the tokenizer's BOS kept only on the first chunk (official ``tokenizer_image_token``). Labels:
every token up to and including ``ASSISTANT:`` is ignored (-100), the answer and ``</s>`` are
supervised. Each target of an answer is written as one codebook group ``"[SEG0] ... [SEG5]"``.
"""
from __future__ import annotations

import torch

from psalm.data.text import join_phrases  # noqa: F401  (re-exported: the multi-target templates' list join)
from psalm.modeling.criterion import IGNORE_INDEX

__all__ = ["SYSTEM", "IMAGE_TOKEN", "IMAGE_TOKEN_INDEX", "codebook_group", "build_conversation", "split_answer_prompt",
           "tokenizer_image_token", "tokenize_conversation", "tokenize_multi_round", "REFER_QUESTION", "MULTI_REFER_QUESTION",
           "join_phrases"]

SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
          "detailed, and polite answers to the human's questions.")
IMAGE_TOKEN = "<image>"
IMAGE_TOKEN_INDEX = -200
ASSISTANT = " ASSISTANT:"
# evaluation prompts of the official code (spec A3.1)
REFER_QUESTION = IMAGE_TOKEN + "\n What is {sent} in this image? Please output segmentation mask."
MULTI_REFER_QUESTION = IMAGE_TOKEN + "\n What is {sent} in this image? Please output segmentation mask."


def codebook_group(num_tokens: int = 6) -> str:
    """The text of one target: ``"[SEG0] [SEG1] ... [SEG{n-1}]"``."""
    return " ".join(f"[SEG{i}]" for i in range(num_tokens))


def build_conversation(question: str, answer: str | None = None, im_start_end: bool = True,
                       eos_token: str = "</s>") -> str:
    """The llava_v1 prompt; without ``answer`` it ends with ``ASSISTANT:`` (generation)."""
    if IMAGE_TOKEN not in question:
        raise ValueError(f"the question must contain {IMAGE_TOKEN!r} once: {question!r}")
    if im_start_end:
        question = question.replace(IMAGE_TOKEN, "<im_start>" + IMAGE_TOKEN + "<im_end>")
    text = f"{SYSTEM} USER: {question}{ASSISTANT}"
    return text if answer is None else f"{text} {answer}{eos_token}"


def split_answer_prompt(conversation: str) -> str:
    """The instruction part of a conversation (up to and including ``ASSISTANT:``)."""
    i = conversation.find(ASSISTANT)
    if i < 0:
        raise ValueError(f"not a llava_v1 conversation (no {ASSISTANT.strip()!r}): {conversation[:80]!r}")
    return conversation[: i + len(ASSISTANT)]


def tokenizer_image_token(text: str, tokenizer) -> torch.Tensor:
    """Token ids with ``IMAGE_TOKEN_INDEX`` at each ``<image>`` (BOS only at the start)."""
    chunks = [tokenizer(c).input_ids for c in text.split(IMAGE_TOKEN)]
    bos = tokenizer.bos_token_id
    has_bos = bos is not None and len(chunks[0]) > 0 and chunks[0][0] == bos
    ids = [bos] if has_bos else []
    for i, c in enumerate(chunks):
        if has_bos and c and c[0] == bos:
            c = c[1:]
        if i:
            ids.append(IMAGE_TOKEN_INDEX)
        ids.extend(c)
    return torch.tensor(ids, dtype=torch.long)


def tokenize_multi_round(tokenizer, rounds, eos_token: str = "</s>", im_start_end: bool = True):
    """LLaVA-style multi-round chat (VQA data): ``rounds`` = [(question, answer), ...], the first
    question holding ``<image>``. Text ``"{SYSTEM} USER: q1 ASSISTANT: a1</s>USER: q2 ASSISTANT: a2</s>"``
    (llava_v1 separators); only the answers (and their ``</s>``) are supervised."""
    text = build_conversation(rounds[0][0], rounds[0][1], im_start_end, eos_token)
    bounds = [(len(split_answer_prompt(text)), len(text))]
    for q, a in rounds[1:]:
        start = len(text) + len("USER: ") + len(q) + len(ASSISTANT)
        text += f"USER: {q}{ASSISTANT} {a}{eos_token}"
        bounds.append((start, len(text)))
    ids = tokenizer_image_token(text, tokenizer)
    labels = torch.full_like(ids, IGNORE_INDEX)
    for instr_end, ans_end in bounds:
        a = len(tokenizer_image_token(text[:instr_end], tokenizer))
        b = len(tokenizer_image_token(text[:ans_end], tokenizer))
        labels[a:b] = ids[a:b]
    return ids, labels


def tokenize_conversation(tokenizer, conversation: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids [T], labels [T]) of a conversation with its answer."""
    ids = tokenizer_image_token(conversation, tokenizer)
    n_instr = len(tokenizer_image_token(split_answer_prompt(conversation), tokenizer))
    labels = ids.clone()
    labels[:n_instr] = IGNORE_INDEX
    if not torch.equal(ids[:n_instr], tokenizer_image_token(split_answer_prompt(conversation), tokenizer)):
        raise ValueError("the tokenizer merges the instruction with the answer; cannot place the labels")
    return ids, labels
