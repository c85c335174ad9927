"""The real client: llama.cpp (through llama-cpp-python, an optional extra built from its PyPI
source package) loads nanotune's GGUF exports of a fine-tuned SmolLM2, merged and as base +
GGUF LoRA adapter, and decodes greedily the tokens nanotune does. Skipped without llama_cpp."""

from __future__ import annotations

import pytest
import torch

from nanotune.cli import main
from nanotune.generate import GenerationConfig, generate_ids
from nanotune.jobs import artifacts

llama_cpp = pytest.importorskip("llama_cpp")

PROMPTS = ("Reverse the words: stone tiger piano", "What is 2+2?")
N = 32


def export(argv: list[str]) -> None:
    assert main(["export", *argv]) == 0


def llama(path, lora=None):
    kwargs = {"lora_path": str(lora)} if lora else {}
    # A float32 KV cache (GGML_TYPE_F32 = 0; llama.cpp's default is f16), so that llama.cpp
    # computes what nanotune does in float32 and the logits can be compared closely.
    f32 = {"type_k": 0, "type_v": 0}
    return llama_cpp.Llama(
        model_path=str(path),
        n_ctx=256,
        n_threads=2,
        logits_all=True,
        verbose=False,
        **f32,
        **kwargs,
    )


def llama_greedy(model, prompt: list[int]) -> tuple[list[int], torch.Tensor]:
    """N greedy tokens from llama.cpp's own logits (no sampler: argmax), and the first logits."""
    model.reset()
    model.eval(prompt)
    first = torch.tensor(model.scores[model.n_tokens - 1])
    out = []
    for _ in range(N):
        out.append(int(model.scores[model.n_tokens - 1].argmax()))
        model.eval([out[-1]])
    return out, first


@pytest.fixture(scope="module")
def exports(smollm2_lora_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("llama_cpp")
    base = "smollm2-135m-instruct"
    export(["--format", "gguf", "--quant", "f32", "--model", base, str(out / "base.gguf")])
    export(["--format", "gguf", "--quant", "f32", "--adapter", str(smollm2_lora_run),
            str(out / "merged.gguf")])  # fmt: skip
    export(["--format", "gguf-lora", "--adapter", str(smollm2_lora_run), str(out / "lora.gguf")])
    return out


@pytest.mark.real_model
def test_llama_cpp_decodes_the_merged_export_and_base_plus_gguf_lora_as_nanotune(
    smollm2_lora_run, exports
):
    tuned, tokenizer = artifacts.load(None, smollm2_lora_run)
    merged = llama(exports / "merged.gguf")
    adapted = llama(exports / "base.gguf", lora=exports / "lora.gguf")
    config = GenerationConfig(max_new_tokens=N, stop_token_ids=())
    for text in PROMPTS:
        chat = tokenizer.apply_chat_template([{"role": "user", "content": text}], True)
        prompt = tokenizer.encode(chat)
        # llama.cpp reads the exported vocabulary and pre-tokenizer to the same ids.
        assert merged.tokenize(chat.encode(), add_bos=False, special=True) == prompt
        want = generate_ids(tuned, [prompt], config, tokenizer)[0]
        with torch.no_grad():
            ours = tuned(torch.tensor([prompt]))[0, -1]
        for model in (merged, adapted):
            got, first = llama_greedy(model, prompt)
            assert got == want, (text, tokenizer.decode(got), tokenizer.decode(want))
            # Measured <= 7.5e-5 on logits up to ~30 (0.019 with llama.cpp's f16 KV cache).
            assert (first - ours).abs().max() < 1e-3


@pytest.mark.real_model
def test_the_gguf_lora_changes_what_llama_cpp_decodes(exports, smollm2_lora_run):
    _, tokenizer = artifacts.load(None, smollm2_lora_run)
    chat = tokenizer.apply_chat_template([{"role": "user", "content": PROMPTS[0]}], True)
    prompt = tokenizer.encode(chat)
    base, _ = llama_greedy(llama(exports / "base.gguf"), prompt)
    adapted, _ = llama_greedy(llama(exports / "base.gguf", lora=exports / "lora.gguf"), prompt)
    assert base != adapted
