"""The `nanotune` command: thin wrappers over the library.

Each subcommand is a function `cmd_<name>(args)` registered in `build_parser`. Errors a user can
cause are `NanotuneError`s: printed as one line on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import types
import typing

from nanotune.errors import NanotuneError
from nanotune.version import __version__

# --- options made from config dataclasses -----------------------------------------------------


def _doc_line(cls: type, name: str) -> str:
    """The first paragraph of a field's attribute docstring, as one line."""
    from nanotune.config import field_docs

    return " ".join(field_docs(cls).get(name, "").split("\n\n")[0].split())


def _comma_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _field_options(
    group, cls: type, names: list[str], *, defaults: bool = True, aliases: dict | None = None
) -> None:
    """`--field-name` options for fields `names` of dataclass `cls`: the field's type, default
    and attribute doc as help. defaults=False leaves an option None unless given (the value
    then overrides a recipe's)."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name in names:
        f, tp = fields[name], hints[name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        present = [a for a in typing.get_args(tp) if a is not type(None)]
        if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(present) == 1:
            tp = present[0]  # optional: its value type
        kw: dict = {}
        if tp is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(tp) is typing.Literal:
            kw["choices"] = typing.get_args(tp)
        elif typing.get_origin(tp) is list:
            kw.update(type=_comma_list, metavar="A,B")
        elif typing.get_origin(tp) is tuple:
            kw.update(action="append", metavar="TEXT")
            default = list(default)
        elif tp in (int, float, str):
            kw.update(type=tp, metavar={int: "N", float: "X", str: "TEXT"}[tp])
        else:
            raise TypeError(f"no command-line option for {cls.__name__}.{name}: {tp!r}")
        shown = ",".join(default) if isinstance(default, list) else default
        group.add_argument(
            "--" + name.replace("_", "-"),
            *(aliases or {}).get(name, ()),
            dest=name,
            default=default if defaults else None,
            help=f"{_doc_line(cls, name)} (default: {shown})".replace("%", "%%"),
            **kw,
        )


# --- generate, chat, models, export ----------------------------------------------------------


def _add_model_args(p: argparse.ArgumentParser, adapter: bool = True) -> None:
    from nanotune.models import DEFAULT_MODEL

    p.add_argument(
        "--model",
        help="preset name, local HF folder or .gguf file, hub id, or a run's final/ folder "
        f"(default: the adapter's base model, else {DEFAULT_MODEL})",
    )
    if adapter:
        p.add_argument("--adapter", metavar="DIR", help="PEFT/LoRA adapter folder to apply")


SAMPLING_FIELDS = [
    "max_new_tokens",
    "temperature",
    "top_k",
    "top_p",
    "repetition_penalty",
    "stop",
    "seed",
]


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    from nanotune.generate import GenerationConfig

    _field_options(p.add_argument_group("sampling"), GenerationConfig, SAMPLING_FIELDS)


def _generation_config(args: argparse.Namespace):
    from nanotune.generate import GenerationConfig

    return GenerationConfig(**{name: getattr(args, name) for name in SAMPLING_FIELDS})


def _add_dtype_arg(p) -> None:
    from nanotune.models.decoding import DECODE_DTYPES

    p.add_argument(
        "--dtype",
        choices=DECODE_DTYPES,
        default="float32",
        help="weights while decoding (bfloat16: faster where the CPU multiplies bf16 natively, "
        "its linear weights prepacked for oneDNN; int8: linear weights in int8 with per-channel "
        "scales, a quarter of float32's bytes, the rest in bfloat16; float32, the default, "
        "answers exactly as training computed)",
    )


def _load(args: argparse.Namespace):
    """(model, tokenizer) named by --model, with --adapter (and the tokenizer saved with it,
    which holds the run's added tokens and chat template) applied when given, in --dtype."""
    from nanotune.jobs import artifacts

    return artifacts.load(
        args.model, getattr(args, "adapter", None), getattr(args, "dtype", "float32")
    )


def _add_generate(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="complete a prompt or answer one chat message",
        description="Generate text from a prompt, or reply to one chat message.",
    )
    _add_model_args(p)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", metavar="TEXT", help="plain text to continue")
    what.add_argument("--chat", metavar="TEXT", help="user message, through the chat template")
    p.add_argument("--system", metavar="TEXT", help="system message for --chat")
    p.add_argument("--stream", action="store_true", help="print text as it is generated")
    _add_dtype_arg(p)
    _add_sampling_args(p)
    p.set_defaults(func=cmd_generate)


def cmd_generate(args: argparse.Namespace) -> int:
    from nanotune.generate import chat_prompt, generate, stream

    config = _generation_config(args)  # bad values fail before the model loads
    if args.system and args.chat is None:
        raise NanotuneError("--system needs --chat (a plain --prompt has no roles)")
    model, tokenizer = _load(args)
    text = args.prompt
    if args.chat is not None:
        system = [{"role": "system", "content": args.system}] if args.system else []
        text = chat_prompt(tokenizer, [*system, {"role": "user", "content": args.chat}])
    if args.stream:
        for piece in stream(model, tokenizer, text, config):
            print(piece, end="", flush=True)
        print()
    else:
        print(generate(model, tokenizer, [text], config)[0])
    return 0


def _add_chat(sub) -> None:
    p = sub.add_parser(
        "chat",
        help="interactive chat in the terminal",
        description="Chat with a model; /reset clears the history, /exit quits.",
    )
    _add_model_args(p)
    p.add_argument("--system", metavar="TEXT", help="system message")
    _add_dtype_arg(p)
    _add_sampling_args(p)
    p.set_defaults(func=cmd_chat)


def cmd_chat(args: argparse.Namespace) -> int:
    from nanotune.generate import chat_prompt, stream

    config = _generation_config(args)
    model, tokenizer = _load(args)
    chat_prompt(tokenizer, [{"role": "user", "content": ""}])  # fail now if it has no template
    system = [{"role": "system", "content": args.system}] if args.system else []
    room = model.config.block_size - config.max_new_tokens
    history: list[dict[str, str]] = []
    print(
        f"nanotune chat with {args.model or args.adapter or 'the default model'}: /reset clears "
        "the history, /exit quits",
        file=sys.stderr,
    )
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            print()
            return 0
        if line == "/exit":
            return 0
        if line == "/reset":
            history = []
            print("(history cleared)")
            continue
        if not line:
            continue
        history.append({"role": "user", "content": line})
        prompt = chat_prompt(tokenizer, system + history)
        # Forget the oldest exchanges rather than overflow the context.
        while len(tokenizer.encode(prompt)) > room and len(history) > 1:
            history = history[2:]
            prompt = chat_prompt(tokenizer, system + history)
        reply = []
        try:
            for piece in stream(model, tokenizer, prompt, config):
                print(piece, end="", flush=True)
                reply.append(piece)
        except NanotuneError as e:
            print(f"nanotune: error: {e}", file=sys.stderr)
            history.pop()
            continue
        print()
        history.append({"role": "assistant", "content": "".join(reply)})


def _add_models(sub) -> None:
    p = sub.add_parser("models", help="list the model presets and whether each works offline")
    p.set_defaults(func=cmd_models)


def _offline(preset) -> bool:
    """Whether the preset's weights are on this machine now (package or hub cache); no network."""
    from nanotune.weights.resolve import package_installed

    if package_installed(preset):  # a chunked package counts before its first assembly
        return True
    if preset.hub_id:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(preset.hub_id, "config.json"), str)
    return False


