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


def test_class_never_predicted_has_precision_zero_and_a_warning():
    target = torch.tensor([0, 0, 1, 1, 2, 2])
    logits = torch.nn.functional.one_hot(torch.tensor([0, 0, 1, 1, 1, 1]), 3).float()
    r = classification_report(logits, target, ["a", "b", "c"], "val")
    assert r.per_class["precision"][2] == 0.0 and r.per_class["f1"][2] == 0.0  # not NaN
    assert r.warnings == ["class 'c' was never predicted: its precision is reported as 0"]
    cm = ConfusionMatrix(3).update(logits.argmax(1), target)
    assert cm.most_confused(3) == [(2, 1, 2)]


def test_expected_calibration_error_on_a_constructed_case():
    from cnnkit.evaluate.metrics import calibration

    # 4 predictions at confidence 0.95 (3 right) and 4 at 0.65 (all right), 10 bins:
    # ECE = 0.5 * |0.75 - 0.95| + 0.5 * |1.0 - 0.65| = 0.1 + 0.175 = 0.275
    probs = torch.tensor([[0.95, 0.05]] * 4 + [[0.65, 0.35]] * 4)
    target = torch.tensor([0, 0, 0, 1, 0, 0, 0, 0])
    c = calibration(probs, target, bins=10)
    assert c["ece"] == pytest.approx(0.275)
    full = [b for b in c["bins"] if b["count"]]
    assert [(b["low"], b["count"], b["accuracy"]) for b in full] == [
        (pytest.approx(0.6), 4, 1.0),
        (pytest.approx(0.9), 4, 0.75),
    ]


def test_accuracy_and_top1_agree_when_logits_tie():
    # bf16 logits tie often; topk's choice among ties is unspecified and used to differ
    # from argmax's, so the report said accuracy 0.9649 and top-1 0.9652.
    generator = torch.Generator().manual_seed(0)
    logits = torch.randint(0, 3, (2000, 10), generator=generator).to(torch.bfloat16)
    target = torch.randint(0, 10, (2000,), generator=generator)
    r = classification_report(logits.float(), target, [str(i) for i in range(10)], "test")
    assert r.top_k[1] == r.accuracy
    assert sum(r.confusion_matrix[i][i] for i in range(10)) / 2000 == r.accuracy


def test_ties_rank_the_lower_class_index_first():
    from cnnkit.evaluate.metrics import ranked_classes

    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0]])
    assert ranked_classes(logits, 3).tolist() == [[1, 2, 4]]
    assert topk_accuracy(logits, torch.tensor([4]), 2) == 0.0
    assert topk_accuracy(logits, torch.tensor([4]), 3) == 1.0
