import json

import pytest

from neuroweaver_ml.errors import ModelNotFound
from neuroweaver_ml.models import resolve_base_model


def test_local_dir_and_file_uri(tiny_model_dir):
    assert resolve_base_model(str(tiny_model_dir)) == tiny_model_dir.resolve()
    assert resolve_base_model(tiny_model_dir.resolve().as_uri()) == tiny_model_dir.resolve()


def test_missing_local_dir_names_what_was_tried(tmp_path):
    with pytest.raises(ModelNotFound, match="does not exist") as e:
        resolve_base_model(str(tmp_path / "nope"))
    assert e.value.reference == str(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFound, match="no config.json"):
        resolve_base_model(f"file://{tmp_path}/empty")


def test_hub_id_is_not_downloaded_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelNotFound) as e:
        resolve_base_model("some-org/some-model")
    msg = str(e.value)
    assert "local HF cache" in msg and "HF_HUB_OFFLINE" in msg


def test_unknown_builtin():
    with pytest.raises(ModelNotFound, match="known builtin models: smollm2-135m-instruct"):
        resolve_base_model("builtin:gpt-5")


@pytest.mark.smollm2
def test_smollm2_builtin_converts_and_answers(smollm2_dir):
    from neuroweaver_ml.generation import generate, load_for_inference

    assert resolve_base_model("builtin:smollm2-135m-instruct", smollm2_dir.parent) == smollm2_dir
    cfg = json.loads((smollm2_dir / "config.json").read_text())
    assert cfg["model_type"] == "llama" and "quantization_config" not in cfg and cfg["num_hidden_layers"] == 30
    model, tok = load_for_inference(smollm2_dir)
    r = generate(model, tok, [{"role": "user", "content": "What is the capital of France?"}], max_new_tokens=20)
    assert "Paris" in r.text and r.finish_reason == "stop"
