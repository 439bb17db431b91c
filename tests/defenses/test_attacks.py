"""FGSM, PGD and FGSM-RS: as strong as an independent reference, inside eps and bounds, harmless to the model."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

from trainguard.defenses.attacks import FGSM, PGD, FGSMRandomStart, make_attack
from trainguard.defenses.errors import AttackConfigError, AttackInputError, DefenseError


def reference_pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    alpha: float,
    steps: int,
    norm: str,
    start: torch.Tensor | None = None,
) -> torch.Tensor:
    """Textbook PGD written independently of the package: loss.backward on a leaf copy, per-sample loops for L2."""
    model.eval()
    adv = x.clone() if start is None else start.clone()
    for _ in range(steps):
        leaf = adv.clone().requires_grad_(True)
        F.cross_entropy(model(leaf), y, reduction="sum").backward()
        g = leaf.grad
        model.zero_grad(set_to_none=True)
        if norm == "inf":
            adv = adv + alpha * g.sign()
            adv = torch.max(torch.min(adv, x + eps), x - eps)
        else:
            rows = []
            for i in range(len(x)):
                step = adv[i] + alpha * g[i] / max(g[i].norm().item(), 1e-12)
                delta = step - x[i]
                if delta.norm() > eps:
                    delta = delta * eps / delta.norm()
                rows.append(x[i] + delta)
            adv = torch.stack(rows)
        adv = adv.clamp(0.0, 1.0).detach()
    return adv


@pytest.fixture(scope="module")
def digits_model() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A small MLP trained on 1,000 digits; returns it with 300 held-out digits."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.data / 16.0, dtype=torch.float32)
    y = torch.tensor(bunch.target, dtype=torch.long)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(80):
        opt.zero_grad()
        F.cross_entropy(model(x[:1000]), y[:1000]).backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    return model, x[1000:1300], y[1000:1300]


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


@pytest.mark.parametrize("norm,eps,alpha", [("inf", 0.1, 0.03), ("2", 1.0, 0.3)])
def test_pgd_without_random_start_matches_the_reference_exactly(digits_model, norm, eps, alpha) -> None:
    model, x, y = digits_model
    ours = PGD(model, eps=eps, steps=5, step_size=alpha, norm=norm, random_start=False)(x, y)
    ref = reference_pgd(model, x, y, eps, alpha, 5, norm)
    assert torch.allclose(ours, ref, atol=1e-5)


@pytest.mark.parametrize("norm,eps", [("inf", 0.1), ("2", 1.0)])
def test_pgd_is_at_least_as_strong_as_the_reference_at_the_same_budget(digits_model, norm, eps) -> None:
    model, x, y = digits_model
    alpha = 2.5 * eps / 10
    gen = torch.Generator().manual_seed(1)
    start = (x + (torch.rand(x.shape, generator=gen) * 2 - 1) * eps).clamp(0, 1) if norm == "inf" else x
    ref_acc = accuracy(model, reference_pgd(model, x, y, eps, alpha, 10, norm, start), y)
    our_acc = accuracy(model, PGD(model, eps=eps, steps=10, norm=norm, seed=3)(x, y), y)
    clean = accuracy(model, x, y)
    assert clean > 0.9
    assert ref_acc < clean - 0.2, "the budget should be large enough to matter"
    assert our_acc <= ref_acc + 0.01


def test_fgsm_is_the_one_step_reference_and_weaker_than_pgd(digits_model) -> None:
    model, x, y = digits_model
    fgsm = FGSM(model, eps=0.1)(x, y)
    assert torch.allclose(fgsm, reference_pgd(model, x, y, 0.1, 0.1, 1, "inf"), atol=1e-6)
    pgd = PGD(model, eps=0.1, steps=10, seed=0)(x, y)
    assert accuracy(model, pgd, y) <= accuracy(model, fgsm, y)


def test_fgsm_with_random_start_lowers_accuracy(digits_model) -> None:
    model, x, y = digits_model
    adv = FGSMRandomStart(model, eps=0.1, seed=0)(x, y)
    assert (adv - x).abs().max() <= 0.1 + 1e-6
    assert accuracy(model, adv, y) < accuracy(model, x, y) - 0.2


def test_targeted_pgd_drives_inputs_to_the_target_class(digits_model) -> None:
    model, x, y = digits_model
    target = (y + 1) % 10
    adv = PGD(model, eps=0.3, steps=20, targeted=True, seed=0)(x, target)
    with torch.no_grad():
        hit = (model(adv).argmax(1) == target).float().mean().item()
    assert hit > 0.8


def _tiny_model(features: int) -> nn.Module:
    torch.manual_seed(features)
    return nn.Sequential(nn.Linear(features, 8), nn.Tanh(), nn.Linear(8, 3))


@settings(max_examples=30, deadline=None)
@given(
    name=st.sampled_from(["fgsm", "pgd", "fgsm-rs"]),
    norm=st.sampled_from(["inf", "2"]),
    eps=st.floats(0.0, 2.0),
    rows=st.integers(1, 5),
    features=st.integers(1, 6),
    per_feature=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_results_stay_within_eps_and_bounds(name, norm, eps, rows, features, per_feature, seed) -> None:
    gen = torch.Generator().manual_seed(seed)
    if per_feature:
        lower = torch.rand(features, generator=gen) * 4 - 2
        upper = lower + torch.rand(features, generator=gen) * 3
    else:
        lower, upper = torch.tensor(-1.0), torch.tensor(1.5)
    x = lower + (upper - lower) * torch.rand(rows, features, generator=gen)
    y = torch.randint(0, 3, (rows,), generator=gen)
    bounds = (lower, upper) if per_feature else (-1.0, 1.5)
    attack = make_attack(name, _tiny_model(features), eps=eps, steps=3, norm=norm, bounds=bounds, seed=seed)
    adv = attack(x, y)
    assert adv.shape == x.shape and adv.dtype == x.dtype
    assert torch.all(adv >= lower) and torch.all(adv <= upper)
    delta = (adv - x).flatten(1)
    size = delta.abs().amax(1) if norm == "inf" else delta.norm(dim=1)
    assert torch.all(size <= eps * (1 + 1e-5) + 1e-6)


class WithBatchNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.5))
        self.frozen = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, 2)
        self.modes_seen: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.modes_seen.append(self.body[1].training or self.body[3].training)
        return self.head(self.frozen(self.body(x)))


@pytest.mark.parametrize("name", ["fgsm", "pgd", "fgsm-rs", "apgd-ce"])
def test_crafting_leaves_batchnorm_modes_and_parameter_grads_untouched(name) -> None:
    torch.manual_seed(0)
    model = WithBatchNorm()
    model.train()
    model.frozen.eval()
    model(torch.randn(16, 4)).sum().backward()
    model.head.bias.grad = None
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    model.modes_seen.clear()

    make_attack(name, model, eps=0.5, steps=3, bounds=(-10.0, 10.0), seed=0)(torch.randn(16, 4), torch.zeros(16).long())

    assert model.modes_seen and not any(model.modes_seen), "crafting must run in eval mode"
    assert model.training and model.body.training and model.body[1].training and not model.frozen.training
    for n, p in model.named_parameters():
        assert (p.grad is None) if grads[n] is None else torch.equal(p.grad, grads[n]), n
    for n, b in model.named_buffers():
        assert torch.equal(b, buffers[n]), n


def test_the_generator_is_seedable_and_its_state_resumable(digits_model) -> None:
    model, x, y = digits_model
    first = PGD(model, eps=0.1, steps=2, seed=5)
    a1, a2 = first(x, y), first(x, y)
    second = PGD(model, eps=0.1, steps=2, seed=5)
    assert torch.equal(second(x, y), a1)
    assert not torch.equal(PGD(model, eps=0.1, steps=2, seed=6)(x, y), a1)
    resumed = PGD(model, eps=0.1, steps=2, seed=99)
    saved = PGD(model, eps=0.1, steps=2, seed=5)
    saved(x, y)
    resumed.load_state_dict(saved.state_dict())
    assert torch.equal(resumed(x, y), a2)


def test_crafting_ignores_an_enclosing_autocast() -> None:
    model = _tiny_model(4)
    dtypes: list[torch.dtype] = []
    model.register_forward_hook(lambda _m, _i, out: dtypes.append(out.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        adv = PGD(model, eps=0.1, steps=2, seed=0)(torch.rand(3, 4), torch.zeros(3).long())
    assert adv.dtype == torch.float32 and set(dtypes) == {torch.float32}


@pytest.mark.parametrize("norm,eps", [("inf", 0.1), ("2", 1.0)])
def test_crafting_at_an_autocast_dtype_runs_forwards_in_it_and_keeps_the_perturbation_in_float32(
    digits_model, norm, eps
) -> None:
    model, x, y = digits_model
    dtypes: list[torch.dtype] = []
    hook = model.register_forward_hook(lambda _m, _i, out: dtypes.append(out.dtype))
    try:
        adv = PGD(model, eps=eps, steps=5, norm=norm, crafting_precision=torch.bfloat16, seed=0)(x, y)
    finally:
        hook.remove()
    assert set(dtypes) == {torch.bfloat16} and adv.dtype == torch.float32
    delta = adv - x
    size = delta.abs().amax(1) if norm == "inf" else delta.norm(dim=1)
    assert torch.all(size <= eps * (1 + 1e-6)) and adv.min() >= 0 and adv.max() <= 1
    assert (delta.abs() > 0).float().mean() > 0.5, "fp32 steps: not rounded away as bf16 steps near 1.0 would be"


@pytest.mark.parametrize("name", ["pgd", "fgsm-rs"])
def test_bf16_crafting_is_about_as_strong_as_float32(digits_model, name) -> None:
    model, x, y = digits_model
    clean = accuracy(model, x, y)
    fp32 = accuracy(model, make_attack(name, model, eps=0.1, steps=7, seed=0)(x, y), y)
    bf16 = accuracy(
        model, make_attack(name, model, eps=0.1, steps=7, seed=0, crafting_precision=torch.bfloat16)(x, y), y
    )
    assert bf16 < clean - 0.2 and abs(bf16 - fp32) <= 0.05


def test_inputs_outside_the_bounds_are_refused_with_exit_code_2() -> None:
    attack = PGD(_tiny_model(4), eps=0.1, steps=1)
    with pytest.raises(AttackInputError, match="outside the attack bounds") as info:
        attack(torch.full((2, 4), 1.5), torch.zeros(2).long())
    assert info.value.exit_code == 2 and isinstance(info.value, DefenseError)
    with pytest.raises(AttackInputError, match="float inputs"):
        attack(torch.zeros(2, 4, dtype=torch.long), torch.zeros(2).long())
    with pytest.raises(AttackInputError, match="broadcast"):
        PGD(_tiny_model(4), eps=0.1, bounds=(torch.zeros(3), torch.ones(3)))(torch.rand(2, 4), torch.zeros(2).long())


def test_a_deferred_range_check_refuses_the_batch_at_the_next_call() -> None:
    attack = PGD(_tiny_model(4), eps=0.1, steps=1, defer_range_check=True)
    labels = torch.zeros(2).long()
    attack(torch.full((2, 4), 1.5), labels)  # read back later: crafting never waits for the device
    with pytest.raises(AttackInputError, match="8 input values lie outside"):
        attack(torch.rand(2, 4), labels)
    attack(torch.full((2, 4), -0.5), labels)
    with pytest.raises(AttackInputError, match=r"batch min -0\.5"):
        attack.range_check.raise_pending()
    attack.range_check.raise_pending()  # reported once


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"eps": -1.0}, "eps"),
        ({"eps": 0.1, "norm": "l1"}, "norm"),
        ({"eps": 0.1, "steps": 0}, "steps"),
        ({"eps": 0.1, "bounds": (1.0, 0.0)}, "lower"),
        ({"eps": 0.1, "crafting_precision": torch.float32}, "crafting_precision must be"),
    ],
)
def test_unusable_configurations_are_refused(kwargs, match) -> None:
    with pytest.raises(AttackConfigError, match=match):
        PGD(_tiny_model(2), **kwargs)
    with pytest.raises(AttackConfigError, match="unknown attack"):
        make_attack("cw", _tiny_model(2), eps=0.1)
