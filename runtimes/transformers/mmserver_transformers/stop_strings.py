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

    def __init__(self, decode: Callable[[Sequence[int]], str], stop: tuple[str, ...], min_tokens: int) -> None:
        self.text = IncrementalText(decode, stop, min_tokens)
        self.pieces: list[str] = []
        self.seen = 0  # generated tokens the text has been given
        self.done = False
        self.stopped_at: int | None = None  # generated tokens up to the one completing a stop string

    def advance(self, tokens: list[int]) -> None:
        """Give the text every new token one at a time (a step may bring several), up to the
        one that completes a stop string."""
        for end in range(self.seen + 1, len(tokens) + 1):
            self.pieces.append(self.text.push(tokens[:end]))
            self.seen = end
            if self.text.matched is not None:
                self.done = True
                self.stopped_at = end
                return


class StopStrings(StoppingCriteria):
    """Watches the rows of one ``generate`` call, whose prompts (left padded) are ``width`` wide.
    Install it only for a search that keeps one sequence per row (not beam search, whose
    candidates are rows of their own); ``finish`` ends the rows either way. Stop strings count
    only after ``min_tokens`` generated tokens, as in ``IncrementalText``."""

    def __init__(self, rows: int, width: int, stop: tuple[str, ...], eos: set[int],
                 decode: Callable[[Sequence[int]], str], min_tokens: int = 0) -> None:
        self.width = width
        self.eos = eos
        self.rows = [_Row(decode, stop, min_tokens) for _ in range(rows)]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        if input_ids.shape[0] != len(self.rows):
            raise ValueError(f"StopStrings watches {len(self.rows)} rows, not {input_ids.shape[0]}")
        for row, tokens in zip(self.rows, input_ids[:, self.width:].tolist()):
            if row.done:
                continue
            end = next((i for i, t in enumerate(tokens) if t in self.eos), None)
            row.advance(tokens if end is None else tokens[:end])
            if end is not None:  # generate ends this row itself
                row.done = True
        return torch.tensor([row.stopped_at is not None for row in self.rows], dtype=torch.bool,
                            device=input_ids.device)

    def finish(self, index: int, tokens: list[int]) -> tuple[list[int], str]:
        """Row ``index``'s tokens (cut before end-of-sequence already) and text once generation
        ended: up to the token that completed a stop string, the text cut before it."""
        row = self.rows[index]
        if row.stopped_at is None:
            row.advance(tokens)
        if row.stopped_at is not None:
            return tokens[:row.stopped_at], "".join(row.pieces)
        return tokens, "".join(row.pieces) + row.text.flush()
