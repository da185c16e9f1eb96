"""Errors a user sees: each names the file, the field and what was expected."""

from __future__ import annotations

from pathlib import Path


class NeuroformerError(Exception):
    """Base class of every error neuroformer raises on purpose."""


class RecordingError(NeuroformerError, ValueError):
    """A recording file (NWB) that cannot be used as it is.

    The message reads ``<file>: <field>: <problem>``, so a user knows where to look.
    """

    def __init__(self, path: str | Path, field: str, problem: str):
        self.path, self.field, self.problem = str(path), field, problem
        super().__init__(f"{path}: {field}: {problem}")


class TokenizerError(NeuroformerError, ValueError):
    """Data that cannot be turned into spike tokens (e.g. non-integer counts)."""


class ModelMismatchError(NeuroformerError, ValueError):
    """A model applied to data it was not built for (unit vocabulary, frame size...)."""
