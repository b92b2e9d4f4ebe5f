"""Hugging Face GPT-2 / Llama checkpoints <-> Craft's GPT: configs, weights, whole directories.

Craft's GPT is `GPT2LMHeadModel` with `positions = "learned"`, `norm = "layernorm"`, `mlp = "gelu"`
or `"gelu_tanh"` (GPT-2's `gelu_new`) and biases, and `LlamaForCausalLM` (also `mistral` without
a sliding window shorter than the context) with `positions = "rope"`, `norm = "rmsnorm"`,
`mlp = "swiglu"`, tied or untied, with grouped-query attention. The weight mapping:

- GPT-2 stores its `Conv1D` weights (c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj) as (in, out):
  transposed. Its `attn.bias` / `attn.masked_bias` buffers are dropped; `lm_head` is tied.
- Llama: q/k/v_proj are concatenated (in that order) into Craft's fused `c_attn`, gate/up_proj
  (gate first) into the SwiGLU input `c_fc`; nothing is transposed.

Weights are read with `craft.interop.safetensors_reader` (single file or sharded with
`model.safetensors.index.json`) straight into a model allocated once, so an import never holds two
copies of the weights. Pickled weights (`pytorch_model.bin`) are refused: nothing is unpickled.
Settings Craft cannot express (RoPE scaling, `head_dim` != hidden / heads, Qwen2's q/k/v-only
biases, GPT-2's `scale_attn_by_inverse_layer_idx`, ...) are refused naming the key.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from craft.config.components import GPTConfig
from craft.errors import CheckpointError, ConfigError
from craft.hub import ModelFiles, model_files
from craft.interop.safetensors_reader import TensorEntry, read_header, reader

CONFIG = "config.json"
GENERATION_CONFIG = "generation_config.json"
HF_EXPORT_KIND = "export-hf"  # the kind in the COMPLETE marker of a directory `craft export` wrote
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth")
# RoPE models declare very long contexts (Llama 3: 131072); the KV cache and RoPE tables are
# preallocated for block_size tokens, so the imported block_size is capped here (a recipe or
# export may set another block_size, up to max_position_embeddings).
ROPE_BLOCK_CAP = 4096
LLAMA_LIKE = ("llama", "mistral")
SUPPORTED = ("gpt2", *LLAMA_LIKE)
_IGNORED = {
    "gpt2": re.compile(r"\.attn\.(bias|masked_bias)$"),
    "llama": re.compile(r"\.rotary_emb\.inv_freq$"),
}


# ---------------------------------------------------------------------------------- config


def read_hf_config(files: ModelFiles) -> dict[str, Any]:
    """The parsed config.json of an HF model directory."""
    path = files.file(CONFIG)
    if not path.is_file():
        raise CheckpointError(
            f"{files.dir}: no {CONFIG}; expected a Hugging Face model directory (config.json + "
            "model.safetensors) or a Craft run, checkpoint or export"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def _int(hf: dict[str, Any], key: str, where: str, default: int | None = None) -> int:
    value = hf.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise CheckpointError(f"{where}: {key} = {value!r}: expected a positive integer")
    return value


def _refuse(where: str, key: str, value: Any, why: str) -> CheckpointError:
    return CheckpointError(f"{where}: {key} = {json.dumps(value)} is not supported: {why}")


def family_of(hf: dict[str, Any], where: str) -> str:
    """`gpt2` or `llama` (Mistral maps like Llama) for a supported config.json, else an error."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED:
        raise CheckpointError(
            f"{where}: model_type {model_type!r} is not supported; Craft imports "
            f"{', '.join(SUPPORTED)} (architectures whose weights map onto its GPT exactly)"
        )
    return "gpt2" if model_type == "gpt2" else "llama"


def model_values_from_hf(hf: dict[str, Any], where: str) -> dict[str, Any]:
    """Craft `model` section values (type gpt) equivalent to an HF config.json."""
    if family_of(hf, where) == "gpt2":
        return _gpt2_values(hf, where)
    return _llama_values(hf, where)


