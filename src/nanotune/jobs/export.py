"""`nanotune export`: a model (a base with an adapter merged in) as an HF folder or a GGUF file
(with an Ollama Modelfile beside it), or an adapter alone as a llama.cpp GGUF LoRA.

Every target is checked before the (slow) load; the writers check again and write atomically.
"""

from __future__ import annotations

import sys
from pathlib import Path

from nanotune.errors import NanotuneError
from nanotune.files.atomic import check_file_target, check_target
from nanotune.jobs import artifacts
from nanotune.jobs.config import ExportCommand
from nanotune.jobs.ollama import check_modelfile_target, write_modelfile
from nanotune.methods import lora_layers
from nanotune.methods.lora import merge
from nanotune.weights import load_model, save_model
from nanotune.weights.gguf import written_by_nanotune
from nanotune.weights.gguf_export import check_quant, export_gguf
from nanotune.weights.gguf_lora import export_gguf_lora
from nanotune.weights.resolve import hub_id_of


def export_command(c: ExportCommand) -> int:
    out = Path(c.out)
    model = artifacts.inspect_output(c.model) if c.model else None
    adapter = artifacts.inspect_output(c.adapter) if c.adapter else None
    if adapter is None and model is not None and model.kind == "adapter":
        model, adapter = None, model  # a LoRA run's final/ passed as the model
    for given in (model, adapter):
        if given is not None and given.kind == "classifier":
            raise NanotuneError(
                f"{given.given}: a classifier; export writes language models (llama.cpp has no "
                "classification head; a classifier's folder is already an HF folder or adapter "
                "plus its head)"
            )
    if adapter is not None:
        adapter.expect("adapter", "--adapter")
    inputs = [g.path for g in (model, adapter) if g is not None and g.path is not None]
    if c.quant is not None and c.format == "gguf":
        check_quant(c.quant)
    if c.format == "hf":
        check_target(out, overwrite=c.overwrite, inputs=inputs)
    else:
        check_file_target(out, overwrite=c.overwrite, ours=written_by_nanotune, inputs=inputs)
    if c.ollama:
        check_modelfile_target(out, overwrite=c.overwrite)
    # The model as named (a run directory read as its final/), else the adapter's base.
    if model is not None:
        base = model.ref
    else:
        base = adapter.base if adapter is not None else None
    if c.format == "gguf-lora":
        if adapter is None:
            raise NanotuneError(
                "--format gguf-lora needs the adapter: --adapter DIR (a LoRA run's final/)"
            )
        plain, _ = load_model(base)
        export_gguf_lora(plain, adapter.path, out, overwrite=c.overwrite, inputs=inputs)
        print(f"wrote {out}")
        return 0
    loaded, tokenizer = artifacts.load(
        base if model is not None else None, adapter.path if adapter else None
    )
    if lora_layers(loaded):
        loaded = merge(loaded)
    base_id = hub_id_of(model.given if model is not None else base) if base else None
    if c.format == "gguf":
        export_gguf(
            loaded,
            tokenizer,
            out,
            quant=c.quant or "f16",
            base_model=base_id,
            overwrite=c.overwrite,
            inputs=inputs,
        )
    else:
        save_model(loaded, tokenizer, out, overwrite=c.overwrite, inputs=inputs, base_model=base_id)
    print(f"wrote {out}")
    if c.ollama:
        modelfile, note = write_modelfile(out, tokenizer, loaded.config, overwrite=c.overwrite)
        if note:
            print(f"nanotune: note: {note}", file=sys.stderr)
        print(f"wrote {modelfile}; next: cd {modelfile.parent} && ollama create NAME -f Modelfile")
    return 0
