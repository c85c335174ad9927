"""PEFT adapter format: nanotune <-> peft interop on tiny random GPT-2 and Llama models."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import (
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
)

from nanotune.errors import NanotuneError
from nanotune.methods import MethodConfig, SequenceClassifier, apply_method, lora_layers, merge
from nanotune.models import Transformer
from nanotune.weights import convert
from nanotune.weights.peft import load_adapter, save_adapter

warnings.filterwarnings("ignore")
PAD = 0


def hf_model(family: str, num_labels: int | None = None, seed: int = 0, layers: int = 2):
    torch.manual_seed(seed)
    if family == "gpt2":
        cfg = GPT2Config(
            n_layer=layers,
            n_embd=64,
            n_head=4,
            vocab_size=96,
            n_positions=32,
            bos_token_id=1,
            eos_token_id=1,
            pad_token_id=PAD,
        )
        cls = GPT2ForSequenceClassification if num_labels else GPT2LMHeadModel
    else:
        cfg = LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=96,
            max_position_embeddings=32,
            tie_word_embeddings=False,
            bos_token_id=1,
            eos_token_id=1,
            pad_token_id=PAD,
        )
    if family == "llama":
        cls = LlamaForSequenceClassification if num_labels else LlamaForCausalLM
    if num_labels:
        cfg.num_labels = num_labels
    return cls(cfg).eval()


def nanotune_from(hf) -> Transformer:
    config = convert.config_from_hf(hf.config.to_dict())
    model = Transformer(config)
    sd = {k: v for k, v in hf.state_dict().items() if not k.startswith("score.")}
    if "lm_head.weight" not in sd:  # sequence classifiers have no LM head
        sd["lm_head.weight"] = sd.get("transformer.wte.weight", sd.get("model.embed_tokens.weight"))
    model.load_state_dict(convert.from_hf(sd, config), strict=False)
    return model.eval()


def nanotune_classifier_from(hf) -> SequenceClassifier:
    clf = SequenceClassifier(nanotune_from(hf), hf.config.num_labels)
    with torch.no_grad():
        clf.score.weight.copy_(hf.score.weight)
    return clf.eval()


IDS = torch.randint(1, 96, (3, 12), generator=torch.Generator().manual_seed(5))
LENGTHS = torch.tensor([12, 7, 3])


def padded_ids() -> torch.Tensor:
    ids = IDS.clone()
    for b, n in enumerate(LENGTHS.tolist()):
        ids[b, n:] = PAD
    return ids


def logits(model, clf: bool) -> torch.Tensor:
    with torch.no_grad():
        if isinstance(model, SequenceClassifier):
            return model(padded_ids(), LENGTHS)
        if clf:
            return model(input_ids=padded_ids()).logits
        out = model(IDS)
        return out if isinstance(out, torch.Tensor) else out.logits


def randomise(model, seed: int = 7) -> None:
    """B starts at zero (and DoRA's magnitude at |W|): perturb both so parity means something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
            elif "lora_magnitude" in n:
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g))


EXPORT_CASES = {
    "gpt2-whole-lora": ("gpt2", dict(targets=["c_attn", "c_proj", "c_fc"]), None),
    "gpt2-qv-lora": ("gpt2", dict(targets=["c_attn.q", "c_attn.v", "mlp.c_proj"]), None),
    "gpt2-qv-dora-rslora": (
        "gpt2",
        dict(targets=["c_attn.q", "c_attn.v"], dora=True, rslora=True),
        None,
    ),
    "gpt2-dora-cls": ("gpt2", dict(targets=["c_attn"], dora=True), 3),
    "llama-all-lora-rslora": ("llama", dict(targets="all-linear", rslora=True), None),
    "llama-qv-dora": ("llama", dict(targets=["q_proj", "v_proj", "gate_proj"], dora=True), None),
    "llama-cls": ("llama", dict(targets=["q_proj", "v_proj"]), 2),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(EXPORT_CASES))
