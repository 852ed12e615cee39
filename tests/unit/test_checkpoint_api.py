"""Checkpoints (metadata checks, identity) and the one-exam Python API."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from inference.api import MammoModel
from inference.checkpoint import (
    DEMO_CHECKPOINT,
    CheckpointError,
    load_checkpoint,
    read_info,
    save_checkpoint,
    sha256_file,
)
from inference.model import create_model
from inference.synthetic import make_exam

pytestmark = pytest.mark.unit  # fast: the unit layer (python -m pytest -m unit)

SIZE = (128, 64)


@pytest.fixture
def ckpt(tmp_path):
    torch.manual_seed(1)
    m = create_model("hybrid", image_size=SIZE, task="birads-3class")
    path = tmp_path / "m.safetensors"
    sha = save_checkpoint(m, path, training_data="unit test", metrics={"x": 1})
    return m, path, sha


def test_round_trip_and_identity(ckpt):
    m, path, sha = ckpt
    assert sha == sha256_file(path) and len(sha) == 64
    m2, info = load_checkpoint(path)
    assert info.sha256 == sha and info.config == m.cfg
    assert info.metadata["training_data"] == "unit test"
    assert info.metadata["input_size"] == "128x64"
    assert json.loads(info.metadata["birads_classes"]) == [
        "BI-RADS 1",
        "BI-RADS 2-3",
        "BI-RADS 4-5",
    ]
    for k, v in m.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k]), k


def _rewrite(path, tensors=None, **meta_changes):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    meta.update(meta_changes)
    save_file(tensors if tensors is not None else load_file(str(path)), str(path), metadata=meta)


def test_mismatches_fail_with_clear_messages(ckpt, tmp_path):
    _, path, _ = ckpt
    bad = tmp_path / "bad.safetensors"
    for change, message in (
        (dict(format="something-else"), "not a mammo-node checkpoint"),
        (dict(format_version="99"), "format version '99'"),
        (dict(task="birads-1v5"), "task"),
        (dict(input_size="512x256"), "input_size"),
    ):
        bad.write_bytes(path.read_bytes())
        _rewrite(bad, **change)
        with pytest.raises(CheckpointError, match=message):
            load_checkpoint(bad)
    t = load_file(str(path))
    k = next(k for k in t if k.endswith("birads_head.weight"))
    t[k] = torch.zeros(7, t[k].shape[1])
    bad.write_bytes(path.read_bytes())
    _rewrite(bad, tensors=t)
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_checkpoint(bad)
    del t[k]
    _rewrite(bad, tensors=t)
    with pytest.raises(CheckpointError, match="missing 1 tensor"):
        load_checkpoint(bad)
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        read_info(tmp_path / "junk.safetensors")
    with pytest.raises(CheckpointError, match="not found"):
        read_info(tmp_path / "nope.safetensors")


def test_predict_exam_list_mapping_and_missing_views(ckpt):
    _, path, sha = ckpt
    model = MammoModel(path, device="cpu")
    assert model.warm_up() > 0.0
    exam = make_exam(seed=4, rows=300, cols=240)
    r = model.predict_exam(exam)  # an unordered list: slots from the headers
    assert r.model["sha256"] == sha
    for b in ("L", "R"):
        br = r.breasts[b]
        assert br.present and br.birads in br.birads_probabilities
        assert abs(sum(br.birads_probabilities.values()) - 1) < 1e-5
        assert abs(sum(br.diagnosis_probabilities.values()) - 1) < 1e-5
        assert abs(sum(r.fusion_weights[b].values()) - 1) < 1e-5
    assert set(r.attention_maps) == {"L-CC", "L-MLO", "R-CC", "R-MLO"}
    assert all(m.shape == (300, 240) for m in r.attention_maps.values())
    assert all(m.shape == SIZE for m in r.attention_maps_model.values())
    # Only the right breast: the left is not present and gets no category.
    r2 = model.predict_exam({"R-CC": exam[2], "R-MLO": exam[3]})
    assert r2.missing_views == ["L-CC", "L-MLO"]
    assert not r2.breasts["L"].present and r2.breasts["L"].birads is None
    assert r2.fusion_weights["R"]["L-CC"] == 0.0 and r2.fusion_weights["R"]["L-MLO"] == 0.0
    with pytest.raises(ValueError, match="unknown view slot"):
        model.predict_exam({"X-CC": exam[0]})
    with pytest.raises(ValueError, match="two images for"):
        model.predict_exam([exam[0], exam[0]])


def test_demo_checkpoint_is_bundled_and_marked():
    info = read_info(DEMO_CHECKPOINT)
    assert DEMO_CHECKPOINT.stat().st_size < 25 * 1024 * 1024
    assert "NOT FOR CLINICAL USE" in info.metadata["intended_use"]
    assert "synthetic" in info.metadata["training_data"]
    assert info.is_demo
    model = MammoModel(device="cpu")  # no checkpoint given: the demo
    assert model.info.sha256 == info.sha256


def test_the_algorithm_name_comes_from_the_checkpoint_architecture(tmp_path):
    """A cnn checkpoint is reported as the CNN baseline, not as the hybrid."""
    from inference.api import MammoModel
    from inference.model import create_model
    from inference.synthetic import make_exam

    path = tmp_path / "cnn.safetensors"
    save_checkpoint(create_model("cnn", image_size=(128, 64)), path, training_data="unit test")
    reading = MammoModel(path, device="cpu").predict_exam(make_exam(seed=1, rows=128, cols=96))
    assert reading.model["name"] == "CnnBaseline" and reading.model["arch"] == "cnn"
    assert (
        MammoModel(device="cpu").predict_exam(make_exam(seed=1, rows=128, cols=96)).model["name"]
        == "HybridCnnVssm"
    )


def test_the_normalisation_travels_in_the_checkpoint(tmp_path):
    import json as _json

    from inference.api import MammoModel
    from inference.model import create_model
    from inference.synthetic import make_exam

    torch.manual_seed(0)
    m = create_model("cnn", image_size=(128, 64))
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_checkpoint(m, a, training_data="unit test")
    save_checkpoint(
        m,
        b,
        training_data="unit test",
        extra={
            "preprocessing": _json.dumps(
                {"mean": 0.2, "std": 0.1, "segment": True, "version": "2-segmented"}
            )
        },
    )
    ma, mb = MammoModel(a, device="cpu"), MammoModel(b, device="cpu")
    assert ma.info.preprocessing["mean"] == 0.5 and ma.info.preprocessing["segment"] is True
    assert mb.info.preprocessing["std"] == 0.1
    exam = make_exam(seed=2, rows=128, cols=96)
    pa = ma.predict_exam(exam).breasts["L"].birads_probabilities
    pb = mb.predict_exam(exam).breasts["L"].birads_probabilities
    assert pa != pb  # the same weights read differently normalised inputs
