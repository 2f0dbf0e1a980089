"""Compatibility alias: the tokenizer code lives in :mod:`psalm.data.tokenizer` (the data path
tokenises the prompts); this module re-exports it."""

from psalm.data.tokenizer import *  # noqa: F401,F403
from psalm.data.tokenizer import __all__, build_tiny_tokenizer, save_tiny_tokenizer  # noqa: F401
