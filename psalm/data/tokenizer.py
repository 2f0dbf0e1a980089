"""PSALM's tokenizer (data-path code: the mappers tokenise the prompts in the loader's workers).

* :func:`load_tokenizer` / :func:`build_tokenizer` load a local HF tokenizer directory and add
  PSALM's ``[PAD]`` and ``[SEG]`` as the official ``train.py`` does;
  :func:`check_tokenizer_matches_vocab` checks it against the model's embedding rows.
* :func:`build_tiny_tokenizer` / :func:`save_tiny_tokenizer`: a small, deterministic, self-contained
  byte-level BPE tokenizer for tests and synthetic training.

The real PSALM tokenizer (phi-1_5's GPT-2 BPE + ``[PAD]`` + ``[SEG]``, 50297 entries) cannot be
downloaded here, so tests and the synthetic training job use a tiny tokenizer with the same
structure:

* byte-level pre-tokenisation and decoding exactly as GPT-2 / phi-1_5 (``ByteLevel``,
  ``add_prefix_space=False``): the first 256 ids are the 256 bytes in GPT-2's order (so ``" "`` is
  ``"Ġ"`` = 220 and ``"\\n"`` is ``"Ċ"`` = 198 as in the real vocabulary), which makes **every** text
  round-trip, ASCII or not;
* ``num_merges`` BPE merges learnt by a small deterministic trainer (below) on a built-in corpus of
  the PSALM prompt wording, or on a corpus you pass;
* then ``<|endoftext|>`` (bos / eos / unk, special), ``[PAD]`` (pad, special) and ``[SEG]`` (an
  ordinary added token), in that order, as PSALM's ``train.py`` adds them, so ``[PAD]`` < ``[SEG]``
  are the last two ids.

Nothing is random: the trainer picks the most frequent adjacent pair and breaks ties by the smaller
pair (string order), so the same arguments always give the same files.

Usage::

    from psalm.data.tokenizer import save_tiny_tokenizer
    path = save_tiny_tokenizer("/tmp/tok")          # then cfg.MODEL.PSALM.TOKENIZER = path
"""

from __future__ import annotations

import collections
import logging
import os
import pathlib
from typing import Iterable

logger = logging.getLogger(__name__)

__all__ = [
    "byte_level_alphabet",
    "build_tiny_tokenizer",
    "save_tiny_tokenizer",
    "DEFAULT_CORPUS",
    "EOS_TOKEN",
    "load_tokenizer",
    "build_tokenizer",
    "check_tokenizer_matches_vocab",
]

EOS_TOKEN = "<|endoftext|>"

# Built-in training text: the PSALM prompt wording plus a few common words, so that the prompts
# tokenise into a realistic number of pieces (not one token per character).
DEFAULT_CORPUS = (
    "[INST] <<SYS>>\nYou are a helpful language and vision assistant. You are able to understand the "
    "visual content that the user provides, and assist the user with a variety of tasks using natural "
    "language.\n<</SYS>>\n\n"
    "This is an image <image>, Please do Panoptic Segmentation.\n"
    "This is all the candidate categories: <cls>, <cls>, <cls>.\n [/INST] \n"
    "Sure, the segmentation result is <seg> <|endoftext|>\n"
    "This is an image <image>, Please doing Referring Segmentation according to the following "
    "instruction:\n<refer> [/INST] \n"
    "This is an image <image>, Please segment by given regions\nThis is all regions:  <region>, "
    "<region>.\n [/INST] \n[SEG]<seg>\n"
    "person bicycle car motorcycle airplane bus train truck boat traffic light fire hydrant stop sign "
    "bench bird cat dog horse sheep cow elephant bear zebra giraffe backpack umbrella handbag tie "
    "bottle cup fork knife spoon bowl banana apple sandwich orange pizza chair couch bed table tree "
    "sky road grass wall building water floor ceiling window door background left right the man woman "
    "red blue green white black small large two the person in red on the left. red figure. "
    "What is in the image? Describe the image in detail. The image shows a scene with objects.\n"
)