def cmd_models(args: argparse.Namespace) -> int:
    from nanotune.models import DEFAULT_MODEL, PRESETS

    rows = [("preset", "description", "source", "offline")]
    for name, preset in PRESETS.items():
        sources = [s for s in (preset.hub_id, preset.package and f"package {preset.package}") if s]
        mark = " (default)" if name == DEFAULT_MODEL else ""
        rows.append(
            (
                name + mark,
                preset.description,
                ", ".join(sources),
                "yes" if _offline(preset) else "no",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[3])
    return 0


def _add_export(sub) -> None:
    p = sub.add_parser(
        "export",
        help="write a model as a Hugging Face folder or a llama.cpp/Ollama GGUF file",
        description="Write a model (preset, .gguf, folder, a run's final/, or a base with "
        "--adapter merged in) as an HF folder (config.json, model.safetensors, tokenizer files) "
        "or, with --format gguf, as one .gguf file for llama.cpp and Ollama (--ollama adds a "
        "Modelfile beside it); --format gguf-lora writes the --adapter alone as a llama.cpp "
        "GGUF LoRA adapter (llama-server --lora) for the base's GGUF.",
    )
    _add_model_args(p)
    p.add_argument(
        "out", metavar="OUT", help="folder to create (hf) or .gguf file to write (gguf, gguf-lora)"
    )
    p.add_argument(
        "--format",
        choices=("hf", "gguf", "gguf-lora"),
        default="hf",
        help="output format (default: hf)",
    )
    p.add_argument(
        "--quant",
        metavar="TYPE",
        help="GGUF weight type (default: f16; an unknown TYPE is refused with the list). As "
        "llama.cpp: norms, biases and GPT-2's position table stay f32; q8_0 keeps a matrix "
        "whose rows are not a multiple of 32 at f16; q4_0/q4_1 give the output head q8_0 and "
        "refuse such a matrix, naming it; q4_k_s/q4_k_m/q5_k_s/q5_k_m/q6_k are made by "
        "llama.cpp's quantizer (the `llama` extra), which picks each tensor's type",
    )
    p.add_argument(
        "--ollama",
        action="store_true",
        help="with --format gguf: also write an Ollama Modelfile beside OUT (FROM, TEMPLATE for "
        "ChatML chat templates, stop tokens, sampling defaults); then `ollama create NAME`",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace OUT if nanotune wrote it (hf: never a folder with other files); never an input",
    )
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from nanotune.files.atomic import check_file_target, check_target
    from nanotune.methods import SequenceClassifier, lora_layers
    from nanotune.methods.lora import merge
    from nanotune.weights import save_model
    from nanotune.weights.gguf import written_by_nanotune
    from nanotune.weights.gguf_export import check_quant, export_gguf
    from nanotune.weights.resolve import hub_id_of

    out = Path(args.out)
    gguf = args.format in ("gguf", "gguf-lora")
    if args.quant is not None and not gguf:
        raise NanotuneError("--quant applies to --format gguf only; drop it or add --format gguf")
    if args.quant is not None and args.format == "gguf":  # before the (slow) load
        check_quant(args.quant)
    if args.ollama and args.format != "gguf":
        raise NanotuneError(
            "--ollama writes a Modelfile beside a model GGUF: use it with --format gguf (for a "
            "LoRA run, that exports the model with the adapter merged in)"
        )
    inputs = [p for p in (args.model, args.adapter) if p and Path(p).exists()]
    # Refuse before the (slow) load; the writers check again and write atomically.
    if gguf:
        check_file_target(out, overwrite=args.overwrite, ours=written_by_nanotune, inputs=inputs)
    else:
        check_target(out, overwrite=args.overwrite, inputs=inputs)
    if args.ollama:
        from nanotune.jobs.ollama import check_modelfile_target, write_modelfile

        check_modelfile_target(out, overwrite=args.overwrite)
    if args.format == "gguf-lora":
        return _export_gguf_lora(args, out, inputs)
    model, tokenizer = _load(args)
    if isinstance(model, SequenceClassifier):
        raise NanotuneError(
            f"{args.adapter or args.model}: a classifier; export writes language models (a "
            "classifier's folder is already an HF folder or adapter plus its head)"
        )
    if lora_layers(model):
        model = merge(model)
    if gguf:
        export_gguf(
            model,
            tokenizer,
            out,
            quant=args.quant or "f16",
            overwrite=args.overwrite,
            inputs=inputs,
        )
    else:
        base = hub_id_of(args.model) if args.model else None
        save_model(model, tokenizer, out, overwrite=args.overwrite, inputs=inputs, base_model=base)
    print(f"wrote {out}")
    if args.ollama:
        modelfile, note = write_modelfile(out, tokenizer, model.config, overwrite=args.overwrite)
        if note:
            print(f"nanotune: note: {note}", file=sys.stderr)
        print(f"wrote {modelfile}; next: cd {modelfile.parent} && ollama create NAME -f Modelfile")
    return 0


def _export_gguf_lora(args: argparse.Namespace, out, inputs: list[str]) -> int:
    """--format gguf-lora: the adapter alone, checked against its (plain) base model."""
    from pathlib import Path

    from nanotune.jobs.artifacts import base_of
    from nanotune.weights import load_model
    from nanotune.weights.classifier import CLASSIFIER_FILE
    from nanotune.weights.gguf_lora import export_gguf_lora

    if args.quant not in (None, "f32"):
        raise NanotuneError(
            "--format gguf-lora writes f32 adapters (convert_lora_to_gguf's default); drop --quant"
        )
    adapter = args.adapter
    if adapter is None and args.model and (Path(args.model) / "adapter_config.json").is_file():
        adapter, args.model = args.model, None  # a LoRA run's final/ passed as the model
    if adapter is None:
        raise NanotuneError(
            "--format gguf-lora needs the adapter: --adapter DIR (a LoRA run's final/)"
        )
    if (Path(adapter) / CLASSIFIER_FILE).is_file():
        raise NanotuneError(
            f"{adapter}: a classifier; llama.cpp has no classification head, so GGUF export "
            "writes language models only"
        )
    base, _ = load_model(args.model or base_of(adapter))
    export_gguf_lora(base, adapter, out, overwrite=args.overwrite, inputs=inputs)
    print(f"wrote {out}")
    return 0


# --- eval ------------------------------------------------------------------------------------


EVAL_DATA_FIELDS = ["format", "prompt_template", "separator", "completion_template"]
EVAL_FIELDS = ["metrics", "split", "max_examples", "batch_size", "max_new_tokens"]
EVAL_FIELDS += ["num_samples", "reward_model"]


def _add_eval(sub) -> None:
    from nanotune.data import DataConfig
    from nanotune.eval import EvalConfig

    p = sub.add_parser(
        "eval",
        help="evaluate a model, or a base model and its fine-tune side by side",
        description="Run the same evaluation on the base model and on the fine-tuned one (adapter "
        "or full folder) and print the metrics side by side with deltas.",
    )
    _add_model_args(p, adapter=False)
    p.set_defaults(model=None)  # None: the recipe's model, else the default model
    tuned = p.add_mutually_exclusive_group()
    tuned.add_argument("--adapter", metavar="DIR", help="PEFT/LoRA adapter folder over --model")
    tuned.add_argument("--finetuned", metavar="DIR", help="fine-tuned full model folder")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--data",
        metavar="FILE",
        help="data file, folder, builtin:<name> or hf:<id>; every row is evaluated",
    )
    source.add_argument(
        "--recipe",
        metavar="NAME",
        help="recipe YAML or packaged recipe: its model, data and eval sections (split included)",
    )
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="config values, as for train: e.g. eval.max_examples=50 data.max_length=256",
    )
    p.add_argument("--set", dest="removed_set", action="append", help=argparse.SUPPRESS)
    g = p.add_argument_group("data (with --data; the data section's fields)")
    _field_options(g, DataConfig, EVAL_DATA_FIELDS)
    g.add_argument(
        "--column",
        action="append",
        default=[],
        metavar="FIELD=COLUMN",
        help="map a format field to a data column, e.g. label=category (repeatable)",
    )
    g = p.add_argument_group(
        "evaluation (the eval section's fields; with --recipe they override it)"
    )
    _field_options(
        g, EvalConfig, EVAL_FIELDS, defaults=False, aliases={"num_samples": ["--samples"]}
    )
    p.add_argument("--report", metavar="DIR", help="also write DIR/report.html")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    from nanotune.config import RunConfig, load_config
    from nanotune.data.formats import FORMATS
    from nanotune.eval import RunSummary, compare, write_report
    from nanotune.eval.compare import metrics_table
    from nanotune.jobs.evaluate import evaluate_job
    from nanotune.models import DEFAULT_MODEL

    if args.removed_set:
        raise NanotuneError(
            f"eval: --set is gone; give overrides as KEY=VALUE, e.g. `nanotune eval --recipe R "
            f"{args.removed_set[0]}`"
        )
    given = {k: getattr(args, k) for k in EVAL_FIELDS if getattr(args, k) is not None}
    flags = [f"eval.{k}={v}" for k, v in given.items()]  # only to name them in errors
    if args.recipe:
        run = load_config(args.recipe, args.overrides)
        section = {**dataclasses.asdict(run.eval), **given}
        run = RunConfig.from_dict(
            {"model": run.model.name, "data": dataclasses.asdict(run.data), "eval": section},
            source=" ".join(flags) or None,
        )
    else:
        columns = dict(c.split("=", 1) for c in args.column if "=" in c)
        if len(columns) != len(args.column):
            raise NanotuneError("--column takes FIELD=COLUMN, e.g. --column label=category")
        data = {k: getattr(args, k) for k in EVAL_DATA_FIELDS}
        metrics = list(FORMATS[args.format].metrics)
        section = {"metrics": metrics, "split": "train", **given}
        run = RunConfig.from_dict(
            {
                "model": DEFAULT_MODEL,
                "data": {"source": args.data, "columns": columns, **data},
                "eval": section,
            },
            args.overrides,
        )
    model, data, cfg = args.model or run.model.name, run.data, run.eval
    before, after, samples = evaluate_job(
        model, data, cfg, adapter=args.adapter, finetuned=args.finetuned
    )
    print(metrics_table(before) if after is None else compare(before, after, ("base", "finetuned")))
    for s in samples:
        print("\n" + "\n".join(f"[{k}] {v}" for k, v in s.items()))
    if args.report:
        config = {
            "model": model,
            "adapter": args.adapter,
            "finetuned": args.finetuned,
            "data": dataclasses.asdict(data),
            "eval": dataclasses.asdict(cfg),
        }
        title = "nanotune evaluation report"
        path = write_report(
            args.report, RunSummary(config, before, after or {}, samples, title=title)
        )
        print(f"\nreport: {path}")
    return 0