def test_nanotune_adapter_loads_in_peft_with_same_logits(case, tmp_path):
    family, method, labels = EXPORT_CASES[case]
    hf = hf_model(family, labels)
    ref_hf = logits(hf, bool(labels))
    model = nanotune_classifier_from(hf) if labels else nanotune_from(hf)
    assert (logits(model, bool(labels)) - ref_hf).abs().max() < 1e-4  # bases agree before adapting
    apply_method(model, MethodConfig(name="lora", r=4, alpha=8, **method))
    randomise(model)
    model.eval()
    ours = logits(model, bool(labels))
    assert (ours - ref_hf).abs().max() > 1e-2  # the adapters change the output
    save_adapter(model, tmp_path, base_model="tiny")
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] == (family == "gpt2")
    assert cfg["task_type"] == ("SEQ_CLS" if labels else "CAUSAL_LM")
    peft_model = PeftModel.from_pretrained(hf, str(tmp_path)).eval()
    assert (logits(peft_model, bool(labels)) - ours).abs().max() < 1e-4
    # And back: a fresh nanotune model reading the folder gives the same logits.
    fresh = (
        nanotune_classifier_from(hf_model(family, labels))
        if labels
        else nanotune_from(hf_model(family))
    )
    load_adapter(fresh, tmp_path)
    assert (logits(fresh.eval(), bool(labels)) - ours).abs().max() < 1e-5


def test_qv_slices_are_stored_as_one_exact_c_attn_lora(tmp_path):
    model = nanotune_from(hf_model("gpt2"))
    apply_method(
        model,
        MethodConfig(name="lora", r=2, alpha=6, targets=["c_attn.q", "c_attn.v", "c_fc", "c_proj"]),
    )
    randomise(model)
    save_adapter(model, tmp_path, base_model="tiny")
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
    assert (cfg["r"], cfg["lora_alpha"]) == (2, 6)
    assert cfg["rank_pattern"]["transformer.h.0.attn.c_attn"] == 4
    assert cfg["alpha_pattern"]["transformer.h.0.attn.c_attn"] == pytest.approx(
        12.0
    )  # scale 3 kept
    from safetensors.torch import load_file

    t = load_file(str(tmp_path / "adapter_model.safetensors"))
    B = t["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"]
    assert B.shape == (192, 4)
    assert not B[64:128].any() and not B[:64, 2:].any() and not B[128:, :2].any()


PEFT_CASES = {
    "gpt2-conv1d-dora": (
        "gpt2",
        dict(target_modules=["c_attn", "c_proj"], fan_in_fan_out=True, use_dora=True),
        None,
    ),
    "gpt2-cls": (
        "gpt2",
        dict(target_modules=["c_attn"], fan_in_fan_out=True, task_type="SEQ_CLS"),
        3,
    ),
    "llama-rslora-patterns": (
        "llama",
        dict(
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"],
            use_rslora=True,
            rank_pattern={"k_proj": 2},
            alpha_pattern={"model.layers.1.self_attn.o_proj": 3},
        ),
        None,
    ),
    "llama-dora-mlp": (
        "llama",
        dict(target_modules=["gate_proj", "up_proj", "v_proj"], use_dora=True),
        None,
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_peft_adapter_loads_in_nanotune_with_same_logits(case, tmp_path):
    family, kwargs, labels = PEFT_CASES[case]
    hf = hf_model(family, labels)
    peft_model = get_peft_model(hf, LoraConfig(r=4, lora_alpha=8, **kwargs))
    randomise(peft_model)
    if labels:
        with torch.no_grad():
            peft_model.base_model.model.score.modules_to_save["default"].weight.normal_()
    peft_model.eval()
    ref = logits(peft_model, bool(labels))
    peft_model.save_pretrained(str(tmp_path))
    base = hf_model(family, labels)
    model = nanotune_classifier_from(base) if labels else nanotune_from(base)
    assert (logits(model, bool(labels)) - ref).abs().max() > 1e-2
    load_adapter(model, tmp_path)
    assert (logits(model.eval(), bool(labels)) - ref).abs().max() < 1e-4


def test_bad_adapters_raise(tmp_path):
    model = nanotune_from(hf_model("gpt2"))
    with pytest.raises(NanotuneError, match="adapter_config.json"):
        load_adapter(model, tmp_path / "missing")
    # An adapter for a wider model.
    big = GPT2LMHeadModel(
        GPT2Config(
            n_layer=2,
            n_embd=128,
            n_head=4,
            vocab_size=96,
            n_positions=32,
            bos_token_id=1,
            eos_token_id=1,
        )
    )
    get_peft_model(
        big, LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True)
    ).save_pretrained(str(tmp_path / "big"))
    with pytest.raises(NanotuneError, match="another base model"):
        load_adapter(model, tmp_path / "big")
    # An adapter on a module nanotune does not adapt (the LM head).
    hf = hf_model("gpt2")
    get_peft_model(
        hf, LoraConfig(r=2, target_modules=["c_attn", "lm_head"], fan_in_fan_out=True)
    ).save_pretrained(str(tmp_path / "head"))
    with pytest.raises(NanotuneError, match="lm_head"):
        load_adapter(nanotune_from(hf_model("gpt2")), tmp_path / "head")
    (tmp_path / "nosafe").mkdir()
    (tmp_path / "nosafe" / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    with pytest.raises(NanotuneError, match="adapter_model.safetensors"):
        load_adapter(model, tmp_path / "nosafe")
    with pytest.raises(NanotuneError, match="no LoRA adapters"):
        save_adapter(model, tmp_path / "out", base_model="tiny")
    assert not lora_layers(model)


def peft_adapter(path, r: int = 2, **lora) -> None:
    """A peft-made LoRA adapter (rank `r` on c_attn) of hf_model("gpt2") saved to `path`."""
    config = LoraConfig(r=r, target_modules=["c_attn"], fan_in_fan_out=True, **lora)
    get_peft_model(hf_model("gpt2"), config).save_pretrained(str(path))


def edit_config(path, **changes) -> None:
    cfg = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**cfg, **changes}))


