"""What a run writes to `final/`, and how any nanotune output is loaded back.

The one place that decides both, so the writer and every reader (generate, chat, classify, eval,
merge, export) agree. Per run, what `final/` holds -> what it is loaded back as:

- LoRA, DoRA, QLoRA (added tokens and trained embeddings included): PEFT adapter + tokenizer
  -> base model + adapter
- classifier, LoRA body: `classifier.json` + PEFT SEQ_CLS adapter (head inside)
  -> base + adapter + head
- classifier, full or last_n body: `classifier.json` + HF folder + `classifier.safetensors`
  -> folder + head
- reward model (one output), any body (LoRA merged): the same, and the folder is an HF
  `…ForSequenceClassification` (num_labels 1)
  -> folder + head; transformers: AutoModelForSequenceClassification
- full, last_n: HF model folder -> the folder

Every `final/` also holds a model card, `README.md` (`jobs/card.py`). The base is recorded by its
hub id (or absolute path) so transformers and PEFT find it; `weights.resolve` maps a preset's hub
id back to the preset, so SmolLM2 still loads offline from its package.

A LoRA run is never merged on save: merged onto a QLoRA run's NF4-rounded base, every weight the
run never touched would be written rounded. `merge` folds an adapter in when asked.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from torch import nn

from nanotune.config import RunConfig
from nanotune.errors import NanotuneError
from nanotune.files.atomic import atomic_dir, check_target
from nanotune.jobs.card import gguf_card, model_card
from nanotune.jobs.config import MergeCommand, PushCommand
from nanotune.methods import SequenceClassifier, lora_layers
from nanotune.methods.lora import merge as merge_lora
from nanotune.models import DEFAULT_MODEL
from nanotune.models.decoding import DecodeDtype, for_decoding
from nanotune.tokenizer import Tokenizer
from nanotune.weights import hub, load_model, save_model
from nanotune.weights.classifier import (
    CLASSIFIER_FILE,
    adapter_labels,
    load_classifier,
    save_classifier,
    write_classifier,
)
from nanotune.weights.hf import write_model
from nanotune.weights.peft import (
    CONFIG_FILE,
    adapter_tokenizer,
    load_adapter,
    read_adapter_config,
    save_adapter,
)

Loaded = tuple[nn.Module, Tokenizer]
CARD_FILE = "README.md"  # the model card the Hub shows


def save_final(
    model: nn.Module,
    tokenizer: Tokenizer,
    config: RunConfig,
    final: Path,
    *,
    before: dict[str, Any] | None = None,
    after: dict[str, Any] | None = None,
    data_stats: dict[str, Any] | None = None,
    data_sources: list[dict[str, Any]] | None = None,
) -> Path:
    """Write a trained model to `final/` in its form from the table above, with its model card
    (README.md, from the run's config and before/after metrics), all in one atomic swap."""
    base = config.model.name
    classifier = isinstance(model, SequenceClassifier)
    if classifier and model.num_labels == 1 and lora_layers(model.body):
        # A reward model is saved merged, as the sequence-classification folder transformers
        # loads (`eval.reward_model` names it); the trained model gets its adapters back.
        with _merged(model.body):
            return save_final(
                model,
                tokenizer,
                config,
                final,
                before=before,
                after=after,
                data_stats=data_stats,
                data_sources=data_sources,
            )
    adapter = bool(lora_layers(model.body if classifier else model))

    def write(tmp: Path) -> None:
        if classifier:
            write_classifier(model, tmp, tokenizer, base)
        elif adapter:
            save_adapter(model, tmp, base)
            tokenizer.save(tmp)
        else:
            write_model(model, tokenizer, tmp, base)
        text = model_card(
            config.to_dict(),
            adapter=adapter,
            classifier=classifier,
            before=before,
            after=after,
            data_stats=data_stats,
            data_sources=data_sources,
        )
        (tmp / CARD_FILE).write_text(text, encoding="utf-8")

    kind = "classifier" if classifier else "adapter" if adapter else "model"
    return atomic_dir(final, write, kind=kind)


@contextlib.contextmanager
def _merged(model: nn.Module) -> Iterator[nn.Module]:
    """`model` with every adapter folded into its base weight, then its LoRA layers put back
    (no copy of the model: NF4 weights cannot be deep-copied)."""
    layers = lora_layers(model)
    merge_lora(model)
    try:
        yield model
    finally:
        for path, layer in layers.items():
            parent, _, leaf = path.rpartition(".")
            setattr(model.get_submodule(parent), leaf, layer)


def base_of(adapter: str | os.PathLike) -> str:
    """The base model an adapter folder names (`base_model_name_or_path`)."""
    base = read_adapter_config(adapter).get("base_model_name_or_path")
    if not base:
        raise NanotuneError(
            f"{Path(adapter) / CONFIG_FILE}: names no base_model_name_or_path; pass --model"
        )
    return base


OutputKind = Literal["adapter", "classifier", "model", "gguf", "unknown", "name"]


@dataclass(frozen=True)
class Output:
    """What a path names, as every entrance reads it (load, merge, export, push, serve).

    kind: `adapter` (PEFT adapter folder, a LoRA run's final/), `classifier` (classifier.json
    beside a model folder or adapter), `model` (an HF folder), `gguf` (a .gguf file, or a folder
    holding just one), `unknown` (something else on disk), `name` (not on disk: a preset or hub
    id). path: the output itself (a run directory's final/, the .gguf in its folder); None for
    a name."""

    kind: OutputKind
    path: Path | None
    given: str

    @property
    def ref(self) -> str:
        """The output as the loaders take it: as given ("./gpt2" stays a path, not the preset
        gpt2), or the final/ or .gguf found inside."""
        if self.path is None or self.path == Path(self.given).expanduser():
            return self.given
        return str(self.path)

    @property
    def base(self) -> str | None:
        """The base model an adapter (or a LoRA classifier) names."""
        if self.path is not None and (self.path / CONFIG_FILE).is_file():
            return base_of(self.path)
        return None

    def expect(self, kind: OutputKind, flag: str) -> Output:
        """This output, refused in one line when it is not a `kind`."""
        if self.kind != kind:
            what = {"name": "no such folder", "unknown": "not a nanotune output"}.get(
                self.kind, f"a {self.kind}"
            )
            need = {"adapter": f"an adapter folder (no {CONFIG_FILE})"}.get(kind, f"a {kind}")
            raise NanotuneError(f"{flag} {self.given}: not {need}; it is {what}")
        return self


def inspect_output(name_or_path: str | os.PathLike) -> Output:
    """What kind of nanotune output (or model) `name_or_path` is: a folder, its final/ when it
    is a run directory, a .gguf file, or a name that is not on disk."""
    given = str(name_or_path)
    path = Path(given).expanduser()
    if not path.exists():
        return Output("name", None, given)
    if path.is_file():
        return Output("gguf" if path.suffix == ".gguf" else "unknown", path, given)
    for folder in (path, path / "final"):
        for marker, kind in ((CLASSIFIER_FILE, "classifier"), (CONFIG_FILE, "adapter")):
            if (folder / marker).is_file():
                return Output(kind, folder, given)
        if (folder / "config.json").is_file():
            return Output("model", folder, given)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return Output("gguf", ggufs[0], given)
    return Output("unknown", path, given)


def apply_adapter(model: nn.Module, tokenizer: Tokenizer, adapter: str | os.PathLike) -> Loaded:
    """`model` with the adapter folder loaded onto it, and the tokenizer saved with the adapter
    (it holds the run's added tokens and chat template)."""
    load_adapter(model, adapter)
    return model, adapter_tokenizer(adapter, tokenizer)


def load(
    model: str | None = None,
    adapter: str | os.PathLike | None = None,
    dtype: DecodeDtype = "float32",
    compile: bool = False,
) -> Loaded:
    """Any nanotune output, ready for inference: a model name or folder, a run's `final/`
    (adapter or classifier folder), or a base with `adapter`; in `dtype` for decoding
    (`models.decoding`), adapters merged first (in float32) for a reduced dtype, so a step costs
    one matmul per layer and rounds once. compile: it will decode through compiled steps (its
    bf16 weights are not packed for eager oneDNN).

    Without `model`, the base comes from the adapter's config (else the default model).
    """
    loaded, tokenizer = _load(model, adapter)
    if dtype != "float32":
        merge_lora(loaded)
    return for_decoding(loaded, dtype, pack=not compile), tokenizer


def _load(model: str | None, adapter: str | os.PathLike | None) -> Loaded:
    if adapter is None and model is not None:
        given = inspect_output(model)
        if given.kind == "classifier":
            return load_classifier(given.path)
        if given.kind == "adapter":  # a LoRA run's final/ (or its run directory) as the model
            model, adapter = None, given.path
        else:
            model = given.ref
    if adapter is not None:
        given = inspect_output(adapter)
        if given.kind == "classifier":
            return load_classifier(given.path)
        adapter = given.expect("adapter", "--adapter").path
    if model is None:
        model = base_of(adapter) if adapter is not None else DEFAULT_MODEL
    loaded, tokenizer = load_model(model)
    if adapter is not None:
        loaded, tokenizer = apply_adapter(loaded, tokenizer, adapter)
    return loaded.eval(), tokenizer


def merge(
    base: str | None,
    adapter: str | os.PathLike,
    out: str | os.PathLike,
    *,
    overwrite: bool = False,
) -> Path:
    """Fold the adapter folder into its base and write a plain HF folder (a classifier folder
    with the head for SEQ_CLS adapters). The base defaults to the adapter's own."""
    given = inspect_output(adapter)
    if given.kind != "classifier" or given.base is None:  # a LoRA classifier's adapter merges too
        given.expect("adapter", "--adapter")
    adapter = given.path
    base = base or base_of(adapter)
    target = Path(out)
    inputs = [p for p in (base, adapter) if Path(p).exists()]
    # Refuse before the (slow) load; the savers check again and write atomically.
    check_target(target, overwrite=overwrite, inputs=inputs)
    model, tokenizer = load_model(base)
    tokenizer = adapter_tokenizer(adapter, tokenizer)
    if read_adapter_config(adapter).get("task_type") != "SEQ_CLS":
        load_adapter(model, adapter)
        merged = merge_lora(model)
        return save_model(
            merged, tokenizer, target, overwrite=overwrite, inputs=inputs, base_model=base
        )
    names = adapter_labels(adapter)
    clf = load_adapter(SequenceClassifier(model, len(names), names), adapter)
    clf.body = merge_lora(clf.body)
    return save_classifier(clf, target, tokenizer, overwrite=overwrite, inputs=inputs)


def push_folder(path: str | os.PathLike) -> Path:
    """What `nanotune push` uploads: a run's `final/`, or a folder that is itself an output; a
    GGUF file goes up in a folder of its own with a model card (`gguf_card`)."""
    given = inspect_output(path)
    if given.kind == "name":
        raise NanotuneError(
            f"{path}: no such file or folder; pass a run's output_dir, its final/ folder, a "
            "model or adapter folder, or a .gguf file"
        )
    if given.kind == "unknown":
        raise NanotuneError(
            f"{path}: neither a run directory with final/ nor an adapter or model folder "
            f"({CONFIG_FILE} or config.json) nor a .gguf file; pass the run's output_dir or "
            "its final/ folder"
        )
    return given.path


def check_push(repo_id: str, token: str | None = None) -> str:
    """The token a push to `repo_id` will use; refused (one line) offline or without one."""
    return hub.push_token(repo_id, token)


def push(
    path: str | os.PathLike, repo_id: str, *, private: bool = False, token: str | None = None
) -> str:
    """Upload a run's `final/` (or an output folder, or a GGUF file with a model card naming its
    base and quantization) to the Hub repository `repo_id`; its URL."""
    found = push_folder(path)
    if found.is_dir():
        return hub.upload(found, repo_id, private=private, token=token)
    hub.push_token(repo_id, token)  # refused offline or without a token, before any copy
    with tempfile.TemporaryDirectory(prefix="nanotune-push-") as tmp:
        folder = Path(tmp)
        os.symlink(found.resolve(), folder / found.name)
        (folder / CARD_FILE).write_text(gguf_card(found, repo_id), encoding="utf-8")
        return hub.upload(folder, repo_id, private=private, token=token)


def push_command(c: PushCommand) -> int:
    print(f"pushed to {push(c.run_dir, c.repo_id, private=c.private, token=c.token)}")
    return 0


def merge_command(c: MergeCommand) -> int:
    print(f"wrote {merge(c.model, c.adapter, c.out_dir, overwrite=c.overwrite)}")
    return 0
