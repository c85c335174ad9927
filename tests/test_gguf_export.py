"""`nanotune export --format gguf`: the file loads back (in nanotune and in transformers) to the
model it was written from, tokenizer included; bad requests are one line and write nothing."""

from __future__ import annotations

import copy
import json
import sys

import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader

from nanotune.cli import main
from nanotune.generate import GenerationConfig, generate_ids
from nanotune.weights import load_model
from nanotune.weights.gguf_export import export_gguf

TEXT = "Hello world, 12 + 34 = 46. <|im_start|>user\nhi<|im_end|>"


def export(source, out, *extra: str) -> None:
    assert main(["export", "--format", "gguf", "--model", str(source), *extra, str(out)]) == 0


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids)


def types(path) -> dict[str, GGMLQuantizationType]:
    return {t.name: t.tensor_type for t in GGUFReader(path).tensors}


@pytest.mark.slow
@pytest.mark.parametrize(("quant", "tol"), [("f32", 1e-4), ("f16", 1e-2), ("bf16", 5e-2)])
def test_tiny_gqa_llama_round_trips(tiny_llama_dir, tmp_path, quant, tol):
    source, tokenizer = load_model(tiny_llama_dir)
    out = tmp_path / "tiny.gguf"
    export(tiny_llama_dir, out, "--quant", quant)
    loaded, loaded_tokenizer = load_model(out)
    ids = torch.randint(
        0, source.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0)
    )
    assert (logits(loaded, ids) - logits(source, ids)).abs().max() < tol
    # GGUF stores the epsilon as float32, so it comes back as float32's nearest 1e-5.
    assert loaded.config.with_(norm_eps=source.config.norm_eps) == source.config
    assert loaded.config.norm_eps == pytest.approx(source.config.norm_eps, rel=1e-6)
    assert loaded_tokenizer.encode(TEXT) == tokenizer.encode(TEXT)
    assert loaded_tokenizer.chat_template == tokenizer.chat_template
    assert (loaded_tokenizer.bos_id, loaded_tokenizer.eos_id) == (
        tokenizer.bos_id,
        tokenizer.eos_id,
    )
    found = types(out)
    assert (
        found["output.weight"]
        == found["blk.0.attn_q.weight"]
        == GGMLQuantizationType[quant.upper()]
    )
    assert found["blk.0.attn_norm.weight"] == GGMLQuantizationType.F32  # norms always f32
    fields = GGUFReader(out).fields
    assert fields["general.architecture"].contents() == "llama"
    assert fields["general.name"].contents() == "tiny"
    assert fields["llama.attention.head_count_kv"].contents() == 2


@pytest.mark.slow
@pytest.mark.parametrize(("quant", "tol"), [("f32", 1e-4), ("f16", 1e-2)])
def test_tiny_gpt2_round_trips(tiny_gpt2_dir, tmp_path, quant, tol):
    source, tokenizer = load_model(tiny_gpt2_dir)
    out = tmp_path / "gpt2.gguf"
    export(tiny_gpt2_dir, out, "--quant", quant)
    loaded, loaded_tokenizer = load_model(out)
    ids = torch.randint(0, 50257, (2, 20), generator=torch.Generator().manual_seed(0))
    # Measured: f32 0.0 (bit-exact), f16 1.6e-3, on logits of about +-3.
    assert (logits(loaded, ids) - logits(source, ids)).abs().max() < tol
    assert loaded.config.with_(norm_eps=source.config.norm_eps) == source.config
    assert loaded_tokenizer.encode(TEXT) == tokenizer.encode(TEXT)
    assert loaded_tokenizer.eos_id == tokenizer.eos_id == 50256
    found = types(out)
    assert "output.weight" not in found  # tied: llama.cpp reuses token_embd
    assert found["blk.0.attn_qkv.weight"] == GGMLQuantizationType[quant.upper()]
    assert found["blk.0.attn_qkv.bias"] == found["blk.0.ffn_norm.bias"] == GGMLQuantizationType.F32
    assert found["position_embd.weight"] == GGMLQuantizationType.F32  # as llama.cpp keeps it
    fields = GGUFReader(out).fields
    assert fields["general.architecture"].contents() == "gpt2"
    assert {k: fields[f"gpt2.{k}"].contents() for k in ("context_length", "block_count")} == {
        "context_length": 128,
        "block_count": 2,
    }
    assert fields["gpt2.feed_forward_length"].contents() == 4 * 32
    assert fields["gpt2.attention.layer_norm_epsilon"].contents() == pytest.approx(1e-5)
    # llama.cpp's name for GPT-2's split; it refuses the 'gpt2' nanotune once wrote.
    assert fields["tokenizer.ggml.pre"].contents() == "gpt-2"


