"""What a run leaves for the ecosystem: base model ids transformers/PEFT resolve, the model card,
`nanotune push`, and the experiment trackers of train.report_to."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from nanotune.cli import main
from nanotune.config import RunConfig
from nanotune.errors import NanotuneError
from nanotune.jobs import artifacts
from nanotune.jobs.card import model_card
from nanotune.jobs.finetune import train
from nanotune.models.config import PRESETS
from nanotune.training.config import TrainConfig
from nanotune.weights.resolve import find_preset, hub_id_of

ROWS = [{"prompt": f"say {w}", "completion": f" {w} {w}"} for w in "red green blue gold".split()]


def _data(tmp_path: Path) -> Path:
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS * 2))
    return path


def _config(tmp_path: Path, model: str, method: str = "lora", **train) -> RunConfig:
    data = _data(tmp_path)
    return RunConfig.from_dict(
        {
            "model": model,
            "method": {"name": method, "r": 2, "alpha": 4},
            "data": {"source": str(data), "val_source": str(data), "max_length": 32},
            "train": {"max_steps": 1, "micro_batch_size": 4, **train},
            "output_dir": str(tmp_path / "run"),
        }
    )


def _card_header(folder: Path) -> dict:
    text = (folder / "README.md").read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


# --- base model ids -----------------------------------------------------------------------------


def test_hub_id_of_presets_paths_and_ids(tmp_path, monkeypatch):
    assert hub_id_of("smollm2") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert hub_id_of("gpt2") == "openai-community/gpt2"
    assert hub_id_of("distilgpt2") == "distilbert/distilgpt2"
    for preset in PRESETS.values():
        # Written as the hub id, read back as the same preset (SmolLM2: from its package, offline).
        assert find_preset(hub_id_of(preset.name)) is preset
    (tmp_path / "base").mkdir()
    monkeypatch.chdir(tmp_path)
    assert hub_id_of("base") == str(tmp_path.resolve() / "base")
    assert hub_id_of("someone/model") == "someone/model"


@pytest.mark.slow
def test_full_run_names_its_base_in_config_json(tmp_path, tiny_gpt2_dir):
    final = train(_config(tmp_path, str(tiny_gpt2_dir), "full"), progress=False).final_dir
    saved = json.loads((final / "config.json").read_text())
    assert saved["_name_or_path"] == str(tiny_gpt2_dir.resolve())
    header = _card_header(final)
    assert header["library_name"] == "transformers" and header["tags"] == ["nanotune", "full"]
    assert "base_model" not in header  # a local folder is no Hub id


# --- the model card ---------------------------------------------------------------------------


@pytest.mark.slow
def test_lora_run_writes_a_model_card_inside_final(tmp_path, tiny_gpt2_dir):
    result = train(_config(tmp_path, str(tiny_gpt2_dir)), progress=False)
    final = result.final_dir
    header = _card_header(final)
    assert header["library_name"] == "peft" and header["pipeline_tag"] == "text-generation"
    assert header["tags"] == ["nanotune", "lora"]
    card = (final / "README.md").read_text()
    assert str(tiny_gpt2_dir.resolve()) in card and "| `r` | `2` |" in card
    assert "| train | 8 | 8 |" in card  # data counts: rows, examples
    assert "| perplexity |" in card  # the before/after table
    marker = json.loads((final / ".nanotune").read_text())
    assert "README.md" in marker["owns"]  # written in the same atomic swap as the adapter


def test_model_card_header_for_a_preset_base():
    config = RunConfig.from_dict(
        {"model": "smollm2", "method": {"name": "qlora"}, "data": {"source": "hf:org/chats"}}
    ).to_dict()
    card = model_card(
        config,
        adapter=True,
        classifier=False,
        before={"perplexity": 9.0},
        after={"perplexity": 6.0},
    )
    header = yaml.safe_load(card.split("---\n")[1])
    assert header == {
        "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "library_name": "peft",
        "tags": ["nanotune", "qlora", "lora"],
        "pipeline_tag": "text-generation",
        "datasets": ["org/chats"],
    }
    assert "| perplexity | 9.0000 | 6.0000 | -3.0000 | better |" in card
    assert "| `quant` | `nf4` |" in card


# --- push -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_gpt2_dir) -> Path:
    """One LoRA run shared by the push tests (they only read it)."""
    tmp = tmp_path_factory.mktemp("push")
    return train(_config(tmp, str(tiny_gpt2_dir)), progress=False).run_dir


@pytest.mark.slow
def test_push_offline_is_one_clear_line(run_dir, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["push", str(run_dir), "me/my-lora", "--token", "t"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nanotune: error: cannot push to 'me/my-lora': HF_HUB_OFFLINE is set")
    assert err.count("\n") == 1


def test_push_without_a_token_is_one_clear_line(run_dir, monkeypatch, capsys):
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    assert main(["push", str(run_dir), "me/my-lora"]) == 2
    err = capsys.readouterr().err
    assert "no Hugging Face token; pass --token, set HF_TOKEN" in err and err.count("\n") == 1


@pytest.mark.slow
def test_one_resolver_says_what_every_kind_of_output_is(run_dir, tiny_gpt2_dir, tmp_path):
    """inspect_output, which load, merge, export, push and serve all ask: a run directory reads
    as its final/, an adapter names its base, a lone .gguf in a folder is that file."""
    inspect = artifacts.inspect_output
    final = run_dir / "final"
    for given in (run_dir, final):
        found = inspect(given)
        assert (found.kind, found.path) == ("adapter", final)
        assert found.base == artifacts.base_of(final)
    assert (inspect(tiny_gpt2_dir).kind, inspect(tiny_gpt2_dir).base) == ("model", None)
    (tmp_path / "clf").mkdir()
    (tmp_path / "clf" / "classifier.json").write_text("{}")
    assert inspect(tmp_path / "clf").kind == "classifier"
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "m.gguf").write_bytes(b"GGUF")
    assert (inspect(tmp_path / "g").kind, inspect(tmp_path / "g").path) == (
        "gguf",
        tmp_path / "g" / "m.gguf",
    )
    assert inspect("gpt2").kind == "name" and inspect(run_dir / "checkpoints").kind == "unknown"
    with pytest.raises(NanotuneError, match="not an adapter folder .* it is a model"):
        inspect(tiny_gpt2_dir).expect("adapter", "--adapter")
    # Every entrance takes a run directory for its final/: generate, merge, export, serve.
    assert main(["merge", "--adapter", str(run_dir), str(tmp_path / "merged")]) == 0
    assert inspect(tmp_path / "merged").kind == "model"


@pytest.fixture
def fake_hub(monkeypatch) -> dict:
    """huggingface_hub's HfApi replaced: what a push created and uploaded, file by file."""
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    calls = {}

    class FakeApi:
        def __init__(self, token=None):
            calls["token"] = token

        def create_repo(self, repo_id, **kw):
            calls["create"] = (repo_id, kw["private"])
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, *, repo_id, folder_path, ignore_patterns, **kw):
            # What the real upload_folder sends: the folder's files through the same filter.
            files = sorted(
                str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file()
            )
            calls["upload"] = (repo_id, folder_path)
            calls["files"] = sorted(filter_repo_objects(files, ignore_patterns=ignore_patterns))
            calls["texts"] = {
                f: (Path(folder_path) / f).read_bytes() for f in calls["files"] if "gguf" not in f
            }

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    return calls


