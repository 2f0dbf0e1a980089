"""Compatibility alias: the prompt builder lives in :mod:`psalm.data.prompt` (prompts are built in the
data path, by the mappers in the loader's workers); this module re-exports it."""

from psalm.data.prompt import *  # noqa: F401,F403
from psalm.data.prompt import __all__  # noqa: F401
