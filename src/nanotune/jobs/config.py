"""What each `nanotune` command takes, as dataclasses: the CLI's options are made from these
fields (type, default, the doc under each field as help), and the Python API builds the same
objects. A class's docstring is the command's help (first line) and description (the rest).

Field metadata the CLI reads (`cli.py`): `positional` (nargs: 1, "?" or "*"), `aliases`
(more flags), and `section`/`only` for a dict of values given for fields of a config section
(`eval --max-examples 50` is the override `eval.max_examples=50`). A field whose type is a
dataclass becomes an option group of its fields. Nothing here imports torch: building the
parser must stay light.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from nanotune.data.config import DataConfig
from nanotune.errors import NanotuneError
from nanotune.eval.config import EvalConfig
from nanotune.generate import GenerationConfig
from nanotune.models.decoding import DecodeDtype


def positional(nargs: int | str = 1, **kwargs: Any) -> Any:
    """A field the command line takes as a positional argument."""
    return field(metadata={"positional": nargs}, **kwargs)


def section(cls: type, only: list[str], aliases: dict[str, tuple[str, ...]] | None = None) -> Any:
    """A dict of the values given (by flag) for fields `only` of config section `cls`."""
    meta = {"section": cls, "only": only, "aliases": aliases or {}}
    return field(default_factory=dict, metadata=meta)


def _one_of(command: str, given: dict[str, Any], *, required: bool = True) -> None:
    """Refuse more than one of the options `given` (name -> value), or none when `required`."""
    flags = " or ".join("--" + k.replace("_", "-") for k in given)
    chosen = [k for k, v in given.items() if v is not None]
    if len(chosen) > 1 or (required and not chosen):
        raise NanotuneError(f"{command}: give {'exactly ' if required else ''}one of {flags}")


@dataclass
class GenerateCommand:
    """complete a prompt or answer one chat message

    Generate text from a prompt, or reply to one chat message through the chat template."""

    model: str | None = None
    """Preset name, local HF folder or .gguf file, hub id, or a run's final/ folder (default:
    the adapter's base model, else the embedded SmolLM2)."""
    adapter: str | None = None
    """PEFT/LoRA adapter folder to apply (a LoRA run's final/)."""
    prompt: str | None = None
    """Plain text to continue."""
    chat: str | None = None
    """A user message, sent through the model's chat template."""
    system: str | None = None
    """System message for --chat."""
    stream: bool = False
    """Print text as it is generated."""
    dtype: DecodeDtype = "float32"
    """Weights while decoding (models.decoding: bfloat16 where the CPU multiplies bf16
    natively, int8 a quarter of float32's bytes; float32 answers exactly as training computed)."""
    sampling: GenerationConfig = field(default_factory=GenerationConfig)
    """How tokens are picked and when to stop."""

    def __post_init__(self) -> None:
        _one_of("generate", {"prompt": self.prompt, "chat": self.chat})
        if self.system is not None and self.chat is None:
            raise NanotuneError("--system needs --chat (a plain --prompt has no roles)")


@dataclass
class ChatCommand:
    """interactive chat in the terminal

    Chat with a model; /reset clears the history, /exit quits."""

    model: str | None = None
    """Preset name, local HF folder or .gguf file, hub id, or a run's final/ folder (default:
    the adapter's base model, else the embedded SmolLM2)."""
    adapter: str | None = None
    """PEFT/LoRA adapter folder to apply (a LoRA run's final/)."""
    system: str | None = None
    """System message."""
    dtype: DecodeDtype = "float32"
    """Weights while decoding (as for generate)."""
    sampling: GenerationConfig = field(default_factory=GenerationConfig)
    """How tokens are picked and when to stop."""


@dataclass
class ModelsCommand:
    """list the model presets and whether each works offline"""