def byte_level_alphabet() -> list[str]:
    """The 256 byte-level symbols in GPT-2's id order (symbol i encodes byte ``_BYTE_ORDER[i]``).

    Printable bytes (``!``..``~``, ``¡``..``¬``, ``®``..``ÿ``) stand for themselves; the other 68 bytes
    (controls, space, ...) are mapped in increasing byte order to ``chr(256 + n)``. Ids follow that
    listing: printable ones first, then the remapped ones, which puts space (``Ġ``) at 220.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols = [chr(b) for b in printable]
    n = 0
    for b in range(256):
        if b not in printable:
            symbols.append(chr(256 + n))
            n += 1
    return symbols


def _learn_merges(words: collections.Counter, num_merges: int) -> list[tuple[str, str]]:
    """Greedy BPE on pre-tokenised words (tuples of symbols -> count). Deterministic tie-break."""
    vocab = dict(words)
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: collections.Counter = collections.Counter()
        for symbols, count in vocab.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))[0]
        merges.append(best)
        joined = best[0] + best[1]
        new_vocab: dict[tuple[str, ...], int] = {}
        for symbols, count in vocab.items():
            out, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(joined)
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            key = tuple(out)
            new_vocab[key] = new_vocab.get(key, 0) + count
        vocab = new_vocab
    return merges


def build_tiny_tokenizer(
    num_merges: int = 200,
    corpus: str | Iterable[str] | None = None,
    model_max_length: int = 2048,
    pad_token: str = "[PAD]",
    seg_token: str = "[SEG]",
    add_psalm_tokens: bool = True,
):
    """Build the tiny tokenizer in memory (a transformers fast tokenizer).

    Args:
        num_merges: number of BPE merges (vocabulary = 256 + merges + 3 added tokens; fewer merges
            if the corpus runs out of pairs).
        corpus: training text (a string or an iterable of strings); default :data:`DEFAULT_CORPUS`.
        model_max_length: stored in the tokenizer config (PSALM: 2048).
        pad_token, seg_token: the two PSALM tokens added after ``<|endoftext|>``.
        add_psalm_tokens: False gives a "base" tokenizer without them (like phi-1_5's own, no pad
            token), to exercise :func:`load_tokenizer`, which adds them.

    Returns:
        ``transformers.PreTrainedTokenizerFast`` with right padding; ``pad_token_id`` and
        ``convert_tokens_to_ids(seg_token)`` are the last two ids.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if num_merges < 0:
        raise ValueError(f"num_merges must be >= 0, got {num_merges}")
    texts = [DEFAULT_CORPUS] if corpus is None else ([corpus] if isinstance(corpus, str) else list(corpus))
    pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    words: collections.Counter = collections.Counter()
    for text in texts:
        # the special-token strings are never split by the real tokenizer: keep them out of BPE
        for special in (EOS_TOKEN, pad_token, seg_token):
            text = text.replace(special, " ")
        for piece, _ in pre.pre_tokenize_str(text):
            words[tuple(piece)] += 1
    merges = _learn_merges(words, num_merges)

    vocab = {sym: i for i, sym in enumerate(byte_level_alphabet())}
    for a, b in merges:
        if a + b not in vocab:
            vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        model_max_length=model_max_length,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    # the order of PSALM's train.py: [PAD] as the pad special token, then [SEG] as an ordinary token
    if add_psalm_tokens:
        tokenizer.add_special_tokens({"pad_token": pad_token})
        tokenizer.add_tokens([seg_token])
    return tokenizer


def save_tiny_tokenizer(directory: str | pathlib.Path, **kwargs) -> pathlib.Path:
    """Build the tiny tokenizer (:func:`build_tiny_tokenizer` arguments) and save it to ``directory``.

    The directory loads with ``AutoTokenizer.from_pretrained(directory)`` and with
    :func:`load_tokenizer`. Returns the directory path.
    """
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    build_tiny_tokenizer(**kwargs).save_pretrained(str(directory))
    return directory


# ------------------------------------------------------------------------------------ tokenizer


def load_tokenizer(
    path: str | os.PathLike,
    pad_token: str = "[PAD]",
    seg_token: str = "[SEG]",
    model_max_length: int = 2048,
):
    """Load a local HF tokenizer directory (fast tokenizer) and make sure ``[PAD]`` and ``[SEG]`` exist.

    Official order (``train.py``): if ``tokenizer.pad_token`` is None, ``[PAD]`` is added as the pad
    special token; then ``[SEG]`` is added with ``add_tokens`` if absent. The tokenizer pads on the
    right. ``<|endoftext|>`` must be a single token (the chat template ends every answer with it).

    Returns:
        the transformers tokenizer.
    """
    from transformers import AutoTokenizer

    path = pathlib.Path(path)
    if not str(path) or str(path) == ".":
        raise ValueError(
            "no tokenizer directory given: set MODEL.PSALM.TOKENIZER (or MODEL.PSALM.LLM.NAME_OR_PATH) to a "
            "local HF tokenizer directory; psalm.data.tokenizer.save_tiny_tokenizer builds a test one"
        )
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer directory {path} does not exist (nothing is downloaded)")
    tokenizer = AutoTokenizer.from_pretrained(
        str(path), use_fast=True, local_files_only=True, model_max_length=model_max_length, padding_side="right"
    )
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": pad_token})
        logger.info("tokenizer had no pad token: added %s (id %d)", pad_token, tokenizer.pad_token_id)
    if seg_token not in tokenizer.get_vocab():
        tokenizer.add_tokens([seg_token])
        logger.info("added %s (id %d) to the tokenizer", seg_token, tokenizer.convert_tokens_to_ids(seg_token))
    for tok in (seg_token, EOS_TOKEN):
        ids = tokenizer.encode(tok, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"{tok!r} must encode to one token with the tokenizer in {path}, got {ids}")
    return tokenizer


