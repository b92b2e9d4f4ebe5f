"""Parameter split, FLOPs per token and memory estimates."""

from __future__ import annotations

import torch

from craft.config.components import GPTConfig, RNNConfig
from craft.models import flops, gpt, rnn

NANO = GPTConfig(n_layer=6, n_head=6, d_model=384, block_size=256, bias=True)


def test_meta_model_allocates_nothing_and_counts_exactly():
    m = flops.meta_model(gpt.build, NANO, 65)
    assert all(p.device.type == "meta" for p in m.parameters())
    c = flops.count_params(m)
    assert c.total == 10_770_816
    assert c.embedding == 65 * 384 + 256 * 384
    assert c.non_embedding == c.total - c.embedding
    assert c.matmul == 10_672_512  # tied: the output layer is the token embedding


def test_untied_output_layer_is_a_matmul_not_an_embedding():
    cfg = NANO.model_copy(update={"tie_embeddings": False})
    c = flops.count_params(flops.meta_model(gpt.build, cfg, 65))
    assert c.total == 10_770_816 + 65 * 384
    assert c.matmul == c.non_embedding == c.total - 65 * 384 - 256 * 384


def test_flops_per_token_formula():
    m = flops.meta_model(gpt.build, NANO, 65)
    attention = 12 * 6 * 6 * 64 * 256
    assert flops.attention_flops_per_token(m, 256) == attention
    assert flops.flops_per_token(m, 256) == 6 * 10_672_512 + attention
    r = flops.meta_model(rnn.build, RNNConfig(), 65)
    assert flops.flops_per_token(r, 128) == 6 * flops.count_params(r).matmul


def test_memory_estimate():
    m = flops.meta_model(gpt.build, NANO, 65)
    n = 10_770_816
    fp32 = flops.estimate_memory(m, 8, 256, "no", "adamw")
    assert (fp32.weights, fp32.gradients, fp32.optimizer) == (4 * n, 4 * n, 8 * n)
    assert fp32.total == 16 * n + fp32.activations
    bf16 = flops.estimate_memory(m, 8, 256, "bf16", "adamw")
    assert bf16.activations < fp32.activations
    assert flops.estimate_memory(m, 16, 256).activations == 2 * fp32.activations
    fused = flops.estimate_memory(m, 8, 256, fused_loss=True)
    assert fp32.activations - fused.activations == 8 * 256 * 2 * 65 * 4
    assert flops.estimate_memory(m, 8, 256, optimizer="sgd", momentum=0.0).optimizer == 0
    r = flops.meta_model(rnn.build, RNNConfig(), 65)
    assert flops.estimate_memory(r, 4, 128).activations > 0


def test_meta_build_matches_real_build():
    cfg = GPTConfig(n_layer=2, n_head=2, n_kv_head=1, d_model=32, mlp="swiglu", norm="rmsnorm")
    real = gpt.build(cfg, 50)
    meta = flops.meta_model(gpt.build, cfg, 50)
    assert flops.count_params(real) == flops.count_params(meta)
    assert real.num_params() == meta.num_params()
    assert real.wte.weight.device == torch.device("cpu")
