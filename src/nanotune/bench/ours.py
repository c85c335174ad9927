"""The nanotune side, through the library's own code paths.

Model `nanotune.models.Transformer` (SmolLM2 through `nanotune.weights.load_model`), methods
`nanotune.methods.apply_method`, batches `nanotune.data`'s collate functions (what
`epoch_batches` returns), losses `nanotune.training.losses` and `.preference` (DPO against the
adapters-off base, as `finetune` wires it for LoRA), the trainer's optimizer (`build_optimizer`),
gradient clipping and precision (`autocast_for`), generation `nanotune.generate.generate_ids`
on the model `models.decoding.for_decoding` prepares for that precision.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from nanotune.bench.cases import Case, model_config, sizes
from nanotune.bench.workload import BETA, LR, Workload

MAX_GRAD_NORM = 1.0  # the trainer's default, and transformers Trainer's


def import_libraries(case: Case) -> None:
    """Import the stack before the memory baseline, so libraries are not counted as the case's."""
    import nanotune.data.batching  # noqa: F401
    import nanotune.generate  # noqa: F401
    import nanotune.methods  # noqa: F401
    import nanotune.training.preference  # noqa: F401
    import nanotune.training.trainer  # noqa: F401

    if case.method == "qlora":
        import torchao  # noqa: F401


def _model(case: Case, quick: bool, device: str, source: str | None):
    from nanotune.models import Transformer

    if case.model == "smollm2":
        from nanotune.weights import load_model

        model, _ = load_model(source, device=device)
        return model
    return Transformer(model_config(case, quick)).to(device)


def _method(case: Case, device: str):
    from nanotune.methods import MethodConfig

    if case.method == "last_n":
        return MethodConfig(name="last_n", last_n=1)
    if case.method == "full":
        return MethodConfig(name="full")
    targets = "all-linear" if case.targets == ("all-linear",) else list(case.targets)
    # float32 compute on every device, as on the peer side.
    return MethodConfig(
        name=case.method,
        r=case.r,
        alpha=2 * case.r,
        dropout=0.0,
        targets=targets,
        compute_dtype="float32",
    )


def _update(loss: torch.Tensor, scaler, opt, params: list) -> None:
    """The trainer's update: backward (through the loss scaler under float16, a GPU without
    native bf16; disabled otherwise), gradients unscaled then clipped, the optimizer step."""
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)


def _packed(examples: list[Any], pad: int, quick: bool) -> dict[str, torch.Tensor]:
    """The step's examples packed into rows, as `data.pack: true` batches them."""
    from nanotune.bench.cases import PACK_LENGTH
    from nanotune.data.batching import collate_lm, pack_examples

    lengths = [len(e.ids) for e in examples]
    max_length = max(max(lengths), PACK_LENGTH if not quick else 0)
    bins = pack_examples(lengths, range(len(examples)), max_length)
    return collate_lm([[examples[i] for i in b] for b in bins], pad, packed=True)


def _grpo(
    case: Case,
    quick: bool,
    device: str,
    items: list[Any],
    source: str | None,
    precision: str,
    model: Any,
    compiled: bool,
) -> Workload:
    """What `finetune` wires for `rl.algorithm: grpo` with LoRA: the engine over the live policy
    (`route_adapters=False`; compiled: `rl.compile: true`), `GRPOObjective` (dapo, beta 0, one
    update per generation), the trainer's optimizer, clipping and precision. A step samples G
    completions of each prompt (no stop token: exactly `grpo_new` tokens, as the peer's
    min_new_tokens), scores them and trains on them in one pass, as the trainer's step does."""
    from nanotune.bench.cases import GRPO_G, grpo_new
    from nanotune.decoding.engine import Engine
    from nanotune.methods import apply_method
    from nanotune.tokenizer import Tokenizer
    from nanotune.training.config import TrainConfig
    from nanotune.training.grpo import GRPOObjective, Prompt, Reward
    from nanotune.training.precision import grad_scaler_for
    from nanotune.training.trainer import autocast_for, build_optimizer

    tokenizer = Tokenizer.from_dir(source)  # the HF folder both sides load (suite.py)
    model = apply_method(model, _method(case, device)).to(device)
    autocast = autocast_for(TrainConfig(dtype=precision), torch.device(device))
    prompts = [
        Prompt(p, "", "", f"prompt {i}") for i, p in enumerate(x for it in items for x in it)
    ]
    engine = Engine(
        model,
        tokenizer,
        max_batch=256,
        prefix_cache_mb=0,
        route_adapters=False,
        compile=compiled,
    )
    objective = GRPOObjective(
        engine,
        prompts,
        [Reward("length", lambda completions, **_: [float(len(c)) for c in completions])],
        num_generations=GRPO_G,
        max_new_tokens=grpo_new(quick),
        loss_type="dapo",
        stop_token_ids=(),
        autocast=autocast,
    )
    model.train()
    opt = build_optimizer(model, TrainConfig(lr=LR, weight_decay=0.0))
    params = [p for g in opt.param_groups for p in g["params"]]
    scaler = grad_scaler_for(TrainConfig(dtype=precision), torch.device(device), params)
    inputs, first = [], 0
    for n, item in enumerate(items):
        inputs.append((n + 1, torch.arange(first, first + len(item))))
        first += len(item)

    def step(x: tuple[int, torch.Tensor]) -> None:
        batch, _ = objective.prepare(model, {"prompt_index": x[1]}, x[0])
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast():
            loss = objective.loss_sum(model, batch) / objective.count(batch)
        _update(loss, scaler, opt, params)

    return Workload(step, inputs)


