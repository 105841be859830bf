"""The text and token-id inputs that the transformers and vLLM runtimes read alike
(``mmserver.token_inputs``), and the embedding request they both build from the OpenAI route's
inputs."""

from __future__ import annotations

import re

import numpy as np
import pytest

from mmserver.embedding import RETURN_INPUT_TOKENS, embedding_request
from mmserver.errors import InvalidInput
from mmserver.token_inputs import IDS_INPUT, MASK_INPUT, id_rows, padded_ids, row_lengths, text_inputs
from mmserver.types import InferInput, InferRequest


def _ids(rows: list[list[int]]) -> InferInput:
    return InferInput(IDS_INPUT, "INT64", np.array(rows, dtype=np.int64))


def _mask(rows: list[list[int]]) -> InferInput:
    return InferInput(MASK_INPUT, "INT64", np.array(rows, dtype=np.int64))


def test_rows_are_the_ids_the_mask_marks_whichever_side_is_padded() -> None:
    ids, mask = _ids([[0, 0, 5, 6], [7, 8, 9, 0]]), _mask([[0, 0, 1, 1], [1, 1, 1, 0]])
    assert id_rows(ids, mask) == [[5, 6], [7, 8, 9]]
    assert row_lengths(ids, mask, vocab_size=10).tolist() == [2, 3]
    assert id_rows(ids, None) == [[0, 0, 5, 6], [7, 8, 9, 0]]  # no mask: every id counts


def test_padded_ids_round_trip() -> None:
    rows = [[3, 4, 5], [6]]
    ids, mask = padded_ids(rows, pad_id=9)
    assert ids.data.tolist() == [[3, 4, 5], [6, 9, 9]] and mask.data.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert id_rows(ids, mask) == rows


@pytest.mark.parametrize(("ids", "mask", "says"), [
    ([[1, 12]], None, "must be in [0, 10)"),
    ([[1, -1]], None, "must be in [0, 10)"),
    ([[1, 2]], [[1, 2]], "0 and 1 only"),
    ([[1, 2], [3, 4]], [[1, 1], [0, 0]], "row 1 has no tokens"),
])
def test_bad_token_ids_are_refused(ids, mask, says) -> None:
    with pytest.raises(InvalidInput, match=re.escape(says)):
        row_lengths(_ids(ids), _mask(mask) if mask is not None else None, vocab_size=10)


def test_text_inputs_tell_texts_from_ids_and_refuse_mixtures() -> None:
    texts = InferInput("text", "BYTES", np.array([b"hi"], dtype=object))
    assert text_inputs(InferRequest([texts]), ("text",)).texts is texts
    given = text_inputs(InferRequest([_ids([[1]]), _mask([[1]])]), ("text",))
    assert given.ids is not None and given.mask is not None and given.texts is None
    for inputs, says in (([texts, _ids([[1]])], "cannot be combined"),
                         ([_mask([[1]])], "needs 'input_ids' beside it"),
                         ([InferInput("pixels", "FP32", np.zeros(1))], "not an input of this model"),
                         ([InferInput("text", "INT64", np.zeros(1, dtype=np.int64))], "texts must be BYTES"),
                         ([_ids([[1, 2]]), _mask([[1]])], "must match"),
                         ([InferInput(IDS_INPUT, "FP32", np.zeros((1, 2), dtype=np.float32))], "must be integers")):
        with pytest.raises(InvalidInput, match=re.escape(says)):
            text_inputs(InferRequest(inputs), ("text",))


def test_the_embedding_request_carries_texts_or_padded_ids_and_asks_for_the_count() -> None:
    texts = embedding_request(["a", "bé"], "text_input", pad_id=0)
    (tensor,) = texts.inputs
    assert (tensor.name, tensor.datatype, tensor.data.tolist()) == ("text_input", "BYTES", [b"a", "bé".encode()])
    assert texts.output_names == ("embedding",) and texts.parameters == {RETURN_INPUT_TOKENS: True}
    ids = embedding_request([[5], [6, 7]], "text_input", pad_id=2)
    assert [t.name for t in ids.inputs] == [IDS_INPUT, MASK_INPUT]
    assert id_rows(*ids.inputs) == [[5], [6, 7]] and ids.inputs[0].data.tolist() == [[5, 2], [6, 7]]


def test_a_flag_parameter_must_be_true_or_false() -> None:
    request = InferRequest([], parameters={"normalize": True, "truncation": "yes"})
    assert request.flag("normalize") is True and request.flag("absent") is False
    assert request.flag("absent", default=True) is True
    with pytest.raises(InvalidInput, match="parameter 'truncation' is 'yes'; expected true or false"):
        request.flag("truncation")
