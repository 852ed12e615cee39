"""The model: variants, shapes, masking of missing views, gradients, config checks."""

from __future__ import annotations

import pytest
import torch

from inference.model import ModelConfig, birads_to_class, create_model

pytestmark = pytest.mark.unit  # fast: the unit layer (python -m pytest -m unit)

SIZE = (128, 64)


def _batch(b=2, missing=()):
    torch.manual_seed(0)
    x = torch.randn(b, 4, 1, *SIZE)
    mask = torch.ones(b, 4, dtype=torch.bool)
    for bi, v in missing:
        mask[bi, v] = False
        x[bi, v] = 0
    return x, mask


@pytest.mark.parametrize("arch", ["hybrid", "cnn", "vssm"])
@pytest.mark.parametrize("weights", ["shared", "separate"])
def test_variants_forward_backward(arch, weights):
    m = create_model(arch, weights=weights, image_size=SIZE, task="birads-3class")
    x, mask = _batch()
    out = m(x, mask)
    assert out["birads_logits"].shape == (2, 2, 3)
    assert out["diagnosis_logits"].shape == (2, 2, 3)
    assert out["fusion_weights"].shape == (2, 2, 4)
    assert out["attention"].shape == (2, 4, SIZE[0] // 32, SIZE[1] // 32)
    torch.testing.assert_close(out["fusion_weights"].sum(-1), torch.ones(2, 2))
    loss, parts = m.loss(out, torch.tensor([[0, 2], [1, -1]]), torch.tensor([[0, 2], [-1, 1]]))
    loss.backward()
    assert set(parts) == {"birads", "diagnosis"}
    grads = [p.grad for p in m.parameters() if p.requires_grad]
    assert sum(g is not None and float(g.abs().sum()) > 0 for g in grads) > 0.8 * len(grads)
    if arch != "cnn":  # the selective scan's parameters learn
        a_logs = [p for n, p in m.named_parameters() if n.endswith("A_logs")]
        assert a_logs and all(float(p.grad.abs().sum()) > 0 for p in a_logs)


def test_missing_views_are_masked_out():
    m = create_model("hybrid", image_size=SIZE).eval()
    x, mask = _batch(missing=[(0, 3), (1, 0), (1, 1)])
    with torch.no_grad():
        out = m(x, mask)
        w = out["fusion_weights"]
        assert float(w[0, :, 3].abs().max()) == 0.0  # R-MLO missing in exam 0
        assert float(w[1, :, :2].abs().max()) == 0.0  # left breast missing in exam 1
        assert out["breast_present"].tolist() == [[True, True], [False, True]]
        assert float(out["attention"][1, 0].abs().max()) == 0.0
        # Changing a missing view's pixels changes nothing.
        x2 = x.clone()
        x2[0, 3] = torch.randn_like(x2[0, 3]) * 5
        out2 = m(x2, mask)
    torch.testing.assert_close(out["birads_logits"], out2["birads_logits"])


def test_single_task_has_no_diagnosis_head():
    m = create_model("cnn", image_size=SIZE, diagnosis=False, task="birads-1v5")
    out = m(*_batch(1))
    assert "diagnosis_logits" not in out and out["birads_logits"].shape == (1, 2, 2)


def test_config_validation_and_round_trip():
    with pytest.raises(ValueError, match="arch"):
        ModelConfig(arch="transformer").validate()
    with pytest.raises(ValueError, match="multiples of 32"):
        ModelConfig(image_size=(100, 64)).validate()
    with pytest.raises(ValueError, match="task"):
        ModelConfig(task="birads-7").validate()
    cfg = ModelConfig(arch="vssm", weights="separate", image_size=(256, 128))
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown model config keys"):
        ModelConfig.from_dict({**cfg.to_dict(), "bogus": 1})


def test_birads_class_mapping():
    assert [birads_to_class("birads-1v5", b) for b in range(1, 6)] == [0, -1, -1, -1, 1]
    assert [birads_to_class("birads-3class", b) for b in range(1, 6)] == [0, 1, 1, 2, 2]
    assert [birads_to_class("birads-5class", b) for b in range(1, 6)] == [0, 1, 2, 3, 4]
    assert birads_to_class("birads-5class", None) == -1
    assert birads_to_class("birads-5class", 0) == -1
