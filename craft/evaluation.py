"""Held-out metrics of a model on a token stream: loss, perplexity, bits per token/character/byte.

The split is cut into consecutive windows of the model's context length: window i feeds tokens
[i*W, (i+1)*W) and predicts tokens [i*W+1, (i+1)*W+1), so every token after the first is predicted
exactly once, with between 1 and W tokens of context. The last, shorter window is kept, so by
default the whole split is scored. `windows=N` scores N full windows spread evenly over the split,
the same rule as training's evaluation (`eval.windows`), so with the same N the two report the
same loss; `max_batches` scores a prefix (which depends on the batch size). The windows are fixed,
so two evaluations of the same model and data give the same numbers.

Bits per character (byte) divide the total negative log-likelihood, in bits, by the number of
characters (UTF-8 bytes) of the decoded targets, which makes models with different tokenizers
comparable.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from craft.errors import CraftError, DataError

_DECODE_CHUNK = 1 << 22  # tokens decoded at once when counting characters


@dataclass(frozen=True)
class EvalResult:
    """Metrics of one evaluation; `tokens` is the number of predicted (scored) tokens."""

    split: str
    loss: float
    perplexity: float
    bits_per_token: float
    bits_per_char: float
    bits_per_byte: float
    tokens: int
    characters: int
    bytes: int
    windows: int
    batches: int
    window: int
    complete: bool  # the whole split was scored (no windows / max_batches cut)
    data: str = ""  # the prepared dataset directory, when known
    checkpoint: str = ""  # the checkpoint (or export) directory whose weights were scored

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def plan_windows(n_tokens: int, window: int) -> list[tuple[int, int]]:
    """(start, length) of each window over a stream of `n_tokens` tokens (length = predictions)."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    return [(s, min(window, n_tokens - 1 - s)) for s in range(0, max(n_tokens - 1, 0), window)]


def plan_batches(
    windows: Sequence[tuple[int, int]], batch_size: int
) -> list[list[tuple[int, int]]]:
    """Consecutive windows grouped into batches; windows of unequal length never share one."""
    batches: list[list[tuple[int, int]]] = []
    for w in windows:
        if batches and len(batches[-1]) < batch_size and batches[-1][0][1] == w[1]:
            batches[-1].append(w)
        else:
            batches.append([w])
    return batches


def count_text(tokenizer: Any, ids: np.ndarray) -> tuple[int, int]:
    """Characters and UTF-8 bytes of the decoded ids (decoded in large chunks)."""
    chars = nbytes = 0
    for s in range(0, len(ids), _DECODE_CHUNK):
        text = tokenizer.decode(ids[s : s + _DECODE_CHUNK].tolist())
        chars += len(text)
        nbytes += len(text.encode("utf-8", errors="surrogatepass"))
    return chars, nbytes


