"""Turn a config and a nanotune-named state dict into a ready Transformer."""

from __future__ import annotations

import torch
from torch import Tensor

from nanotune.models.config import ModelConfig
from nanotune.models.transformer import Transformer, rope_inv_freq


def build_model(
    config: ModelConfig,
    sd: dict[str, Tensor],
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> Transformer:
    """A Transformer holding exactly `sd` (converted to `dtype` on `device`), in eval mode."""
    # Build on the meta device: random init of a model about to be overwritten is wasted time.
    with torch.device("meta"):
        model = Transformer(config)
    tensors = {
        k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype)
        for k, v in sd.items()
    }
    model.load_state_dict(tensors, strict=True, assign=True)
    # assign=True gives wte and lm_head separate Parameters; re-tie so they stay one tensor.
    if config.tie_embeddings:
        model.lm_head.weight = model.wte.weight
    # Non-persistent buffers are not in the state dict and are still on meta.
    if config.positions == "rope":
        model.register_buffer("inv_freq", rope_inv_freq(config).to(device), persistent=False)
    return model.eval()