# --- merge, classify ---------------------------------------------------------------------------


def _add_merge(sub) -> None:
    p = sub.add_parser(
        "merge",
        help="fold a LoRA/DoRA adapter into its base model and write an HF folder",
        description="Load --model, apply the PEFT adapter folder --adapter, merge it into the "
        "base weights and write a plain Hugging Face folder (a classifier folder for SEQ_CLS).",
    )
    p.add_argument(
        "--model",
        help="base model: preset, HF folder, .gguf or hub id (default: the adapter's base model)",
    )
    p.add_argument("--adapter", required=True, metavar="DIR", help="PEFT adapter folder")
    p.add_argument("out_dir", metavar="OUT_DIR", help="folder to create")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace OUT_DIR if nanotune wrote it (never a folder with other files)",
    )
    p.set_defaults(func=cmd_merge)


def cmd_merge(args: argparse.Namespace) -> int:
    from nanotune.jobs import artifacts

    out = artifacts.merge(args.model, args.adapter, args.out_dir, overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0


def _add_classify(sub) -> None:
    p = sub.add_parser(
        "classify",
        help="label texts with a fine-tuned classifier",
        description="Print the predicted label of each text and the probability of every label: "
        "for one --text as a short list, otherwise one tab-separated line per text under a header.",
    )
    p.add_argument("--model", required=True, metavar="DIR", help="a classifier run's final/ folder")
    p.add_argument(
        "--text", action="append", default=[], metavar="TEXT", help="text to classify (repeatable)"
    )
    p.add_argument(
        "--file",
        metavar="PATH",
        help="texts to classify: one per line, or a .jsonl file of objects with a text field",
    )
    p.set_defaults(func=cmd_classify)


def _read_texts(path: str) -> list[str]:
    """The texts of a --file: one per non-blank line, or the `text` field of each .jsonl line."""
    import json
    from pathlib import Path

    p = Path(path)
    try:
        # Split on newlines only: str.splitlines also breaks at U+2028 inside a JSON string.
        lines = [line.rstrip("\r") for line in p.read_text(encoding="utf-8").split("\n")]
    except (OSError, UnicodeDecodeError) as e:
        raise NanotuneError(f"{p}: cannot read the texts ({e}); give a UTF-8 text file") from e
    texts = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if p.suffix != ".jsonl":
            texts.append(line)
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise NanotuneError(f"{p}:{n}: not valid JSON ({e}); one object per line") from e
        text = row.get("text") if isinstance(row, dict) else None
        if not isinstance(text, str) or not text:
            raise NanotuneError(f'{p}:{n}: needs a non-empty string field "text"')
        texts.append(text)
    if not texts:
        raise NanotuneError(f"{p}: holds no texts; put one text per line")
    return texts


def cmd_classify(args: argparse.Namespace) -> int:
    from nanotune.classify import classify_batch
    from nanotune.jobs import artifacts
    from nanotune.methods import SequenceClassifier

    texts = [*args.text, *(_read_texts(args.file) if args.file else [])]
    if not texts:
        raise NanotuneError("classify: give --text TEXT (repeatable) or --file PATH")
    model, tokenizer = artifacts.load(args.model)
    if not isinstance(model, SequenceClassifier):
        raise NanotuneError(
            f"{args.model}: not a classifier (no classifier.json); give the final/ folder of a "
            "classification run"
        )
    results = classify_batch(model, tokenizer, texts)
    if len(texts) == 1 and not args.file:
        (probs,) = results
        print(max(probs, key=probs.get))
        for name, p in probs.items():
            print(f"  {name}: {p:.4f}")
        return 0
    print("\t".join(["label", *model.label_names, "text"]))
    for text, probs in zip(texts, results, strict=True):
        shown = " ".join(text.split())  # one line per text, whatever whitespace it holds
        print("\t".join([max(probs, key=probs.get), *(f"{p:.4f}" for p in probs.values()), shown]))
    return 0


def _config_reference() -> str:
    """Every config field, by section: dotted name, type, default and its one-line doc."""
    from nanotune.config import RunConfig

    lines = ["config fields (YAML keys, or KEY=VALUE overrides):"]
    hints = typing.get_type_hints(RunConfig)
    top = []
    for section in dataclasses.fields(RunConfig):
        cls = hints[section.name]
        if not dataclasses.is_dataclass(cls):
            top.append((RunConfig, section))
            continue
        lines += ["", f"{section.name}:"]
        lines += _field_lines(cls, dataclasses.fields(cls), f"{section.name}.")
    lines += ["", "run:"] + _field_lines(RunConfig, [f for _, f in top], "")
    return "\n".join(lines)


def _yaml_value(value) -> str:
    """A default as YAML writes it (true, null, '', [a, b])."""
    import yaml

    value = list(value) if isinstance(value, tuple) else value  # betas: (0.9, 0.999)
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    return text.removesuffix("...").strip()


def _field_lines(cls: type, fields, prefix: str) -> list[str]:
    from nanotune.config import type_name

    hints = typing.get_type_hints(cls)
    out = []
    for f in fields:
        if f.default_factory is not dataclasses.MISSING:
            shown = _yaml_value(f.default_factory())
        elif f.default is not dataclasses.MISSING:
            shown = _yaml_value(f.default)
        else:
            shown = "(required)"
        out.append(f"  {prefix}{f.name}: {type_name(hints[f.name])} = {shown}")
        out.append(f"      {_doc_line(cls, f.name)}")
    return out


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="fine-tune a model from a YAML config or packaged recipe",
        description="Fine-tune a model as a YAML config or packaged recipe says, with KEY=VALUE "
        "overrides (e.g. train.lr=1e-4 method.r=8); the run directory gets config.yaml, "
        "metrics.jsonl, checkpoints/ and final/.",
        epilog=_config_reference(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", nargs="?", help="config YAML file or packaged recipe name")
    p.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="e.g. train.lr=1e-4 method.r=8"
    )
    p.add_argument("--recipe", metavar="NAME", help="packaged recipe (see `nanotune recipes`)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing run directory (only one nanotune wrote; the old run is kept "
        "until the new one has a checkpoint)",
    )
    check = p.add_mutually_exclusive_group()
    check.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config (defaults included) as YAML and exit; loads no model",
    )
    check.add_argument(
        "--dry-run",
        action="store_true",
        help="load the model and tokenizer, build the data, apply the method; print the data "
        "counts and trainable parameters and exit; writes nothing",
    )
    p.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    config, overrides = args.config, args.overrides
    if args.recipe:  # argparse hands the first KEY=VALUE to the optional positional
        config, overrides = args.recipe, [*filter(None, [args.config]), *overrides]
    elif config is None:
        raise NanotuneError("train: give a config YAML or --recipe NAME (see `nanotune recipes`)")
    if args.print_config or args.dry_run:
        from nanotune.config import load_config

        resolved = load_config(config, overrides)
        if args.print_config:
            print(resolved.to_yaml(), end="")
        else:
            from nanotune.jobs.finetune import dry_run

            dry_run(resolved)
        return 0
    from nanotune.jobs.finetune import train
    from nanotune.training.dist import is_main

    result = train(config, overrides=overrides, resume=args.resume, overwrite=args.overwrite)
    if is_main():  # under torchrun every rank returns here; one report is enough
        print(f"done: {result.step} steps; final model in {result.final_dir}")
        if result.report:
            print(f"report: {result.report}")
    return 0