# a vocabulary at least GPT-2's (phi-1_5's base) is a real model's, whose embedding rows have meaning
REAL_VOCAB_MIN = 50257


def build_tokenizer(cfg):
    """:func:`load_tokenizer` from ``MODEL.PSALM.TOKENIZER`` (or ``MODEL.PSALM.LLM.NAME_OR_PATH`` if empty),
    checked against the model's vocabulary (:func:`check_tokenizer_matches_vocab`)."""
    path = cfg.MODEL.PSALM.TOKENIZER or cfg.MODEL.PSALM.LLM.NAME_OR_PATH
    tokenizer = load_tokenizer(
        path,
        pad_token=cfg.MODEL.PSALM.PAD_TOKEN,
        seg_token=cfg.MODEL.PSALM.SEG_TOKEN,
        model_max_length=cfg.MODEL.PSALM.MODEL_MAX_LENGTH,
    )
    check_tokenizer_matches_vocab(
        tokenizer, int(cfg.MODEL.PSALM.LLM.VOCAB_SIZE), cfg.MODEL.PSALM.PAD_TOKEN, cfg.MODEL.PSALM.SEG_TOKEN,
        where=str(path),
    )
    return tokenizer


def check_tokenizer_matches_vocab(tokenizer, vocab_size: int, pad_token: str = "[PAD]", seg_token: str = "[SEG]",
                                  where: str = "the tokenizer") -> None:
    """A real model's tokenizer must index the checkpoint's embedding rows exactly.

    Always: ``len(tokenizer) <= vocab_size``. For a real vocabulary (``vocab_size >= REAL_VOCAB_MIN``,
    e.g. phi-1_5's PSALM vocabulary 50297 = 50295 base + ``[PAD]`` 50295 + ``[SEG]`` 50296):
    ``len(tokenizer) == vocab_size``, ``[SEG]`` is the last id and ``[PAD]`` (when it is PSALM's pad
    token) the one before. A phi tokenizer that already has a pad token gets no ``[PAD]``, so its
    ``[SEG]`` lands on id 50295, the official ``[PAD]`` row: that is an error, not a silent remap.
    Test-size vocabularies may keep spare rows.
    """
    n = len(tokenizer)
    if n > vocab_size:
        raise ValueError(
            f"MODEL.PSALM.LLM.VOCAB_SIZE={vocab_size} is smaller than {where} ({n} tokens); set it to at least {n}"
        )
    if vocab_size < REAL_VOCAB_MIN:
        return
    seg_id = tokenizer.convert_tokens_to_ids(seg_token)
    pad_is_psalm = tokenizer.pad_token == pad_token
    problems = []
    if n != vocab_size:
        problems.append(f"it has {n} tokens, the model's vocabulary (MODEL.PSALM.LLM.VOCAB_SIZE) {vocab_size}")
    if seg_id != vocab_size - 1:
        problems.append(f"{seg_token} has id {seg_id}, the model's {seg_token} row is {vocab_size - 1}")
    if pad_is_psalm and tokenizer.pad_token_id != vocab_size - 2:
        problems.append(f"{pad_token} has id {tokenizer.pad_token_id}, the model's {pad_token} row is {vocab_size - 2}")
    if not problems:
        return
    hint = ""
    if not pad_is_psalm:
        hint = (
            f" The tokenizer already had a pad token ({tokenizer.pad_token!r}, id {tokenizer.pad_token_id}), so "
            f"{pad_token} was not added and {seg_token} took the id of the official {pad_token} row "
            f"({vocab_size - 2} in a {vocab_size}-row PSALM vocabulary)."
        )
    raise ValueError(
        f"{where} does not match the model's embedding rows: " + "; ".join(problems) + "." + hint
        + " Use the tokenizer the converter writes (tools/convert_official.py --output DIR: DIR; "
        "tools/convert_phi.py --save-tokenizer DIR), or one without a pad token (official phi-1_5), or set "
        "MODEL.PSALM.LLM.VOCAB_SIZE to the checkpoint's row count if the checkpoint was trained with this tokenizer."
    )
