"""Continuous-batching decoding over one base model and many adapters, in-process.

`engine` runs the decode loop (slots in a KV cache, one forward per step for every active
sequence), `lora` routes each row of a forward to its adapter, `limits` holds the defaults
(torch-free). `serve/` puts HTTP over it; `training/` (GRPO) generates with it from the policy
being trained. It sits below both so neither imports the other.
"""

from __future__ import annotations

from nanotune.lazy import lazy_exports

__getattr__ = lazy_exports(
    __name__,
    {"Engine": "engine", "Sampling": "engine", "Sequence": "engine", "Event": "engine"},
)
