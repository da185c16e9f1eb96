"""Small measurements several tests make."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from neuroformer.data.tokenizer import PAD


def token_cross_entropy(model, loader) -> float:
    """Mean next-ID cross-entropy over all target tokens of a data loader, in this process."""
    total, n = 0.0, 0
    with torch.no_grad():
        for batch in loader:
            logits = model(batch.inputs).id_logits
            total += F.cross_entropy(logits.flatten(0, 1), batch.target_ids.flatten(), ignore_index=PAD,
                                     reduction="sum").item()
            n += int((batch.target_ids != PAD).sum())
    return total / n