def _gpt2_values(hf: dict[str, Any], where: str) -> dict[str, Any]:
    act = hf.get("activation_function", "gelu_new")
    mlp = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}.get(act)
    if mlp is None:
        raise _refuse(where, "activation_function", act, "Craft has gelu (erf) and gelu_tanh")
    if hf.get("scale_attn_by_inverse_layer_idx"):
        raise _refuse(
            where, "scale_attn_by_inverse_layer_idx", True, "Craft scales every layer by 1/sqrt(hs)"
        )
    if not hf.get("scale_attn_weights", True):
        raise _refuse(where, "scale_attn_weights", False, "Craft always scales attention")
    if hf.get("add_cross_attention"):
        raise _refuse(where, "add_cross_attention", True, "Craft's GPT is decoder-only")
    d = _int(hf, "n_embd", where)
    inner = hf.get("n_inner")
    return {
        "type": "gpt",
        "n_layer": _int(hf, "n_layer", where),
        "n_head": _int(hf, "n_head", where),
        "d_model": d,
        "block_size": _int(hf, "n_positions", where),
        "vocab_size": _int(hf, "vocab_size", where),
        "norm": "layernorm",
        "norm_eps": float(hf.get("layer_norm_epsilon", 1e-5)),
        "positions": "learned",
        "mlp": mlp,
        "mlp_hidden": 4 * d if inner is None else _int(hf, "n_inner", where),
        "bias": True,
        "dropout": 0.0,
        "tie_embeddings": bool(hf.get("tie_word_embeddings", True)),
        "init_std": float(hf.get("initializer_range", 0.02)),
    }


def _rope_theta(hf: dict[str, Any], where: str) -> float:
    params = hf.get("rope_parameters")
    scaling = hf.get("rope_scaling")
    for key, spec in (("rope_parameters", params), ("rope_scaling", scaling)):
        if isinstance(spec, dict):
            kind = spec.get("rope_type", spec.get("type", "default"))
            if kind not in (None, "default"):
                raise _refuse(where, f"{key}.rope_type", kind, "Craft has plain RoPE (no scaling)")
        elif spec is not None:
            raise CheckpointError(f"{where}: {key} = {spec!r}: expected an object or null")
    theta = hf.get("rope_theta")
    if theta is None and isinstance(params, dict):
        theta = params.get("rope_theta")
    return float(10000.0 if theta is None else theta)


def _llama_values(hf: dict[str, Any], where: str) -> dict[str, Any]:
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise _refuse(where, "hidden_act", act, "Craft's SwiGLU gates with silu")
    d = _int(hf, "hidden_size", where)
    heads = _int(hf, "num_attention_heads", where)
    head_dim = hf.get("head_dim")
    if head_dim is not None and head_dim * heads != d:
        raise _refuse(
            where, "head_dim", head_dim, f"Craft's head size is hidden_size / heads = {d // heads}"
        )
    attn_bias, mlp_bias = bool(hf.get("attention_bias", False)), bool(hf.get("mlp_bias", False))
    if attn_bias != mlp_bias:
        raise _refuse(
            where,
            "attention_bias" if attn_bias else "mlp_bias",
            True,
            "Craft's `bias` switches the biases of every linear layer at once",
        )
    block = min(_int(hf, "max_position_embeddings", where, 2048), ROPE_BLOCK_CAP)
    window = hf.get("sliding_window") if hf.get("use_sliding_window", True) else None
    if window is not None:
        if not isinstance(window, int) or window < 1:
            raise CheckpointError(f"{where}: sliding_window = {window!r}: expected an integer")
        block = min(block, window)  # within one window, sliding-window attention is full attention
    return {
        "type": "gpt",
        "n_layer": _int(hf, "num_hidden_layers", where),
        "n_head": heads,
        "n_kv_head": _int(hf, "num_key_value_heads", where, heads),
        "d_model": d,
        "block_size": block,
        "vocab_size": _int(hf, "vocab_size", where),
        "norm": "rmsnorm",
        "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
        "positions": "rope",
        "rope_theta": _rope_theta(hf, where),
        "mlp": "swiglu",
        "mlp_hidden": _int(hf, "intermediate_size", where),
        "bias": attn_bias,
        "dropout": 0.0,
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "init_std": float(hf.get("initializer_range", 0.02)),
    }


