"""Request validation and stop sequences, without a server."""

from __future__ import annotations

import pytest

from craft.serving import protocol as P
from craft.serving.worker import _Text


class _Decoder:
    pass


@pytest.mark.parametrize(
    ("pieces", "stops", "sent", "cut"),
    [
        (["ab", "c<", "/s", ">tail"], ["</s>"], "abc", True),  # a stop spread over 3 pieces
        (["ab", "c<", "x"], ["</s>"], "abc<x", False),  # a false start is released
        (["hello wor", "ld"], ["wor", "o w"], "hell", True),  # the earliest stop wins
        (["xx", "yy"], [], "xxyy", False),
    ],
)
def test_stop_sequences_hold_back_and_cut(
    pieces: list[str], stops: list[str], sent: str, cut: bool
) -> None:
    text = _Text(_Decoder(), stops)
    out, hit = [], False
    for i, piece in enumerate(pieces):
        got, hit = text.push(piece, final=i == len(pieces) - 1)
        out.append(got)
        if hit:
            break
    assert "".join(out) == sent and hit == cut


def test_strict_parsing_names_the_field() -> None:
    ok = P.parse(P.CompletionRequest, {"model": "m", "prompt": "a", "temperature": 1})
    assert ok.temperature == 1.0 and ok.stops() == []
    cases = [
        ({"model": "m", "prompt": "a", "top_p": 0}, "top_p"),
        ({"model": "m", "prompt": "a", "seed": -1}, "seed"),
        ({"model": "m", "prompt": "a", "echo": True}, "echo: not supported"),
        ({"model": "m", "prompt": "a", "best_of": 2}, "best_of: not supported"),
        ({"model": "m", "prompt": ["a", 3]}, "prompt"),
    ]
    for body, needle in cases:
        with pytest.raises(P.ApiError) as e:
            P.parse(P.CompletionRequest, body)
        assert e.value.status == 400 and needle in e.value.message
    with pytest.raises(P.ApiError, match="stop"):
        P.parse(P.CompletionRequest, {"model": "m", "prompt": "a", "stop": [""]}).stops()
    with pytest.raises(P.ApiError, match="messages"):
        P.parse(P.ChatRequest, {"model": "m", "messages": [{"role": "user"}]})
