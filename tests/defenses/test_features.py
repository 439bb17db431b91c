"""Head-scope split: the default head of Sequential and torchvision-style models, named heads, and refusals."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from trainguard.defenses.errors import ScreeningInputError
from trainguard.defenses.features import head_features, split_head


class PooledNet(nn.Module):
    """torchvision-style: a trunk, then pooling in forward(), then the `fc` attribute."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer1 = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.fc = nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.layer1(x), 1), 1))


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))


def test_default_head_of_a_sequential_is_its_last_linear_fed_by_the_layers_before() -> None:
    model = _mlp()
    x = torch.randn(7, 6)
    split = split_head(model)
    (features,) = head_features(model, split, [x])
    assert split.entry == "4"
    assert torch.allclose(features, model[:4](x))
    assert torch.allclose(split.head(features), model(x))


def test_head_layers_takes_the_last_k_linear_layers_and_what_lies_between() -> None:
    model = _mlp()
    split = split_head(model, head_layers=2)
    assert split.entry == "2"
    assert [type(m) for m in split.head] == [nn.Linear, nn.ReLU, nn.Linear]
    (features,) = head_features(model, split, [torch.randn(3, 6)])
    assert features.shape == (3, 5)


def test_default_head_of_a_torchvision_style_model_is_fc_on_the_pooled_features() -> None:
    model = PooledNet().eval()
    x = torch.randn(5, 1, 8, 8)
    split = split_head(model)
    first, second = head_features(model, split, [x, x[:2]], batch_size=2)
    assert split.entry == "fc"
    assert first.shape == (5, 4)
    assert torch.allclose(first[:2], second)
    assert torch.allclose(split.head(first), model(x), atol=1e-6)


def test_a_named_layer_after_which_forward_does_more_is_refused() -> None:
    model = PooledNet()
    with pytest.raises(ScreeningInputError, match=r"not the head from 'layer1\.2'"):
        head_features(model, split_head(model, feature_layer="layer1.2"), [torch.randn(2, 1, 8, 8)])


def test_unknown_layers_and_too_many_head_layers_are_refused() -> None:
    with pytest.raises(ScreeningInputError, match="no module 'layer9'"):
        split_head(PooledNet(), feature_layer="layer9")
    with pytest.raises(ScreeningInputError, match="head_layers > 1"):
        split_head(PooledNet(), head_layers=2)
    with pytest.raises(ScreeningInputError, match="fewer than head_layers=4"):
        split_head(_mlp(), head_layers=4)
