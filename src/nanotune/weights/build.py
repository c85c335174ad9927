"""Turn a config and a nanotune-named state dict into a ready Transformer."""

from __future__ import annotations

import torch
from torch import Tensor

from nanotune.errors import NanotuneError
from nanotune.models.config import ModelConfig
from nanotune.models.transformer import Transformer, rope_buffers


def build_model(
    config: ModelConfig,
    sd: dict[str, Tensor],
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    where: str = "checkpoint",
) -> Transformer:
    """A Transformer holding exactly `sd` (converted to `dtype` on `device`), in eval mode.

    `where` names the file in the error when a tensor's shape does not fit the config.
    """
    # Build on the meta device: random init of a model about to be overwritten is wasted time.
    with torch.device("meta"):
        model = Transformer(config)
    wanted = model.state_dict()
    wrong = [k for k, v in sd.items() if k in wanted and v.shape != wanted[k].shape]
    if wrong:
        k = wrong[0]
        raise NanotuneError(
            f"{where}: {len(wrong)} tensor(s) do not fit the config's sizes, e.g. {k} is "
            f"{list(sd[k].shape)} where the config needs {list(wanted[k].shape)}; the config "
            "does not match the weights (re-download or re-save the model)"
        )
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
        for name, buffer in rope_buffers(config).items():
            model.register_buffer(name, buffer.to(device), persistent=False)
    return model.eval()
