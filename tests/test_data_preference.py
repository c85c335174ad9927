"""The preference format and its batches: the prompt once, responses supervised whole, bad pairs
counted or named by file and line."""

from __future__ import annotations

import json

import pytest
import torch

from nanotune.data import IGNORE, DataConfig, PreferenceExample, build_datasets, epoch_batches
from nanotune.data.batching import collate_preference
from nanotune.data.example import Row
from nanotune.data.formats import END_MARKER, chat_prompt_ids, format_preference
from nanotune.errors import NanotuneError
from nanotune.tokenizer import gpt2_tokenizer
from nanotune.weights.gguf import load_gguf_tokenizer

HH_PROMPT = "\n\nHuman: What is 2+2?\n\nAssistant: 4.\n\nHuman: And 3+3?\n\nAssistant:"


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_text_pair_encodes_the_prompt_once_and_ends_responses_in_eos():
    tok = gpt2_tokenizer()
    cfg = DataConfig(source="x", format="preference", separator="\nAnswer:")
    row = Row({"prompt": "Capital of France?", "chosen": " Paris", "rejected": " Rome"}, "p:1")
    ex = format_preference(row, tok, cfg)
    assert ex.prompt == tok.encode("Capital of France?\nAnswer:")
    assert ex.chosen == tok.encode(" Paris") + [tok.eos_id]
    assert ex.rejected == tok.encode(" Rome") + [tok.eos_id]
    assert ex.length == len(ex.prompt) + 2 and ex.ref_chosen is None


def test_hh_rlhf_transcripts_share_their_prompt_and_differ_in_the_last_reply(tmp_path):
    tok = gpt2_tokenizer()
    rows = [
        {"chosen": HH_PROMPT + " 6.", "rejected": HH_PROMPT + " 7, I think."},
        {
            "chosen": "\n\nHuman: Hi\n\nAssistant: Hello!",
            "rejected": "\n\nHuman: Hi\n\nAssistant: Go.",
        },
    ]
    cfg = DataConfig(source=write_jsonl(tmp_path / "hh.jsonl", rows), format="preference")
    data = build_datasets(cfg, tok)  # GPT-2 has no chat template: the markers are added
    assert data.task == "preference" and data.added_tokens == [
        "<|system|>",
        "<|user|>",
        "<|assistant|>",
        "<|end|>",
    ]
    ex = data.train[0]
    prompt = tok.decode(ex.prompt)
    # The earlier turns (the first reply too) are prompt; only the last replies are responses.
    assert prompt == (
        "<|user|>\nWhat is 2+2?<|end|>\n<|assistant|>\n4.<|end|>\n"
        "<|user|>\nAnd 3+3?<|end|>\n<|assistant|>\n"
    )
    assert tok.decode(ex.chosen) == f"6.{END_MARKER}"
    assert tok.decode(ex.rejected) == f"7, I think.{END_MARKER}"
    messages = [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And 3+3?"},
    ]
    assert ex.prompt == chat_prompt_ids(messages, tok, cfg)  # as generation renders it
    assert tok.chat_template  # the markers template travels with the tokenizer


@pytest.mark.slow
def test_messages_pairs_render_with_the_models_template(smollm2_gguf):
    tok = load_gguf_tokenizer(smollm2_gguf)
    cfg = DataConfig(source="x", format="preference")
    prompt = [{"role": "user", "content": "Colour of the sky?"}]
    explicit = Row(
        {
            "prompt": prompt,
            "chosen": [{"role": "assistant", "content": "Blue."}],
            "rejected": [{"role": "assistant", "content": "Green."}],
        },
        "m:1",
    )
    implicit = Row(  # whole conversations, no prompt column: the shared turns are the prompt
        {
            "chosen": prompt + [{"role": "assistant", "content": "Blue."}],
            "rejected": prompt + [{"role": "assistant", "content": "Green."}],
        },
        "m:2",
    )
    text_response = Row({"prompt": prompt, "chosen": "Blue.", "rejected": "Green."}, "m:3")
    first = format_preference(explicit, tok, cfg)
    assert first.prompt == chat_prompt_ids(prompt, tok, cfg)
    assert tok.decode(first.chosen) == "Blue.<|im_end|>"
    assert tok.decode(first.rejected) == "Green.<|im_end|>"
    assert format_preference(implicit, tok, cfg) == first
    assert format_preference(text_response, tok, cfg) == first


BAD = [
    ({"prompt": "Q?", "chosen": " A", "rejected": " A"}, "same response"),
    ({"prompt": "Q?", "chosen": " A", "rejected": "  "}, "rejected response is empty"),
    (
        {
            "chosen": "\n\nHuman: Hi\n\nAssistant: Hello",
            "rejected": "\n\nHuman: Yo\n\nAssistant: Hey",
        },
        "differ before their last reply",
    ),
    (
        {"chosen": "\n\nHuman: Hi\n\nAssistant:", "rejected": "\n\nHuman: Hi\n\nAssistant: Hey"},
        "empty",
    ),
    ({"chosen": "just text", "rejected": "other text"}, "not an HH-RLHF transcript"),
    ({"prompt": "Q?", "chosen": " A"}, "missing column 'rejected'"),
]