def test_adapter_whose_config_rank_differs_from_its_tensors_is_refused(tmp_path):
    peft_adapter(tmp_path / "a", r=2)
    edit_config(tmp_path / "a", r=4)
    model = nanotune_from(hf_model("gpt2"))
    with pytest.raises(NanotuneError) as e:
        load_adapter(model, tmp_path / "a")
    message = str(e.value)
    assert (
        "a/adapter_model.safetensors: transformer.h.0.attn.c_attn has LoRA tensors of rank 2"
        in (message)
    )
    assert "adapter_config.json declares r=4" in message
    assert not lora_layers(model)  # checked before the model is touched
    # rank_pattern is what PEFT uses per module: a matching one makes the same folder load.
    edit_config(tmp_path / "a", rank_pattern={"c_attn": 2})
    load_adapter(model, tmp_path / "a")
    assert lora_layers(model)


@pytest.mark.parametrize(
    "damage, message",
    [
        ("truncate", r"adapter_model\.safetensors is truncated or corrupt"),
        ("list", r"adapter_config\.json should hold a JSON object .*not a JSON list"),
        ("json", r"adapter_config\.json is not valid JSON"),
        ("dropout", r"adapter_config\.json: lora_dropout must be a number in \[0, 1\), got 'x'"),
        ("alpha", r"adapter_config\.json: lora_alpha must be a finite number, got 'NaN'"),
        ("nan", r"adapter_model\.safetensors: tensor '.*c_attn\.lora_A\.weight' holds NaN"),
    ],
)
def test_broken_adapter_files_are_one_clear_error(tmp_path, damage, message):
    from safetensors.torch import load_file, save_file

    d = tmp_path / "a"
    peft_adapter(d)
    weights = d / "adapter_model.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "list":
        (d / "adapter_config.json").write_text("[]")
    elif damage == "json":
        (d / "adapter_config.json").write_text('{"peft_type": "LORA",')
    elif damage == "dropout":
        edit_config(d, lora_dropout="x")
    elif damage == "alpha":
        edit_config(d, lora_alpha="NaN")
    else:
        tensors = load_file(weights)
        next(t for k, t in tensors.items() if "lora_A" in k)[0, 0] = float("nan")
        save_file(tensors, weights)
    with pytest.raises(NanotuneError, match=message):
        load_adapter(nanotune_from(hf_model("gpt2")), d)