@dataclass
class ExportCommand:
    """write a model as a Hugging Face folder or a llama.cpp/Ollama GGUF file

    Write a model (preset, .gguf, folder, a run's final/, or a base with --adapter merged in)
    as an HF folder (config.json, model.safetensors, tokenizer files) or, with --format gguf,
    as one .gguf file for llama.cpp and Ollama (--ollama adds a Modelfile beside it);
    --format gguf-lora writes the --adapter alone as a llama.cpp GGUF LoRA adapter
    (llama-server --lora) for the base's GGUF."""

    out: str = positional()
    """Folder to create (hf) or .gguf file to write (gguf, gguf-lora)."""
    model: str | None = None
    """The model: preset, HF folder, .gguf, hub id or a run's final/ (default: the adapter's
    base model)."""
    adapter: str | None = None
    """PEFT/LoRA adapter folder: merged in (hf, gguf) or written alone (gguf-lora)."""
    format: Literal["hf", "gguf", "gguf-lora"] = "hf"
    """Output format."""
    quant: str | None = None
    """GGUF weight type (default: f16; an unknown one is refused with the list). As llama.cpp:
    norms, biases and GPT-2's position table stay f32; q8_0 keeps a matrix whose rows are not
    a multiple of 32 at f16; q4_0/q4_1 give the output head q8_0; the K-quants (q4_k_m, ...)
    are made by llama.cpp's quantizer (the `llama` extra), which picks each tensor's type."""
    ollama: bool = False
    """With --format gguf: also write an Ollama Modelfile beside OUT (FROM, TEMPLATE for
    ChatML chat templates, stop tokens, sampling defaults); then `ollama create NAME`."""
    overwrite: bool = False
    """Replace OUT if nanotune wrote it (hf: never a folder with other files); never an input."""

    def __post_init__(self) -> None:
        gguf = self.format in ("gguf", "gguf-lora")
        if self.quant is not None and not gguf:
            raise NanotuneError(
                "--quant applies to --format gguf only; drop it or add --format gguf"
            )
        if self.format == "gguf-lora" and self.quant not in (None, "f32"):
            raise NanotuneError(
                "--format gguf-lora writes f32 adapters (convert_lora_to_gguf's default); "
                "drop --quant"
            )
        if self.ollama and self.format != "gguf":
            raise NanotuneError(
                "--ollama writes a Modelfile beside a model GGUF: use it with --format gguf "
                "(for a LoRA run, that exports the model with the adapter merged in)"
            )


EVAL_DATA_FIELDS = ["format", "prompt_template", "separator", "completion_template"]
EVAL_FIELDS = ["metrics", "split", "max_examples", "batch_size", "max_new_tokens"]
EVAL_FIELDS += ["num_samples", "reward_model"]


@dataclass
class EvalCommand:
    """evaluate a model, or a base model and its fine-tune side by side

    Run the same evaluation on the base model and on the fine-tuned one (adapter or full
    folder) and print the metrics side by side with deltas."""

    overrides: list[str] = positional("*", default_factory=list)
    """Config values as KEY=VALUE, as for train: e.g. eval.max_examples=50."""
    model: str | None = None
    """The base model (default: the recipe's, else the embedded SmolLM2)."""
    adapter: str | None = None
    """PEFT/LoRA adapter folder over --model."""
    finetuned: str | None = None
    """Fine-tuned full model folder."""
    data: str | None = None
    """Data file, folder, builtin:<name> or hf:<id>; every row is evaluated."""
    recipe: str | None = None
    """Recipe YAML or packaged recipe: its model, data and eval sections (split included)."""
    column: tuple[str, ...] = ()
    """With --data: map a format field to a data column, FIELD=COLUMN (e.g. label=category)."""
    data_section: dict[str, Any] = section(DataConfig, EVAL_DATA_FIELDS)
    """The data section's fields (with --data)."""
    eval_section: dict[str, Any] = section(
        EvalConfig, EVAL_FIELDS, aliases={"num_samples": ("--samples",)}
    )
    """The eval section's fields: with --recipe they override it; with --data the defaults are
    as shown, except the split (train) and the metrics (the format's)."""
    report: str | None = None
    """Also write report.html into this folder."""

    def __post_init__(self) -> None:
        _one_of("eval", {"data": self.data, "recipe": self.recipe})
        _one_of("eval", {"adapter": self.adapter, "finetuned": self.finetuned}, required=False)
        if not all("=" in c for c in self.column):
            raise NanotuneError("--column takes FIELD=COLUMN, e.g. --column label=category")


