"""The model card (`README.md`) of a run's `final/`: the Hub's YAML metadata, then what was trained
on what, how, and what it scored."""

from __future__ import annotations

from typing import Any

import yaml

from nanotune.data.config import DataConfig
from nanotune.data.formats import FORMATS
from nanotune.eval.compare import compare_rows, fmt, verdict
from nanotune.training.config import DEFAULT_BETA
from nanotune.version import __version__
from nanotune.weights.resolve import HUB_ID, hub_id_of

# The method fields that shape the result, per method (the rest are defaults that do nothing).
METHOD_KEYS = {
    "full": [],
    "last_n": ["last_n"],
    "lora": ["r", "alpha", "dropout", "targets", "rslora", "dora", "train_embeddings"],
}
METHOD_KEYS["dora"] = METHOD_KEYS["lora"]
METHOD_KEYS["qlora"] = [*METHOD_KEYS["lora"], "quant", "block_size", "compute_dtype"]
TRAIN_KEYS = [
    "lr",
    "schedule",
    "warmup_steps",
    "warmup_ratio",
    "min_lr_ratio",
    "weight_decay",
    "micro_batch_size",
    "grad_accum",
    "max_steps",
    "epochs",
    "max_grad_norm",
    "dtype",
    "seed",
]
OBJECTIVE_KEYS = {
    "dpo": ["beta", "loss", "label_smoothing"],
    "simpo": ["beta", "simpo_gamma", "label_smoothing"],
    "orpo": ["orpo_lambda"],
    "reward": [],
}
DATA_KEYS = ["source", "val_source", "test_source", "format", "max_length", "pack"]