@pytest.mark.slow
@pytest.mark.parametrize("row,message", BAD, ids=[m for _, m in BAD])
def test_bad_pairs_are_counted_skips_or_errors_naming_file_and_line(row, message, tmp_path):
    good = {"prompt": "Q?", "chosen": " yes", "rejected": " no"}
    source = write_jsonl(tmp_path / "pairs.jsonl", [good, row, good])
    skip = DataConfig(source=source, format="preference", on_bad_row="skip")
    data = build_datasets(skip, gpt2_tokenizer())
    assert len(data.train) == 2 and data.stats["train"]["skipped_bad_row"] == 1
    assert data.problems[0].startswith(f"{source}:2: ") and message in data.problems[0]
    assert "1 skipped bad row" in data.summary()
    with pytest.raises(NanotuneError, match=f"^{source}:2: .*{message}"):
        build_datasets(DataConfig(source=source, format="preference"), gpt2_tokenizer())


def test_long_pairs_drop_or_lose_prompt_tokens_never_response_tokens(tmp_path):
    tok = gpt2_tokenizer()
    row = Row(
        {"prompt": "one two three four five six", "chosen": " yes", "rejected": " no way"}, "p:1"
    )
    short = DataConfig(source="x", format="preference", max_length=6, truncate_prompt=True)
    ex = format_preference(row, tok, short)
    assert ex.length == 6 and ex.rejected == tok.encode(" no way") + [tok.eos_id]
    assert ex.prompt == tok.encode("one two three four five six")[-3:]
    source = write_jsonl(tmp_path / "long.jsonl", [dict(row), {**row, "prompt": "Q"}])
    data = build_datasets(DataConfig(source=source, format="preference", max_length=6), tok)
    assert len(data.train) == 1 and data.stats["train"]["dropped_too_long"] == 1
    with pytest.raises(NanotuneError, match="pack"):
        DataConfig(source="x", format="preference", pack=True)


def test_batch_holds_a_row_per_pair_with_the_prompt_once_and_targets_only_responses():
    pairs = [
        PreferenceExample([5, 6, 7], [8, 9, 0], [10]),
        PreferenceExample([1], [2, 3], [4, 4, 4, 4], ref_chosen=-1.5, ref_rejected=-2.0),
    ]
    batch = collate_preference(pairs, pad_id=99)
    ids, targets = batch["input_ids"], batch["targets"]
    assert ids.shape == batch["positions"].shape == batch["branch_ids"].shape == (2, 7)
    assert targets.shape == (2, 2, 7)
    assert ids[0].tolist() == [5, 6, 7, 8, 9, 0, 10] and ids[1].tolist() == [1, 2, 3, 4, 4, 4, 4]
    # Both responses continue the prompt: positions restart where it ends; pads are branch 0.
    assert batch["positions"][0].tolist() == [0, 1, 2, 3, 4, 5, 3]
    assert batch["branch_ids"][0].tolist() == [0, 0, 0, 1, 1, 1, 2]
    assert batch["branch_ids"][1].tolist() == [0, 1, 1, 2, 2, 2, 2]
    assert batch["ends"].tolist() == [[6, 7], [3, 7]] and batch["lengths"].tolist() == [7, 7]
    for b, ex in enumerate(pairs):
        for j, response in enumerate((ex.chosen, ex.rejected)):
            row = targets[b, j]
            assert row[row != IGNORE].tolist() == response
            # Each target is the next token of its own branch: the prompt's last token, then
            # the branch's own tokens (never the other response's).
            pos = (row != IGNORE).nonzero().squeeze(1).tolist()
            p = len(ex.prompt)
            own = [p - 1] + [t for t in range(p, 7) if batch["branch_ids"][b, t] == j + 1][:-1]
            assert pos == own
    assert "ref_logps" not in batch  # only when every pair carries them
    assert batch["n_supervised"] == 3 + 1 + 2 + 4 and batch["n_computed"] == 14
    assert batch["n_real"] == 7 + 7
    pairs[0].ref_chosen, pairs[0].ref_rejected = -3.0, -4.0
    ref = collate_preference(pairs, pad_id=99)["ref_logps"]
    assert torch.equal(ref, torch.tensor([[-3.0, -4.0], [-1.5, -2.0]]))


def test_epoch_batches_of_pairs_cover_every_pair_once():
    pairs = [
        PreferenceExample([1] * (i % 5 + 1), [2] * (i % 3 + 1), [3] * (i % 4 + 1))
        for i in range(23)
    ]
    batches = epoch_batches(
        pairs, 4, seed=0, epoch=0, task="preference", pad_id=0, group_by_length=True
    )
    assert sum(b["n_examples"] for b in batches) == 23
    assert sum(b["n_supervised"] for b in batches) == sum(
        len(p.chosen) + len(p.rejected) for p in pairs
    )
    again = epoch_batches(
        pairs, 4, seed=0, epoch=0, task="preference", pad_id=0, group_by_length=True
    )
    assert all(
        torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(batches, again, strict=True)
    )
