"""Prepared datasets: load-time validation, resumable per-rank sampling, eval windows, builders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from craft.config.components import (
    BytesTokenizerConfig,
    CharTokenizerConfig,
    RandomDataConfig,
    TokensDataConfig,
)
from craft.config.registry import build
from craft.data.datasets import (
    DataModule,
    EvalBatches,
    PreparedDataset,
    TokenSource,
    TrainBatches,
    open_prepared,
)
from craft.data.prepare import default_dataset_dir, prepare
from craft.errors import DataError

BLOCK = 16


@pytest.fixture
def prepared(text_files: list[Path], tmp_path: Path) -> Path:
    out = tmp_path / "ds"
    prepare(text_files * 1, out, CharTokenizerConfig(), workers=1, progress=False, val_fraction=0.3)
    return out


@pytest.fixture
def dm(prepared: Path) -> DataModule:
    return open_prepared(prepared, BLOCK)


def _take(it, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [next(it) for _ in range(n)]


def _equal(a, b) -> bool:
    return all(
        torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b, strict=True)
    )


def test_batches_are_shifted_windows_of_the_train_split(dm: DataModule) -> None:
    data = np.asarray(dm.dataset.split("train")).astype(np.int64)
    x, y = next(dm.train_batches(8, seed=0))
    assert x.shape == y.shape == (8, BLOCK) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    for row in x:  # every row is a real window of the split
        start = next(
            i for i in range(len(data) - BLOCK) if (data[i : i + BLOCK] == row.numpy()).all()
        )
        assert start + BLOCK < len(data)


def test_sampler_is_deterministic_and_seed_dependent(dm: DataModule) -> None:
    a = _take(dm.train_batches(4, seed=7), 5)
    b = _take(dm.train_batches(4, seed=7), 5)
    c = _take(dm.train_batches(4, seed=8), 5)
    assert _equal(a, b) and not _equal(a, c)


def test_resume_and_resume_of_resume(dm: DataModule) -> None:
    reference = _take(dm.train_batches(4, seed=3), 24)
    first = dm.train_batches(4, seed=3)
    _take(first, 8)
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON round trip
    assert state == {"version": 1, "seed": 3, "step": 8}
    second = dm.train_batches(4, seed=999)  # the state's seed wins
    second.load_state_dict(state)
    got = _take(second, 8)
    assert _equal(got, reference[8:16])
    third = dm.train_batches(4, seed=0)
    third.load_state_dict(second.state_dict())
    assert _equal(_take(third, 8), reference[16:24])


def test_ranks_draw_distinct_streams_and_share_state(prepared: Path) -> None:
    r0 = open_prepared(prepared, BLOCK, rank=0, world_size=2)
    r1 = open_prepared(prepared, BLOCK, rank=1, world_size=2)
    a, b = _take(r0.train_batches(4, 1), 8), _take(r1.train_batches(4, 1), 8)
    assert not any(torch.equal(x0, x1) for (x0, _), (x1, _) in zip(a, b, strict=True))
    # the state is rank-independent: rank 1 resumes its own stream from rank 0's saved state
    it0 = r0.train_batches(4, 1)
    _take(it0, 3)
    it1 = r1.train_batches(4, 1)
    it1.load_state_dict(it0.state_dict())
    assert _equal(_take(it1, 5), b[3:8])


def test_bad_sampler_state(dm: DataModule) -> None:
    it = dm.train_batches(2, 0)
    for bad in [{}, {"version": 2, "seed": 0, "step": 0}, {"version": 1, "seed": -1, "step": 0}]:
        with pytest.raises(DataError, match="sampler state"):
            it.load_state_dict(bad)
    with pytest.raises(DataError):
        TrainBatches(lambda rng, b: np.zeros((b, 3)), batch_size=0, seed=0)


def test_eval_windows_are_fixed_and_spread(dm: DataModule) -> None:
    val = np.asarray(dm.dataset.split("val")).astype(np.int64)
    everything = dm.eval_batches("val", batch_size=3)
    n_windows = (len(val) - BLOCK - 1) // BLOCK + 1
    assert sum(x.shape[0] for x, _ in everything) == n_windows
    first_x, first_y = everything[0]
    assert torch.equal(first_x[0], torch.from_numpy(val[:BLOCK]))
    assert torch.equal(first_y[0], torch.from_numpy(val[1 : BLOCK + 1]))
    some = dm.eval_batches("val", batch_size=2, max_batches=2)
    again = dm.eval_batches("val", batch_size=2, max_batches=2)
    assert len(some) == 2 and _equal(list(some), list(again))
    last_x = some[-1][0][-1]  # evenly spread: the last chosen window is the split's last one
    assert torch.equal(last_x, everything[-1][0][-1])
    with pytest.raises(DataError, match="unknown split"):
        dm.eval_batches("test", 2)


def test_random_dataset() -> None:
    cfg = RandomDataConfig(vocab_size=50, seed=3)
    dm = build("data", cfg, None, block_size=BLOCK, rank=0, world_size=1, is_main=True, wait=None)
    assert dm.tokenizer is None and dm.vocab_size == 50 and dm.dir is None
    it = dm.train_batches(4, seed=1)
    x, y = next(it)
    assert x.shape == (4, BLOCK) and int(x.max()) < 50 and torch.equal(x[:, 1:], y[:, :-1])
    it2 = dm.train_batches(4, seed=1)
    it2.load_state_dict(it.state_dict())
    assert _equal([next(it)], [next(it2)])
    other = build("data", RandomDataConfig(vocab_size=50, seed=4), None, block_size=BLOCK)
    assert not torch.equal(next(other.train_batches(4, seed=1))[0], x)
    ev = dm.eval_batches("val", 4, max_batches=2)
    assert len(ev) == 2 and _equal(list(ev), list(dm.eval_batches("val", 4, max_batches=2)))


def _corrupt(prepared: Path, edit) -> None:
    meta = json.loads((prepared / "meta.json").read_text())
    edit(meta)
    (prepared / "meta.json").write_text(json.dumps(meta))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: (p / "meta.json").unlink(), "not a prepared dataset"),
        (lambda p: (p / "meta.json").write_text("{nope"), "not valid JSON"),
        (
            lambda p: _corrupt(p, lambda m: m["splits"]["train"].update(tokens=5)),
            "holds .* bytes but",
        ),
        (lambda p: (p / "val.bin").write_bytes(b"\x00" * 3), "val.bin: holds 3 bytes"),
        (lambda p: (p / "train.bin").unlink(), "train.bin is missing"),
        (lambda p: _corrupt(p, lambda m: m.update(vocab_size=7)), "vocab_size 7 disagrees"),
        (lambda p: _corrupt(p, lambda m: m.update(dtype="int8")), "dtype 'int8'"),
        (lambda p: _corrupt(p, lambda m: m.update(format_version=9)), "format_version 9"),
        (lambda p: _corrupt(p, lambda m: m.update(vocab_size=70000)), "uint16 cannot hold"),
        (
            lambda p: (p / "tokenizer.json").write_text(
                (p / "tokenizer.json").read_text().replace('"unk": false', '"unk": true')
            ),
            "tokenizer file tokenizer.json does not match",
        ),
    ],
)
def test_damaged_datasets_fail_at_load(prepared: Path, damage, message: str) -> None:
    damage(prepared)
    with pytest.raises(DataError, match=message):
        PreparedDataset(prepared)


def test_block_size_larger_than_a_split(prepared: Path) -> None:
    with pytest.raises(DataError, match="fewer than block_size"):
        open_prepared(prepared, 100_000)


def test_build_tokens_prepares_named_source_once(shakespeare: Path, tmp_path: Path) -> None:
    waits: list[int] = []
    data = TokensDataConfig(source="tinyshakespeare")
    dm = build(
        "data", data, CharTokenizerConfig(), block_size=32, rank=0, world_size=1,
        is_main=True, wait=lambda: waits.append(1), progress=False, workers=1,
    )  # fmt: skip
    assert waits == [1] and dm.vocab_size == 65 and dm.tokenizer.type == "char"
    assert dm.dir == default_dataset_dir(data, CharTokenizerConfig())
    assert dm.dir.name.startswith("tinyshakespeare-char-")
    assert dm.dir.parent == Path(__import__("os").environ["CRAFT_HOME"]) / "datasets"
    stamp = (dm.dir / "meta.json").stat().st_mtime_ns
    again = build("data", data, CharTokenizerConfig(), block_size=32, progress=False)
    assert (again.dir / "meta.json").stat().st_mtime_ns == stamp  # reused, not prepared again
    # another tokenizer config or split never reuses it
    assert default_dataset_dir(data, CharTokenizerConfig(unk=True)) != dm.dir
    assert default_dataset_dir(data, BytesTokenizerConfig()) != dm.dir
    assert (
        default_dataset_dir(
            TokensDataConfig(source="tinyshakespeare", val_fraction=0.2), CharTokenizerConfig()
        )
        != dm.dir
    )


def test_build_tokens_non_main_waits_and_never_prepares(text_files, tmp_path: Path) -> None:
    data = TokensDataConfig(files=[str(p) for p in text_files], dir=str(tmp_path / "ds"))
    order: list[str] = []
    with pytest.raises(DataError, match="after the main process prepared it"):
        build(
            "data", data, CharTokenizerConfig(), block_size=8, rank=1, world_size=2,
            is_main=False, wait=lambda: order.append("wait"),
        )  # fmt: skip
    assert order == ["wait"] and not (tmp_path / "ds").exists()
    dm = build(
        "data", data, CharTokenizerConfig(), block_size=8, rank=0, world_size=2, is_main=True,
        wait=lambda: order.append("main-wait"), progress=False,
    )  # fmt: skip
    assert order == ["wait", "main-wait"] and dm.dir == tmp_path / "ds"
    other = build(
        "data", data, CharTokenizerConfig(), block_size=8, rank=1, world_size=2, is_main=False,
        wait=lambda: None,
    )  # fmt: skip
    assert other.vocab_size == dm.vocab_size


def test_build_tokens_main_failure_still_releases_the_others(tmp_path: Path) -> None:
    waits: list[int] = []
    data = TokensDataConfig(files=[str(tmp_path / "missing.txt")], dir=str(tmp_path / "ds"))
    with pytest.raises(DataError, match=r"missing\.txt"):
        build("data", data, CharTokenizerConfig(), block_size=8, wait=lambda: waits.append(1))
    assert waits == [1]


def test_build_tokens_rejects_a_dir_prepared_with_another_tokenizer(prepared: Path) -> None:
    data = TokensDataConfig(dir=str(prepared))
    assert build("data", data, CharTokenizerConfig(), block_size=8).dir == prepared
    with pytest.raises(DataError, match="prepared with tokenizer"):
        build("data", data, BytesTokenizerConfig(), block_size=8)
    with pytest.raises(DataError, match=r"neither data\.source nor data\.files"):
        build(
            "data",
            TokensDataConfig(dir=str(prepared / "nothing")),
            CharTokenizerConfig(),
            block_size=8,
        )


def test_prepare_records_the_largest_id_of_each_split(prepared: Path) -> None:
    ds = PreparedDataset(prepared)
    for split in ("train", "val"):
        assert ds.meta["splits"][split]["max_id"] == int(np.asarray(ds.split(split)).max())
        assert ds.meta["splits"][split]["max_id"] < ds.vocab_size


def test_ids_outside_the_vocabulary_fail_at_load_naming_the_first_position(
    prepared: Path,
) -> None:
    meta = json.loads((prepared / "meta.json").read_text())
    ids = np.fromfile(prepared / "train.bin", dtype=np.uint16)
    ids[[123, 200]] = meta["vocab_size"] + 4  # same size, meta.json untouched
    ids.tofile(prepared / "train.bin")
    with pytest.raises(
        DataError,
        match=rf"train\.bin: token id {meta['vocab_size'] + 4} at position 123 is outside",
    ):
        PreparedDataset(prepared)


def test_a_recorded_max_id_outside_the_vocabulary_is_a_damaged_meta(prepared: Path) -> None:
    _corrupt(prepared, lambda m: m["splits"]["val"].update(max_id=m["vocab_size"]))
    with pytest.raises(DataError, match=r"splits\.val\.max_id \d+ is outside"):
        PreparedDataset(prepared)
    _corrupt(prepared, lambda m: m["splits"]["val"].update(max_id=None, tokens=True))
    with pytest.raises(DataError, match=r"splits\.val: expected"):
        PreparedDataset(prepared)


def test_eval_windows_do_not_depend_on_the_batch_size(dm: DataModule) -> None:
    def windows(batch_size: int) -> torch.Tensor:
        return torch.cat([x for x, _ in dm.eval_batches("val", batch_size, windows=7)])

    assert windows(2).shape[0] == 7 and torch.equal(windows(2), windows(5))
    rand = build("data", RandomDataConfig(vocab_size=50, seed=3), None, block_size=BLOCK)
    a = torch.cat([x for x, _ in rand.eval_batches("val", 2, windows=5)])
    b = torch.cat([x for x, _ in rand.eval_batches("val", 3, windows=5)])
    assert a.shape[0] == 5 and torch.equal(a, b)


def _over(tokens: np.ndarray, block: int) -> DataModule:
    """A DataModule whose splits are both `tokens`."""
    src = TokenSource(tokens, block)
    return DataModule(train=src, val=src, tokenizer=None, vocab_size=1 << 16, block_size=block)


@pytest.mark.parametrize("n", range(9, 30))  # every remainder mod the window, edges included
def test_eval_windows_cover_the_split_from_its_first_to_its_last_full_window(n: int) -> None:
    block = 4
    tokens = np.arange(n, dtype=np.uint16)  # token i is i: a window names its start
    dm = _over(tokens, block)
    starts = [int(x[0]) for xs, _ in dm.eval_batches("val", batch_size=3) for x in xs]
    # windows of block + 1 tokens at stride block: the last one may end on the last token
    assert starts == list(range(0, n - block, block))
    for xs, ys in dm.eval_batches("val", batch_size=3):
        for x, y in zip(xs, ys, strict=True):
            s = int(x[0])
            assert x.tolist() == list(range(s, s + block))
            assert y.tolist() == list(range(s + 1, s + block + 1))
    spread = dm.eval_batches("val", batch_size=1, max_batches=3)
    chosen = [int(x[0, 0]) for x, _ in spread]
    assert chosen[0] == 0 and chosen[-1] == starts[-1] and len(set(chosen)) == min(3, len(starts))


def test_training_windows_reach_both_ends_of_the_split() -> None:
    block = 4
    tokens = np.arange(block + 3, dtype=np.uint16)  # three possible windows: starts 0, 1, 2
    it = _over(tokens, block).train_batches(batch_size=64, seed=0)
    seen = {int(x[0]) for _ in range(4) for x in next(it)[0]}
    assert seen == {0, 1, 2}


def test_eval_batches_ask_for_whole_batches_then_the_rest() -> None:
    asked: list[tuple[int, int]] = []

    def make(first: int, n: int) -> np.ndarray:
        asked.append((first, n))
        return np.arange(first, first + n)[:, None] + np.arange(3)  # (n, T + 1 = 3)

    ev = EvalBatches(make, num_windows=10, batch_size=4)
    assert len(ev) == 3 and [x.shape[0] for x, _ in ev] == [4, 4, 2]
    assert asked == [(0, 4), (4, 4), (8, 2)]
    assert torch.equal(ev[-1][0], ev[2][0])
    for i in (3, -4):
        with pytest.raises(IndexError):
            ev[i]
    dm = _over(np.arange(20, dtype=np.uint16), 4)
    assert dm.num_tokens("val") == 20 and (dm.rank, dm.world_size) == (0, 1)  # one process
    for bs, mb in [(0, None), (2, 0)]:
        with pytest.raises(DataError, match="must be >= 1"):
            dm.eval_batches("val", bs, mb)


def test_sampler_state_at_the_start_and_seed_zero_loads() -> None:
    dm = _over(np.arange(20, dtype=np.uint16), 4)
    fresh = dm.train_batches(2, seed=0)
    other = dm.train_batches(2, seed=5)
    other.load_state_dict(fresh.state_dict())  # {seed 0, step 0}: a valid state
    assert _equal([next(other)], [next(dm.train_batches(2, seed=0))])


def test_random_dataset_draws_every_id_and_defaults_to_rank_zero() -> None:
    cfg = RandomDataConfig(vocab_size=5, seed=3)
    single = build("data", cfg, None, block_size=BLOCK)
    ranked = build("data", cfg, None, block_size=BLOCK, rank=1, world_size=2)
    assert (single.rank, single.world_size) == (0, 1) and (ranked.rank, ranked.world_size) == (1, 2)
    assert single.num_tokens("train") is None  # no token files behind random data
    x, y = next(single.train_batches(64, seed=0))
    assert sorted(set(x.flatten().tolist()) | set(y.flatten().tolist())) == [0, 1, 2, 3, 4]
    rank0 = build("data", cfg, None, block_size=BLOCK, rank=0, world_size=2)
    assert _equal(_take(single.train_batches(4, 1), 2), _take(rank0.train_batches(4, 1), 2))
    assert not torch.equal(next(ranked.train_batches(4, 1))[0], next(rank0.train_batches(4, 1))[0])


def _pcg(*words: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(list(words))))


def test_batch_i_of_rank_r_comes_from_the_generator_seeded_by_seed_rank_i() -> None:
    """The stream is a function of (seed, rank, step) alone, so a resumed run (also one started by
    another Craft version) sees the batches an uninterrupted run would have."""
    tokens = np.arange(50, dtype=np.uint16)
    for rank in (0, 1):
        dm = DataModule(
            train=TokenSource(tokens, 4), val=TokenSource(tokens, 4), tokenizer=None,
            vocab_size=50, block_size=4, rank=rank,
        )  # fmt: skip
        assert (dm.rank, dm.world_size, dm.block_size) == (rank, 1, 4)
        it = dm.train_batches(batch_size=3, seed=7)
        for step in range(3):
            x, y = next(it)
            starts = _pcg(7, rank, step, 0).integers(0, 50 - 4, size=3)
            assert (
                x[:, 0].tolist() == starts.tolist() and y[:, -1].tolist() == (starts + 4).tolist()
            )
    plain = TrainBatches(lambda rng, b: rng.integers(0, 9, size=(b, 3)), batch_size=1, seed=2)
    assert next(plain)[0].tolist() == [_pcg(2, 0, 0, 0).integers(0, 9, size=(1, 3))[0, :2].tolist()]
    assert not torch.equal(next(plain)[0], next(plain)[0])  # every step draws anew


def test_random_eval_batches_cover_the_vocabulary_with_full_windows() -> None:
    dm = build("data", RandomDataConfig(vocab_size=4, seed=0), None, block_size=BLOCK)
    one = dm.eval_batches("val", batch_size=8)
    assert len(one) == 1 and one[0][0].shape == (8, BLOCK)  # max_batches None: one batch
    x, y = dm.eval_batches("val", batch_size=8, max_batches=1)[0]
    assert x.shape == y.shape == (8, BLOCK) and torch.equal(x[:, 1:], y[:, :-1])
    assert sorted(set(x.flatten().tolist())) == [0, 1, 2, 3]
    train_x, _ = dm.eval_batches("train", batch_size=8, max_batches=1)[0]
    assert not torch.equal(train_x, x)  # each split its own fixed windows


def test_open_prepared_needs_one_full_window_per_split(prepared: Path) -> None:
    ds = PreparedDataset(prepared)
    n = min(ds.num_tokens("train"), ds.num_tokens("val"))
    dm = open_prepared(ds, n - 1)  # exactly block_size + 1 tokens in the smaller split
    assert (dm.block_size, dm.rank, dm.world_size) == (n - 1, 0, 1)
    assert len(dm.eval_batches("val" if ds.num_tokens("val") == n else "train", 1)) == 1
    with pytest.raises(DataError, match="fewer than block_size"):
        open_prepared(ds, n)
    ranked = open_prepared(ds, 8, rank=1, world_size=3)
    assert (ranked.rank, ranked.world_size) == (1, 3)
