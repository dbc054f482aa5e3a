import math

from cnnkit.evaluate.diagnosis import diagnose


def curves(train_loss, val_loss=None, train_acc=None, val_acc=None):
    n = len(train_loss)
    return [
        {
            "epoch": i + 1,
            "train_loss": train_loss[i],
            "val_loss": val_loss[i] if val_loss else None,
            "train_acc": train_acc[i] if train_acc else 0.99,
            "val_acc": val_acc[i] if val_acc else (0.985 if val_loss else None),
        }
        for i in range(n)
    ]


def verdicts(history, **kw):
    return [v.verdict for v in diagnose(history, **kw)]


def test_overfitting_from_rising_validation_loss():
    h = curves([0.5, 0.3, 0.2, 0.1, 0.05], [0.40, 0.30, 0.28, 0.33, 0.40])
    [v] = diagnose(h)
    assert v.verdict == "overfitting"
    assert "rose from 0.2800 (epoch 3) to 0.4000" in v.summary
    assert any("dropout" in r for r in v.remedies) and any("augment" in r for r in v.remedies)


def test_overfitting_from_an_accuracy_gap():
    h = curves(
        [0.5, 0.4, 0.35], [0.5, 0.45, 0.44], train_acc=[0.9, 0.97, 0.99], val_acc=[0.85, 0.88, 0.90]
    )
    [v] = diagnose(h)
    assert v.verdict == "overfitting" and "gap of 9.0 points" in v.summary


def test_underfitting():
    h = curves(
        [2.0, 1.5, 1.45], [2.0, 1.6, 1.5], train_acc=[0.3, 0.5, 0.6], val_acc=[0.3, 0.5, 0.6]
    )
    assert verdicts(h) == ["underfitting"]


def test_flat_loss():
    h = curves([2.30, 2.30, 2.29], [2.30, 2.30, 2.30], train_acc=[0.1] * 3, val_acc=[0.1] * 3)
    [v] = diagnose(h)
    assert v.verdict == "flat" and "2.3000 at epoch 1, 2.2900 at epoch 3" in v.summary
    assert any("raise the learning rate" in r for r in v.remedies)


def test_stuck_at_chance_after_a_blow_up():
    # lr 1 on MNIST: the loss explodes in epoch 1, then settles near ln(10) at 10% accuracy
    h = curves(
        [26883.8, 2.4566, 2.4375, 2.4397],
        [2.4678, 2.4273, 2.3861, 2.3878],
        train_acc=[0.1037, 0.0967, 0.094, 0.0923],
        val_acc=[0.0973, 0.1023, 0.0993, 0.1043],
    )
    [v] = diagnose(h, classes=10)
    assert v.verdict == "stuck" and "blew up to 2.688e+04 at epoch 1" in v.summary
    assert any("lower the learning rate" in r for r in v.remedies)
    assert "underfitting" in verdicts(h)  # without the class count: the old, wrong advice
    # a loss that never blew up and a flat curve at chance: not this verdict
    flat = curves([2.30, 2.30, 2.29], [2.30, 2.30, 2.30], train_acc=[0.1] * 3, val_acc=[0.1] * 3)
    assert verdicts(flat, classes=10) == ["flat"]


def test_diverging_and_nan_loss():
    [v] = diagnose(curves([0.5, 0.3, math.nan], [0.5, 0.3, math.nan]))
    assert v.verdict == "diverging" and "epoch 3" in v.summary
    assert any("lower the learning rate" in r for r in v.remedies)
    assert verdicts(curves([0.5, 0.2, 0.9], [0.5, 0.3, 1.0])) == ["diverging"]


def test_not_converged_and_healthy():
    assert verdicts(curves([0.5, 0.3, 0.2], [0.45, 0.3, 0.22])) == ["not-converged"]
    [v] = diagnose(curves([0.5, 0.3, 0.29], [0.45, 0.3, 0.29]))
    assert v.verdict == "healthy" and "validation accuracy 98.50%" in v.summary


def test_unnormalised_inputs():
    pre = {"mean": [0.0], "std": [1.0]}
    assert "unnormalised-inputs" in verdicts(curves([0.5, 0.3, 0.29]), preprocessing=pre)