class _Progress:
    """A rich bar on a terminal; otherwise a plain line every 10 s and one at the end."""

    PLAIN_INTERVAL_S = 10.0

    def __init__(self, total: int, label: str, enabled: bool) -> None:
        self.total, self.label, self.done = total, label, 0
        self._bar: Any = None
        self._plain = enabled and not sys.stderr.isatty()
        self._t0 = self._last = time.perf_counter()
        if enabled and not self._plain:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                ProgressColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.text import Text

            class _Rate(ProgressColumn):
                def render(self, task: Any) -> Text:
                    speed = task.speed
                    return Text(f"{speed:.1f} batch/s" if speed else "? batch/s")

            self._bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                _Rate(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=Console(stderr=True),
                transient=True,
            )
            self._bar.start()
            self._task = self._bar.add_task(label, total=total)

    def _line(self, final: bool) -> None:
        elapsed = time.perf_counter() - self._t0
        rate = self.done / max(elapsed, 1e-9)
        tail = (
            f"done in {elapsed:.1f}s"
            if final
            else f"eta {(self.total - self.done) / max(rate, 1e-9):.0f}s"
        )
        sys.stderr.write(
            f"{self.label}: {self.done}/{self.total} batches, {rate:.1f} batch/s, {tail}\n"
        )
        sys.stderr.flush()

    def advance(self) -> None:
        self.done += 1
        if self._bar is not None:
            self._bar.advance(self._task)
        elif self._plain and time.perf_counter() - self._last >= self.PLAIN_INTERVAL_S:
            self._last = time.perf_counter()
            self._line(final=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
        elif self._plain and self.done == self.total:
            self._line(final=True)


def _batches(
    tokens: np.ndarray, plan: list[list[tuple[int, int]]], device: torch.device
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for batch in plan:
        length = batch[0][1]
        rows = np.stack([tokens[s : s + length + 1] for s, _ in batch]).astype(np.int64)
        xy = torch.from_numpy(rows).to(device)  # (B, L+1)
        yield xy[:, :-1], xy[:, 1:]  # (B, L), (B, L)


@torch.no_grad()
def evaluate_tokens(
    model: torch.nn.Module,
    tokenizer: Any,
    tokens: np.ndarray | Sequence[int],
    *,
    window: int,
    batch_size: int = 16,
    max_batches: int | None = None,
    split: str = "val",
    progress: bool = False,
    autocast_dtype: torch.dtype | None = None,
    on_batch: Callable[[int, float], None] | None = None,
    windows: int | None = None,
) -> EvalResult:
    """Score `tokens` (a 1-D id stream) with `model` in fixed windows of `window` predictions.

    `windows` picks that many full windows spread evenly over the stream (independent of
    `batch_size`); `max_batches` keeps the first batches. The model stays on its device and
    dtype; `autocast_dtype` runs the forward under autocast. `on_batch(i, loss)` sees the mean
    loss of each batch.
    """
    from craft.data.datasets import spread_evenly

    toks = np.asarray(tokens)
    if toks.ndim != 1:
        raise DataError(f"{split} split: expected a 1-D token stream, got shape {toks.shape}")
    if len(toks) < 2:
        raise DataError(f"{split} split has {len(toks)} tokens; at least 2 are needed to score")
    if max_batches is not None and max_batches < 1:
        raise DataError(f"max_batches = {max_batches}: expected an integer >= 1")
    if windows is not None and windows < 1:
        raise DataError(f"windows = {windows}: expected an integer >= 1")
    every = plan_windows(len(toks), window)
    chosen = every
    if windows is not None and windows < len(every):
        full = [w for w in every if w[1] == window]
        chosen = [full[i] for i in spread_evenly(len(full), windows).tolist()]
    plan = plan_batches(chosen, batch_size)
    if max_batches is not None:
        plan = plan[:max_batches]
    complete = sum(len(b) for b in plan) == len(every)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))

    was_training = model.training
    model.eval()
    total_nll = 0.0  # nats, summed over predicted tokens
    n_pred = 0
    bar = _Progress(len(plan), f"eval {split}", progress)
    try:
        for i, (x, y) in enumerate(_batches(toks, plan, device)):
            if autocast_dtype is not None and autocast_dtype != torch.float32:
                with torch.autocast(device.type, dtype=autocast_dtype):
                    _, loss = model(x, targets=y)
            else:
                _, loss = model(x, targets=y)
            value = float(loss.float())
            if not math.isfinite(value):
                raise DataError(f"{split} split: the loss of batch {i} is {value}")
            total_nll += value * y.numel()
            n_pred += y.numel()
            if on_batch is not None:
                on_batch(i, value)
            bar.advance()
    finally:
        bar.close()
        model.train(was_training)

    chars, nbytes = count_text(tokenizer, toks[1 : 1 + n_pred])
    loss = total_nll / n_pred
    bits = total_nll / math.log(2)
    return EvalResult(
        split=split,
        loss=loss,
        perplexity=math.exp(loss) if loss < 700 else math.inf,
        bits_per_token=loss / math.log(2),
        bits_per_char=bits / chars if chars else math.nan,
        bits_per_byte=bits / nbytes if nbytes else math.nan,
        tokens=n_pred,
        characters=chars,
        bytes=nbytes,
        windows=sum(len(b) for b in plan),
        batches=len(plan),
        window=window,
        complete=complete,
    )


# ----------------------------------------------------------------------------- checkpoints


def _describe(tok: Any) -> str:
    return f"{getattr(tok, 'type', type(tok).__name__)} tokenizer of {tok.vocab_size} ids"


def check_same_vocabulary(model_tokenizer: Any, model_vocab: int, dataset: Any) -> None:
    """Raise DataError unless `dataset` was tokenized with the model's tokenizer."""
    data_tok = dataset.tokenizer
    where = f"{dataset.path}: vocabulary mismatch"
    if dataset.vocab_size != model_vocab or data_tok.vocab_size != model_tokenizer.vocab_size:
        raise DataError(
            f"{where}: the dataset uses a {_describe(data_tok)}, the checkpoint's model has "
            f"{model_vocab} outputs with a {_describe(model_tokenizer)}"
        )
    same_type = getattr(data_tok, "type", None) == getattr(model_tokenizer, "type", None)
    if not same_type or (
        hasattr(data_tok, "artifact") and data_tok.artifact() != model_tokenizer.artifact()
    ):
        raise DataError(
            f"{where}: the dataset's {_describe(data_tok)} and the checkpoint's "
            f"{_describe(model_tokenizer)} map ids to different text"
        )


