"""A pickle payload that runs code when loaded: what a malicious weights file would carry."""

from __future__ import annotations

from pathlib import Path


class RunsCode:
    """Unpickling this calls ``Path.touch`` on ``marker``; the marker existing means code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))