def export_family(cfg: Any) -> str:
    """`gpt2` or `llama`: the HF architecture that expresses this model config, else an error."""
    if getattr(cfg, "type", None) != "gpt":
        raise ConfigError(
            f"model.type = {getattr(cfg, 'type', None)!r}: only Craft's GPT has a Hugging Face "
            "equivalent (GPT-2 or Llama)"
        )
    kv = cfg.n_kv_head or cfg.n_head
    needs = {
        "gpt2": {
            "positions": ("learned", cfg.positions == "learned"),
            "norm": ("layernorm", cfg.norm == "layernorm"),
            "mlp": ("gelu or gelu_tanh", cfg.mlp in ("gelu", "gelu_tanh")),
            "bias": ("true", cfg.bias),
            "n_kv_head": (f"n_head ({cfg.n_head})", kv == cfg.n_head),
        },
        "llama": {
            "positions": ("rope", cfg.positions == "rope"),
            "norm": ("rmsnorm", cfg.norm == "rmsnorm"),
            "mlp": ("swiglu", cfg.mlp == "swiglu"),
        },
    }
    for family, checks in needs.items():
        if all(ok for _, ok in checks.values()):
            return family
    diffs = []
    for family, checks in needs.items():
        wrong = [f"model.{k} = {want}" for k, (want, ok) in checks.items() if not ok]
        diffs.append(f"as {family} it would need {', '.join(wrong)}")
    raise ConfigError(
        "this model has no Hugging Face equivalent (positions "
        f"{cfg.positions!r}, norm {cfg.norm!r}, mlp {cfg.mlp!r}, bias {cfg.bias}): "
        + "; ".join(diffs)
    )


def hf_config(cfg: Any, vocab_size: int, *, bos_id: int | None, eos_id: int | None) -> dict:
    """config.json for `transformers` equivalent to a Craft GPT config."""
    from craft.models.gpt import mlp_hidden_size

    family = export_family(cfg)
    common = {
        "vocab_size": vocab_size,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "use_cache": True,
    }
    if family == "gpt2":
        return {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "n_layer": cfg.n_layer,
            "n_head": cfg.n_head,
            "n_embd": cfg.d_model,
            "n_positions": cfg.block_size,
            "n_inner": mlp_hidden_size(cfg),
            "activation_function": "gelu_new" if cfg.mlp == "gelu_tanh" else "gelu",
            "layer_norm_epsilon": cfg.norm_eps,
            "resid_pdrop": cfg.dropout,
            "embd_pdrop": cfg.dropout,
            "attn_pdrop": 0.0,
            "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False,
            **common,
        }
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head or cfg.n_head,
        "hidden_size": cfg.d_model,
        "head_dim": cfg.d_model // cfg.n_head,
        "intermediate_size": mlp_hidden_size(cfg),
        "hidden_act": "silu",
        "max_position_embeddings": cfg.block_size,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "attention_bias": cfg.bias,
        "mlp_bias": cfg.bias,
        "attention_dropout": 0.0,
        **common,
    }


# ---------------------------------------------------------------------------------- weights


@dataclass(frozen=True)
class Part:
    """One HF tensor that fills rows of a Craft tensor (its HF name, HF shape, transposed?)."""

    hf: str
    shape: tuple[int, ...]
    transpose: bool = False
    crop: bool = False  # the file may hold more rows (learned positions beyond block_size)

    @property
    def rows(self) -> int:
        return self.shape[1] if self.transpose else self.shape[0]