def checkpoint_dataset_dir(cfg: Any, tokenizer: Any) -> Path | None:
    """Where the dataset a checkpoint's config names would be prepared, found without reading
    (or preparing) anything that config names: `data.dir`, or the cache entry of a known named
    source or of plain `data.files` (located by their size and time, never read).

    The config comes from a checkpoint that may have been downloaded, so its paths are looked up,
    never written to; None when the location cannot be known that way.
    """
    from craft.data.prepare import default_dataset_dir
    from craft.data.sources import is_source

    d = cfg.data
    if d.dir:
        return Path(d.dir).expanduser()
    fingerprint = None
    if getattr(cfg.tokenizer, "type", None) == "sentencepiece" and cfg.tokenizer.model:
        # The model file the config names is not read: the checkpoint carries that tokenizer.
        fingerprint = {"type": "sentencepiece", "model_sha256": tokenizer.config()["model_sha256"]}
    if d.source:
        if not is_source(d.source):
            return None
    elif not d.files or not all(
        not any(c in f for c in "*?[") and Path(f).expanduser().is_file() for f in d.files
    ):
        return None
    try:
        return default_dataset_dir(d, cfg.tokenizer, fingerprint=fingerprint)
    except CraftError:
        return None


def open_eval_data(cfg: Any, data: str | Path | None, tokenizer: Any = None) -> Any:
    """The PreparedDataset to score: `data` when given, else the checkpoint's own dataset if it
    is already prepared on this machine (nothing the checkpoint names is ever prepared)."""
    from craft.data.datasets import PreparedDataset
    from craft.data.prepare import is_prepared

    if data is not None:
        return PreparedDataset(data)
    if getattr(cfg.data, "type", None) != "tokens":
        raise DataError(
            f"the checkpoint was trained on data.type = {cfg.data.type!r}, which has no text to "
            "score; pass --data DIR (a prepared dataset)"
        )
    if not (cfg.data.source or cfg.data.files or cfg.data.dir):
        raise DataError(
            "the checkpoint records no dataset (e.g. a Hugging Face model); pass --data DIR "
            "(a dataset prepared with the model's tokenizer)"
        )
    path = checkpoint_dataset_dir(cfg, tokenizer)
    if path is None or not is_prepared(path):
        where = f" (looked for {path})" if path is not None else ""
        raise DataError(
            f"the checkpoint's own dataset is not prepared on this machine{where}; Craft never "
            "prepares data a checkpoint's config names; pass --data DIR (a prepared dataset with "
            "the same tokenizer)"
        )
    return PreparedDataset(path)


def evaluate_checkpoint(
    checkpoint: str | Path,
    *,
    data: str | Path | None = None,
    split: str = "val",
    max_batches: int | None = None,
    batch_size: int | None = None,
    device: str | torch.device | None = "auto",
    dtype: str | torch.dtype | None = None,
    progress: bool = True,
    windows: int | None = None,
    trust_imports: bool = False,
) -> EvalResult:
    """Score a checkpoint (run, checkpoint or export directory) on a split of prepared data.

    The data is the checkpoint's own prepared dataset unless `data` names another one, which
    must use the same tokenizer. `dtype` bfloat16/float16 runs the forward under autocast.
    """
    from craft.generation import resolve_device, resolve_dtype
    from craft.training.builders import model_block_size
    from craft.training.checkpoint import load_model, resolve_source

    if split not in ("train", "val"):
        raise DataError(f"split = {split!r}: expected val or train")
    if batch_size is not None and batch_size < 1:
        raise DataError(f"batch_size = {batch_size}: expected an integer >= 1")
    if windows is not None and max_batches is not None:
        raise DataError("windows and max_batches: give one of them, not both")
    autocast = resolve_dtype(dtype)
    ck = resolve_source(checkpoint)  # a run directory: its newest complete checkpoint
    model, tokenizer, cfg = load_model(
        ck, device=resolve_device(device), trust_imports=trust_imports
    )
    dataset = open_eval_data(cfg, data, tokenizer)
    check_same_vocabulary(tokenizer, model.vocab_size, dataset)
    window = getattr(model, "block_size", None) or model_block_size(cfg)
    result = evaluate_tokens(
        model,
        tokenizer,
        dataset.split(split),
        window=window,
        batch_size=batch_size or cfg.eval.batch_size or cfg.training.batch_size,
        max_batches=max_batches,
        split=split,
        progress=progress,
        autocast_dtype=autocast,
        windows=windows,
    )
    return replace(result, data=str(dataset.path), checkpoint=str(ck))
