"""Load what `nanotune serve` was asked to serve and start it."""

from __future__ import annotations

import sys
from pathlib import Path

from nanotune.decoding.engine import Engine
from nanotune.errors import NanotuneError
from nanotune.jobs import artifacts
from nanotune.methods import SequenceClassifier
from nanotune.models import DEFAULT_MODEL
from nanotune.serve.app import Server, run_server
from nanotune.serve.limits import MAX_BATCH, MAX_BODY, MAX_QUEUE, PREFIX_CACHE_MB
from nanotune.weights.peft import CONFIG_FILE


def adapter_spec(spec: str) -> tuple[str, Path]:
    """`NAME=DIR` (or a bare DIR, named after its folder; a run's final/ after the run)."""
    name, sep, path = spec.partition("=")
    if not sep:
        path = spec
        folder = Path(spec).expanduser().resolve()
        name = folder.parent.name if folder.name == "final" else folder.name
    if not name or not path:
        raise NanotuneError(f"--adapter {spec!r}: give NAME=DIR (an adapter folder)")
    return name, Path(path).expanduser()


def serve(
    model: str | None,
    adapters: list[str],
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    max_batch: int = MAX_BATCH,
    max_queue: int = MAX_QUEUE,
    prefix_cache_mb: int = PREFIX_CACHE_MB,
    max_body: int = MAX_BODY,
    served_name: str | None = None,
    dtype: str = "float32",
) -> None:
    """Serve `model` (a name, model folder, or a LoRA run's final/, whose base is then served
    with it as an adapter) and the `NAME=DIR` adapters until SIGINT/SIGTERM.

    `dtype` bfloat16 halves the bytes each decode step streams (weights and adapters in bf16,
    the KV cache too on GPU; logits and sampling stay float32); int8 quarters the linear
    weights' bytes (the rest in bf16; base only, no --adapter). Answers are then no longer bit-equal to float32,
    and whether either is faster depends on the kernels of the device: measure with
    `nanotune bench`.
    """
    specs = [adapter_spec(a) for a in adapters]
    if model is not None and (Path(model).expanduser() / CONFIG_FILE).is_file():
        specs.insert(0, adapter_spec(model))
        model = artifacts.base_of(model)
    names = [n for n, _ in specs]
    if len(set(names)) != len(names):
        raise NanotuneError(f"--adapter names must differ: {', '.join(names)}")
    for name, path in specs:
        if not (path / CONFIG_FILE).is_file():
            raise NanotuneError(
                f"--adapter {name}={path}: not an adapter folder (no {CONFIG_FILE})"
            )
    if dtype == "int8" and specs:
        raise NanotuneError(
            "--dtype int8 quantizes the base's linear layers, which --adapter's adapters attach "
            "to; merge each adapter into its base (`nanotune merge`) and serve that, or use "
            "--dtype bfloat16"
        )
    base_name = served_name or model or DEFAULT_MODEL
    if base_name in names:
        raise NanotuneError(f"--adapter name {base_name!r} is the base model's name; rename it")
    base, tokenizer = artifacts.load(model, dtype=dtype)
    if isinstance(base, SequenceClassifier):
        raise NanotuneError(
            f"{model}: is a classifier, which does not generate text; use `nanotune classify`"
        )
    engine = Engine(
        base, tokenizer, max_batch=max_batch, max_queue=max_queue, prefix_cache_mb=prefix_cache_mb
    )
    for name, path in specs:
        engine.load_adapter(name, path)
    if api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"nanotune serve: warning: listening on {host} with no --api-key: anyone who can "
            "reach it can use it (and load adapters from this machine's disk)",
            file=sys.stderr,
        )
    server = Server(engine, base_name, api_key=api_key, max_body=max_body)
    run_server(server, host, port, announce=lambda line: print(line, flush=True))