# --- bench -----------------------------------------------------------------------------------


def _add_bench(sub) -> None:
    p = sub.add_parser(
        "bench", help="time nanotune against transformers + peft; write BENCHMARKS.md"
    )
    p.add_argument("--quick", action="store_true", help="tiny shapes: a smoke test in seconds")
    p.add_argument("--cases", help="comma-separated case names (default: all)")
    p.add_argument("--output", default="BENCHMARKS.md", help="markdown report to write")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    from nanotune import bench

    names = bench.select(args.cases)
    command = ["nanotune bench"] + ["--quick"] * args.quick
    command += [f"--cases {args.cases}"] * bool(args.cases)
    command += [f"--output {args.output}", f"--device {args.device}"]
    results = bench.run(
        names, quick=args.quick, device=args.device, output=args.output, command=" ".join(command)
    )
    print(f"wrote {args.output}")
    # A peer that dies (llama.cpp crashing on this CPU, say) is a row saying how; only
    # nanotune's own failures fail the run.
    failed = [c for c, sides in results.items() if sides["nanotune"].error]
    return 1 if failed else 0


# --- recipes, demo ----------------------------------------------------------------------------


def _add_recipes(sub) -> None:
    p = sub.add_parser(
        "recipes",
        help="list the packaged recipes, or print one",
        description="List the packaged recipes with a one-line description; with NAME, print "
        "its YAML (run it with `nanotune train --recipe NAME [KEY=VALUE ...]`).",
    )
    p.add_argument("name", nargs="?", help="recipe to print")
    p.set_defaults(func=cmd_recipes)