def _table(header: tuple[str, ...], rows: list[tuple[Any, ...]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _fields(d: dict[str, Any], keys: list[str]) -> str:
    return _table(("field", "value"), [(f"`{k}`", f"`{d[k]}`") for k in keys if k in d])


def model_card(
    config: dict[str, Any],
    *,
    adapter: bool,
    classifier: bool,
    before: dict[str, Any] | None = None,
    after: dict[str, Any] | None = None,
    data_stats: dict[str, Any] | None = None,
    data_sources: list[dict[str, Any]] | None = None,
) -> str:
    """README.md text for `final/`, from the run's resolved config (`RunConfig.to_dict()`)."""
    model, method, data, train = (config.get(k) or {} for k in ("model", "method", "data", "train"))
    base = hub_id_of(model.get("name", ""))
    name = method.get("name", "")
    meta: dict[str, Any] = {}
    if HUB_ID.match(base):  # a local folder is no Hub id: the Hub would refuse the card
        meta["base_model"] = base
    meta["library_name"] = "peft" if adapter else "transformers"
    meta["tags"] = ["nanotune", name] + (["lora"] if adapter and name != "lora" else [])
    meta["pipeline_tag"] = "text-classification" if classifier else "text-generation"
    source = str(data.get("source", ""))
    if source.startswith("hf:"):
        meta["datasets"] = [source.removeprefix("hf:").split(":")[0]]
    if adapter:
        loads = (
            "```python\nfrom peft import AutoPeftModelForCausalLM\n\n"
            'model = AutoPeftModelForCausalLM.from_pretrained("<this folder or repo>")\n```'
        )
    else:
        loads = (
            "```python\nfrom transformers import AutoModelForCausalLM\n\n"
            'model = AutoModelForCausalLM.from_pretrained("<this folder or repo>")\n```'
        )
    preference = config.get("preference") or {}
    objective = preference.get("objective")
    spec = FORMATS.get(data.get("format", DataConfig.format))
    if objective is None and spec is not None and spec.task == "preference":
        objective = "dpo"
    if objective:
        meta["tags"].append("reward-model" if objective == "reward" else objective)
    if classifier:
        loads = (
            "A classifier: `classifier.json` names its labels. Load it with nanotune "
            "(`nanotune classify --model <this folder> TEXT`)."
        )
    if objective == "reward":
        loads = (
            "A reward model (one score per text, Bradley–Terry on preference pairs):\n\n"
            "```python\nfrom transformers import AutoModelForSequenceClassification\n\n"
            'model = AutoModelForSequenceClassification.from_pretrained("<this folder or repo>")'
            "\n```\n\nIt can be the `eval.reward_model` of another nanotune run."
        )
    parts = [
        "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---",
        f"# {name} fine-tune of {base}",
        f"Fine-tuned with [nanotune](https://pypi.org/project/nanotune/) {__version__}: "
        + ("a PEFT adapter over the base model." if adapter else "the whole model."),
        loads,
        f"## Base model\n\n`{base}`",
        f"## Method: {name}\n\n"
        + (
            _fields(method, METHOD_KEYS[name]) if METHOD_KEYS.get(name) else "Every weight trained."
        ),
        "## Data\n\n" + _fields(data, DATA_KEYS),
    ]
    if objective:
        shown = dict(preference)
        if shown.get("beta") is None and objective in DEFAULT_BETA:
            shown["beta"] = DEFAULT_BETA[objective]
        parts.append(f"## Objective: {objective}\n\n" + _fields(shown, OBJECTIVE_KEYS[objective]))
    if data_stats:
        rows = [(s, c.get("rows", 0), c.get("examples", 0)) for s, c in data_stats.items()]
        parts.append(_table(("split", "rows", "examples"), rows))
    if data_sources:  # data.sources: the mix, as each epoch draws it
        total = sum(s["per_epoch"] for s in data_sources) or 1
        rows = [
            (
                f"`{s['source']}`",
                s["rows"],
                s["examples"],
                f"{s['per_epoch']} ({100 * s['per_epoch'] / total:.1f}%)",
            )
            for s in data_sources
        ]
        parts.append(_table(("training source", "rows", "examples", "per epoch"), rows))
    parts.append("## Training\n\n" + _fields(train, TRAIN_KEYS))
    rows = compare_rows(before or {}, after or {})
    if rows:
        split = (config.get("eval") or {}).get("split", "test")
        body = [(n, fmt(b), fmt(a), fmt(d, signed=True), verdict(n, d)) for n, b, a, d in rows]
        parts.append(
            f"## Results\n\nOn the `{split}` split, before and after fine-tuning:\n\n"
            + _table(("metric", "before", "after", "delta", ""), body)
        )
    return "\n\n".join(parts) + "\n"


def gguf_card(path, repo_id: str) -> str:
    """README.md for a GGUF file pushed alone: the Hub's metadata (base model, gguf tag), the
    weight type and how llama.cpp and Ollama run it."""
    from nanotune.weights.gguf import gguf_facts

    facts = gguf_facts(path)
    base = facts["base_model"]
    meta: dict[str, Any] = {}
    if base and HUB_ID.match(base):
        meta["base_model"] = base
    meta["library_name"] = "gguf"
    meta["tags"] = ["nanotune", "gguf", *filter(None, [facts["architecture"]])]
    meta["pipeline_tag"] = "text-generation"
    name = path.name
    rows = [
        ("file", f"`{name}`"),
        ("architecture", facts["architecture"]),
        ("weight type", facts["quant"]),
        ("context length", facts["context_length"]),
        ("base model", base or "not recorded in the file"),
        ("written by", f"nanotune {facts['nanotune']}" if facts["nanotune"] else "not nanotune"),
    ]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows if v is not None)
    return (
        f"---\n{yaml.safe_dump(meta, sort_keys=False)}---\n\n"
        f"# {repo_id.split('/')[-1]}\n\n"
        f"A GGUF model file for llama.cpp and Ollama, pushed with nanotune {__version__}.\n\n"
        f"| | |\n|---|---|\n{table}\n\n"
        f'```bash\nllama-cli -m {name} -p "Hello"\n'
        f"ollama run hf.co/{repo_id}\n```\n"
    )
