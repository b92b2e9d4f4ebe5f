"""Language models. Each file holds one model and its `build(cfg, vocab_size, *, fused_loss)`.

Every model follows one contract (docs/architecture.md): `model(idx, targets=None, cache=None)
-> (logits, loss)`, `block_size`, `vocab_size`, `new_cache(batch_size, device, dtype)` and
`num_params()`. Models call `craft.ops` for attention, norms and losses, never a backend.
"""

from __future__ import annotations

from craft.models.gpt import GPT, KVCache
from craft.models.rnn import RNNLM, RNNState

__all__ = ["GPT", "RNNLM", "KVCache", "RNNState"]