def cmd_recipes(args: argparse.Namespace) -> int:
    from nanotune.recipes import list_recipes, recipe_text

    if args.name:
        print(recipe_text(args.name), end="")
        return 0
    rows = list_recipes()
    width = max(len(name) for name, _ in rows)
    for name, description in rows:
        print(f"{name.ljust(width)}  {description}")
    return 0


def _add_demo(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="fine-tune the embedded SmolLM2 with LoRA offline, before/after report",
        description="Run the packaged demo recipe: LoRA on SmolLM2-135M-Instruct learning to "
        "reverse word lists (a few minutes on a laptop CPU), evaluated before and after on "
        "held-out lists; prints the table and samples and writes report.html.",
    )
    p.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="recipe values, e.g. train.max_steps=30"
    )
    p.add_argument(
        "--output-dir", metavar="DIR", help="run directory (default: a new runs/demo-<time>)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output-dir")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    from nanotune.jobs.demo import run_demo

    run_demo(args.output_dir, overwrite=args.overwrite, overrides=args.overrides)
    return 0


class _Parser(argparse.ArgumentParser):
    """The top-level parser. argparse fills a nargs="*" positional from one run of positionals
    only, so `train my.yaml --resume train.lr=1e-4` would leave train.lr=1e-4 unrecognised: the
    subcommands in `intermixed` (those taking KEY=VALUE overrides) take them among their flags."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.intermixed: dict[str, argparse.ArgumentParser] = {}

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        sub = self.intermixed.get(args[0]) if args else None
        if sub is None:
            return super().parse_known_args(args, namespace)
        namespace = argparse.Namespace() if namespace is None else namespace
        namespace.command = args[0]
        return sub.parse_known_intermixed_args(args[1:], namespace)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="nanotune", description="Fine-tune GPT-2 and other small language models."
    )
    parser.add_argument("--version", action="version", version=f"nanotune {__version__}")
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=argparse.ArgumentParser
    )
    # Subcommands register themselves here: add_<name>_parser(sub).
    _add_generate(sub)
    _add_chat(sub)
    _add_models(sub)
    _add_export(sub)
    _add_eval(sub)
    _add_merge(sub)
    _add_classify(sub)
    _add_bench(sub)
    _add_train(sub)
    _add_recipes(sub)
    _add_demo(sub)
    _add_push(sub)
    _add_serve(sub)
    parser.intermixed = {name: sub.choices[name] for name in ("train", "eval", "demo")}
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except NanotuneError as e:
        # One line, whatever a library put into the message it wraps.
        print(f"nanotune: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # train's Interrupted says what it saved and its signal
        print(f"nanotune: {str(e) or 'interrupted'}", file=sys.stderr)
        return getattr(e, "exit_code", 130)


def _add_push(sub) -> None:
    p = sub.add_parser(
        "push",
        help="upload a run's final/ (or an adapter or model folder) to the Hugging Face Hub",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run's output_dir, or its final/ folder")
    p.add_argument("repo_id", metavar="REPO_ID", help="hub repository, owner/name")
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.add_argument("--token", help="hub token (default: HF_TOKEN or the `hf auth login` one)")
    p.set_defaults(func=cmd_push)


def cmd_push(args: argparse.Namespace) -> int:
    from nanotune.jobs.artifacts import push

    url = push(args.run_dir, args.repo_id, private=args.private, token=args.token)
    print(f"pushed to {url}")
    return 0


def _add_serve(sub) -> None:
    from nanotune.serve import limits

    p = sub.add_parser(
        "serve",
        help="an OpenAI-compatible HTTP server for a model and its LoRA adapters",
        description="Serve a base model and any number of its LoRA adapters over the OpenAI "
        "API (/v1/completions, /v1/chat/completions, /v1/models), batching requests for "
        "different adapters together. Needs the 'serve' extra. Requests pick an adapter by "
        "its NAME in the `model` field; the base answers to its own name.",
    )
    p.add_argument(
        "--model",
        help="base model: name, folder, .gguf, or a LoRA run's final/ (served with its base) "
        "(default: the embedded SmolLM2)",
    )
    p.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="a LoRA adapter folder (a run's final/) served as model NAME; repeatable",
    )
    p.add_argument("--served-model-name", metavar="NAME", help="the base model's name in the API")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback)")
    p.add_argument("--port", type=int, default=8000, help="port (0: any free one; default 8000)")
    p.add_argument(
        "--api-key",
        default=os.environ.get("NANOTUNE_API_KEY"),
        help="require 'Authorization: Bearer KEY' (default: $NANOTUNE_API_KEY, else none); "
        "a key given here shows in the process list (ps), set NANOTUNE_API_KEY to keep it out",
    )
    _add_dtype_arg(p)
    p.add_argument(
        "--max-batch", type=int, default=limits.MAX_BATCH, help="sequences decoded together"
    )
    p.add_argument(
        "--max-queue",
        type=int,
        default=limits.MAX_QUEUE,
        help="requests waiting before new ones get 429",
    )
    p.add_argument(
        "--max-body-kb",
        type=int,
        default=limits.MAX_BODY // 1024,
        help="largest request body in KiB (413 above)",
    )
    p.add_argument(
        "--prefix-cache-mb",
        type=int,
        default=limits.PREFIX_CACHE_MB,
        help="keys/values of recent prompts kept so a prompt that starts the same way (system "
        "prompt, few-shot context) prefills only the rest; 0 = off",
    )
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    from nanotune.serve import serve

    if args.max_body_kb < 1:
        raise NanotuneError("--max-body-kb must be at least 1")
    serve(
        args.model,
        args.adapter,
        host=args.host,
        port=args.port,
        api_key=args.api_key or None,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        prefix_cache_mb=args.prefix_cache_mb,
        max_body=args.max_body_kb * 1024,
        served_name=args.served_model_name,
        dtype=args.dtype,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