def test_push_uploads_exactly_final_without_the_marker(run_dir, fake_hub, capsys):
    calls = fake_hub
    assert main(["push", str(run_dir), "me/my-lora", "--private", "--token", "tok"]) == 0
    assert "pushed to https://huggingface.co/me/my-lora" in capsys.readouterr().out
    final = run_dir / "final"
    assert calls["token"] == "tok" and calls["create"] == ("me/my-lora", True)
    assert calls["upload"] == ("me/my-lora", str(final))
    expected = sorted(p.name for p in final.iterdir() if p.name != ".nanotune")
    assert calls["files"] == expected
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(expected)
    # final/ itself is accepted too, and a folder that is no output is refused.
    assert main(["push", str(final), "me/my-lora", "--token", "tok"]) == 0
    with pytest.raises(NanotuneError, match="neither a run directory"):
        artifacts.push(run_dir / "checkpoints", "me/my-lora", token="tok")


@pytest.mark.slow
def test_push_a_gguf_file_or_a_folder_holding_one_with_a_model_card(
    run_dir, fake_hub, tmp_path, capsys
):
    """A GGUF goes up alone with a model card naming its base (recorded in the file by the
    export) and its weight type; the file itself is untouched and nothing is left behind."""
    folder = tmp_path / "gguf"
    folder.mkdir()
    gguf = folder / "tuned.gguf"
    assert main(["export", str(gguf), "--model", str(run_dir), "--format", "gguf"]) == 0
    for given in (gguf, folder):
        fake_hub.clear()
        assert main(["push", str(given), "me/tuned-gguf", "--token", "tok"]) == 0
        assert fake_hub["files"] == ["README.md", "tuned.gguf"]
        card = fake_hub["texts"]["README.md"].decode()
        base = artifacts.inspect_output(run_dir).base
        assert "| weight type | F16 |" in card and f"| base model | {base} |" in card
        assert "library_name: gguf" in card and "ollama run hf.co/me/tuned-gguf" in card
    assert sorted(p.name for p in folder.iterdir()) == ["tuned.gguf"]


