"""`nanotune bench`: nanotune against transformers + peft, case by case, in one run.

Each case runs three times (nanotune in the precision `train.dtype: auto` picks here, the peer in
float32, the peer under its bf16 autocast), each time in a fresh subprocess
(`nanotune.bench.worker`) so memory figures do not mix; ratios are against the faster peer run.
The matmul peaks that FLOP/s are compared with are measured in this process, in the same run.
"""

from __future__ import annotations

from nanotune.lazy import lazy_exports

# torch loads with the run, so `nanotune --help` (BenchCommand's options) stays light.
__getattr__ = lazy_exports(__name__, {"run": "suite", "select": "suite"})