def weight_layout(cfg: Any, vocab_size: int, family: str | None = None) -> dict[str, list[Part]]:
    """Craft parameter name -> the HF tensors (in HF `*ForCausalLM` naming) that make it up."""
    from craft.models.gpt import mlp_hidden_size

    family = family or export_family(cfg)
    c, h = cfg.d_model, cfg.n_head
    kv = (cfg.n_kv_head or h) * (c // h)
    hidden = mlp_hidden_size(cfg)
    out: dict[str, list[Part]] = {}
    if family == "gpt2":
        t = "transformer."
        out["wte.weight"] = [Part(f"{t}wte.weight", (vocab_size, c))]
        out["wpe.weight"] = [Part(f"{t}wpe.weight", (cfg.block_size, c), crop=True)]
        for i in range(cfg.n_layer):
            p, q = f"blocks.{i}.", f"{t}h.{i}."
            for craft, hf, shape in [
                ("attn.c_attn", "attn.c_attn", (c, 3 * c)),
                ("attn.c_proj", "attn.c_proj", (c, c)),
                ("mlp.c_fc", "mlp.c_fc", (c, hidden)),
                ("mlp.c_proj", "mlp.c_proj", (hidden, c)),
            ]:
                out[f"{p}{craft}.weight"] = [Part(f"{q}{hf}.weight", shape, transpose=True)]
                out[f"{p}{craft}.bias"] = [Part(f"{q}{hf}.bias", (shape[1],))]
            for ln in ("ln_1", "ln_2"):
                out[f"{p}{ln}.weight"] = [Part(f"{q}{ln}.weight", (c,))]
                out[f"{p}{ln}.bias"] = [Part(f"{q}{ln}.bias", (c,))]
        out["ln_f.weight"] = [Part(f"{t}ln_f.weight", (c,))]
        out["ln_f.bias"] = [Part(f"{t}ln_f.bias", (c,))]
    else:
        m = "model."
        out["wte.weight"] = [Part(f"{m}embed_tokens.weight", (vocab_size, c))]
        for i in range(cfg.n_layer):
            p, q = f"blocks.{i}.", f"{m}layers.{i}."
            kinds = ["weight", "bias"] if cfg.bias else ["weight"]
            for kind in kinds:
                full = lambda n, k=kind: (n, c) if k == "weight" else (n,)  # noqa: E731
                out[f"{p}attn.c_attn.{kind}"] = [
                    Part(f"{q}self_attn.{n}_proj.{kind}", full(r))
                    for n, r in (("q", c), ("k", kv), ("v", kv))
                ]
                out[f"{p}attn.c_proj.{kind}"] = [Part(f"{q}self_attn.o_proj.{kind}", full(c))]
                out[f"{p}mlp.c_fc.{kind}"] = [
                    Part(f"{q}mlp.{n}_proj.{kind}", full(hidden)) for n in ("gate", "up")
                ]
                down = (c, hidden) if kind == "weight" else (c,)
                out[f"{p}mlp.c_proj.{kind}"] = [Part(f"{q}mlp.down_proj.{kind}", down)]
            out[f"{p}ln_1.weight"] = [Part(f"{q}input_layernorm.weight", (c,))]
            out[f"{p}ln_2.weight"] = [Part(f"{q}post_attention_layernorm.weight", (c,))]
        out["ln_f.weight"] = [Part(f"{m}norm.weight", (c,))]
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = [Part("lm_head.weight", (vocab_size, c))]
    return out


def _canonical(name: str, family: str) -> str:
    """HF names as `*ForCausalLM` saves them (base-model checkpoints lack the prefix)."""
    prefix = "transformer." if family == "gpt2" else "model."
    if name.startswith((prefix, "lm_head.")):
        return name
    return prefix + name


def weight_index(files: ModelFiles, family: str) -> dict[str, TensorEntry]:
    """Every tensor of the checkpoint (single file or sharded), by canonical HF name."""
    single, index = files.file(WEIGHTS), files.file(WEIGHTS_INDEX)
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        entries: dict[str, TensorEntry] = {}
        for shard in sorted(set(map(str, weight_map.values()))):
            path = files.file(shard)
            if not path.is_file():
                raise CheckpointError(
                    f"{index}: names shard {shard!r}, which is missing from {files.dir}"
                )
            found, _ = read_header(path)
            for name, file in weight_map.items():
                if file != shard:
                    continue
                if name not in found:
                    raise CheckpointError(f"{index}: maps {name!r} to {shard}, which lacks it")
                entries[_canonical(name, family)] = found[name]
        return entries
    if single.is_file():
        found, _ = read_header(single)
        return {_canonical(k, family): v for k, v in found.items()}
    pickles = [n for n in PICKLE_WEIGHTS if files.exists(n)]
    if pickles:
        raise CheckpointError(
            f"{files.dir}: has only pickled PyTorch weights ({pickles[0]}), which Craft never "
            "loads (unpickling can run arbitrary code); convert them to safetensors where you "
            "trust the file (transformers: from_pretrained(DIR).save_pretrained(OUT, "
            "safe_serialization=True)) or download the model's safetensors files"
        )
    raise CheckpointError(f"{files.dir}: no {WEIGHTS} or {WEIGHTS_INDEX}")


def load_weights(
    model: torch.nn.Module, index: dict[str, TensorEntry], family: str, where: str
) -> None:
    """Fill `model` (a Craft GPT) from HF tensors, checking names and shapes."""
    layout = weight_layout(model.config, model.vocab_size, family)
    params = model.state_dict()
    tied = {"lm_head.weight"} if model.config.tie_embeddings else set()
    unfilled = sorted((set(params) - set(layout) - tied) | (set(layout) - set(params)))
    if unfilled:
        raise CheckpointError(
            f"{where}: a {family} checkpoint has nothing for {', '.join(unfilled[:3])}; the model "
            "config differs from the checkpoint's architecture"
        )
    missing = sorted({p.hf for parts in layout.values() for p in parts} - set(index))
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise CheckpointError(
            f"{where}: tensors missing from the checkpoint: {', '.join(missing[:3])}{more}"
        )
    used = {p.hf for parts in layout.values() for p in parts}
    tied_head = "lm_head.weight" if model.config.tie_embeddings else None
    extra = sorted(
        n for n in set(index) - used if n != tied_head and not _IGNORED[family].search(n)
    )
    if extra:
        more = f" and {len(extra) - 3} more" if len(extra) > 3 else ""
        raise CheckpointError(
            f"{where}: tensors this {family} model config has no place for: "
            f"{', '.join(extra[:3])}{more} (e.g. biases or layers the config does not declare)"
        )
    with reader() as r:
        for name, parts in layout.items():
            dest = params[name]
            row = 0
            for part in parts:
                entry = index[part.hf]
                ok = (
                    entry.shape[1:] == part.shape[1:] and entry.shape[0] >= part.shape[0]
                    if part.crop
                    else entry.shape == part.shape
                )
                if not ok:
                    raise CheckpointError(
                        f"{where}: {part.hf} has shape {list(entry.shape)}, the config implies "
                        f"{list(part.shape)} ({entry.path.name})"
                    )
                target = dest[row : row + part.rows]  # (rows, ...) contiguous
                if not part.transpose and entry.dtype == dest.dtype:
                    r.read_into(entry, target, rows=part.shape[0] if part.crop else None)
                else:
                    src = r.read(entry)
                    src = src.t() if part.transpose else src[: part.shape[0]]
                    target.copy_(src)
                    del src
                row += part.rows


def hf_state_dict(
    cfg: Any, state: dict[str, torch.Tensor], vocab_size: int, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """HF tensors (as `*ForCausalLM` names them) from a Craft GPT state dict."""
    out: dict[str, torch.Tensor] = {}
    for name, parts in weight_layout(cfg, vocab_size).items():
        src = state[name]
        row = 0
        for part in parts:
            piece = src[row : row + part.rows]
            piece = piece.t() if part.transpose else piece
            out[part.hf] = piece.detach().to("cpu", dtype).contiguous().clone()
            row += part.rows
    return out


# ---------------------------------------------------------------------------------- models


def _marker_kind(directory: Path) -> str | None:
    """The `kind` of a Craft completion marker in `directory` (None when there is none)."""
    from craft.errors import CraftError
    from craft.safety import read_json_bounded

    if not (directory / "COMPLETE").is_file():
        return None
    try:
        marker = read_json_bounded(directory / "COMPLETE", what="COMPLETE")
    except CraftError:
        return ""
    kind = marker.get("kind") if isinstance(marker, dict) else None
    return kind if isinstance(kind, str) else ""


def is_hf_model_dir(path: str | Path) -> bool:
    """A directory laid out as an HF model (config.json, tokenizer.json, HF weight files) and not
    as a Craft checkpoint or export (no config.toml; a COMPLETE marker only of an HF export)."""
    p = Path(path).expanduser()
    if not p.is_dir() or (p / "config.toml").exists():
        return False
    if _marker_kind(p) not in (None, HF_EXPORT_KIND):
        return False
    # model.safetensors alone is also what an interrupted Craft checkpoint holds: not a sign
    names = (CONFIG, GENERATION_CONFIG, "tokenizer.json", WEIGHTS_INDEX, *PICKLE_WEIGHTS)
    return any((p / n).is_file() for n in names) or any(p.glob("model-*-of-*.safetensors"))


def empty_gpt(cfg: GPTConfig, vocab_size: int) -> torch.nn.Module:
    """A Craft GPT with allocated but unset weights (no random init: they are loaded next)."""
    from craft.models.gpt import GPT, rope_tables

    with torch.device("meta"):
        model = GPT(cfg, vocab_size)
    if cfg.tie_embeddings:  # to_empty would give each name of a tied weight its own memory
        model.lm_head.register_parameter("weight", None)
    model = model.to_empty(device="cpu")
    if cfg.tie_embeddings:
        model.lm_head.weight = model.wte.weight
    if model.rope_cos is not None:
        cos, sin = rope_tables(cfg.block_size, model.head_size, cfg.rope_theta)
        model.rope_cos.copy_(cos)
        model.rope_sin.copy_(sin)
    return model


@dataclass
class Pretrained:
    """An HF model directory opened for import: its files, config and family."""

    files: ModelFiles
    hf: dict[str, Any]
    family: str
    values: dict[str, Any]  # the equivalent Craft `model` section

    @property
    def where(self) -> str:
        return str(self.files.dir / CONFIG)

    def has_tokenizer(self) -> bool:
        return self.files.exists("tokenizer.json")

    def check_weights(self) -> None:
        """Read the weight headers (cheap): a bad checkpoint fails before any other work."""
        weight_index(self.files, self.family)

    def load_into(self, model: torch.nn.Module) -> None:
        load_weights(model, weight_index(self.files, self.family), self.family, str(self.files.dir))

    def tokenizer(self) -> Any:
        from craft.data.tokenizers.hf import HFTokenizer

        return HFTokenizer.from_hf_dir(self.files)


def open_pretrained(source: str | Path, files: ModelFiles | None = None) -> Pretrained:
    """Open an HF model directory or Hub id (reads config.json only)."""
    files = files or model_files(source)
    hf = read_hf_config(files)
    where = str(files.dir / CONFIG)
    family = family_of(hf, where)
    return Pretrained(files, hf, family, model_values_from_hf(hf, where))


def check_vocab(tokenizer: Any, vocab_size: int, where: str) -> None:
    if tokenizer is not None and tokenizer.vocab_size > vocab_size:
        raise CheckpointError(
            f"{where}: the tokenizer has {tokenizer.vocab_size} ids, more than the model's "
            f"embedding of {vocab_size} rows"
        )


def _config_and_tokenizer(
    pre: Pretrained, model_cfg: GPTConfig | None = None
) -> tuple[GPTConfig, Any]:
    """The model config (`model_cfg` or the imported one) and the tokenizer (None without
    tokenizer.json), checked to fit each other."""
    try:
        cfg = model_cfg or GPTConfig(**pre.values)
    except ValueError as e:
        raise CheckpointError(f"{pre.where}: not usable as a Craft GPT: {e}") from None
    tokenizer = pre.tokenizer() if pre.has_tokenizer() else None
    check_vocab(tokenizer, cfg.vocab_size or pre.values["vocab_size"], str(pre.files.dir))
    return cfg, tokenizer


def load_pretrained(
    source: str | Path, *, model_cfg: GPTConfig | None = None
) -> tuple[torch.nn.Module, Any, GPTConfig]:
    """(Craft GPT in eval mode, tokenizer or None, its model config) from an HF directory/Hub id.

    `model_cfg` replaces the imported model config (it must keep every weight shape).
    """
    pre = open_pretrained(source)
    cfg, tokenizer = _config_and_tokenizer(pre, model_cfg)
    model = empty_gpt(cfg, cfg.vocab_size or pre.values["vocab_size"])
    pre.load_into(model)
    model.eval()
    return model, tokenizer, cfg


def write_hf_model(
    out: Path,
    cfg: Any,
    state: dict[str, torch.Tensor],
    tokenizer: Any,
    *,
    vocab_size: int,
    dtype: torch.dtype = torch.float32,
) -> list[str]:
    """Write config.json, generation_config.json, model.safetensors and the tokenizer files."""
    from safetensors.torch import save_file

    from craft.interop.hf_tokenizer import to_hf_tokenizer

    family = export_family(cfg)
    hf_tok = to_hf_tokenizer(tokenizer) if tokenizer is not None else None
    if hf_tok is not None:
        check_vocab(hf_tok, vocab_size, "export")
    bos = hf_tok.bos_id if hf_tok is not None else None
    eos = hf_tok.eos_id if hf_tok is not None else None
    config = {**hf_config(cfg, vocab_size, bos_id=bos, eos_id=eos), "dtype": _dtype_name(dtype)}
    gen = {"bos_token_id": bos, "eos_token_id": eos}
    tensors = hf_state_dict(cfg, state, vocab_size, dtype)
    save_file(tensors, str(out / WEIGHTS), metadata={"format": "pt"})
    del tensors
    names = [WEIGHTS]
    for name, obj in ((CONFIG, config), (GENERATION_CONFIG, gen)):
        (out / name).write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
        names.append(name)
    if hf_tok is not None:
        for name, data in hf_tok.hf_files(model_max_length=cfg.block_size).items():
            (out / name).write_bytes(data)
            names.append(name)
    assert family in ("gpt2", "llama")
    return names


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def is_hf_source(path: str | Path) -> bool:
    """An HF model directory, or (nothing at that path) something that reads as a Hub id."""
    from craft.hub import looks_like_hub_id

    p = Path(path).expanduser()
    return is_hf_model_dir(p) or (not p.exists() and looks_like_hub_id(str(path)))


def craft_config(model_cfg: GPTConfig, tokenizer_source: str | None) -> Any:
    """A complete Craft config around an imported model (what `load_model` returns)."""
    from craft.config import from_dict, to_dict

    data: dict[str, Any] = {"model": to_dict(model_cfg)}
    if tokenizer_source is not None:
        data["tokenizer"] = {"type": "hf", "path": tokenizer_source}
    return from_dict(data, label="config.json")


def load_for_inference(source: str | Path) -> tuple[torch.nn.Module, Any, Any]:
    """(model in eval mode, tokenizer, Craft config) of an HF directory or Hub id."""
    model, tokenizer, cfg = load_pretrained(source)
    _need_tokenizer(tokenizer, source)
    return model, tokenizer, craft_config(cfg, str(source))


def inspect_pretrained(source: str | Path) -> tuple[Any, Any]:
    """(tokenizer, Craft config) of what `load_for_inference(source)` loads, with the weight
    files' headers read (readable, every shard present) but no weight read or model built."""
    pre = open_pretrained(source)
    cfg, tokenizer = _config_and_tokenizer(pre)
    _need_tokenizer(tokenizer, source)
    pre.check_weights()
    return tokenizer, craft_config(cfg, str(source))


def _need_tokenizer(tokenizer: Any, source: str | Path) -> None:
    if tokenizer is None:
        raise CheckpointError(
            f"{source}: has no tokenizer.json; generating or evaluating text needs the "
            "model's tokenizer next to its weights"
        )
