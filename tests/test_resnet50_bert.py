"""The reference recipe `model=resnet50_bert` end to end through the real CLIs, from local files.

No package ships ResNet50 ImageNet or bert-base weights (DESIGN.md), so the files are written
here with RANDOM weights of the REAL architectures: torchvision's resnet50 state dict as a .pth,
and a bert-base-uncased-shaped folder (BertConfig() defaults: 12 layers, 768 hidden, 30522
tokens) with the bert-base-uncased vocabulary (the MiniLM package ships the same vocab.txt).
Then: train (2 steps, 64 px, batch 4), evaluate, serve (initialize, add-folder, search), and
check that what the recipe freezes stayed bit-identical to the files. Missing files exit 2 with
the WeightsUnavailableError message instead of training from random weights.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from data.fixtures import make_shapes_dataset
from tests.serving_fixtures import ServerProcess

REPO = Path(__file__).resolve().parents[1]
SMALL_RUN = ["model.image.image_size=64", "trainer.batch_size=4", "trainer.max_steps=2", "trainer.max_epochs=1",
             "trainer.warmup_steps=1", "trainer.num_workers=0", "trainer.num_threads=2", "data.split_fractions=[0.6,0.4,0.0]"]


def _cli(module: str, *args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """resnet50.pth, a bert-base-shaped folder and a 16-image captioned set."""
    from torchvision.models import resnet50
    from transformers import BertConfig, BertModel

    from training.pretrained import minilm_tokenizer

    root = tmp_path_factory.mktemp("resnet50_bert")
    torch.manual_seed(0)
    torch.save(resnet50(weights=None).state_dict(), root / "resnet50.pth")
    config = BertConfig()  # the bert-base-uncased shape
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (12, 768, 30522)
    bert_dir = root / "bert-base-uncased"
    BertModel(config, add_pooling_layer=False).save_pretrained(bert_dir)
    tokenizer = minilm_tokenizer()
    assert len(tokenizer) == config.vocab_size and tokenizer.do_lower_case  # the bert-base-uncased vocab
    tokenizer.save_pretrained(bert_dir)
    csv_path = make_shapes_dataset(root / "data", count=16, size=64, seed=0)
    return {"root": root, "resnet": root / "resnet50.pth", "bert": bert_dir, "csv": csv_path,
            "images": root / "data" / "images"}


@pytest.fixture(scope="module")
def run(files) -> Path:
    run_dir = files["root"] / "run"
    proc = _cli("training.train", "model=resnet50_bert", f"model.image.weights_path={files['resnet']}",
                f"model.text.name_or_path={files['bert']}", "data=captions_csv", f"data.csv={files['csv']}",
                *SMALL_RUN, f"trainer.cache_dir={files['root'] / 'cache'}", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("best", "last"):
        assert (run_dir / name / "model.safetensors").is_file() and (run_dir / name / "config.json").is_file(), name
    return run_dir


def test_checkpoint_keeps_the_recipe_and_the_bert_base_shape(run):
    config = json.loads((run / "best" / "config.json").read_text())
    assert config["model"]["name"] == "resnet50_bert" and config["model"]["text"]["pooling"] == "cls"
    assert (config["bert_config"]["num_hidden_layers"], config["bert_config"]["hidden_size"]) == (12, 768)
    assert config["preprocessing"]["image_size"] == 64
    assert config["preprocessing"]["mean"] == [0.485, 0.456, 0.406]  # torchvision's ImageNet statistics
    assert config["metrics"], "validation metrics missing"


def test_frozen_parts_stayed_frozen_and_trained_parts_moved(files, run):
    trained = load_file(str(run / "last" / "model.safetensors"))
    resnet = torch.load(files["resnet"], weights_only=True)
    bert = {k.removeprefix("bert."): v for k, v in load_file(str(files["bert"] / "model.safetensors")).items()}

    def image_key(name: str) -> str:
        stage, rest = name.split(".", 1)
        if stage in ("conv1", "bn1"):
            return f"image_encoder.stages.0.{0 if stage == 'conv1' else 1}.{rest}"
        return f"image_encoder.stages.{int(stage[-1])}.{rest}" if stage.startswith("layer") else ""

    def text_key(name: str) -> str:
        if name.startswith("embeddings."):
            return "text_encoder.stages.0." + name.removeprefix("embeddings.")
        if name.startswith("encoder.layer."):
            index, rest = name.removeprefix("encoder.layer.").split(".", 1)
            return f"text_encoder.stages.{int(index) + 1}.{rest}"
        return ""

    def compare(source: dict, to_key, trained_stages: set[int]) -> tuple[int, int]:
        frozen_checked = moved = 0
        for name, tensor in source.items():
            key = to_key(name)
            if not key or "num_batches_tracked" in key or key not in trained:
                continue
            stage = int(key.split(".")[2])
            if stage in trained_stages:
                moved += int(not torch.equal(trained[key], tensor))
            else:
                assert torch.equal(trained[key], tensor), f"frozen {key} changed"
                frozen_checked += 1
        return frozen_checked, moved

    frozen, moved = compare(resnet, image_key, trained_stages={4})  # stem..layer3 frozen, layer4 trained
    assert frozen > 200 and moved > 20, (frozen, moved)
    assert not torch.equal(trained["image_encoder.stages.4.2.conv3.weight"], resnet["layer4.2.conv3.weight"])
    assert torch.equal(trained["image_encoder.stages.3.5.conv3.weight"], resnet["layer3.5.conv3.weight"])
    frozen, moved = compare(bert, text_key, trained_stages={11, 12})  # embeddings..layer 10 frozen
    assert frozen > 150 and moved > 20, (frozen, moved)
    assert not torch.equal(trained["text_encoder.stages.12.output.dense.weight"], bert["encoder.layer.11.output.dense.weight"])
    assert torch.equal(trained["text_encoder.stages.10.output.dense.weight"], bert["encoder.layer.9.output.dense.weight"])
    assert torch.equal(trained["text_encoder.stages.0.word_embeddings.weight"], bert["embeddings.word_embeddings.weight"])


def test_evaluate_cli_on_the_checkpoint(files, run, tmp_path):
    proc = _cli("evaluation.evaluate", f"checkpoint={run / 'best'}", "data=captions_csv", f"data.csv={files['csv']}",
                "split=all", "num_workers=0", "num_threads=2", "figures=false", "progress=false",
                f"output_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    text = json.dumps(metrics)
    assert "MRR" in text and "text_to_image" in text, text[:500]


def test_serving_indexes_and_searches_with_the_checkpoint(files, run, tmp_path):
    import httpx

    from data.images import load_image
    from training.checkpoint import load_checkpoint

    checkpoint = run / "best"
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    server = ServerProcess(checkpoint, tmp_path / "db", cwd, "torch_threads=2")
    try:
        server.wait_ready(timeout=120)
        with httpx.Client(base_url=server.url, timeout=120) as client:
            init = client.post("/db/initialize", json={"user_name": "resnet50_bert_gallery"})
            assert init.status_code == 200, init.text
            model_id = json.loads((checkpoint / "config.json").read_text())["model_id"]
            assert init.json()["model_id"] == init.json()["server_model_id"] == model_id
            uid = init.json()["user_id"]
            added = client.post("/images/add-folder", params={"user_id": uid},
                                json={"folder_path": str(files["images"])})
            assert added.status_code == 200, added.text
            assert (added.json()["added"], added.json()["failed"]) == (16, 0), added.text
            search = client.post("/images/search", params={"user_id": uid},
                                 json={"query": "a red circle", "top_k": 16})
            assert search.status_code == 200, search.text
    finally:
        code, survivors = server.stop()
    assert not survivors, survivors
    results = search.json()["results"]
    assert search.json()["total_images"] == 16 and len(results) == 16
    assert [r["rank"] for r in results] == list(range(1, 17))
    assert {Path(r["path"]) for r in results} == {p.resolve() for p in files["images"].iterdir()}
    scores = [r["score"] for r in results]
    assert scores == sorted(scores, reverse=True) and len(set(scores)) > 1
    # The server's scores are this checkpoint's cosines (computed here independently).
    loaded = load_checkpoint(checkpoint, device="cpu")
    query = loaded.embed_texts(["a red circle"])[0]
    for result in (results[0], results[-1]):
        pixels = loaded.image_transform(load_image(result["path"])).unsqueeze(0)
        assert abs(float(loaded.embed_images(pixels)[0] @ query) - result["score"]) < 0.02, result


def test_missing_weights_fail_with_exit_2_and_the_reason(files, tmp_path):
    common = ["model=resnet50_bert", "data=captions_csv", f"data.csv={files['csv']}", *SMALL_RUN, "trainer.cache_dir=null"]
    missing_file, missing_dir = tmp_path / "no-such-resnet50.pth", tmp_path / "no-such-bert-folder"
    cases = {  # both CLIs at once: most of each is the import
        "a": [f"model.image.weights_path={missing_file}", f"model.text.name_or_path={files['bert']}"],
        "b": [f"model.image.weights_path={files['resnet']}", f"model.text.name_or_path={missing_dir}"],
    }
    procs = {name: subprocess.Popen([sys.executable, "-m", "training.train", *common, *args,
                                     f"hydra.run.dir={tmp_path / name}"], cwd=REPO, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True) for name, args in cases.items()}
    outputs = {name: proc.communicate(timeout=240)[0] for name, proc in procs.items()}
    for name, proc in procs.items():
        assert proc.returncode == 2, outputs[name][-3000:]
        assert "Traceback" not in outputs[name] and not (tmp_path / name / "best").exists()
    assert f"weights file not found: {missing_file}" in outputs["a"]
    assert f"text encoder folder not found: {missing_dir} (model.text.name_or_path)" in outputs["b"]


def test_wrong_files_fail_loudly_instead_of_loading_random_weights(tmp_path):
    """Another architecture's .pth, a pickled module, an empty folder, a BERT folder missing a layer."""
    from omegaconf import OmegaConf
    from safetensors.torch import save_file
    from torchvision.models import resnet18
    from transformers import BertConfig, BertModel

    from training.model import build_image_encoder
    from training.pretrained import WeightsUnavailableError, load_bert, minilm_tokenizer

    def image_cfg(path: Path):
        return OmegaConf.create({"arch": "resnet50", "weights_path": str(path), "trainable_stages": 1, "pooled_stages": 1})

    torch.save(resnet18(weights=None).state_dict(), tmp_path / "resnet18.pth")
    with pytest.raises(WeightsUnavailableError, match="is not a torchvision ResNet50 state dict"):
        build_image_encoder(image_cfg(tmp_path / "resnet18.pth"), pretrained=True)
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pth")  # a pickled module, not a state dict
    with pytest.raises(WeightsUnavailableError, match="is not a readable state dict"):
        build_image_encoder(image_cfg(tmp_path / "module.pth"), pretrained=True)

    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsUnavailableError, match="has no config.json"):
        load_bert(str(tmp_path / "empty"))
    partial = tmp_path / "partial-bert"
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
              add_pooling_layer=False).save_pretrained(partial)
    minilm_tokenizer().save_pretrained(partial)
    state = load_file(str(partial / "model.safetensors"))
    save_file({k: v for k, v in state.items() if "layer.1." not in k}, str(partial / "model.safetensors"),
              metadata={"format": "pt"})
    with pytest.raises(WeightsUnavailableError, match="missing or of another shape"):
        load_bert(str(partial))
