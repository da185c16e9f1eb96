"""One command-line style for every ``python -m neuroformer.*`` tool.

- Options are ``--name value``; ``name=value`` (Hydra's style, as ``train.py`` takes) means
  the same, so ``python -m neuroformer.mds model=models:/twin@champion`` works too.
- Settings that also exist in Python live in frozen dataclasses whose fields carry their own
  help text (``option``), so the API and the command line never disagree about a default.
- ``run`` executes a tool, ``hydra_main`` runs ``train.py``: a user error (a bad file, a model
  that does not fit the data, an invalid setting: ``errors.user_error``) is printed as one
  message on stderr with exit status 2; ``--debug`` (``HYDRA_FULL_ERROR=1`` for ``train.py``)
  shows its traceback. Anything else is a bug and shows its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

import hydra

from neuroformer.errors import user_error

USER_ERROR = 2  # exit status of a refused input, as argparse uses for bad options


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
    """An argument parser that shows each option's default in ``--help`` and has ``--debug``."""
    p = argparse.ArgumentParser(prog=prog, description=description, formatter_class=_DefaultsFormatter,
                                epilog="Options may also be given as name=value.")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error, not just its message")
    return p


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


_ASSIGNMENT = re.compile(r"^([A-Za-z_][A-Za-z0-9_-]*)=(.*)$", re.DOTALL)


def as_flags(argv: Sequence[str], parser: argparse.ArgumentParser) -> list[str]:
    """``name=value`` arguments as ``--name value`` where ``--name`` is one of ``parser``'s options."""
    known = {s for action in parser._actions for s in action.option_strings}
    out: list[str] = []
    for arg in argv:
        match = _ASSIGNMENT.match(arg)
        flag = "--" + match.group(1).replace("_", "-") if match else None
        if flag in known:
            value = match.group(2)
            negated = "--no-" + flag[2:]
            if negated in known and value.lower() in ("true", "false"):  # a boolean switch
                out.append(flag if value.lower() == "true" else negated)
            else:
                out += [flag, value]
        else:
            out.append(arg)
    return out


def run(main: Callable[[argparse.Namespace], int], parser: argparse.ArgumentParser,
        argv: Sequence[str] | None = None, extra: bool = False) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``), call ``main(args)``, return its exit status.

    A ``NeuroformerError`` becomes one ``error: ...`` line on stderr and status 2 (with
    ``--debug``, the traceback is raised instead). With ``extra``, arguments the parser does
    not know are left for ``main`` in ``args.extra`` instead of refused.
    """
    tokens = as_flags(sys.argv[1:] if argv is None else argv, parser)
    if extra:
        args, args.extra = parser.parse_known_args(tokens)
    else:
        args = parser.parse_args(tokens)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return main(args)
    except Exception as exc:
        err = user_error(exc)
        if err is None or args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return USER_ERROR


def hydra_main(task: Callable[[Any], Any], **hydra_args: Any) -> int:
    """Run ``task(cfg)`` as Hydra's main function (``hydra.main(**hydra_args)``) with the tools'
    error rules; returns the exit status (``train.py``).

    A user error inside the task prints one ``error: ...`` line on stderr and gives status 2.
    Hydra reports errors in composing the config (an unknown or malformed override) itself, as
    a message without a traceback; they are user errors too and give 2 rather than Hydra's 1.
    ``HYDRA_FULL_ERROR=1`` shows the traceback of either.
    """
    started = False
    debug = os.environ.get("HYDRA_FULL_ERROR") == "1"

    def guarded(cfg: Any) -> Any:
        nonlocal started
        started = True
        try:
            return task(cfg)
        except Exception as exc:
            err = user_error(exc)
            if err is None or debug:
                raise
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(USER_ERROR) from None

    try:
        hydra.main(version_base="1.3", **hydra_args)(guarded)()
    except SystemExit as stop:
        if stop.code == 1 and not started:  # Hydra refused the command line
            return USER_ERROR
        return stop.code if isinstance(stop.code, int) else USER_ERROR
    return 0
