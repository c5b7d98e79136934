"""Linear probing: the cached many-head sweep, head files, feature variants and the frozen-backbone check."""

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

from mokd.core.errors import MokdError
from mokd.core.features import FeatureKind, feature_function
from mokd_eval.finetune import Classifier
from mokd_eval.linear import (BackboneChangedError, evaluate_head, load_head, save_head, snapshot,
                              sweep_source_feature, sweep_variants, train_head_sweep, variant_columns,
                              verify_unchanged)
from mokd.core.registry import ALIASES, build_backbone
from mokd.core.schedules import cosine_schedule
from mokd_eval.splits import heldout_split

CNN = ALIASES["r_tiny"]


def digits_features():
    digits = load_digits()
    x_train, x_val, y_train, y_val = train_test_split(digits.data, digits.target, test_size=0.2,
                                                      stratify=digits.target, random_state=0)
    scaler = StandardScaler().fit(x_train)
    return (scaler.transform(x_train).astype(np.float32), y_train, scaler.transform(x_val).astype(np.float32), y_val)


def flat_spec(dim: int):
    """A ResNet-like spec whose pooled feature has `dim` values, for sweeps on ready-made features."""
    return dataclasses.replace(CNN, widths=(16, 32, 64, dim))


def test_sweep_separates_linearly_separable_features():
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 1, (5, 16)) * 6
    labels = np.repeat(np.arange(5), 60)
    features = (centres[labels] + rng.normal(0, 0.5, (300, 16))).astype(np.float32)
    fit, held = heldout_split(labels, 0.2, 0)
    result = train_head_sweep(features, labels, fit, held, spec=flat_spec(16), source=FeatureKind(),
                              variants=[FeatureKind()], lrs=[0.1, 1.0], num_classes=5, epochs=10, batch_size=32,
                              warmup_epochs=1, seed=0)
    assert result.heads[result.winner]["heldout_top1"] == 100.0
    assert evaluate_head(result.weight, result.bias, features, labels, np.arange(16))["top1"] == 100.0


@pytest.mark.slow  # trains four heads for 60 epochs and sklearn's logistic regression
def test_sweep_matches_sklearn_logistic_regression_on_digits():
    x_train, y_train, x_val, y_val = digits_features()
    fit, held = heldout_split(y_train, 0.1, 0)
    result = train_head_sweep(x_train, y_train, fit, held, spec=flat_spec(64), source=FeatureKind(),
                              variants=[FeatureKind()], lrs=[0.03, 0.1, 0.3, 1.0], num_classes=10, epochs=60,
                              batch_size=64, warmup_epochs=2, seed=0)
    ours = evaluate_head(result.weight, result.bias, x_val, y_val, np.arange(64))["top1"]
    reference = LogisticRegression(max_iter=2000).fit(x_train[fit], y_train[fit]).score(x_val, y_val) * 100
    assert ours == pytest.approx(reference, abs=2.0), (ours, reference)


