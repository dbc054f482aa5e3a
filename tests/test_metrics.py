import pytest
import torch

from cnnkit.evaluate.metrics import ConfusionMatrix, classification_report, topk_accuracy


def test_per_class_metrics_by_hand():
    target = torch.tensor([0, 0, 0, 1, 1, 2])
    predicted = torch.tensor([0, 0, 1, 1, 2, 1])
    cm = ConfusionMatrix(3).update(predicted, target)
    assert cm.counts.tolist() == [[2, 1, 0], [0, 1, 1], [0, 1, 0]]
    pc = cm.per_class()
    # class 0: P 2/2, R 2/3; class 1: P 1/3, R 1/2; class 2: P 0/1, R 0/1
    assert pc["precision"] == pytest.approx([1.0, 1 / 3, 0.0])
    assert pc["recall"] == pytest.approx([2 / 3, 0.5, 0.0])
    assert pc["f1"] == pytest.approx([0.8, 0.4, 0.0])
    assert pc["support"] == [3, 2, 1]
    assert cm.accuracy() == pytest.approx(3 / 6)


def test_report_averages_and_topk():
    target = torch.tensor([0, 0, 0, 1, 1, 2])
    logits = torch.nn.functional.one_hot(torch.tensor([0, 0, 1, 1, 2, 1]), 3).float()
    r = classification_report(logits, target, ["a", "b", "c"], "test")
    assert r.macro["f1"] == pytest.approx((0.8 + 0.4 + 0) / 3)
    assert r.weighted["f1"] == pytest.approx((0.8 * 3 + 0.4 * 2) / 6)
    assert r.accuracy == pytest.approx(0.5)
    d = r.to_dict()
    assert d["per_class"]["b"]["support"] == 2 and d["split"] == "test"


def test_topk():
    logits = torch.tensor([[0.1, 0.5, 0.4], [0.8, 0.15, 0.05]])
    target = torch.tensor([2, 2])
    assert topk_accuracy(logits, target, 1) == 0.0
    assert topk_accuracy(logits, target, 2) == 0.5
    assert topk_accuracy(logits, target, 3) == 1.0
