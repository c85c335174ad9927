"""Load what `nanotune serve` was asked to serve and start it."""

from __future__ import annotations

import sys
from pathlib import Path

from nanotune.decoding.engine import Engine, check_adapters_attach
from nanotune.errors import NanotuneError
from nanotune.jobs import artifacts
from nanotune.models import DEFAULT_MODEL
from nanotune.serve.app import Server, run_server
from nanotune.serve.config import LOOPBACK, ServeCommand


def adapter_spec(spec: str) -> tuple[str, Path]:
    """`NAME=DIR` (or a bare DIR, named after its folder; a run's final/ after the run), the
    folder checked to be an adapter (a run directory read as its final/)."""
    name, sep, path = spec.partition("=")
    if not sep:
        path = spec
        folder = Path(spec).expanduser().resolve()
        name = folder.parent.name if folder.name == "final" else folder.name
    if not name or not path:
        raise NanotuneError(f"--adapter {spec!r}: give NAME=DIR (an adapter folder)")
    return name, artifacts.inspect_output(path).expect("adapter", f"--adapter {name}=").path


def serve(c: ServeCommand) -> None:
    """Serve `c.model` (a name, model folder, or a LoRA run's final/, whose base is then served
    with it as an adapter) and the `NAME=DIR` adapters until SIGINT/SIGTERM.

    `dtype` bfloat16 halves the bytes each decode step streams (weights and adapters in bf16,
    the KV cache too on GPU; logits and sampling stay float32); int8 quarters the linear
    weights' bytes (the rest in bf16; base only). Answers are then no longer bit-equal to
    float32, and whether either is faster depends on the kernels of the device: measure with
    `nanotune bench`.
    """
    model = c.model
    given = artifacts.inspect_output(model) if model is not None else None
    if given is not None and given.kind == "classifier":
        raise NanotuneError(
            f"{model}: is a classifier, which does not generate text; use `nanotune classify`"
        )
    specs = [adapter_spec(a) for a in c.adapter]
    if given is not None and given.kind == "adapter":  # a LoRA run: its base, with it
        specs.insert(0, adapter_spec(model))
        model = given.base
    names = [n for n, _ in specs]
    if len(set(names)) != len(names):
        raise NanotuneError(f"--adapter names must differ: {', '.join(names)}")
    if specs:  # before the (slow) load: Engine.load_adapter refuses it again, at run time too
        check_adapters_attach(c.dtype)
    base_name = c.served_model_name or model or DEFAULT_MODEL
    if base_name in names:
        raise NanotuneError(f"--adapter name {base_name!r} is the base model's name; rename it")
    base, tokenizer = artifacts.load(model, dtype=c.dtype, compile=c.compile)
    engine = Engine(
        base,
        tokenizer,
        max_batch=c.max_batch,
        max_queue=c.max_queue,
        prefix_cache_mb=c.prefix_cache_mb,
        compile=c.compile,
    )
    for name, path in specs:
        engine.load_adapter(name, path)
    if c.api_key is None and c.host not in LOOPBACK:
        print(
            f"nanotune serve: warning: listening on {c.host} with no --api-key: anyone who can "
            "reach it can use it (and load adapters from this machine's disk)",
            file=sys.stderr,
        )
    server = Server(engine, base_name, api_key=c.api_key, max_body=c.max_body_kb * 1024)
    run_server(server, c.host, c.port, announce=lambda line: print(line, flush=True))


def serve_command(c: ServeCommand) -> int:
    serve(c)
    return 0
