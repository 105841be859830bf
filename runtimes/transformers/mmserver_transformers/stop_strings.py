"""Stop strings for a V2 batch of generated sequences: a stopping criterion that ends each row of
``model.generate`` at the token that completes one of the batch's stop strings, and then gives
every row's tokens and text ended as a streamed sequence ends (``IncrementalText``).

Without it a row would generate all its ``max_tokens`` and be cut afterwards: a stop string met
early would still cost the whole generation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import StoppingCriteria

from mmserver.generation import IncrementalText


class _Row:
    """One generated row: its text so far, and where a stop string or end-of-sequence ended it."""

    def __init__(self, decode: Callable[[Sequence[int]], str], stop: tuple[str, ...]) -> None:
        self.text = IncrementalText(decode, stop)
        self.pieces: list[str] = []
        self.done = False
        self.stopped_at: int | None = None  # generated tokens up to the one completing a stop string


class StopStrings(StoppingCriteria):
    """Watches the rows of one ``generate`` call, whose prompts (left padded) are ``width`` wide."""

    def __init__(self, rows: int, width: int, stop: tuple[str, ...], eos: set[int],
                 decode: Callable[[Sequence[int]], str]) -> None:
        self.width = width
        self.eos = eos
        self.rows = [_Row(decode, stop) for _ in range(rows)]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        generated = input_ids[:, self.width:].tolist()
        for row, tokens in zip(self.rows, generated):
            if row.done:
                continue
            if tokens and tokens[-1] in self.eos:  # generate ends this row itself
                row.done = True
                continue
            row.pieces.append(row.text.push(tokens))
            if row.text.matched is not None:
                row.done = True
                row.stopped_at = len(tokens)
        return torch.tensor([row.stopped_at is not None for row in self.rows], dtype=torch.bool,
                            device=input_ids.device)

    def finish(self, index: int, tokens: list[int]) -> tuple[list[int], str]:
        """Row ``index``'s tokens (cut before end-of-sequence already) and text once generation
        ended: up to the token that completed a stop string, the text cut before it."""
        row = self.rows[index]
        if row.stopped_at is not None:
            return tokens[:row.stopped_at], "".join(row.pieces)
        row.pieces.append(row.text.push(tokens))
        return tokens, "".join(row.pieces) + row.text.flush()