def build(
    case: Case,
    quick: bool,
    device: str,
    items: list[Any],
    source: str | None,
    precision: str,
    compiled: bool = False,
) -> Workload:
    """The case's step as nanotune runs it; `compiled`: as `train.compile: true` runs training
    (each block's forward and backward through torch.compile, lengths as symbols) and
    `generate --compile` decodes (one graph per step, the cache's length a symbol) and, for
    grpo, as `rl.compile: true` samples."""
    from nanotune.data.batching import collate_class, collate_lm
    from nanotune.data.example import ClassExample, Example
    from nanotune.methods import SequenceClassifier, apply_method
    from nanotune.training.config import TrainConfig
    from nanotune.training.losses import ClassificationObjective, LMObjective
    from nanotune.training.precision import grad_scaler_for
    from nanotune.training.prefix import PrefixStore, available_memory
    from nanotune.training.trainer import autocast_for, build_optimizer

    cfg = model_config(case, quick)
    pad = cfg.eos_token_id if cfg.eos_token_id is not None else 0
    model = _model(case, quick, device, source)
    if case.kind == "generate":
        from nanotune.generate import GenerationConfig, generate_ids
        from nanotune.models.decoding import for_decoding

        # `--dtype` (int8 for the -int8 cases); compiled, bf16 weights are left plain
        model = for_decoding(model.eval(), precision, pack=not compiled)
        # No stop tokens: every row generates exactly max_new_tokens, as on the peer side.
        gen = GenerationConfig(
            max_new_tokens=sizes(quick).gen_new, stop_token_ids=(), compile=compiled
        )
        return Workload(lambda prompts: generate_ids(model, prompts, gen), items)

    if case.kind == "grpo":
        return _grpo(case, quick, device, items, source, precision, model, compiled)
    if case.kind == "dpo":
        from nanotune.data.batching import collate_preference
        from nanotune.data.example import PreferenceExample
        from nanotune.methods import adapters_disabled
        from nanotune.training.preference import PreferenceObjective

        # What finetune builds for LoRA DPO (jobs.reference.reference_context): the reference
        # policy is the model with its adapters switched off, so no second copy of the weights.
        objective = PreferenceObjective("dpo", beta=BETA, reference=adapters_disabled)
        batches = [
            collate_preference([PreferenceExample(p, c, r) for p, c, r in item], pad)
            for item in items
        ]
    elif case.kind == "classify":
        model = SequenceClassifier(model, 2)
        if case.epochs:  # as the trainer does for a whole run (train.frozen_prefix_cache)
            spill = Path(tempfile.gettempdir()) / f"nanotune-bench-prefix-{os.getpid()}.bin"
            prefix = PrefixStore(available_memory() // 4, spill)  # ~110 MiB: stays in RAM
        objective = ClassificationObjective()
        batches = [collate_class([ClassExample(ids, y) for ids, y in item], pad) for item in items]
    else:
        objective = LMObjective()
        if case.kind == "sft":
            examples = [[Example(p + a, [-100] * len(p) + a) for p, a in item] for item in items]
        else:
            examples = [[Example(r, list(r)) for r in item] for item in items]
        if case.pack:
            batches = [_packed(exs, pad, quick) for exs in examples]
        else:
            batches = [collate_lm([[e] for e in exs], pad, packed=False) for exs in examples]
    model = apply_method(model, _method(case, device)).to(device).train()
    if case.kind == "classify" and case.epochs:
        model.cache_frozen_prefix(prefix)
    if compiled:
        from nanotune.training.compiled import compile_targets

        for m in compile_targets(model):
            m.compile_blocks(True)
    batches = [
        {k: v.to(device) for k, v in b.items() if isinstance(v, torch.Tensor)} for b in batches
    ]
    opt = build_optimizer(model, TrainConfig(lr=LR, weight_decay=0.0))
    params = [p for g in opt.param_groups for p in g["params"]]
    autocast = autocast_for(TrainConfig(dtype=precision), torch.device(device))
    scaler = grad_scaler_for(TrainConfig(dtype=precision), torch.device(device), params)

    def step(batch: dict[str, torch.Tensor]) -> None:
        with autocast():  # the trainer's: the forward (the loss) under autocast, backward after
            loss = objective.loss_sum(model, batch) / objective.count(batch)
        _update(loss, scaler, opt, params)

    return Workload(step, batches)
