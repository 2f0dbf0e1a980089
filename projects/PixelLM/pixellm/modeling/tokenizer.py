"""Tokenizer loading for PixelLM (the release: slow LLaMA ``tokenizer.model`` + added tokens).

The official code runs transformers 4.31's slow sentencepiece ``LlamaTokenizer`` (``legacy=True``).
Two of its behaviours decide the token ids (and so which hidden states the [SEG] tokens read):

* every piece of text between added tokens gets sentencepiece's dummy prefix ``"▁"``
  (``"[SEG5].</s>"`` -> ``[SEG5]``, ``▁``, ``.``, ``</s>``); transformers 5's ``LlamaTokenizer`` does the
  same with ``legacy=True`` (``Metaspace(prepend_scheme="always")``);
* added tokens given as plain strings (all the PixelLM tokens: ``train_ds.py`` adds them as ``str``,
  and ``save_pretrained`` of 4.31 keeps only their ids in ``added_tokens.json``) strip the whitespace
  on both sides (``"ASSISTANT: [SEG0] [SEG1]"`` -> ``ASSISTANT``, ``:``, ``[SEG0]``, ``[SEG1]``).
  transformers 5 reads ``added_tokens.json`` as non-stripping tokens, so they are given here as
  ``AddedToken(lstrip=True, rstrip=True)``, and :func:`add_pixellm_tokens` adds them that way too.
"""
from __future__ import annotations

import json
import logging
import pathlib

__all__ = ["load_pixellm_tokenizer", "add_pixellm_tokens", "PIXELLM_EXTRA_TOKENS"]

logger = logging.getLogger(__name__)
PIXELLM_EXTRA_TOKENS = ("<im_start>", "<im_end>")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")


def _stripping_token(content: str, special: bool):
    """A PixelLM added token with the 4.31 slow tokenizer's default for ``str`` tokens (strip both sides)."""
    from transformers import AddedToken

    return AddedToken(content, lstrip=True, rstrip=True, normalized=not special, special=special)


def _tokenizer_class(directory: pathlib.Path):
    """The class named by ``tokenizer_config.json:tokenizer_class`` (``None``: let ``AutoTokenizer`` choose).

    ``AutoTokenizer`` of transformers 5 routes by the ``config.json`` next to the tokenizer first; a
    PixelLM release has a ``llava`` config there, which gives a generic ``TokenizersBackend`` that
    drops the LLaMA dummy prefix. The tokenizer's own config names the class it was saved with.
    """
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

    cfg_file = directory / "tokenizer_config.json"
    if not cfg_file.is_file():
        return None
    name = json.loads(cfg_file.read_text()).get("tokenizer_class")
    if not name:
        return None
    cls = tokenizer_class_from_name(name) or tokenizer_class_from_name(name.removesuffix("Fast"))
    if cls is None:
        raise ValueError(f"{cfg_file} names tokenizer_class={name!r}, which this transformers version does not have")
    return cls


def _legacy_added_tokens(directory: pathlib.Path) -> dict | None:
    """``added_tokens_decoder`` for a tokenizer saved by transformers < 4.34 (``added_tokens.json`` only).

    ``None`` when the directory records the added tokens itself (``tokenizer_config.json:added_tokens_decoder``
    or ``tokenizer.json``): their lstrip/rstrip are then loaded as saved.
    """
    added = directory / "added_tokens.json"
    cfg_file = directory / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
    if not added.is_file() or "added_tokens_decoder" in cfg or (directory / "tokenizer.json").is_file():
        return None
    # as 4.31 reloads them: plain no-split strings (not special: ``decode(skip_special_tokens=True)`` keeps them)
    return {int(i): _stripping_token(t, False) for t, i in json.loads(added.read_text()).items()}


def load_pixellm_tokenizer(path, required: bool = True):
    """The tokenizer of ``path`` with ``pad_token = unk_token`` (official ``train_ds``).

    A release directory (slow LLaMA ``tokenizer.model`` + ``added_tokens.json``) loads as
    ``transformers.LlamaTokenizer`` with ``legacy`` from its config and stripping added tokens, which
    gives the official ids (see the module docstring). A directory saved by transformers >= 4.34
    (e.g. psalm's tiny tokenizer) loads as saved.

    ``required=False`` (the tokenizer looked for in ``MODEL_DIR``): a directory without tokenizer files,
    or a sentencepiece model without the ``sentencepiece`` package, gives ``None`` and a warning; the
    model then runs on token ids only (teacher-forced evaluation), and the predictor refuses to run.
    A tokenizer that is there but fails to load (a broken file) is an error even then.
    """
    from transformers import AutoTokenizer
    from transformers.utils import is_sentencepiece_available

    directory = pathlib.Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"tokenizer directory {directory} does not exist (MODEL.PIXELLM.TOKENIZER / MODEL_DIR)")
    if not any((directory / f).is_file() for f in _TOKENIZER_FILES):
        msg = f"{directory} has no tokenizer files ({', '.join(_TOKENIZER_FILES)})"
        if required:
            raise FileNotFoundError(msg + "; set MODEL.PIXELLM.TOKENIZER to the tokenizer directory")
        logger.warning("%s; running on token ids only", msg)
        return None
    needs_sp = (directory / "tokenizer.model").is_file() and not (directory / "tokenizer.json").is_file()
    if needs_sp and not is_sentencepiece_available():
        msg = (f"the tokenizer in {directory} is a sentencepiece model (tokenizer.model) and the `sentencepiece` "
               "package is not installed (pip install sentencepiece)")
        if required:
            raise RuntimeError(msg)
        logger.warning("%s; running on token ids only", msg)
        return None
    cls = _tokenizer_class(directory) or AutoTokenizer
    kwargs = {}
    added = _legacy_added_tokens(directory)
    if added is not None:
        kwargs["added_tokens_decoder"] = added
    try:
        tok = cls.from_pretrained(str(directory), **kwargs)
    except Exception as e:  # noqa: BLE001 - the reason is reported
        raise RuntimeError(f"cannot load the tokenizer in {directory} with {cls.__name__}: {e}") from e
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token
    return tok


def add_pixellm_tokens(tokenizer, codebook: list[str]) -> None:
    """Add the codebook tokens and <im_start>/<im_end> (special) as the official ``train_ds.py``.

    They strip the whitespace around them like the ``str`` tokens of the official (4.31 slow) tokenizer.
    """
    tokenizer.add_tokens([_stripping_token(t, False) for t in codebook])
    tokenizer.add_tokens([_stripping_token(t, True) for t in PIXELLM_EXTRA_TOKENS], special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token