@pytest.mark.slow
def test_merge_cli_refuses_a_rank_mismatch_in_one_line(tmp_path, capsys):
    from nanotune.cli import main

    gpt2_folder(tmp_path / "base")
    get_peft_model(
        GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=32)),
        LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True),
    ).save_pretrained(str(tmp_path / "a"))
    edit_config(tmp_path / "a", r=8)
    argv = ["merge", "--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "a")]
    assert main([*argv, str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "rank 2 but adapter_config.json declares r=8" in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def gpt2_folder(path) -> tuple:
    """A tiny GPT-2 with the real 50,257-token BPE, saved as an HF folder."""
    from nanotune.tokenizer import gpt2_tokenizer
    from nanotune.weights import save_model

    hf = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=32))
    model, tok = nanotune_from(hf), gpt2_tokenizer()
    save_model(model, tok, path)
    return model, tok


@pytest.mark.slow
def test_merge_cli_writes_a_folder_with_the_adapted_logits(tmp_path):
    from nanotune.cli import main
    from nanotune.weights import load_model

    model, _ = gpt2_folder(tmp_path / "base")
    apply_method(
        model, MethodConfig(name="dora", r=4, alpha=8, targets=["c_attn.q", "c_attn.v", "c_fc"])
    )
    randomise(model)
    save_adapter(model, tmp_path / "adapter", base_model=str(tmp_path / "base"))
    ids = torch.randint(0, 50257, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model.eval()(ids)
    argv = [
        "merge",
        "--model",
        str(tmp_path / "base"),
        "--adapter",
        str(tmp_path / "adapter"),
        str(tmp_path / "out"),
    ]
    assert main(argv) == 0
    merged, _ = load_model(tmp_path / "out")
    assert not lora_layers(merged)
    with torch.no_grad():
        assert (merged(ids) - ref).abs().max() < 1e-5
    # A second merge into the same folder is refused rather than overwriting it.
    assert main(argv) == 2


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["adapter", "full"])
def test_classifier_save_load_and_classify_cli(fmt, tmp_path, capsys):
    from nanotune.classify import classify
    from nanotune.cli import main
    from nanotune.weights.classifier import load_classifier, save_classifier

    body, tok = gpt2_folder(tmp_path / "base")
    clf = SequenceClassifier(body, 3, ["neg", "neu", "pos"])
    apply_method(clf, MethodConfig(name="lora", r=4, alpha=8, targets=["c_attn", "c_proj"]))
    randomise(clf)
    with torch.no_grad():
        clf.score.weight.mul_(50)  # make the labels clearly apart
    clf.eval()
    base = str(tmp_path / "base") if fmt == "adapter" else None
    if fmt == "full":  # a LoRA classifier is saved as an adapter; merged, as a full folder
        with pytest.raises(NanotuneError, match="merge the adapters first"):
            save_classifier(clf, tmp_path / "clf", tok)
        clf.body = merge(clf.body)
    save_classifier(clf, tmp_path / "clf", tok, base_model=base)
    assert (
        tmp_path / "clf" / ("adapter_config.json" if fmt == "adapter" else "config.json")
    ).is_file()
    loaded, tok2 = load_classifier(tmp_path / "clf")
    assert loaded.label_names == ["neg", "neu", "pos"]
    text = "a tiny model reads this sentence"
    want, got = classify(clf, tok, text), classify(loaded, tok2, text)
    assert max(abs(want[k] - got[k]) for k in want) < 1e-5
    assert main(["classify", "--model", str(tmp_path / "clf"), "--text", text]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == max(want, key=want.get)
    assert out[1].startswith("  neg: ")
    if fmt == "adapter":  # merging a classifier adapter gives a full classifier folder
        assert (
            main(
                [
                    "merge",
                    "--model",
                    base,
                    "--adapter",
                    str(tmp_path / "clf"),
                    str(tmp_path / "merged"),
                ]
            )
            == 0
        )
        merged, _ = load_classifier(tmp_path / "merged")
        got = classify(merged, tok, text)
        assert max(abs(want[k] - got[k]) for k in want) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gpt2", "llama"])  # tied and untied LM head
def test_trained_embeddings_travel_in_the_adapter(family, tmp_path):
    model = nanotune_from(hf_model(family))
    model.resize_token_embeddings(100)  # four added tokens
    targets = ["c_attn"] if family == "gpt2" else ["q_proj", "v_proj"]
    apply_method(
        model, MethodConfig(name="lora", r=4, alpha=8, targets=targets, train_embeddings=True)
    )
    randomise(model)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        model.wte.weight.add_(torch.randn(model.wte.weight.shape, generator=g))
        if family == "llama":
            model.lm_head.weight.add_(torch.randn(model.lm_head.weight.shape, generator=g))
    ids = torch.randint(1, 100, (3, 12), generator=g)
    ids[:, 0] = 98  # an added token in every row
    with torch.no_grad():
        ours = model.eval()(ids)
    save_adapter(model, tmp_path, base_model="tiny")
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["modules_to_save"] == ["wte" if family == "gpt2" else "embed_tokens", "lm_head"]
    assert cfg.get("ensure_weight_tying", False) == (family == "gpt2")
    fresh = nanotune_from(hf_model(family))
    load_adapter(fresh, tmp_path)
    assert fresh.config.vocab_size == 100
    with torch.no_grad():
        assert torch.equal(fresh.eval()(ids), ours)
    hf = hf_model(family)
    hf.resize_token_embeddings(100)
    peft_model = PeftModel.from_pretrained(hf, str(tmp_path)).eval()
    with torch.no_grad():
        assert (peft_model(ids).logits - ours).abs().max() < 1e-4


def test_an_adapter_head_apart_from_a_tied_embedding_is_refused(tmp_path):
    hf = hf_model("gpt2")
    peft_model = get_peft_model(
        hf,
        LoraConfig(
            r=2, target_modules=["c_attn"], fan_in_fan_out=True, modules_to_save=["lm_head"]
        ),
    )
    with torch.no_grad():
        peft_model.base_model.model.lm_head.modules_to_save["default"].weight.add_(1.0)
    peft_model.save_pretrained(str(tmp_path))
    model = nanotune_from(hf_model("gpt2"))
    with pytest.raises(NanotuneError, match="ties the two"):
        load_adapter(model, tmp_path)
    assert not lora_layers(model)  # refused before touching the model


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_run_with_added_chat_markers_saves_an_adapter_peft_loads(method, tmp_path, tiny_gpt2_dir):
    from peft import AutoPeftModelForCausalLM

    from nanotune.cli import main
    from nanotune.config import RunConfig
    from nanotune.jobs.finetune import train
    from nanotune.tokenizer import Tokenizer
    from nanotune.weights import load_model

    rows = [{"user": f"say {w}", "assistant": f"{w} {w}"} for w in "red green blue gold".split()]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows * 3))
    config = RunConfig.from_dict(
        {
            "model": str(tiny_gpt2_dir),
            "method": {"name": method, "r": 4, "alpha": 8, "train_embeddings": True},
            "data": {"source": str(tmp_path / "chat.jsonl"), "format": "chat"},
            "train": {"max_steps": 2, "micro_batch_size": 4, "lr": 1e-2},
            "output_dir": str(tmp_path / "run"),
        }
    )
    final = train(config, progress=False).final_dir
    assert (final / "adapter_config.json").is_file() and not (final / "config.json").exists()
    # A local base is named by its absolute path: AutoPeftModelForCausalLM finds it from anywhere.
    saved = json.loads((final / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == str(tiny_gpt2_dir.resolve())
    tokenizer = Tokenizer.from_dir(final)
    assert tokenizer.vocab_size == 50257 + 4  # the chat markers
    text = tokenizer.apply_chat_template([{"role": "user", "content": "say red"}], True)
    assert text == "<|user|>\nsay red<|end|>\n<|assistant|>\n"  # the markers' template, saved
    ids = torch.tensor([tokenizer.encode(text)])
    base, _ = load_model(tiny_gpt2_dir)
    original = base.wte.weight.detach().clone()
    load_adapter(base, final)
    assert not torch.equal(base.wte.weight[:50257], original)  # the trained embedding
    with torch.no_grad():
        ours = base(ids)
    hf = AutoPeftModelForCausalLM.from_pretrained(str(final)).eval()  # resizes to the tokenizer
    with torch.no_grad():
        assert (hf(ids).logits - ours).abs().max() < 1e-4
    chat = ["generate", "--model", str(tiny_gpt2_dir), "--adapter", str(final), "--chat", "hi"]
    assert main([*chat, "--max-new-tokens", "2"]) == 0
    merge = ["merge", "--model", str(tiny_gpt2_dir), "--adapter", str(final)]
    assert main([*merge, str(tmp_path / "merged")]) == 0
    merged, merged_tokenizer = load_model(tmp_path / "merged")
    assert merged_tokenizer.vocab_size == tokenizer.vocab_size and merged_tokenizer.chat_template
    with torch.no_grad():
        assert (merged(ids) - ours).abs().max() < 1e-5


@pytest.mark.slow
def test_classifier_adapter_carries_trained_embeddings_and_added_tokens(tmp_path):
    from nanotune.weights.classifier import load_classifier, save_classifier

    body, tok = gpt2_folder(tmp_path / "base")
    tok.add_special_tokens(["<|sep|>"])
    body.resize_token_embeddings(tok.vocab_size)
    clf = SequenceClassifier(body, 2, ["no", "yes"])
    apply_method(clf, MethodConfig(name="lora", r=4, alpha=8, train_embeddings=True))
    randomise(clf)
    with torch.no_grad():
        body.wte.weight.add_(torch.randn(body.wte.weight.shape) * 0.5)
    ids = torch.tensor([tok.encode("is this<|sep|> right")])
    with torch.no_grad():
        ours = clf.eval()(ids, torch.tensor([ids.shape[1]]))
    save_classifier(clf, tmp_path / "clf", tok, base_model=str(tmp_path / "base"))
    cfg = json.loads((tmp_path / "clf" / "adapter_config.json").read_text())
    assert cfg["modules_to_save"] == ["score", "wte"]
    loaded, tok2 = load_classifier(tmp_path / "clf")
    assert tok2.encode("is this<|sep|> right") == ids[0].tolist()  # the adapter's tokenizer
    with torch.no_grad():
        assert torch.equal(loaded(ids, torch.tensor([ids.shape[1]])), ours)
    hf = GPT2ForSequenceClassification.from_pretrained(tmp_path / "base", num_labels=2)
    hf.resize_token_embeddings(tok.vocab_size)
    peft_model = PeftModel.from_pretrained(hf, str(tmp_path / "clf")).eval()
    with torch.no_grad():
        assert (peft_model(input_ids=ids).logits - ours).abs().max() < 1e-4


@pytest.mark.slow
def test_classify_batches_and_the_cli_takes_several_texts_and_files(tmp_path, capsys):
    from nanotune.classify import classify, classify_batch
    from nanotune.cli import main
    from nanotune.weights.classifier import save_classifier

    body, tok = gpt2_folder(tmp_path / "base")
    clf = SequenceClassifier(body, 3, ["neg", "neu", "pos"])
    apply_method(clf, MethodConfig(name="lora", r=4, alpha=8))
    randomise(clf)
    with torch.no_grad():
        clf.score.weight.mul_(50)
    clf.eval()
    save_classifier(clf, tmp_path / "clf", tok, base_model=str(tmp_path / "base"))
    texts = ["a tiny model reads this sentence", "WIN a FREE prize, text now", "ok", "so so"]
    want = [classify(clf, tok, t) for t in texts]
    for got, w in zip(classify_batch(clf, tok, texts, batch_size=3), want, strict=True):
        assert max(abs(got[k] - w[k]) for k in w) < 1e-5  # padding changes nothing

    def table(argv) -> list[list[str]]:
        assert main(["classify", "--model", str(tmp_path / "clf"), *argv]) == 0
        header, *rows = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
        assert header == ["label", "neg", "neu", "pos", "text"]
        return rows

    rows = table(["--text", texts[0], "--text", texts[1]])
    assert [r[0] for r in rows] == [max(w, key=w.get) for w in want[:2]]
    assert [float(p) for p in rows[1][1:4]] == pytest.approx(list(want[1].values()), abs=1e-4)
    assert rows[0][4] == texts[0]
    (tmp_path / "texts.txt").write_text(f"{texts[2]}\n\n{texts[3]}\r\n")
    assert [r[4] for r in table(["--file", str(tmp_path / "texts.txt")])] == texts[2:]
    lines = [json.dumps({"text": "two\nlines\u2028"}), "", json.dumps({"text": texts[2]})]
    (tmp_path / "texts.jsonl").write_text("\n".join(lines) + "\n")
    rows = table(["--file", str(tmp_path / "texts.jsonl"), "--text", texts[3]])
    assert [r[4] for r in rows] == [texts[3], "two lines", texts[2]]
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"label": 1}\n')
    assert (
        main(["classify", "--model", str(tmp_path / "clf"), "--file", str(tmp_path / "bad.jsonl")])
        == 2
    )
    assert "bad.jsonl:2" in capsys.readouterr().err
    assert main(["classify", "--model", str(tmp_path / "clf")]) == 2
    assert "--text" in capsys.readouterr().err


@pytest.mark.slow
def test_added_tokens_that_did_not_train_grow_as_in_training(tmp_path):
    from nanotune.weights import load_model

    model, tok = gpt2_folder(tmp_path / "base")
    tok.add_special_tokens(["<|x|>"])
    model.resize_token_embeddings(tok.vocab_size)  # the new row starts at the mean embedding
    apply_method(model, MethodConfig(name="lora", r=4, alpha=8))
    randomise(model)
    save_adapter(model, tmp_path / "adapter", base_model=str(tmp_path / "base"))
    tok.save(tmp_path / "adapter")
    ids = torch.tensor([tok.encode("a<|x|> b")])
    fresh, _ = load_model(tmp_path / "base")
    load_adapter(fresh, tmp_path / "adapter")  # grows to the adapter's tokenizer
    with torch.no_grad():
        assert torch.equal(fresh(ids), model.eval()(ids))


@pytest.mark.real_model
def test_smollm2_adapter_loads_in_peft_by_its_hub_id(smollm2, tmp_path, monkeypatch):
    """An adapter over the SmolLM2 preset names `HuggingFaceTB/SmolLM2-135M-Instruct`, and
    AutoPeftModelForCausalLM resolves that id through the Hugging Face cache, offline.

    The cache here holds nanotune's own export of the packaged (Q4_1-dequantized) weights, not
    the hub's files: the test proves the recorded id and the logits, not the hub's checkpoint.
    """
    import huggingface_hub
    from peft import AutoPeftModelForCausalLM

    from nanotune.models import Transformer
    from nanotune.weights import save_model

    base, tokenizer = smollm2
    model = Transformer(base.config)
    model.load_state_dict(base.state_dict())  # a copy: the session fixture stays untouched
    apply_method(model, MethodConfig(name="lora", r=4, targets=["q_proj", "v_proj", "down_proj"]))
    # Trained, not randomised: a few AdamW steps give the adapter the scale real runs have.
    batch = torch.tensor([tokenizer.encode("Paris is the capital of France.")])
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-3)
    for _ in range(4):
        logits = model(batch[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert any(p.abs().max() > 0 for n, p in model.named_parameters() if "lora_B" in n)
    save_adapter(model.eval(), tmp_path / "adapter", "smollm2-135m-instruct")
    hub_id = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())[
        "base_model_name_or_path"
    ]
    assert hub_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    # The layout huggingface_hub writes: refs/main names the snapshot folder.
    repo = tmp_path / "hub" / ("models--" + hub_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    save_model(base, tokenizer, repo / "snapshots" / ("0" * 40))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    hf = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "adapter")).eval()
    ids = torch.tensor([tokenizer.encode("The capital of France is")])
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
    # Logits up to ~30 through 30 layers, summed in another order (peft adds each LoRA product
    # apart): measured 0.6e-4 to 1.0e-4, so 1e-4 sat on the edge.
    assert (theirs - ours).abs().max() <= 3e-4
