"""The unit vocabulary: which unit each ID token stands for, across sessions."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from neuroformer.data.tokenizer import N_SPECIAL
from neuroformer.errors import ModelMismatchError


@dataclass
class UnitVocabulary:
    """Ordered, session-namespaced unit names (``"<session>/<unit id>"``).

    Unit ``k`` of the vocabulary is ID token ``k + N_SPECIAL``. The order never changes once
    a model is trained on it; ``extend`` only appends, so a trained model's embeddings stay
    valid and only the new rows need training.
    """

    names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._index = {name: i for i, name in enumerate(self.names)}
        if len(self._index) != len(self.names):
            raise ValueError("unit vocabulary has duplicate names")

    def __len__(self) -> int:
        return len(self.names)

    @property
    def size(self) -> int:
        """ID-token vocabulary size (units plus special tokens)."""
        return len(self.names) + N_SPECIAL

    def extend(self, names: Iterable[str]) -> UnitVocabulary:
        """A new vocabulary with any unseen ``names`` appended (existing indices kept)."""
        new = [n for n in dict.fromkeys(names) if n not in self._index]
        return UnitVocabulary(self.names + new)

    def indices(self, names: Iterable[str], source: object = None) -> np.ndarray:
        """(n,) vocabulary index of each name; unknown names raise a clear error naming ``source``
        (the recording they come from), if given."""
        names = list(names)
        missing = [n for n in names if n not in self._index]
        if missing:
            where = f"{source}: units: " if source is not None else ""
            raise ModelMismatchError(
                f"{where}{len(missing)} unit(s) are not in the model's unit vocabulary (e.g. {missing[:3]}); "
                f"the model knows {len(self.names)} units from sessions "
                f"{sorted({n.split('/')[0] for n in self.names})[:5]}. Extend the vocabulary "
                "(fine-tune on the new session) before applying the model to it."
            )
        return np.array([self._index[n] for n in names], dtype=np.int64)

    def to_dict(self) -> dict:
        return {"names": list(self.names)}

    @classmethod
    def from_dict(cls, d: dict) -> UnitVocabulary:
        return cls(list(d["names"]))
