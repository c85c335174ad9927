"""What fine-tuning and evaluation do alike between loading a model and running it: the model made
ready for the data's task, and the reward model its metrics need."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from nanotune.data import Datasets
from nanotune.errors import NanotuneError
from nanotune.eval.config import EvalConfig
from nanotune.methods import MethodConfig, SequenceClassifier
from nanotune.methods.classifier import REWARD_LABEL
from nanotune.training.dist import is_main


def prepare_model(
    model: nn.Module,
    tokenizer: Any,
    data: Datasets,
    *,
    seed: int,
    method: MethodConfig | None = None,
    reward: bool = False,
) -> nn.Module:
    """`model` (a loaded Transformer) ready for `data.task`: embedding rows for the tokens the
    data (or the config) added to `tokenizer`, and for classification a head over the labels.

    seed: the head's initial weights depend on it alone (the global RNG is left as it was), so
        the untrained head of a base model is the same in every evaluation and on every rank.
    method: the method that will train the model, for the note on embeddings it leaves untrained
        (None: the model is only evaluated); printed once, by rank 0.
    reward: preference data trains a reward model: a one-output head (the score) on the body.
    """
    added = tokenizer.vocab_size - model.config.vocab_size
    if added > 0:
        model.resize_token_embeddings(tokenizer.vocab_size)  # mean-initialised rows
        frozen = method is not None and method.name != "full" and not method.train_embeddings
        if frozen and is_main():
            print(
                f"note: {added} tokens were added but their embeddings stay at their initial "
                "value; set method.train_embeddings: true to learn them"
            )
    if data.task == "classification" or (data.task == "preference" and reward):
        names = data.label_names if data.task == "classification" else [REWARD_LABEL]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = SequenceClassifier(model, len(names), names)
    return model


def reward_model(cfg: EvalConfig) -> Any:
    """The reward model the `reward` metric scores with (None without that metric); loaded before
    anything slow, so a missing one fails first."""
    if "reward" not in cfg.metrics:
        return None
    from nanotune.eval import RewardModel

    return RewardModel(reward_model_folder(cfg.reward_model))


def reward_model_folder(name: str) -> str:
    """`eval.reward_model` as `RewardModel` loads it: a nanotune run directory stands for its
    final/, and a folder a packaged recipe writes but that is not there yet is refused naming
    the recipe to run first (else it would be looked up as a hub id)."""
    from nanotune.recipes import recipe_writing

    path = Path(name).expanduser()
    if not (path / "config.json").is_file() and (path / "final" / "config.json").is_file():
        return str(path / "final")
    if not path.exists() and (recipe := recipe_writing(path)):
        raise NanotuneError(
            f"eval.reward_model: {name} does not exist yet; it is the reward model the "
            f"{recipe} recipe trains: run `nanotune train {recipe}` first, in this directory"
        )
    return name
