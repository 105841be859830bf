"""The text generation contract (``mmserver.generation``): parameter validation, room checks and
incremental text with stop strings. Pure Python, no model."""

from __future__ import annotations

import pytest

from mmserver.errors import InvalidInput
from mmserver.generation import (
    FINISH_LENGTH,
    Completion,
    GenerationChunk,
    IncrementalText,
    InvalidParameter,
    SamplingParams,
    check_room,
    parse_sampling,
)


def test_defaults_and_values() -> None:
    assert parse_sampling({}) == SamplingParams()
    params = parse_sampling({"max_tokens": 5, "temperature": 0, "top_p": 0.5, "stop": "x", "seed": 3, "n": 2,
                             "top_k": -1, "ignore_eos": True, "other": "left alone"})
    assert params == SamplingParams(max_tokens=5, temperature=0.0, top_p=0.5, stop=("x",), seed=3, n=2,
                                    ignore_eos=True)
    assert params.greedy
    assert parse_sampling({"max_new_tokens": 7}, aliases={"max_new_tokens": "max_tokens"}).max_tokens == 7
    assert parse_sampling({}, defaults={"max_tokens": 9}).max_tokens == 9
    assert parse_sampling({"max_tokens": None}, defaults={"max_tokens": 9}).max_tokens == 9


@pytest.mark.parametrize("values, param", [
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 1.5}, "max_tokens"),
    ({"max_tokens": True}, "max_tokens"),
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": 2.5}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.01}, "top_p"),
    ({"seed": -1}, "seed"),
    ({"n": 0}, "n"),
    ({"n": 100}, "n"),
    ({"stop": ""}, "stop"),
    ({"stop": ["a", 3]}, "stop"),
    ({"stop": ["s"] * 17}, "stop"),
    ({"ignore_eos": "yes"}, "ignore_eos"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
])
def test_bad_values_name_the_parameter(values: dict, param: str) -> None:
    with pytest.raises(InvalidParameter) as caught:
        parse_sampling(values)
    assert caught.value.param == param
    assert param in caught.value.message
    assert isinstance(caught.value, InvalidInput)  # a 400


def test_aliases_clash() -> None:
    with pytest.raises(InvalidParameter, match="mean the same"):
        parse_sampling({"max_tokens": 3, "max_new_tokens": 4}, aliases={"max_new_tokens": "max_tokens"})


def test_room() -> None:
    assert check_room(SamplingParams(), 10, 100) == 90
    assert check_room(SamplingParams(max_tokens=5), 10, 100) == 5
    assert check_room(SamplingParams(), 10, None) is None
    with pytest.raises(InvalidParameter) as caught:
        check_room(SamplingParams(max_tokens=95), 10, 100)
    assert caught.value.param == "max_tokens"
    with pytest.raises(InvalidParameter) as caught:
        check_room(SamplingParams(), 100, 100)
    assert caught.value.param == "prompt"
    with pytest.raises(InvalidParameter):
        check_room(SamplingParams(), 0, 100)


def test_min_tokens_beyond_max_tokens_or_the_room_is_refused() -> None:
    assert check_room(SamplingParams(max_tokens=5, min_tokens=5), 10, 100) == 5
    assert check_room(SamplingParams(min_tokens=90), 10, 100) == 90
    for params, limit in ((SamplingParams(max_tokens=5, min_tokens=20), 100),  # the request's max_tokens
                          (SamplingParams(max_tokens=5, min_tokens=20), None),
                          (SamplingParams(min_tokens=91), 100)):  # what the prompt leaves
        with pytest.raises(InvalidParameter) as caught:
            check_room(params, 10, limit)
        assert caught.value.param == "min_tokens" and "min_tokens" in caught.value.message


def _decoder(pieces: dict[int, str]):
    return lambda ids: "".join(pieces[i] for i in ids)


def test_incremental_text_holds_back_incomplete_characters() -> None:
    pieces = {1: "ab", 2: "\ufffd", 3: "c"}
    text = IncrementalText(_decoder(pieces))
    assert text.push([1]) == "ab"
    assert text.push([1, 2]) == ""  # maybe the first byte of a character
    assert text.push([1, 2, 3]) == "\ufffdc"
    assert text.push([1, 2, 3, 2]) == ""
    assert text.flush() == "\ufffd"  # at the end, whatever is left


def test_incremental_text_stop_strings() -> None:
    pieces = {1: "hel", 2: "lo wo", 3: "rld", 4: "!"}
    text = IncrementalText(_decoder(pieces), stop=("o w", "xyz"))
    assert text.push([1]) == "hel"
    assert text.push([1, 2]) == "l"  # "lo wo": "o w" matched
    assert text.matched == "o w"
    assert text.push([1, 2, 3]) == "" and text.flush() == ""
    # a tail that may become a stop string waits
    text = IncrementalText(_decoder({1: "abc", 2: "d", 3: "e"}), stop=("cdx",))
    assert text.push([1]) == "ab"
    assert text.push([1, 2]) == ""
    assert text.push([1, 2, 3]) == "cde"
    assert text.matched is None


def test_incremental_text_looks_for_stop_strings_only_after_min_tokens() -> None:
    pieces = {1: "ab", 2: "cd", 3: "ab", 4: "e"}
    text = IncrementalText(_decoder(pieces), stop=("ab",), min_tokens=1)
    assert text.push([1]) == "ab"  # one token, not more than min_tokens: no stop string yet
    assert text.push([1, 2]) == "cd"
    assert text.push([1, 2, 3]) == "" and text.matched == "ab"  # the second one counts
    # a stop string that spans the last token before the limit and the first after it counts
    text = IncrementalText(_decoder({1: "xa", 2: "b", 3: "c"}), stop=("ab",), min_tokens=1)
    assert text.push([1]) == "x"  # "a" may start the stop string: held back
    assert text.push([1, 2]) == "" and text.matched == "ab"
    assert IncrementalText(_decoder(pieces), stop=("ab",)).push([1]) == ""  # without min_tokens, at once


def test_completion_gathers_chunks() -> None:
    done = Completion(0)
    done.add(GenerationChunk(0, "a", (1,), 3, 1))
    done.add(GenerationChunk(0, "b", (2, 3), 3, 3, FINISH_LENGTH))
    assert (done.text, done.token_ids, done.prompt_tokens, done.completion_tokens, done.finish_reason) == \
        ("ab", [1, 2, 3], 3, 3, FINISH_LENGTH)
