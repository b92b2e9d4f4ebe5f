"""Decoding loop, KV cache, context refill, prompts and streaming."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from craft.data.tokenizers import BytesTokenizer, CharTokenizer, SentencePieceTokenizer
from craft.errors import TokenizerError
from craft.generation import SamplingParams, generate, iter_tokens, row_generator
from tests.generation._fakes import Scripted, tiny_gpt, tiny_rnn

TEXT = "abcdefghij \n"
GREEDY = SamplingParams(temperature=0.0)


def _char(text: str = TEXT, **special: int) -> CharTokenizer:
    tok = CharTokenizer(sorted(set(text)))
    for name, value in special.items():  # e.g. eos_id=3: pretend the vocabulary has one
        setattr(tok, name, value)
    return tok


def _tokens(model, prompt: list[int], n: int, **kw) -> list[int]:
    idx = torch.tensor([prompt])
    return [int(t[0]) for t in iter_tokens(model, idx, max_new_tokens=n, **kw)]


def _windowed_reference(model, prompt: list[int], n: int, keep: int) -> list[int]:
    """Greedy decoding by full recomputation over the windows the refill policy defines."""
    seq, start, out = list(prompt), 0, []
    with torch.no_grad():
        for _ in range(n):
            if len(seq) - start > model.block_size:
                start = len(seq) - keep
            logits, _ = model(torch.tensor([seq[start:]]))
            out.append(int(logits[0, -1].argmax()))
            seq.append(out[-1])
    return out


@pytest.mark.parametrize(
    "cfg", [{}, {"positions": "rope", "n_kv_head": 1}, {"norm": "rmsnorm", "mlp": "swiglu"}]
)
def test_greedy_with_and_without_cache_identical(cfg: dict) -> None:
    model = tiny_gpt(12, block_size=16, **cfg).eval()
    prompt = [1, 2, 3, 7]
    cached = _tokens(model, prompt, 12, sampling=GREEDY)  # fills the context exactly
    assert cached == _tokens(model, prompt, 12, sampling=GREEDY, use_cache=False)
    assert len(set(cached)) >= 2


def test_model_without_new_cache_recomputes_the_window() -> None:
    from tests.config.plugins.bigram_plugin import Bigram

    torch.manual_seed(0)
    model = Bigram(12, block_size=4).eval()  # a plugin model that implements no cache
    prompt = [1, 2, 3, 7, 5]
    got = _tokens(model, prompt, 8, sampling=GREEDY)
    assert got == _tokens(model, prompt, 8, sampling=GREEDY, use_cache=False)
    assert got[0] == int(model.table.weight[5].argmax())


def test_cached_logits_match_full_recompute() -> None:
    model = tiny_gpt(12, block_size=16).eval()
    idx = torch.randint(0, 12, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full, _ = model(idx)
        cache = model.new_cache(2, torch.device("cpu"), torch.float32)
        step = [model(idx[:, :4], cache=cache)[0]]
        step += [model(idx[:, t : t + 1], cache=cache)[0] for t in range(4, 10)]
    torch.testing.assert_close(torch.cat(step, dim=1), full, rtol=1e-5, atol=1e-5)


def test_refill_with_full_window_equals_crop_every_step() -> None:
    model = tiny_gpt(12, block_size=8).eval()
    prompt = [1, 2, 3]
    cached = _tokens(model, prompt, 30, sampling=GREEDY, refill_tokens=8)
    assert cached == _tokens(model, prompt, 30, sampling=GREEDY, use_cache=False)


@pytest.mark.parametrize("keep", [None, 1, 5])
def test_refill_beyond_context_matches_windowed_recompute(keep: int | None) -> None:
    model = tiny_gpt(12, block_size=8).eval()
    got = _tokens(model, [4, 5], 40, sampling=GREEDY, refill_tokens=keep)
    assert got == _windowed_reference(model, [4, 5], 40, keep=6 if keep is None else keep)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_rnn_carries_hidden_state(cell: str) -> None:
    model = tiny_rnn(12, cell=cell).eval()
    prompt = [1, 2, 3, 4]
    cached = _tokens(model, prompt, 25, sampling=GREEDY)
    assert cached == _tokens(model, prompt, 25, sampling=GREEDY, use_cache=False)
    kw = {"max_new_tokens": 30, "temperature": 1.0, "seed": 3}
    tok = _char()
    assert generate(model, tok, "abc", **kw) == generate(model, tok, "abc", use_cache=False, **kw)


def test_same_seed_same_text() -> None:
    tok = _char()
    model = tiny_gpt(tok.vocab_size, block_size=48)
    kw = dict(max_new_tokens=40, temperature=1.0, top_k=8, top_p=0.95, seed=123, num_samples=2)
    a = generate(model, tok, "abc", **kw)
    assert a == generate(model, tok, "abc", **kw)
    assert a == generate(model, tok, "abc", use_cache=False, **kw)
    assert a[0] != a[1]  # the samples continue one generator
    assert generate(model, tok, "abc", **{**kw, "seed": 124}) != a
    assert all(len(t) == 40 for t in a)
    assert model.training  # the mode is restored


def test_greedy_generate_equals_argmax_decoding() -> None:
    tok = _char()
    model = tiny_gpt(tok.vocab_size, block_size=32).eval()
    ids = tok.encode("abc")
    expect = tok.decode(_tokens(model, ids, 20, sampling=GREEDY, use_cache=False))
    assert generate(model, tok, "abc", max_new_tokens=20, temperature=0.0) == [expect]
    top1 = generate(model, tok, "abc", max_new_tokens=20, temperature=0.7, top_k=1, seed=9)
    assert top1 == [expect]


def test_streaming_pieces_equal_returned_text() -> None:
    tok = _char()
    model = tiny_gpt(tok.vocab_size, block_size=16)
    pieces: dict[int, list[str]] = {0: [], 1: []}
    kw = dict(max_new_tokens=30, seed=0, num_samples=2)
    out = generate(model, tok, "ab", on_text=lambda i, p: pieces[i].append(p), **kw)
    assert ["".join(pieces[0]), "".join(pieces[1])] == out
    assert out == generate(model, tok, "ab", **kw)


def test_stops_at_eos_and_drops_it() -> None:
    tok = _char(eos_id=_char().encode("j")[0])
    a, b, c = tok.encode("abc")
    model = Scripted(tok.vocab_size, [0, 0, a, b, tok.eos_id, c, c])
    pieces: list[str] = []
    out = generate(model, tok, "hh", max_new_tokens=10, on_text=lambda i, p: pieces.append(p))
    assert out == ["ab"] and "".join(pieces) == "ab"
    plain = _char()  # without an eos token the stream runs to max_new_tokens
    model = Scripted(plain.vocab_size, [0, 0, a, b, c])
    assert generate(model, plain, "hh", max_new_tokens=5, temperature=0.0) == ["abccc"]


def test_batched_rows_keep_eos_once_finished() -> None:
    model = tiny_rnn(5).eval()
    idx = torch.tensor([[1, 2], [3, 4]])
    gen = torch.Generator().manual_seed(0)
    seq = torch.stack(list(iter_tokens(model, idx, max_new_tokens=300, eos_id=0, generator=gen)), 1)
    assert bool((seq == 0).any(dim=1).all())  # both rows ended, so the loop stopped early
    for row in seq:
        first = int((row == 0).nonzero()[0])
        assert bool((row[first:] == 0).all())


def test_long_prompt_is_cropped_with_warning(caplog: pytest.LogCaptureFixture) -> None:
    tok = _char()
    model = tiny_gpt(tok.vocab_size, block_size=16)
    long = "abcdefghij" * 5
    with caplog.at_level(logging.WARNING, logger="craft.generation"):
        out = generate(model, tok, long, max_new_tokens=5, temperature=0.0)
    assert "cropped from the left" in caplog.text and "50 tokens" in caplog.text
    assert out == generate(model, tok, long[-16:], max_new_tokens=5, temperature=0.0)


def test_empty_prompt_starts_from_bos_or_newline() -> None:
    tok = BytesTokenizer()
    model = tiny_gpt(tok.vocab_size, block_size=16).eval()
    idx = torch.tensor([[tok.bos_id]])
    steps = list(iter_tokens(model, idx, max_new_tokens=6, sampling=GREEDY, eos_id=tok.eos_id))
    expect = tok.decode([int(t) for t in steps if int(t) != tok.eos_id])
    assert generate(model, tok, "", max_new_tokens=6, temperature=0.0) == [expect]

    plain = _char()
    model = tiny_gpt(plain.vocab_size, block_size=16)
    assert generate(model, plain, "", max_new_tokens=6, temperature=0.0) == generate(
        model, plain, "\n", max_new_tokens=6, temperature=0.0
    )
    with pytest.raises(TokenizerError, match="empty prompt"):
        generate(tiny_gpt(3), _char("abc"), "", max_new_tokens=1)


def test_missing_characters_are_listed() -> None:
    tok = _char()
    model = tiny_gpt(tok.vocab_size)
    with pytest.raises(TokenizerError) as err:
        generate(model, tok, "abXcY€X", max_new_tokens=1)
    msg = str(err.value)
    assert msg.startswith("prompt: ") and "3 character" in msg
    assert "'X'" in msg and "'Y'" in msg and "'€'" in msg


def test_byte_stream_emits_whole_characters() -> None:
    tok = BytesTokenizer()
    text = "añ€😀 z"
    raw = tok.encode(text)
    model = Scripted(tok.vocab_size, [0, *raw, tok.eos_id])  # prompt "x" then the bytes
    pieces: list[str] = []
    out = generate(model, tok, "x", max_new_tokens=50, on_text=lambda i, p: pieces.append(p))
    assert out == [text] and "".join(pieces) == text
    assert "😀" in pieces and "€" in pieces  # each came out whole, never as U+FFFD
    assert all("\ufffd" not in p for p in pieces)


def test_random_byte_model_stream_equals_decoded_ids() -> None:
    tok = BytesTokenizer()
    model = tiny_gpt(tok.vocab_size, block_size=32)
    pieces: list[str] = []
    out = generate(
        model, tok, "é", max_new_tokens=60, seed=5, on_text=lambda i, p: pieces.append(p)
    )
    ids = _tokens_from_seed(model, tok, "é", 60, seed=5)
    assert "".join(pieces) == out[0] == tok.decode(ids)


@pytest.fixture(scope="module")
def sp_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> SentencePieceTokenizer:
    from tests.conftest import SHARED_DATA

    path = Path(SHARED_DATA) / "tinyshakespeare" / "input.txt"
    if not path.exists():
        pytest.skip("tinyshakespeare mirror not found")
    text = path.read_text(encoding="utf-8")[:60_000]
    return SentencePieceTokenizer.train([text], vocab_size=400)


def test_sentencepiece_streaming_keeps_word_boundaries(
    sp_tokenizer: SentencePieceTokenizer,
) -> None:
    tok = sp_tokenizer
    model = tiny_gpt(tok.vocab_size, block_size=64)
    prompt = "First Citizen:\nWe are"
    pieces: list[str] = []
    out = generate(
        model, tok, prompt, max_new_tokens=40, seed=1, on_text=lambda i, p: pieces.append(p)
    )
    assert "".join(pieces) == out[0]
    # the streamed continuation is exactly the decoded whole minus the decoded prompt
    gen_ids = _tokens_from_seed(model, tok, prompt, 40, seed=1)
    whole = tok.decode(tok.encode(prompt) + gen_ids)
    assert whole == tok.decode(tok.encode(prompt)) + out[0]


def _tokens_from_seed(model, tok, prompt: str, n: int, seed: int) -> list[int]:
    gen = row_generator(seed, 0)  # sample 0 of a run with `seed`
    idx = torch.tensor([tok.encode(prompt)])
    out = []
    for t in iter_tokens(model.eval(), idx, max_new_tokens=n, generator=gen, eos_id=tok.eos_id):
        if int(t) == tok.eos_id:
            break
        out.append(int(t))
    return out