def test_batched_heads_equal_separately_trained_linear_layers():
    """Each head of the bank gets exactly the updates of its own SGD at its own lr (reference: a plain loop)."""
    x_train, y_train, _, _ = digits_features()
    x, y = x_train[:200], y_train[:200]
    fit, held = np.arange(180), np.arange(180, 200)
    lrs, epochs, batch = [0.05, 0.5], 3, 32
    result = train_head_sweep(x, y, fit, held, spec=flat_spec(64), source=FeatureKind(), variants=[FeatureKind()],
                              lrs=lrs, num_classes=10, epochs=epochs, batch_size=batch, warmup_epochs=1, seed=7)
    torch.manual_seed(7)
    initial = torch.randn(2, 10, 64) * 0.01
    steps = math.ceil(180 / batch)
    for head, lr in enumerate(lrs):
        weight = initial[head].clone().requires_grad_(True)
        bias = torch.zeros(10, requires_grad=True)
        optimizer = torch.optim.SGD([weight, bias], lr=0.0, momentum=0.9)
        schedule = cosine_schedule(lr * batch / 256, 0.0, epochs, steps, 1)
        for epoch in range(epochs):
            order = torch.randperm(180, generator=torch.Generator().manual_seed(7 * 100003 + epoch))
            for step in range(steps):
                optimizer.param_groups[0]["lr"] = float(schedule[epoch * steps + step])
                index = order[step * batch:(step + 1) * batch]
                loss = F.cross_entropy(torch.as_tensor(x)[index] @ weight.T + bias, torch.as_tensor(y)[index])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        if head == result.winner:
            torch.testing.assert_close(result.weight, weight.detach(), rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(result.bias, bias.detach(), rtol=1e-4, atol=1e-6)
        accuracy = (((torch.as_tensor(x)[held] @ weight.T + bias).argmax(1) == torch.as_tensor(y)[held])
                    .float().mean().item() * 100)
        assert result.heads[head]["heldout_top1"] == pytest.approx(accuracy, abs=1e-4)


def test_sweep_resumes_to_the_same_heads(tmp_path: Path):
    x_train, y_train, _, _ = digits_features()
    fit, held = heldout_split(y_train, 0.1, 0)
    common = dict(spec=flat_spec(64), source=FeatureKind(), variants=[FeatureKind()], lrs=[0.1, 1.0],
                  num_classes=10, epochs=3, batch_size=128, warmup_epochs=1, seed=0)
    full = train_head_sweep(x_train, y_train, fit, held, **common)

    def stop(epoch):
        if epoch == 0:
            raise KeyboardInterrupt

    path = tmp_path / "sweep.pth"
    with pytest.raises(KeyboardInterrupt):
        train_head_sweep(x_train, y_train, fit, held, checkpoint_path=path, on_epoch_end=stop, **common)
    resumed = train_head_sweep(x_train, y_train, fit, held, checkpoint_path=path, resume=True, **common)
    assert resumed.resumed_from_epoch == 1
    assert torch.equal(resumed.weight, full.weight) and resumed.heads == full.heads
    with pytest.raises(MokdError, match="for 10 classes but the dataset has 11"):
        train_head_sweep(x_train, y_train, fit, held, checkpoint_path=path, resume=True,
                         **{**common, "num_classes": 11})


def test_vit_sweep_variants_are_slices_of_the_one_cached_feature(tiny_vit_spec):
    vit = build_backbone(tiny_vit_spec).eval()
    images = torch.randn(3, 3, 32, 32)
    source = sweep_source_feature(tiny_vit_spec)
    assert source.describe() == "last_cls:4+avgpool" and source.dim(tiny_vit_spec) == 5 * 192
    with torch.no_grad():
        full = feature_function(vit, tiny_vit_spec, source)(images)
        tokens = vit.forward_features(images)  # after the final norm
        for variant in sweep_variants(tiny_vit_spec, None):
            sliced = full[:, variant_columns(tiny_vit_spec, source, variant)]
            direct = feature_function(vit, tiny_vit_spec, variant)(images)
            torch.testing.assert_close(sliced, direct)
        # n = 1 without pooling is the k-NN feature (CLS after the final norm); pooling appends the patch mean
        torch.testing.assert_close(full[:, 3 * 192:4 * 192], tokens[:, 0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(full[:, 4 * 192:], tokens[:, 1:].mean(1), rtol=1e-4, atol=1e-5)
    assert FeatureKind.parse("last_cls:1+avgpool") == FeatureKind("last_cls", 1, True)
    with pytest.raises(MokdError, match="last_cls:N\\+avgpool"):
        FeatureKind.parse("last_cls:2+max")


def test_head_file_loads_on_its_own(tmp_path: Path):
    head = torch.nn.Linear(8, 3)
    path = save_head(tmp_path / "head.pt", head, feature=FeatureKind(), spec=CNN, classes=["a", "b", "c"],
                     source={"model_key": "teacher"})
    loaded, meta = load_head(path)
    assert torch.equal(loaded.weight, head.weight) and torch.equal(loaded.bias, head.bias)
    assert meta["classes"] == ["a", "b", "c"] and meta["feature"] == "default"
    assert torch.load(path, weights_only=True)["arch"]["name"] == "r_tiny"


def test_backbone_check_catches_a_bn_statistic_update():
    backbone = build_backbone(CNN)
    model = Classifier(backbone, CNN, FeatureKind(), 10, frozen=True)
    before = snapshot(backbone)
    model.train()
    model(torch.randn(4, 3, 32, 32))  # frozen: BN stays in eval mode, nothing moves
    verify_unchanged(backbone, before, "test")
    backbone.train()
    with torch.no_grad():
        backbone(torch.randn(4, 3, 32, 32))  # a deliberate update of the BN running statistics
    with pytest.raises(BackboneChangedError, match="bn1.running_mean"):
        verify_unchanged(backbone, before, "test")