@dataclass
class MergeCommand:
    """fold a LoRA/DoRA adapter into its base model and write an HF folder

    Load --model, apply the PEFT adapter folder --adapter, merge it into the base weights and
    write a plain Hugging Face folder (a classifier folder for SEQ_CLS)."""

    out_dir: str = positional()
    """Folder to create."""
    adapter: str | None = None
    """PEFT adapter folder (required)."""
    model: str | None = None
    """Base model: preset, HF folder, .gguf or hub id (default: the adapter's base model)."""
    overwrite: bool = False
    """Replace OUT_DIR if nanotune wrote it (never a folder with other files)."""

    def __post_init__(self) -> None:
        if self.adapter is None:
            raise NanotuneError("merge: give --adapter DIR (the PEFT adapter folder to fold in)")


@dataclass
class ClassifyCommand:
    """label texts with a fine-tuned classifier

    Print the predicted label of each text and the probability of every label: for one --text
    as a short list, otherwise one tab-separated line per text under a header."""

    model: str | None = None
    """A classifier run's final/ folder (required)."""
    text: tuple[str, ...] = ()
    """Text to classify (repeatable)."""
    file: str | None = None
    """Texts to classify: one per line, or a .jsonl file of objects with a text field."""

    def __post_init__(self) -> None:
        if self.model is None:
            raise NanotuneError("classify: give --model DIR (a classifier run's final/)")
        if not self.text and self.file is None:
            raise NanotuneError("classify: give --text TEXT (repeatable) or --file PATH")


@dataclass
class TrainCommand:
    """fine-tune a model from a YAML config or packaged recipe

    Fine-tune a model as a YAML config or packaged recipe says, with KEY=VALUE overrides (e.g.
    train.lr=1e-4 method.r=8); the run directory gets config.yaml, metrics.jsonl, checkpoints/
    and final/."""

    config: str | None = positional("?", default=None)
    """Config YAML file or packaged recipe name."""
    overrides: list[str] = positional("*", default_factory=list)
    """Config values as KEY=VALUE, e.g. train.lr=1e-4 method.r=8."""
    recipe: str | None = None
    """Packaged recipe (see `nanotune recipes`)."""
    resume: bool = False
    """Continue from the latest checkpoint."""
    overwrite: bool = False
    """Replace an existing run directory (only one nanotune wrote; the old run is kept until
    the new one has a checkpoint)."""
    print_config: bool = False
    """Print the resolved config (defaults included) as YAML and exit; loads no model."""
    dry_run: bool = False
    """Load the model and tokenizer, build the data, apply the method; print the data counts
    and trainable parameters and exit; writes nothing."""

    def __post_init__(self) -> None:
        if self.recipe:  # argparse hands the first KEY=VALUE to the optional positional
            self.overrides = [*filter(None, [self.config]), *self.overrides]
            self.config = self.recipe
        elif self.config is None:
            raise NanotuneError(
                "train: give a config YAML or --recipe NAME (see `nanotune recipes`)"
            )
        if self.print_config and self.dry_run:
            raise NanotuneError("train: give one of --print-config or --dry-run")


@dataclass
class RecipesCommand:
    """list the packaged recipes, or print one

    List the packaged recipes with a one-line description; with NAME, print its YAML (run it
    with `nanotune train --recipe NAME [KEY=VALUE ...]`)."""

    name: str | None = positional("?", default=None)
    """Recipe to print."""


@dataclass
class DemoCommand:
    """fine-tune the embedded SmolLM2 with LoRA offline, before/after report

    Run the packaged demo recipe: LoRA on SmolLM2-135M-Instruct learning to reverse word lists
    (a few minutes on a laptop CPU), evaluated before and after on held-out lists; prints the
    table and samples and writes report.html."""

    overrides: list[str] = positional("*", default_factory=list)
    """Recipe values as KEY=VALUE, e.g. train.max_steps=30."""
    output_dir: str | None = None
    """Run directory (default: a new runs/demo-<time>)."""
    overwrite: bool = False
    """Replace an existing --output-dir."""


@dataclass
class PushCommand:
    """upload a run's final/ (or an adapter, model folder or GGUF file) to the Hugging Face Hub"""

    run_dir: str = positional()
    """A run's output_dir, its final/ folder, a model or adapter folder, or a .gguf file."""
    repo_id: str = positional()
    """Hub repository, owner/name."""
    private: bool = False
    """Create the repository private."""
    token: str | None = None
    """Hub token (default: HF_TOKEN or the `hf auth login` one)."""
