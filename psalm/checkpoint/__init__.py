"""Checkpoint converters and strict loading (missing / unexpected / mis-shaped keys are reported)."""
from .strict import IncompatibleKeysError, LoadReport, load_strict

__all__ = ["IncompatibleKeysError", "LoadReport", "load_strict"]
