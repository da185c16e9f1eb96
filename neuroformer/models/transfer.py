"""Transfer a trained Neuroformer to new units: extend its unit vocabulary.

A unit vocabulary only ever appends (``UnitVocabulary.extend``), so a pretrained model's ID
token ``k`` means the same unit after the extension. ``extend_vocabulary`` copies every
weight, keeps the rows of the ID embedding and the ID output head of known tokens exactly,
and adds rows for the new units: each new row starts at the mean of the known units' rows
(in the output head, a new unit starts with an average unit's logit) plus the small random
init of a fresh model, which breaks the symmetry between new units.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from neuroformer.data.tokenizer import N_SPECIAL
from neuroformer.data.vocabulary import UnitVocabulary
from neuroformer.errors import ModelMismatchError
from neuroformer.models.neuroformer import Neuroformer

ID_ROWS = ("id_embedding.weight", "id_head.weight")  # the parameters with one row per ID token


def extend_vocabulary(model: Neuroformer, old: UnitVocabulary, new: UnitVocabulary) -> Neuroformer:
    """A copy of ``model`` for the unit vocabulary ``new``, which must extend ``old``.

    Args:
        model: trained on ``old`` (its ``id_vocab_size`` is ``old.size``).
        old: the vocabulary the model was trained on.
        new: ``old`` with any new units appended.

    Returns:
        a new Neuroformer (train mode) with ``id_vocab_size = new.size``; rows ``< old.size``
        of the ID embedding and ID head are the trained ones, the other weights are copies.
    """
    if model.config.id_vocab_size != old.size:
        raise ModelMismatchError(f"the model has {model.config.id_vocab_size} ID tokens but its vocabulary "
                                 f"has {old.size} ({len(old)} units + {N_SPECIAL} special)")
    if new.names[: len(old)] != old.names:
        raise ModelMismatchError("the new unit vocabulary does not start with the model's units in the same "
                                 "order; build it with old.extend(new_names)")
    extended = Neuroformer(replace(model.config, id_vocab_size=new.size))
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    fresh = extended.state_dict()
    for key in ID_ROWS:
        trained = state[key]
        centre = trained[N_SPECIAL:].mean(0) if len(old) else torch.zeros_like(trained[0])
        state[key] = torch.cat([trained, fresh[key][old.size:] + centre])
    extended.load_state_dict(state)
    return extended.train()


def new_id_rows(n_old: int, n_new: int) -> torch.Tensor:
    """(n_new,) float mask, 1 for ID tokens ``>= n_old`` (the new units), 0 for the others."""
    return (torch.arange(n_new) >= n_old).float()
