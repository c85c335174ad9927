"""`nanotune serve`: an OpenAI-compatible server for a base model and any number of its LoRA
adapters, batching requests for different adapters into one forward (continuous batching).

`engine` runs the decode loop, `lora` routes rows to adapters, `protocol` checks requests and
shapes responses, `app` is the Starlette/uvicorn side, `run` wires them from the CLI's flags.
"""

from __future__ import annotations

from nanotune.lazy import lazy_exports

__getattr__ = lazy_exports(__name__, {"serve": "run", "adapter_spec": "run"})