@pytest.mark.slow
@pytest.mark.parametrize(("quant", "tol"), [("f32", 1e-4), ("f16", 1e-2)])
def test_transformers_gguf_loader_reads_the_gpt2_export(tiny_gpt2_dir, tmp_path, quant, tol):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "gpt2.gguf"
    export(tiny_gpt2_dir, out, "--quant", quant)
    want = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir).eval()
    # transformers reads gpt2.context_length into n_ctx only, so n_positions (the position
    # table, which llama.cpp sizes by context_length) keeps its 1024 default unless told.
    got = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, n_positions=128)
    ids = torch.randint(0, 50257, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (got(ids).logits - want(ids).logits).abs().max() < tol


@pytest.mark.slow
def test_tied_embeddings_write_no_output_tensor(tiny_llama_tied_dir, tmp_path):
    source, _ = load_model(tiny_llama_tied_dir)
    out = tmp_path / "tied.gguf"
    export(tiny_llama_tied_dir, out, "--quant", "f32")
    assert "output.weight" not in types(out)
    loaded, _ = load_model(out)
    assert loaded.config.tie_embeddings
    ids = torch.arange(1, 30)[None]
    assert (logits(loaded, ids) - logits(source, ids)).abs().max() < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize(("quant", "tol"), [("f32", 1e-4), ("f16", 1e-2)])
def test_transformers_gguf_loader_reads_the_export(tiny_llama_dir, tmp_path, quant, tol):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "tiny.gguf"
    export(tiny_llama_dir, out, "--quant", quant)
    want = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    got = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name).eval()
    ids = torch.randint(0, 49152, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (got(ids).logits - want(ids).logits).abs().max() < tol


@pytest.mark.slow
def test_q8_0_keeps_rows_that_are_no_whole_block_at_f16(tiny_llama_factory, tmp_path):
    # hidden 48: attention and gate/up rows (48 values) are not a multiple of Q8_0's 32.
    folder = tiny_llama_factory(hidden_size=48, intermediate_size=64)
    out = tmp_path / "odd.gguf"
    export(folder, out, "--quant", "q8_0")
    found = types(out)
    assert found["blk.0.attn_q.weight"] == found["blk.0.ffn_up.weight"] == GGMLQuantizationType.F16
    assert found["blk.0.ffn_down.weight"] == GGMLQuantizationType.Q8_0  # rows of 64
    assert found["output_norm.weight"] == GGMLQuantizationType.F32
    source, _ = load_model(folder)
    loaded, _ = load_model(out)
    ids = torch.arange(1, 20)[None]
    assert (logits(loaded, ids) - logits(source, ids)).abs().max() < 0.05


def test_q4_0_refuses_rows_that_are_no_whole_block_naming_the_tensor(
    tiny_llama_factory, tmp_path, capsys
):
    folder = tiny_llama_factory(hidden_size=48, intermediate_size=64)
    capsys.readouterr()
    argv = ["export", "--format", "gguf", "--quant", "q4_0", "--model", str(folder)]
    assert main([*argv, str(tmp_path / "odd.gguf")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "tensor 'token_embd.weight' has rows of 48 values" in err and "--quant q8_0" in err
    assert list(tmp_path.iterdir()) == []  # refused before anything was written


@pytest.mark.slow
def test_a_chat_run_adapter_exports_merged_with_its_added_tokens(tiny_llama_dir, tmp_path, capsys):
    from nanotune.config import RunConfig
    from nanotune.jobs import artifacts
    from nanotune.jobs.finetune import train

    rows = [{"user": f"say {w}", "assistant": f"{w} {w}"} for w in "red green blue gold".split()]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows * 3))
    config = RunConfig.from_dict(
        {
            "model": {"name": str(tiny_llama_dir), "special_tokens": ["<tool>", "</tool>"]},
            "method": {"name": "lora", "r": 4, "alpha": 8, "train_embeddings": True},
            "data": {"source": str(tmp_path / "chat.jsonl"), "format": "chat"},
            "train": {"max_steps": 2, "micro_batch_size": 4, "lr": 1e-2},
            "output_dir": str(tmp_path / "run"),
        }
    )
    final = train(config, progress=False).final_dir
    tuned, tokenizer = artifacts.load(None, final)
    out = tmp_path / "tuned.gguf"
    assert (
        main(["export", "--format", "gguf", "--quant", "f32", "--adapter", str(final), str(out)])
        == 0
    )
    loaded, loaded_tokenizer = load_model(out)
    assert loaded_tokenizer.vocab_size == tokenizer.vocab_size == 49152 + 2
    assert loaded_tokenizer.special_tokens["<tool>"] == tokenizer.special_tokens["<tool>"]
    assert loaded_tokenizer.chat_template == tokenizer.chat_template
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "say <tool>red</tool>"}], True
    )
    assert loaded_tokenizer.encode(text) == tokenizer.encode(text)
    ids = torch.tensor([tokenizer.encode(text)])
    assert (logits(loaded, ids) - logits(tuned, ids)).abs().max() < 1e-4
    # The same run as a GGUF LoRA: llama.cpp adapters cannot add tokens, so only merged.
    capsys.readouterr()
    argv = ["export", "--format", "gguf-lora", "--adapter", str(final), str(tmp_path / "l.gguf")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "trains the embedding or adds tokens" in err
    assert "--format gguf --adapter" in err and not (tmp_path / "l.gguf").exists()


@pytest.mark.slow
def test_a_classifier_is_refused_in_one_line(tmp_path, tiny_llama_dir, capsys):
    from nanotune.methods import SequenceClassifier
    from nanotune.weights.classifier import save_classifier

    body, tokenizer = load_model(tiny_llama_dir)
    save_classifier(SequenceClassifier(body, 2, ["no", "yes"]), tmp_path / "clf", tokenizer)
    capsys.readouterr()
    argv = [
        "export",
        "--format",
        "gguf",
        "--model",
        str(tmp_path / "clf"),
        str(tmp_path / "c.gguf"),
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "a classifier" in err
    assert not (tmp_path / "c.gguf").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clf"]  # no temp file left either


@pytest.mark.slow
def test_an_existing_file_or_an_input_is_never_overwritten(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"mine")
    argv = ["export", "--format", "gguf", "--model", str(tiny_llama_dir), str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already exists" in err and "--overwrite" in err
    assert out.read_bytes() == b"mine"
    # --overwrite replaces only a GGUF nanotune wrote (its nanotune.version key says so).
    assert main([*argv, "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "refusing to overwrite a file nanotune did not write" in err
    assert out.read_bytes() == b"mine"
    out.unlink()
    assert main(argv) == 0
    assert main([*argv, "--quant", "f32", "--overwrite"]) == 0  # its own: replaced
    first = out.read_bytes()
    # Its own input, even with --overwrite: refused before anything is loaded or written.
    assert main(["export", "--format", "gguf", "--model", str(out), str(out), "--overwrite"]) == 2
    assert "refusing to overwrite the input" in capsys.readouterr().err
    assert out.read_bytes() == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]
    assert (
        main(["export", "--model", str(tiny_llama_dir), "--quant", "q8_0", str(tmp_path / "x")])
        == 2
    )
    assert "--format gguf" in capsys.readouterr().err


# --- the real SmolLM2 --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_ids(smollm2):
    _, tokenizer = smollm2
    text = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2+2?"}], True)
    return torch.tensor([tokenizer.encode(text)])


@pytest.mark.real_model
def test_smollm2_f32_export_is_exact(smollm2, smollm2_gguf, smollm2_ids, tmp_path):
    model, tokenizer = smollm2
    out = export_gguf(model, tokenizer, tmp_path / "s.gguf", quant="f32")
    loaded, loaded_tokenizer = load_model(out)
    assert torch.equal(logits(loaded, smollm2_ids), logits(model, smollm2_ids))
    # The vocabulary is the source file's, token for token (types and merges included).
    source, written = GGUFReader(smollm2_gguf).fields, GGUFReader(out).fields
    for key in ("pre", "tokens", "token_type", "merges", "bos_token_id", "eos_token_id"):
        assert (
            written[f"tokenizer.ggml.{key}"].contents()
            == source[f"tokenizer.ggml.{key}"].contents()
        )
    assert (
        written["tokenizer.chat_template"].contents()
        == source["tokenizer.chat_template"].contents()
    )
    assert written["llama.rope.freq_base"].contents() == source["llama.rope.freq_base"].contents()


@pytest.mark.real_model
def test_smollm2_pre_tokenizer_name_survives_a_saved_tokenizer(smollm2, tmp_path):
    from nanotune.tokenizer import Tokenizer

    # A run's final/ holds the tokenizer as tokenizer.json, whose plain GPT-2 split would say
    # 'gpt-2'; the GGUF's own 'smollm' (digits split one by one in llama.cpp) is kept instead.
    _, tokenizer = smollm2
    tokenizer.save(tmp_path)
    again = Tokenizer.from_dir(tmp_path)
    assert again.gguf_pre == "smollm"
    assert again.gguf_metadata(49152)["tokenizer.ggml.pre"] == "smollm"


@pytest.mark.real_model
def test_smollm2_f16_export_is_its_weights_rounded_to_f16(smollm2, smollm2_ids, tmp_path):
    model, tokenizer = smollm2
    out = export_gguf(model, tokenizer, tmp_path / "s.gguf", quant="f16")
    loaded, _ = load_model(out)
    # What f16 must give: every matrix rounded to f16, every 1-D tensor (norms) kept f32.
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for p in rounded.parameters():
            if p.ndim > 1:
                p.copy_(p.half().float())
    got = logits(loaded, smollm2_ids)
    assert (got - logits(rounded, smollm2_ids)).abs().max() < 1e-4
    # Against the f32 source the rounding shows, on logits of a few units to tens: measured 0.13.
    assert (got - logits(model, smollm2_ids)).abs().max() < 0.5


def greedy(model, tokenizer, prompt: list[int]) -> list[int]:
    """32 greedy tokens, not stopping at the end of the turn."""
    config = GenerationConfig(max_new_tokens=32, stop_token_ids=())
    return generate_ids(model, [prompt], config, tokenizer)[0]


def chat_prompt(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(
        tokenizer.apply_chat_template([{"role": "user", "content": text}], True)
    )


@pytest.mark.real_model
def test_smollm2_q8_0_export_greedy_decodes_the_same(smollm2, tmp_path):
    model, tokenizer = smollm2
    out = export_gguf(model, tokenizer, tmp_path / "s.gguf", quant="q8_0")
    assert out.stat().st_size < 160 * 2**20  # about 1 byte a weight (the f32 file is 514 MiB)
    loaded, _ = load_model(out)
    # Measured 32 of 32 for both. Greedy decoding splits where two tokens nearly tie: on "Write
    # a short story about a cat who learns to swim." it does at token 3, where the source's top
    # two logits are 0.005 apart (q8_0 moves logits by up to 1.4 on this model).
    for text in ("List three colors.", "What is 2+2?"):
        prompt = chat_prompt(tokenizer, text)
        assert greedy(loaded, tokenizer, prompt) == greedy(model, tokenizer, prompt)


@pytest.mark.real_model
def test_smollm2_q4_0_export_is_its_weights_rounded_to_q4_0(smollm2, tmp_path):
    import numpy as np
    from gguf.quants import dequantize, quantize

    model, tokenizer = smollm2
    out = export_gguf(model, tokenizer, tmp_path / "s.gguf", quant="q4_0")
    found = types(out)
    assert (
        found["blk.0.attn_q.weight"] == found["blk.29.ffn_down.weight"] == GGMLQuantizationType.Q4_0
    )
    assert found["token_embd.weight"] == GGMLQuantizationType.Q8_0  # the tied head: more bits
    assert out.stat().st_size < 100 * 2**20
    loaded, _ = load_model(out)
    # What q4_0 must give: every matrix through gguf's Q4_0 (its blocks run along rows, so
    # llama.cpp's Q/K row order does not change them), the tied embedding through Q8_0.
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in rounded.named_parameters():
            if p.ndim > 1:
                kind = (
                    GGMLQuantizationType.Q8_0 if name == "wte.weight" else GGMLQuantizationType.Q4_0
                )
                w = np.ascontiguousarray(p.numpy())
                p.copy_(torch.from_numpy(dequantize(quantize(w, kind), kind).reshape(w.shape)))
    prompt = chat_prompt(tokenizer, "List three colors.")
    want = greedy(model, tokenizer, prompt)
    ids = torch.tensor([prompt + want])
    got = logits(loaded, ids)
    assert (got - logits(rounded, ids)).abs().max() < 1e-4  # measured 0.0
    # Against the source (itself Q4_1) 4-bit rounding shows; the tolerance: the next token of the
    # source's greedy 32, teacher-forced, agrees at >= 22 of 32 positions (measured 25; 24 on
    # the cat story prompt). Free-running greedy text parts after 0-6 tokens.
    at = slice(len(prompt) - 1, len(prompt) - 1 + len(want))
    agree = (got[0, at].argmax(-1) == logits(model, ids)[0, at].argmax(-1)).sum().item()
    assert agree >= 22


@pytest.mark.real_model
def test_smollm2_q4_1_export_of_the_q4_1_source_is_byte_identical(smollm2, smollm2_gguf, tmp_path):
    # The source was quantized by llama.cpp's llama-quantize: gguf's Q4_1 quantizer, fed the
    # dequantized weights, gives back the very same blocks (and the Q8_0 tied embedding too).
    model, tokenizer = smollm2
    out = export_gguf(model, tokenizer, tmp_path / "s.gguf", quant="q4_1")
    source = {t.name: t for t in GGUFReader(smollm2_gguf).tensors}
    written = {t.name: t for t in GGUFReader(out).tensors}
    assert written.keys() == source.keys()
    for name, t in written.items():
        assert t.tensor_type == source[name].tensor_type, name
        assert t.data.tobytes() == source[name].data.tobytes(), name


@pytest.mark.real_model
def test_smollm2_with_a_trained_lora_exports_merged(smollm2_lora_run, tmp_path):
    from nanotune.jobs import artifacts
    from nanotune.methods.lora import merge

    tuned, tokenizer = artifacts.load(None, smollm2_lora_run)
    base, _ = artifacts.load("smollm2-135m-instruct", None)
    prompt = chat_prompt(tokenizer, "Reverse the words: stone tiger piano")
    assert greedy(tuned, tokenizer, prompt) != greedy(base, tokenizer, prompt)  # it was trained
    merged = merge(copy.deepcopy(tuned))
    for quant in ("f32", "q8_0"):
        out = tmp_path / f"tuned-{quant}.gguf"
        export(smollm2_lora_run, out, "--quant", quant)
        loaded, _ = load_model(out)
        if quant == "f32":
            ids = torch.tensor([prompt])
            assert (logits(loaded, ids) - logits(merged, ids)).abs().max() < 1e-4  # measured 0.0
            # Against the unmerged adapter, W + sBA rounds differently from Wx + sB(Ax): on logits
            # up to ~30, measured 2e-4 (float32's relative 1e-5).
            assert (logits(loaded, ids) - logits(tuned, ids)).abs().max() < 1e-3
        else:
            assert greedy(loaded, tokenizer, prompt) == greedy(tuned, tokenizer, prompt)


def test_k_quants_without_llama_cpp_are_refused_before_the_load(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp raises ImportError
    out = tmp_path / "m.gguf"
    # A model that does not exist: the refusal comes before any load would fail on it.
    argv = ["export", "--format", "gguf", "--quant", "q4_k_m", "--model", str(tmp_path / "none")]
    assert main([*argv, str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'nanotune[llama]'" in err
    assert list(tmp_path.iterdir()) == []