def test_push_to_hub_without_a_token_is_refused_before_training(
    tmp_path, tiny_gpt2_dir, monkeypatch
):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    config = _config(tmp_path, str(tiny_gpt2_dir), push_to_hub="me/my-lora")
    with pytest.raises(NanotuneError, match="no Hugging Face token"):
        train(config, progress=False)
    assert not (tmp_path / "run").exists()


# --- trackers ---------------------------------------------------------------------------------


def test_a_tracker_that_is_not_installed_is_refused_in_the_config(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    with pytest.raises(
        NanotuneError, match="train.report_to: wandb is not installed; pip install wandb"
    ):
        TrainConfig(report_to=["wandb"])
    with pytest.raises(NanotuneError, match="report_to\\[0\\]: 'wandbb' is not one of"):
        RunConfig.from_dict({"train": {"report_to": ["wandbb"]}})


@pytest.fixture
def fake_trackers(monkeypatch) -> list[tuple[str, dict]]:
    """wandb, mlflow and trackio as modules that record their calls (no service offline)."""
    import importlib.machinery
    import sys
    import types

    calls: list[tuple[str, dict]] = []

    def module(name: str, **functions) -> None:
        fake = types.ModuleType(name)
        fake.__spec__ = importlib.machinery.ModuleSpec(name, None)  # find_spec finds it
        for key, fn in functions.items():
            setattr(fake, key, fn)
        monkeypatch.setitem(sys.modules, name, fake)

    def record(what: str, result=None):
        def call(*args, **kw):
            calls.append((what, {"args": args, **kw}))
            return result(**kw) if callable(result) else result

        return call

    run = types.SimpleNamespace
    module(
        "wandb",
        init=record(
            "wandb.init",
            lambda id, **_: run(
                id=id or "wb-1", log=record("wandb.log"), finish=record("wandb.finish")
            ),
        ),
    )
    module(
        "mlflow",
        set_experiment=record("mlflow.set_experiment"),
        start_run=record(
            "mlflow.start_run", lambda run_id=None, **_: run(info=run(run_id=run_id or "ml-1"))
        ),
        log_params=record("mlflow.log_params"),
        log_metrics=record("mlflow.log_metrics"),
        end_run=record("mlflow.end_run"),
    )
    module(
        "trackio",
        init=record("trackio.init"),
        log=record("trackio.log"),
        finish=record("trackio.finish"),
    )
    return calls


def _called(calls: list[tuple[str, dict]], what: str) -> list[dict]:
    return [kw for name, kw in calls if name == what]


def test_a_resumed_run_continues_its_tracker_runs_with_the_config_logged_once(
    tmp_path, fake_trackers, monkeypatch
):
    from nanotune.training.logger import RunLogger

    monkeypatch.setenv("WANDB_PROJECT", "from-env")
    hparams = {"train": {"lr": 0.001, "report_to": ["wandb"]}, "model": "gpt2"}
    trackers = ["wandb", "mlflow", "trackio"]
    log = RunLogger(tmp_path, 4, 0, False, trackers, hparams=hparams)
    log.log({"step": 1, "train_loss": 2.0})
    log.close()
    (wb,) = _called(fake_trackers, "wandb.init")
    assert wb["project"] == "from-env" and wb["config"] == hparams and wb["id"] is None
    assert _called(fake_trackers, "mlflow.log_params") == [
        {"args": ({"train.lr": 0.001, "train.report_to": ["wandb"], "model": "gpt2"},)}
    ]
    assert _called(fake_trackers, "trackio.init")[0]["config"] == hparams
    saved = json.loads((tmp_path / "trackers.json").read_text())
    assert saved == {"wandb": "wb-1", "mlflow": "ml-1", "trackio": tmp_path.name}

    fake_trackers.clear()
    log = RunLogger(tmp_path, 4, 2, False, trackers, project="mine", hparams=hparams)
    log.log({"step": 3, "train_loss": 1.5})
    log.close()
    (wb,) = _called(fake_trackers, "wandb.init")
    assert (wb["project"], wb["id"], wb["resume"]) == ("mine", "wb-1", "allow")
    assert _called(fake_trackers, "mlflow.set_experiment") == [{"args": ("mine",)}]
    assert _called(fake_trackers, "mlflow.start_run") == [{"args": (), "run_id": "ml-1"}]
    assert _called(fake_trackers, "mlflow.log_params") == []  # logged when the run began
    (tr,) = _called(fake_trackers, "trackio.init")
    assert (tr["project"], tr["name"], tr["resume"]) == ("mine", tmp_path.name, "allow")
    assert [kw["step"] for kw in _called(fake_trackers, "wandb.log")] == [3]
    assert json.loads((tmp_path / "trackers.json").read_text()) == saved


@pytest.mark.slow
def test_a_run_gives_the_trackers_its_resolved_config(
    tmp_path, tiny_gpt2_dir, fake_trackers, monkeypatch
):
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    config = _config(tmp_path, str(tiny_gpt2_dir), report_to=["wandb", "mlflow"], lr=1e-3)
    train(config, progress=False)
    (wb,) = _called(fake_trackers, "wandb.init")
    assert wb["project"] == "nanotune" and wb["config"] == config.to_dict()
    (params,) = _called(fake_trackers, "mlflow.log_params")
    assert params["args"][0]["train.lr"] == 1e-3 and params["args"][0]["method.r"] == 2
    assert _called(fake_trackers, "wandb.log") and _called(fake_trackers, "mlflow.log_metrics")


@pytest.mark.skipif(
    importlib.util.find_spec("wandb") is None or importlib.util.find_spec("mlflow") is None,
    reason="needs wandb and mlflow (the dev extra)",
)
@pytest.mark.slow
def test_a_resumed_run_continues_the_same_wandb_and_mlflow_runs(
    tmp_path, tiny_gpt2_dir, monkeypatch
):
    """The real trackers, offline: W&B in offline mode, MLflow on a local file store. A run
    killed after step 2 and resumed is one W&B run and one MLflow run, with the resolved config
    as hyperparameters and the loss at every step 1..4 (the steps after the checkpoint once)."""
    import shutil

    import mlflow
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    store = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # a local file store, as asked
    mlflow.set_tracking_uri(store)
    config = _config(
        tmp_path,
        str(tiny_gpt2_dir),
        report_to=["wandb", "mlflow"],
        max_steps=4,
        save_every=2,
        log_every=1,
        lr=1e-3,
    )
    import wandb

    opened, logged, real_init = [], [], wandb.init

    def init(**kw):  # the real run, its config read back as W&B holds it, its steps recorded
        run = real_init(**kw)
        opened.append((run.id, dict(run.config)))
        real_log = run.log

        def log(data, step=None, **more):
            logged.append((len(opened), step))
            return real_log(data, step=step, **more)

        run.log = log
        return run

    monkeypatch.setattr(wandb, "init", init)
    first = train(config, progress=False)
    ids = json.loads((first.run_dir / "trackers.json").read_text())
    # As if killed after the checkpoint at step 2: what came after it is gone.
    shutil.rmtree(first.run_dir / "checkpoints" / "step-4")
    train(config, resume=True, progress=False)
    assert json.loads((first.run_dir / "trackers.json").read_text()) == ids

    client = MlflowClient(store)
    (experiment,) = [e for e in client.search_experiments() if e.name == "nanotune"]
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_id == ids["mlflow"]
    assert run.data.params["train.lr"] == "0.001" and run.data.params["method.r"] == "2"
    history = client.get_metric_history(run.info.run_id, "loss")
    assert sorted({m.step for m in history}) == [1, 2, 3, 4]

    assert [run_id for run_id, _ in opened] == [ids["wandb"]] * 2
    # The resumed session logs to the same run from step 3 on (after its checkpoint at step 2).
    assert sorted({s for n, s in logged if n == 1}) == [1, 2, 3, 4]
    assert sorted({s for n, s in logged if n == 2}) == [3, 4]
    assert opened[0][1]["train"]["lr"] == 1e-3 and opened[0][1]["method"]["r"] == 2
    runs = sorted((first.run_dir / "wandb").glob("offline-run-*"))  # in the run directory
    assert len(runs) == 2 and {r.name.rsplit("-", 1)[1] for r in runs} == {ids["wandb"]}


def test_no_tracker_by_default(run_dir):
    assert (run_dir / "metrics.jsonl").is_file() and not (run_dir / "tensorboard").exists()


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="needs tensorboard")
def test_tensorboard_when_named_writes_event_files(tmp_path, tiny_gpt2_dir):
    config = _config(tmp_path, str(tiny_gpt2_dir), report_to=["tensorboard"])
    run = train(config, progress=False).run_dir
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))


