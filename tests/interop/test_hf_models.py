"""Hugging Face GPT-2 / Llama / Mistral <-> Craft GPT, checked against transformers itself."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from craft.config.components import GPTConfig
from craft.errors import CheckpointError, ConfigError
from craft.generation import SamplingParams, iter_tokens
from craft.interop.hf import (
    export_family,
    hf_state_dict,
    load_pretrained,
    model_values_from_hf,
    write_hf_model,
)
from craft.models.gpt import GPT
from tests.interop import hf_models

FAMILIES = ["gpt2", "llama", "llama_tied", "mistral"]


def _hf(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path)).eval()


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.fixture(scope="module")
def pairs(zoo):
    """(transformers model, Craft model imported from its directory) per family."""
    return {name: (_hf(path), load_pretrained(path)[0]) for name, path in zoo.items()}


@pytest.mark.parametrize("name", FAMILIES)
def test_import_matches_transformers(pairs, name: str) -> None:
    hf, craft = pairs[name]
    idx = torch.randint(0, craft.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = hf(idx).logits
        got, _ = craft(idx)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)

    # float64: the two computations agree far below float32 rounding
    hf64, craft64 = hf_models_copy(hf).double(), hf_models_copy(craft).double()
    with torch.no_grad():
        diff = (craft64(idx)[0] - hf64(idx).logits).abs().max().item()
    assert diff < 1e-6

    # loss and gradients (mapped to HF names with the export mapping)
    hf.zero_grad(set_to_none=True)
    craft.zero_grad(set_to_none=True)
    want_loss = hf(idx, labels=idx).loss
    want_loss.backward()
    _, loss = craft(idx[:, :-1], targets=idx[:, 1:])
    loss.backward()
    torch.testing.assert_close(loss, want_loss, atol=1e-5, rtol=0)
    grads = {k: p.grad for k, p in craft.named_parameters(remove_duplicate=False)}
    mapped = hf_state_dict(craft.config, grads, craft.vocab_size, torch.float32)
    hf_grads = dict(hf.named_parameters(remove_duplicate=False))
    assert mapped, "no gradients compared"
    for k, g in mapped.items():
        torch.testing.assert_close(g, hf_grads[k].grad, atol=1e-5, rtol=1e-4, msg=k)
    hf.zero_grad(set_to_none=True)
    craft.zero_grad(set_to_none=True)


def hf_models_copy(model: torch.nn.Module) -> torch.nn.Module:
    import copy

    return copy.deepcopy(model)


@pytest.mark.parametrize("name", FAMILIES)
def test_greedy_generation_matches_transformers(pairs, name: str) -> None:
    hf, craft = pairs[name]
    prompt = torch.randint(3, craft.vocab_size, (1, 6), generator=torch.Generator().manual_seed(1))
    want = hf.generate(
        prompt, max_new_tokens=30, do_sample=False, eos_token_id=None, pad_token_id=0
    )[0, 6:]
    got = torch.cat(
        list(iter_tokens(craft, prompt, max_new_tokens=30, sampling=SamplingParams(0.0)))
    )
    assert got.tolist() == want.tolist()


@pytest.mark.parametrize("name", FAMILIES)
def test_round_trip_is_bitwise(zoo, pairs, tmp_path: Path, name: str) -> None:
    hf, craft = pairs[name]
    write_hf_model(tmp_path, craft.config, craft.state_dict(), None, vocab_size=craft.vocab_size)
    before, after = _tensors(zoo[name]), _tensors(tmp_path)
    before = {k: v for k, v in before.items() if not k.endswith((".attn.bias", ".masked_bias"))}
    assert set(before) == set(after)
    for k in before:
        assert torch.equal(before[k], after[k]), k
    reloaded = _hf(tmp_path)
    idx = torch.arange(12)[None] % craft.vocab_size
    with torch.no_grad():
        assert torch.equal(reloaded(idx).logits, hf(idx).logits)


def test_bfloat16_round_trip_is_bitwise(tmp_path: Path) -> None:
    src = hf_models.save_model(hf_models.llama_model(64).to(torch.bfloat16), tmp_path / "src")
    model, _, cfg = load_pretrained(src)
    assert model.wte.weight.dtype == torch.float32
    (tmp_path / "out").mkdir()
    write_hf_model(
        tmp_path / "out", cfg, model.state_dict(), None, vocab_size=64, dtype=torch.bfloat16
    )
    a, b = _tensors(src), _tensors(tmp_path / "out")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


EXPRESSIBLE = {
    "gpt2-gelu": dict(mlp="gelu"),
    "gpt2-tanh-untied": dict(mlp="gelu_tanh", tie_embeddings=False, mlp_hidden=40),
    "llama-gqa": dict(positions="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2, bias=False),
    "llama-tied-bias": dict(
        positions="rope", norm="rmsnorm", mlp="swiglu", tie_embeddings=True, rope_theta=300.0
    ),
}


@pytest.mark.parametrize("name", sorted(EXPRESSIBLE))
def test_export_every_expressible_variant(tmp_path: Path, name: str) -> None:
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=2, n_head=4, d_model=32, block_size=32, **EXPRESSIBLE[name])
    model = GPT(cfg, 50).eval()
    with torch.no_grad():
        for p in model.parameters():  # non-trivial norms and biases
            p.add_(0.05 * torch.randn_like(p))
    write_hf_model(tmp_path, cfg, model.state_dict(), None, vocab_size=50)
    hf = _hf(tmp_path)
    assert type(hf).__name__ == (
        "GPT2LMHeadModel" if name.startswith("gpt2") else "LlamaForCausalLM"
    )
    idx = torch.randint(0, 50, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], hf(idx).logits, atol=1e-5, rtol=0)
    # and back: Craft imports its own export to the same config and weights
    again, _, _ = load_pretrained(tmp_path)
    for k, v in model.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k


@pytest.mark.parametrize(
    "cfg, hint",
    [
        (dict(norm="rmsnorm"), "as gpt2 it would need model.norm = layernorm"),
        (dict(positions="rope"), "as llama it would need model.norm = rmsnorm, model.mlp = swiglu"),
        (dict(n_kv_head=2), "model.n_kv_head = n_head (4)"),
        (dict(bias=False), "model.bias = true"),
    ],
)
def test_inexpressible_models_name_the_nearest_settings(cfg: dict, hint: str) -> None:
    with pytest.raises(ConfigError, match="no Hugging Face equivalent") as e:
        export_family(GPTConfig(n_head=4, d_model=32, **cfg))
    assert hint in str(e.value)


GPT2_CFG = {
    "model_type": "gpt2",
    "n_embd": 32,
    "n_layer": 2,
    "n_head": 4,
    "n_positions": 64,
    "vocab_size": 50,
}
LLAMA_CFG = {
    "model_type": "llama",
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 40,
    "vocab_size": 50,
}


@pytest.mark.parametrize(
    "change, match",
    [
        ({"model_type": "qwen2"}, "model_type 'qwen2' is not supported"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling.rope_type"),
        (
            {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}},
            "rope_parameters.rope_type",
        ),
        ({"head_dim": 16}, "head_dim = 16 is not supported"),
        ({"attention_bias": True}, "attention_bias = true is not supported"),
        ({"hidden_act": "gelu"}, "hidden_act"),
    ],
)
def test_llama_features_craft_cannot_express_are_refused(change: dict, match: str) -> None:
    with pytest.raises(CheckpointError, match=match):
        model_values_from_hf({**LLAMA_CFG, **change}, "config.json")


@pytest.mark.parametrize(
    "change, match",
    [
        ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
        ({"activation_function": "relu"}, "activation_function"),
        ({"n_embd": 0}, "n_embd = 0"),
    ],
)
def test_gpt2_features_craft_cannot_express_are_refused(change: dict, match: str) -> None:
    with pytest.raises(CheckpointError, match=match):
        model_values_from_hf({**GPT2_CFG, **change}, "config.json")


def test_config_values_carried_explicitly() -> None:
    v = model_values_from_hf(
        {
            **LLAMA_CFG,
            "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_theta": 5e5},
            "max_position_embeddings": 131072,
        },
        "config.json",
    )
    assert v["norm_eps"] == 1e-6 and v["rope_theta"] == 5e5 and v["mlp_hidden"] == 40
    assert v["block_size"] == 4096  # capped: the KV cache is preallocated for block_size tokens
    assert model_values_from_hf({**GPT2_CFG}, "c")["mlp"] == "gelu_tanh"
    assert (
        model_values_from_hf({**LLAMA_CFG, "model_type": "mistral", "sliding_window": 16}, "c")[
            "block_size"
        ]
        == 16
    )


def test_imported_tokenizer_and_ids(zoo) -> None:
    _, tok, cfg = load_pretrained(zoo["llama"])
    assert tok.type == "hf" and tok.bos_id == 1 and tok.eos_id == 2
    assert tok.prompt_ids("Hi")[0] == tok.bos_id  # Llama's post-processor adds <s>
    assert tok.encode("Hi")[0] != tok.bos_id  # data is encoded without it
    assert cfg.norm_eps == 1e-6 and cfg.rope_theta == 500.0 and cfg.n_kv_head == 2
    config = json.loads((zoo["gpt2"] / "config.json").read_text())
    assert config["activation_function"] == "gelu_new"
