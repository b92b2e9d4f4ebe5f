"""`craft export`: a checkpoint (or HF model) as a Craft export or a Hugging Face model directory.

The Hugging Face directory holds `config.json`, `generation_config.json`, `model.safetensors` and
the tokenizer files, so `transformers.AutoModelForCausalLM.from_pretrained(DIR)`,
`AutoTokenizer.from_pretrained(DIR)` and `pipeline("text-generation", model=DIR)` load it with no
custom code. The directory is written next to its destination and renamed into place; an existing
non-empty destination is replaced only with `force`, and only when Craft wrote it: its
`COMPLETE` marker (kind `export-hf`, which transformers ignores) lists the files that may be
deleted.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from craft.errors import CheckpointError, ConfigError
from craft.fileio import storage_error
from craft.interop.hf import HF_EXPORT_KIND

FORMATS = ("hf", "craft")


def _check_output(out: Path, source: str | Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"--output {out}: is a file; expected a directory to create")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise CheckpointError(
            f"--output {out}: exists and is not empty; choose another directory or pass --force "
            "to replace it"
        )
    src = Path(source).expanduser()
    if src.exists():
        a, b = Path(os.path.realpath(out)), Path(os.path.realpath(src))
        if a == b or a in b.parents or b in a.parents:
            raise CheckpointError(
                f"--output {out}: overlaps the source {src}; export to another directory"
            )


def export(
    source: str | Path,
    output: str | Path,
    *,
    fmt: str = "hf",
    force: bool = False,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write `source` (run, checkpoint, export, HF directory or Hub id) to `output` in `fmt`."""
    from craft.interop.hf import export_family, write_hf_model
    from craft.training.checkpoint import commit_directory, export_model, load_model

    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    out = Path(output).expanduser()
    _check_output(out, source, force)
    try:
        if fmt == "craft":
            return export_model(source, out)
        model, tokenizer, cfg = load_model(source)
        export_family(cfg.model)  # a clear error before anything is written
        state = model.state_dict()

        def write(tmp: Path) -> None:
            write_hf_model(
                tmp, cfg.model, state, tokenizer, vocab_size=model.vocab_size, dtype=dtype
            )

        return commit_directory(out, write, kind=HF_EXPORT_KIND, step=None)
    except Exception as e:  # a full disk, permission denied: the partial export is removed
        err = storage_error(e, f"exporting to {out}", name_file=False)
        if err is None:
            raise
        raise err from None