def test_the_smollm2_hub_id_resolves_to_the_packaged_gguf(smollm2_gguf, monkeypatch):
    """What an adapter over the SmolLM2 preset records, nanotune loads offline from its package."""
    from nanotune.weights.resolve import resolve

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    found = resolve(hub_id_of("smollm2-135m-instruct"))
    assert found.kind == "package" and found.path == smollm2_gguf


@pytest.mark.real_model
def test_adapter_over_smollm2_loads_back_from_its_hub_id_offline(tmp_path, monkeypatch):
    from nanotune.methods import MethodConfig, apply_method, lora_layers
    from nanotune.models import Transformer
    from nanotune.tokenizer import gpt2_tokenizer
    from nanotune.weights.peft import save_adapter

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    shape = PRESETS["smollm2-135m-instruct"].config
    model = apply_method(Transformer(shape), MethodConfig(name="lora", r=2, targets=["q_proj"]))
    save_adapter(model, tmp_path / "adapter", "smollm2-135m-instruct")
    assert artifacts.base_of(tmp_path / "adapter") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    loaded, tokenizer = artifacts.load(adapter=tmp_path / "adapter")
    got = loaded.config
    assert (got.family, got.n_layer, got.n_embd) == ("llama", shape.n_layer, shape.n_embd)
    assert len(lora_layers(loaded)) == shape.n_layer
    assert tokenizer.vocab_size == shape.vocab_size != gpt2_tokenizer().vocab_size
