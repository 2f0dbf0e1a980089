"""Compatibility alias: the task vocabulary lives in :mod:`psalm.structures.tasks` (a layer every
package imports without going up); this module re-exports it."""

from psalm.structures.tasks import *  # noqa: F401,F403
from psalm.structures.tasks import __all__  # noqa: F401
