"""Files written atomically: a reader, a crash or a preemption never sees half a file.

Every output of the platform (checkpoints, NWB recordings, metrics.json, plots, the remembered
MLflow run id) is written to a temporary name beside its destination and renamed over it only
once complete: a rename within a folder is atomic on POSIX filesystems.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; renamed over ``path`` if the block succeeds.

    The temporary name keeps ``path``'s suffix (some writers check it) and is unique per
    process and call, so concurrent writers never share one. On any error it is removed and
    ``path`` keeps its previous content.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.{uuid.uuid4().hex[:8]}.partial{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.is_dir():  # a writer that makes a folder (a sharded checkpoint)
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically; returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def _strict(value: Any) -> Any:
    """JSON-ready: NaN and inf become null, numpy scalars plain numbers."""
    if isinstance(value, dict):
        return {str(k): _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def write_json(path: str | Path, data: dict) -> Path:
    """Write ``data`` as strict JSON (NaN and inf as null), atomically; returns the path."""
    return write_text(path, json.dumps(_strict(data), indent=2, allow_nan=False))
