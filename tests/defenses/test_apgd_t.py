"""APGD-T (AutoAttack's targeted APGD): the targeted DLR loss, the top-k targets in turn, robust rows only onward."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from fractions import Fraction

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from trainguard.defenses.attacks import APGDT, PGD, dlr_loss_targeted, make_attack
from trainguard.defenses.errors import AttackConfigError, TooFewClassesError

PUBLISHED = ("0", "0.22", "0.41", "0.57", "0.70", "0.80", "0.87", "0.93", "0.99")
Loss = Callable[[torch.Tensor], torch.Tensor]


def reference_run(
    model: nn.Module, x0: torch.Tensor, y: torch.Tensor, start: torch.Tensor, eps: float, steps: int, loss_fn: Loss
) -> tuple[torch.Tensor, bool, float]:
    """Algorithm 1 of the paper on one L-inf sample: (point, fooled, best loss), the loss history a plain list."""
    marks = [math.ceil(Fraction(p) * steps) for p in PUBLISHED]

    def project(v: torch.Tensor) -> torch.Tensor:
        return torch.min(torch.max(v, x0 - eps), x0 + eps).clamp(0, 1)

    def evaluate(v: torch.Tensor) -> tuple[float, torch.Tensor, bool]:
        leaf = v.clone().requires_grad_(True)
        logits = model(leaf)
        loss = loss_fn(logits).sum()
        (grad,) = torch.autograd.grad(loss, leaf)
        return loss.item(), grad, bool(logits.argmax(1).item() != y.item())

    eta, cur, prev = 2 * eps, start, start
    f, g, wrong = evaluate(cur)
    history, f_max, x_max, g_max = [f], f, cur, g
    fooled = cur if wrong else None
    last, f_max_last, halved_last = 0, f_max, False
    for k in range(steps):
        z = project(cur + eta * g.sign())
        nxt = z if k == 0 else project(cur + 0.75 * (z - cur) + 0.25 * (cur - prev))
        prev, cur = cur, nxt
        f, g, wrong = evaluate(cur)
        if wrong:
            fooled = cur
        history.append(f)
        if f > f_max:
            f_max, x_max, g_max = f, cur, g
        if k + 1 in marks[1:] and k + 1 > last:
            rises = sum(history[j + 1] > history[j] for j in range(last, k + 1))
            halve = rises < 0.75 * (k + 1 - last) or (not halved_last and f_max <= f_max_last)
            if halve:
                eta, cur, g = eta / 2, x_max, g_max
                history[-1] = f_max
            last, f_max_last, halved_last = k + 1, f_max, halve
    return (fooled if fooled is not None else x_max), fooled is not None, f_max


def reference_apgd_t(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, starts: list[torch.Tensor], eps: float, steps: int, k: int
) -> torch.Tensor:
    """AutoAttack's APGD-T one sample at a time: targets the 2nd..(k+1)th highest clean logits in turn (one restart
    each), stops at the first run that misclassifies the sample, else keeps the highest-loss point."""
    out = []
    for i in range(len(x)):
        x0, t = x[i : i + 1], y[i : i + 1]
        with torch.no_grad():
            clean = model(x0)
        if clean.argmax(1).item() != t.item():
            out.append(x0)
            continue
        order = clean.argsort(dim=1, descending=True)[0]
        best, best_loss = x0, -math.inf
        for j in range(1, k + 1):
            aim = order[j : j + 1]
            point, fooled, loss = reference_run(
                model, x0, t, starts[j - 1][i : i + 1], eps, steps, lambda z, a=aim, t=t: dlr_loss_targeted(z, t, a)
            )
            if fooled:
                best = point
                break
            if loss > best_loss:
                best, best_loss = point, loss
        out.append(best)
    return torch.cat(out)


@pytest.fixture(scope="module")
def robust_model() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A small MLP adversarially trained (PGD-5, eps 0.1) on 1,000 digits, with 300 held-out digits."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.data / 16.0, dtype=torch.float32)
    y = torch.tensor(bunch.target, dtype=torch.long)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for epoch in range(15):
        for i in range(0, 1000, 100):
            x_adv = PGD(model, eps=0.1, steps=5, seed=epoch * 100 + i)(x[i : i + 100], y[i : i + 100])
            opt.zero_grad()
            F.cross_entropy(model(x_adv), y[i : i + 100]).backward()
            opt.step()
    return model, x[1000:1300], y[1000:1300]


def correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).argmax(1) == y


def test_targeted_dlr_matches_autoattacks_formula_and_turns_positive_once_the_target_wins() -> None:
    z = torch.tensor([[5.0, 3.0, 1.0, 0.0, -1.0], [1.0, 4.0, 2.0, 0.5, 0.0]], dtype=torch.float64)
    y, aim = torch.tensor([0, 0]), torch.tensor([2, 1])
    expected = torch.tensor([-(5 - 1) / (5 - (1 + 0) / 2), -(1 - 4) / (4 - (1 + 0.5) / 2)], dtype=torch.float64)
    assert torch.allclose(dlr_loss_targeted(z, y, aim), expected)
    assert dlr_loss_targeted(z, y, aim)[0] < 0 < dlr_loss_targeted(z, y, aim)[1]


def test_batched_apgd_t_matches_autoattacks_algorithm_run_one_sample_at_a_time(robust_model) -> None:
    model, x, y = robust_model
    # float64: batched and one-row forwards cannot break a near tie differently; eps where several targets are needed.
    model, x, y, eps, steps, k = copy.deepcopy(model).double(), x[:30].double(), y[:30], 0.12, 30, 3
    lower, upper = torch.tensor(0.0), torch.tensor(1.0)
    draw = make_attack("apgd-t", model, eps=eps, seed=5)
    starts = [draw.random_start(x, eps, lower, upper) for _ in range(k)]
    ours = APGDT(model, eps=eps, steps=steps, target_classes=k, seed=5)(x, y)
    reference = reference_apgd_t(model, x, y, starts, eps, steps, k)
    fooled = ~correct(model, ours, y)
    assert 0 < fooled.sum() < len(y), "a budget where some rows resist"
    assert torch.equal(fooled, ~correct(model, reference, y))
    assert torch.allclose(ours[fooled], reference[fooled], atol=1e-12)


def test_more_targets_never_raise_robust_accuracy_and_apgd_t_is_at_least_as_strong_as_pgd20(robust_model) -> None:
    model, x, y = robust_model
    accuracy = [correct(model, APGDT(model, eps=0.15, steps=20, target_classes=k, seed=1)(x, y), y) for k in (1, 3, 9)]
    assert accuracy[0].sum() >= accuracy[1].sum() >= accuracy[2].sum()
    assert accuracy[2].sum() < accuracy[0].sum(), "further targets should break more rows at this budget"
    pgd = correct(model, PGD(model, eps=0.15, steps=20, seed=1)(x, y), y)
    default = correct(model, make_attack("apgd-t", model, eps=0.15, seed=1)(x, y), y)
    assert default.float().mean() <= pgd.float().mean() + 0.01


def test_apgd_t_refuses_fewer_than_four_classes_at_the_first_forward() -> None:
    model = nn.Linear(4, 3)
    calls: list[int] = []
    model.register_forward_hook(lambda *_: calls.append(1))
    with pytest.raises(TooFewClassesError, match="classes >= 4") as info:
        APGDT(model, eps=0.1)(torch.rand(5, 4), torch.zeros(5).long())
    assert info.value.classes == 3 and len(calls) == 1


@pytest.mark.parametrize("kwargs,match", [({"targeted": True}, "untargeted"), ({"target_classes": 0}, "target_")])
def test_unusable_apgd_t_settings_are_refused(kwargs, match) -> None:
    with pytest.raises(AttackConfigError, match=match):
        APGDT(nn.Linear(4, 5), eps=0.1, **kwargs)
