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


class ConfigError(NeuroformerError, ValueError):
    """A setting (config value or command-line option) that is missing or invalid; names the key."""


def user_error(exc: BaseException) -> BaseException | None:
    """The user error behind ``exc`` (a bad file or setting), or None if ``exc`` is a bug.

    User errors are ``NeuroformerError``s and invalid configs: OmegaConf's errors (a missing
    ``???`` value, a bad interpolation or type) and a call that names a setting the target does
    not take. Hydra wraps errors raised while it builds objects, so the chain of causes is searched.
    """
    from omegaconf.errors import OmegaConfBaseException

    seen = exc
    while seen is not None:
        if isinstance(seen, (NeuroformerError, OmegaConfBaseException)):
            return seen
        if isinstance(seen, TypeError) and ("unexpected keyword argument" in str(seen)
                                            or "required positional argument" in str(seen)):
            return exc  # a config key the constructor does not take; Hydra's message names the target
        seen = seen.__cause__ or seen.__context__
    return None
