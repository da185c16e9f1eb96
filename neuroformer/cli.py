"""Command-line helpers shared by the ``python -m neuroformer.*`` tools.

Their settings live in frozen dataclasses whose fields carry their own help text, so the
Python API and the command line can never disagree about a default.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any


def option(default: Any, help: str) -> Any:
    """A dataclass field whose help text is also its command-line option's."""
    return dataclasses.field(default=default, metadata={"help": help})


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends ``(default: ...)`` unless the help text already explains the default, or there is none."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def parser(prog: str, description: str) -> argparse.ArgumentParser:
    """An argument parser that shows each option's default in ``--help``."""
    return argparse.ArgumentParser(prog=prog, description=description, formatter_class=_DefaultsFormatter)


def add_options(parser: argparse.ArgumentParser, config: type) -> None:
    """One ``--field-name`` option per field of the dataclass ``config`` (booleans get ``--no-``)."""
    for f in dataclasses.fields(config):
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=f.metadata["help"])
        else:
            parser.add_argument(flag, type=type(f.default), default=f.default, help=f.metadata["help"])


def options(args: argparse.Namespace, config: type) -> Any:
    """The ``config`` dataclass built from the parsed options of ``add_options``."""
    return config(**{f.name: getattr(args, f.name) for f in dataclasses.fields(config)})
