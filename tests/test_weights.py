"""Weights in and out: HF folders, GGUF, name resolution, save round trips.

Parity is against transformers loading the same files (fp32, max abs logit diff <= 1e-4).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from nanotune.errors import NanotuneError
from nanotune.models.config import PRESETS
from nanotune.weights import load_model, resolve, save_model

TEXT = "Hello world! Fine-tuning small models: 3 tests, 2 cores, <|endoftext|> and more."
ATOL = 1e-4


def _hf_logits(path: Path, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs).eval()
    with torch.no_grad():
        return model(ids).logits


def _assert_parity(path: Path, ids: torch.Tensor | None = None) -> None:
    model, tokenizer = load_model(path)
    if ids is None:
        ids = torch.tensor([tokenizer.encode(TEXT)])
    with torch.no_grad():
        ours = model(ids)
    theirs = _hf_logits(path, ids)
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() <= ATOL


# --- parity with transformers on folders it wrote -------------------------------------------------


def test_gpt2_folder_parity(tiny_gpt2_dir):
    _assert_parity(tiny_gpt2_dir)


@pytest.mark.slow
def test_llama_gqa_untied_parity(tiny_llama_dir):
    model, _ = load_model(tiny_llama_dir)
    assert not model.config.tie_embeddings and model.config.kv_heads == 2
    _assert_parity(tiny_llama_dir)


@pytest.mark.slow
def test_llama_gqa_tied_parity(tiny_llama_tied_dir):
    model, _ = load_model(tiny_llama_tied_dir)
    assert model.lm_head.weight is model.wte.weight  # one tensor, so training keeps them tied
    _assert_parity(tiny_llama_tied_dir)


@pytest.mark.slow
def test_llama3_rope_scaling_parity(tiny_llama_factory):
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    }
    path = tiny_llama_factory(seed=3, rope_scaling=scaling, rope_theta=500000.0)
    model, _ = load_model(path)
    assert model.config.rope_scaling["rope_type"] == "llama3"
    # Positions well past original_max_position_embeddings, where the scaling matters.
    ids = torch.randint(0, 49152, (2, 100), generator=torch.Generator().manual_seed(0))
    _assert_parity(path, ids)


@pytest.mark.slow
def test_sharded_safetensors_parity(tiny_gpt2_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)
    ref.save_pretrained(tmp_path, max_shard_size="1MB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert not (tmp_path / "model.safetensors").exists()
    _assert_parity(tmp_path, torch.tensor([[464, 2068, 7586, 21831, 18045, 625, 262]]))


def test_pytorch_bin_parity(tiny_llama_dir, tmp_path):
    shutil.copy(tiny_llama_dir / "config.json", tmp_path / "config.json")
    shutil.copy(tiny_llama_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    torch.save(load_file(tiny_llama_dir / "model.safetensors"), tmp_path / "pytorch_model.bin")
    _assert_parity(tmp_path)


def test_dtype_and_tied_head(tiny_gpt2_dir):
    model, _ = load_model(tiny_gpt2_dir, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.lm_head.weight is model.wte.weight
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.slow
def test_gpt2_folder_without_tokenizer_uses_gpt2_bpe(tiny_gpt2_dir, tmp_path):
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_gpt2_dir / name, tmp_path / name)
    _, tokenizer = load_model(tmp_path)
    assert tokenizer.encode("Hello world") == [15496, 995]


@pytest.mark.real_model
def test_smollm2_gguf_parity_with_transformers(smollm2, smollm2_gguf, smollm2_tokenizer_dir):
    from transformers import AutoTokenizer

    model, tokenizer = smollm2
    hf_tok = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)  # transformers' GGUF reading
    chat = "<|im_start|>user\nHi there!<|im_end|>\n<|im_start|>assistant\n"
    for text in (TEXT, chat):
        assert tokenizer.encode(text) == hf_tok.encode(text, add_special_tokens=False)
    assert model.config.n_layer == 30 and model.config.kv_heads == 3
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    ids = torch.tensor([tokenizer.encode(TEXT)])
    with torch.no_grad():
        ours = model(ids)
    theirs = _hf_logits(smollm2_gguf.parent, ids, gguf_file=smollm2_gguf.name)
    assert (ours - theirs).abs().max().item() <= ATOL


# --- save_model round trips -----------------------------------------------------------------------


def _assert_round_trip(model, tokenizer, out: Path) -> None:
    from transformers import AutoTokenizer

    save_model(model, tokenizer, out)
    assert {"config.json", "model.safetensors", "generation_config.json"} <= {
        p.name for p in out.iterdir()
    }
    ids = torch.tensor([tokenizer.encode(TEXT)])
    with torch.no_grad():
        ours = model(ids)
    assert (ours - _hf_logits(out, ids)).abs().max().item() <= ATOL
    hf_tok = AutoTokenizer.from_pretrained(out)
    assert hf_tok.encode(TEXT, add_special_tokens=False) == tokenizer.encode(TEXT)
    # No leftover temporary folders beside the result.
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == []


@pytest.mark.slow
def test_save_round_trip_gpt2(tiny_gpt2_dir, tmp_path):
    model, tokenizer = load_model(tiny_gpt2_dir)
    out = tmp_path / "saved"
    _assert_round_trip(model, tokenizer, out)
    sd = load_file(out / "model.safetensors")
    assert "lm_head.weight" not in sd  # tied head stored once, as transformers does
    reloaded, _ = load_model(out)
    for (k, a), b in zip(model.state_dict().items(), reloaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


@pytest.mark.slow
def test_save_round_trip_untied_llama(tiny_llama_dir, tmp_path):
    model, tokenizer = load_model(tiny_llama_dir)
    _assert_round_trip(model, tokenizer, tmp_path / "saved")


@pytest.mark.real_model
def test_save_round_trip_smollm2(smollm2, tmp_path):
    model, tokenizer = smollm2
    _assert_round_trip(model, tokenizer, tmp_path / "smollm2")


@pytest.mark.slow
def test_save_refuses_non_empty_dir_and_leaves_it(tiny_gpt2_dir, tmp_path):
    model, tokenizer = load_model(tiny_gpt2_dir)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(NanotuneError, match="not empty"):
        save_model(model, tokenizer, out)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert (out / "notes.txt").read_text() == "keep me"
    # --overwrite replaces only what nanotune wrote: the user's file is never deleted.
    with pytest.raises(NanotuneError, match="did not write"):
        save_model(model, tokenizer, out, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    mine = tmp_path / "mine"
    save_model(model, tokenizer, mine)
    with pytest.raises(NanotuneError, match="not empty"):
        save_model(model, tokenizer, mine)
    save_model(model, tokenizer, mine, overwrite=True)
    assert (mine / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "out"]  # no temp leftovers


def test_save_refuses_unmerged_extra_weights(tiny_gpt2_dir, tmp_path):
    model, tokenizer = load_model(tiny_gpt2_dir)
    model.blocks[0].attn.lora_A = torch.nn.Parameter(torch.zeros(2, 32))
    with pytest.raises(NanotuneError, match="merge the adapters"):
        save_model(model, tokenizer, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


# --- resolution -----------------------------------------------------------------------------------


def test_resolve_presets_aliases_and_package(smollm2_gguf):
    gpt2 = resolve("gpt2")
    assert (gpt2.kind, gpt2.hub_id, gpt2.preset.name) == ("hub", "openai-community/gpt2", "gpt2")
    assert resolve("openai-community/gpt2").preset.name == "gpt2"
    assert resolve("GPT2-Medium").preset.name == "gpt2-medium"
    for name in ("smollm2", "smollm2-135m-instruct", "HuggingFaceTB/SmolLM2-135M-Instruct"):
        found = resolve(name)
        assert (found.kind, found.path, found.is_gguf) == ("package", smollm2_gguf, True)


def test_resolve_preset_without_package_falls_back_to_hub(monkeypatch):
    preset = PRESETS["smollm2-135m-instruct"]
    monkeypatch.setitem(
        PRESETS, preset.name, dataclasses.replace(preset, package="no_such_package_nanotune")
    )
    found = resolve("smollm2")
    assert (found.kind, found.hub_id) == ("hub", "HuggingFaceTB/SmolLM2-135M-Instruct")


def test_resolve_preset_before_local_path(tiny_gpt2_dir, tmp_path, monkeypatch):
    shutil.copytree(tiny_gpt2_dir, tmp_path / "gpt2")
    monkeypatch.chdir(tmp_path)
    assert resolve("gpt2").kind == "hub"  # a preset name always means the preset
    local = resolve("./gpt2")
    assert (local.kind, local.path) == ("path", Path("gpt2"))
    assert resolve(str(tiny_gpt2_dir)).path == tiny_gpt2_dir


def test_resolve_local_gguf_and_hub_id(smollm2_gguf):
    found = resolve(str(smollm2_gguf))
    assert (found.kind, found.is_gguf, found.preset) == ("path", True, None)
    hub = resolve("someone/some-model.v2")
    assert (hub.kind, hub.hub_id, hub.path) == ("hub", "someone/some-model.v2", None)


def test_unknown_name_suggests_presets():
    with pytest.raises(NanotuneError, match=r"unknown model 'gtp2'.*did you mean 'gpt2'"):
        resolve("gtp2")
    with pytest.raises(NanotuneError, match="smollm2"):
        resolve("smolm2")


def test_bad_local_paths(tmp_path):
    with pytest.raises(NanotuneError, match="does not exist"):
        resolve(str(tmp_path / "missing.gguf"))
    with pytest.raises(NanotuneError, match="has no config.json"):
        resolve(str(tmp_path))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(NanotuneError, match="not a .gguf"):
        resolve(str(tmp_path / "weights.bin"))


def _offline(monkeypatch, home: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)


def test_hub_id_offline_not_cached_fails_fast(monkeypatch, tmp_path):
    _offline(monkeypatch, tmp_path)
    start = time.monotonic()
    with pytest.raises(NanotuneError) as err:
        load_model("gpt2")
    message = str(err.value)
    assert (
        "model 'gpt2' is not in the local Hugging Face cache and the hub is unreachable" in message
    )
    assert "--model ./my-gpt2" in message and "\n" not in message
    with pytest.raises(
        NanotuneError, match="'someone/tiny' is not in the local Hugging Face cache"
    ):
        load_model("someone/tiny")
    assert time.monotonic() - start < 30  # a guard against retry loops, far above the real time


def test_hub_id_offline_served_from_cache(monkeypatch, tmp_path, tiny_gpt2_dir):
    _offline(monkeypatch, tmp_path)
    # The layout huggingface_hub writes: refs/main names the snapshot folder.
    repo = tmp_path / "hub" / "models--someone--tiny-gpt2"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    shutil.copytree(tiny_gpt2_dir, repo / "snapshots" / ("0" * 40))
    model, tokenizer = load_model("someone/tiny-gpt2")
    reference, _ = load_model(tiny_gpt2_dir)
    assert torch.equal(model.wte.weight, reference.wte.weight)
    assert tokenizer.encode("Hello world") == [15496, 995]


# --- broken files ---------------------------------------------------------------------------------


def _copy_without_weights(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors"))
    return dst


def test_missing_weights_file(tiny_gpt2_dir, tmp_path):
    d = _copy_without_weights(tiny_gpt2_dir, tmp_path / "m")
    with pytest.raises(NanotuneError, match="no weights in .*model.safetensors"):
        load_model(d)


def test_truncated_safetensors(tiny_gpt2_dir, tmp_path):
    d = _copy_without_weights(tiny_gpt2_dir, tmp_path / "m")
    data = (tiny_gpt2_dir / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(NanotuneError, match=r"model\.safetensors is truncated or corrupt"):
        load_model(d)


def test_corrupt_config_json(tiny_gpt2_dir, tmp_path):
    d = _copy_without_weights(tiny_gpt2_dir, tmp_path / "m")
    (d / "config.json").write_text('{"model_type": "gpt2",')
    with pytest.raises(NanotuneError, match=r"config\.json is not valid JSON"):
        load_model(d)


def test_truncated_pytorch_bin(tiny_gpt2_dir, tmp_path):
    d = _copy_without_weights(tiny_gpt2_dir, tmp_path / "m")
    torch.save(load_file(tiny_gpt2_dir / "model.safetensors"), d / "pytorch_model.bin")
    data = (d / "pytorch_model.bin").read_bytes()
    (d / "pytorch_model.bin").write_bytes(data[: len(data) // 3])
    with pytest.raises(NanotuneError, match=r"pytorch_model\.bin could not be read"):
        load_model(d)


def test_missing_tensor(tiny_llama_dir, tmp_path):
    d = _copy_without_weights(tiny_llama_dir, tmp_path / "m")
    sd = load_file(tiny_llama_dir / "model.safetensors")
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, d / "model.safetensors")
    with pytest.raises(NanotuneError, match="missing tensor 'layers.1.mlp.up_proj.weight'"):
        load_model(d)


def test_shard_listed_but_missing(tiny_gpt2_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir).save_pretrained(
        tmp_path, max_shard_size="1MB"
    )
    shard = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(NanotuneError, match=f"{shard.name} is missing"):
        load_model(tmp_path)


@pytest.mark.parametrize(
    "text, message",
    [
        ("[1, 2]", r"config\.json should hold a JSON object .*, not a JSON list"),
        ('{"model_type": "gpt2"}', r"config\.json: required key 'vocab_size' is missing"),
        (
            '{"model_type": "gpt2", "vocab_size": 50257, "n_layer": "2", '
            '"n_head": 4, "n_embd": 32}',
            r"config\.json: n_layer must be a positive integer, got '2'",
        ),
        (
            '{"model_type": "gpt2", "vocab_size": 50257, "n_layer": 2, "n_head": 0, "n_embd": 32}',
            r"config\.json: inconsistent or mistyped sizes",
        ),
        (
            '{"model_type": "gpt2", "vocab_size": 50257, "n_layer": 2, "n_head": 4, "n_embd": 32, '
            '"layer_norm_epsilon": NaN}',
            r"config\.json: norm_eps must be a positive finite number, got nan",
        ),
        (
            '{"model_type": "llama", "vocab_size": 64, "num_hidden_layers": 1, "hidden_size": 8, '
            '"num_attention_heads": 2, "intermediate_size": 16, "rope_scaling": "linear"}',
            r"config\.json: rope_scaling must be a mapping",
        ),
    ],
)
def test_config_json_of_the_wrong_shape(tiny_gpt2_dir, tmp_path, text, message):
    d = _copy_without_weights(tiny_gpt2_dir, tmp_path / "m")
    (d / "config.json").write_text(text)
    with pytest.raises(NanotuneError, match=message):
        load_model(d)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_naming_the_tensor(tiny_gpt2_dir, tmp_path, fmt, bad):
    d = _copy_without_weights(tiny_gpt2_dir, tmp_path / "m")
    sd = load_file(tiny_gpt2_dir / "model.safetensors")
    sd["transformer.h.1.mlp.c_fc.weight"][3, 5] = bad
    if fmt == "bin":
        torch.save(sd, d / "pytorch_model.bin")
    else:
        save_file(sd, d / "model.safetensors")
    kind = "NaN" if bad != bad else "inf"
    match = rf"{fmt}: tensor 'transformer.h.1.mlp.c_fc.weight' holds {kind} values"
    with pytest.raises(NanotuneError, match=match):
        load_model(d)


@pytest.mark.parametrize(
    "fixture, key", [("tiny_gpt2_dir", "n_layer"), ("tiny_llama_dir", "num_hidden_layers")]
)
def test_config_with_fewer_layers_than_the_weights_is_refused(request, tmp_path, fixture, key):
    src = request.getfixturevalue(fixture)
    d = tmp_path / "m"
    shutil.copytree(src, d)
    config = json.loads((d / "config.json").read_text())
    config[key] = 1
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(NanotuneError) as e:
        load_model(d)
    message = str(e.value)
    assert "have no place in the 1-layer" in message and "\n" not in message
    assert ("'h.1." if fixture == "tiny_gpt2_dir" else "'layers.1.") in message


def test_config_sizes_that_do_not_fit_the_weights(tiny_gpt2_dir, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(tiny_gpt2_dir, d)
    config = json.loads((d / "config.json").read_text())
    config["n_inner"] = 64  # the weights have 4 * 32 = 128
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        NanotuneError,
        match=r"blocks\.0\.mlp\.fc\.weight is \[128, 32\] where the config needs \[64, 32\]",
    ):
        load_model(d)


def test_broken_tokenizer_files_name_the_file(tiny_gpt2_dir, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(tiny_gpt2_dir, d)
    (d / "tokenizer_config.json").write_text('{"bos_token": ')
    with pytest.raises(NanotuneError, match=r"tokenizer_config\.json is not valid JSON .*line 1"):
        load_model(d)
    (d / "tokenizer_config.json").write_text('["not", "an", "object"]')
    with pytest.raises(NanotuneError, match=r"tokenizer_config\.json should hold a JSON object"):
        load_model(d)
    (d / "tokenizer_config.json").write_text("{}")
    (d / "chat_template.jinja").write_bytes(b"\xff\xfe{{ messages }}")
    with pytest.raises(NanotuneError, match=r"chat_template\.jinja is not UTF-8 text"):
        load_model(d)
    (d / "chat_template.jinja").unlink()
    (d / "tokenizer.json").write_text("{")
    with pytest.raises(NanotuneError, match=r"tokenizer\.json: not a valid tokenizer\.json"):
        load_model(d)


@pytest.mark.slow
def test_truncated_shard_names_the_shard(tiny_gpt2_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir).save_pretrained(
        tmp_path, max_shard_size="1MB"
    )
    shard = sorted(tmp_path.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(NanotuneError, match=rf"{shard.name} is truncated or corrupt"):
        load_model(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": ')
    with pytest.raises(NanotuneError, match=r"index\.json is not valid JSON"):
        load_model(tmp_path)


# llama.cpp names and tensor types of the tiny GGUF below: every supported type appears once.
GGUF_BLOCK = {
    "self_attn.q_proj": ("attn_q", "Q8_0"),
    "self_attn.k_proj": ("attn_k", "BF16"),
    "self_attn.v_proj": ("attn_v", "Q4_0"),
    "self_attn.o_proj": ("attn_output", "Q4_1"),
    "mlp.gate_proj": ("ffn_gate", "F16"),
    "mlp.up_proj": ("ffn_up", "F16"),
    "mlp.down_proj": ("ffn_down", "F32"),
    "input_layernorm": ("attn_norm", "F32"),
    "post_attention_layernorm": ("ffn_norm", "F32"),
}


def _llama_cpp_permute(w, n_head):
    """convert_hf_to_gguf's Q/K row order (interleaved rotary halves), as llama.cpp writes it."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _write_tiny_llama_gguf(
    path: Path, tensor_types: dict[str, str] | None = None, poison: str | None = None
) -> None:
    """A 2-layer untied Llama GGUF, written the way llama.cpp's converter does; `poison` names a
    tensor given a NaN."""
    import gguf
    import numpy as np
    from gguf.quants import quantize
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        rms_norm_eps=1e-5, initializer_range=0.1, tie_word_embeddings=False,
    )  # fmt: skip
    sd = {k: v.numpy() for k, v in LlamaForCausalLM(cfg).state_dict().items()}
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(64)
    w.add_embedding_length(32)
    w.add_block_count(2)
    w.add_feed_forward_length(64)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(8)
    w.add_vocab_size(256)  # transformers sizes its embedding from this, not the tensor

    def add(name: str, array, qtype: str) -> None:
        if name == poison:
            array = array.copy()
            array.flat[7] = np.nan
        q = gguf.GGMLQuantizationType[qtype]
        if q == gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, array)
        elif q == gguf.GGMLQuantizationType.Q8_1:  # gguf cannot quantize it either: zero bytes
            block, size = gguf.GGML_QUANT_SIZES[q]
            raw = np.zeros((array.shape[0], array.shape[1] // block * size), dtype=np.uint8)
            w.add_tensor(name, raw, raw_dtype=q)
        else:
            w.add_tensor(name, quantize(array, q), raw_dtype=q)

    add("token_embd.weight", sd.pop("model.embed_tokens.weight"), "Q8_0")
    add("output.weight", sd.pop("lm_head.weight"), "F16")
    add("output_norm.weight", sd.pop("model.norm.weight"), "F32")
    for key, array in sd.items():
        _, _, layer, *module, _ = key.split(".")
        short, qtype = GGUF_BLOCK[".".join(module)]
        if short == "attn_q":
            array = _llama_cpp_permute(array, 4)
        elif short == "attn_k":
            array = _llama_cpp_permute(array, 2)
        name = f"blk.{layer}.{short}.weight"
        add(name, array, (tensor_types or {}).get(name, qtype))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_tiny_gguf_all_types_parity_with_transformers(tmp_path):
    from nanotune.weights.gguf import load_gguf_model

    path = tmp_path / "tiny.gguf"
    _write_tiny_llama_gguf(path)
    model = load_gguf_model(path)
    assert not model.config.tie_embeddings and model.config.kv_heads == 2
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(ids)
    theirs = _hf_logits(tmp_path, ids, gguf_file=path.name)
    assert ours.std() > 0.3
    assert (ours - theirs).abs().max().item() <= ATOL


def test_gguf_unsupported_tensor_type(tmp_path):
    from nanotune.weights.gguf import load_gguf_model

    path = tmp_path / "q81.gguf"
    _write_tiny_llama_gguf(path, {"blk.1.ffn_up.weight": "Q8_1"})
    with pytest.raises(NanotuneError, match="'blk.1.ffn_up.weight' uses GGUF type Q8_1"):
        load_gguf_model(path)


def test_gguf_of_unsupported_architecture(tmp_path):
    import gguf
    import numpy as np

    path = tmp_path / "falcon.gguf"
    writer = gguf.GGUFWriter(str(path), "falcon")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(NanotuneError, match="GGUF architecture 'falcon' is not supported"):
        load_model(path)


def test_corrupt_gguf(tmp_path):
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"GGUF" + b"\x00" * 20)
    with pytest.raises(NanotuneError, match="broken.gguf"):
        load_model(path)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["blk.1.ffn_down.weight", "output.weight"])  # F32 and F16
def test_gguf_with_nan_is_refused_naming_the_tensor(tmp_path, name):
    from nanotune.weights.gguf import load_gguf_model

    path = tmp_path / "nan.gguf"
    _write_tiny_llama_gguf(path, poison=name)
    with pytest.raises(NanotuneError, match=rf"nan\.gguf: tensor '{name}' holds NaN values"):
        load_gguf_model(path)


def test_gguf_tensor_names_without_a_block_number_are_refused():
    from nanotune.weights.gguf import _hf_name

    assert _hf_name("blk.3.attn_q.weight") == "model.layers.3.self_attn.q_proj.weight"
    assert _hf_name("blk.x.attn_q.weight") is None and _hf_name("blk.weight") is None
