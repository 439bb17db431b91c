"""APGD-CE and APGD-DLR (Croce & Hein, 2020): the published schedule, the paper's algorithm, at least PGD's strength."""

from __future__ import annotations

import copy
import itertools
import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

from trainguard.defenses.attacks import APGDCE, APGDDLR, PGD, checkpoint_fractions, checkpoints, dlr_loss, make_attack
from trainguard.defenses.errors import AttackConfigError, TooFewClassesError

PUBLISHED = ("0", "0.22", "0.41", "0.57", "0.70", "0.80", "0.87", "0.93", "0.99")


def test_checkpoint_fractions_are_the_published_ones() -> None:
    assert checkpoint_fractions() == tuple(Fraction(p) for p in PUBLISHED)


@settings(max_examples=200, deadline=None)
@given(steps=st.integers(1, 5000))
def test_checkpoints_follow_the_recurrence_for_any_budget(steps: int) -> None:
    marks = checkpoints(steps)
    assert marks[0] == 0 and all(a < b for a, b in itertools.pairwise(marks)) and marks[-1] <= steps
    # The recurrence, in percent so that it is exact: p1 = 22, p_{j+1} = p_j + max(p_j - p_{j-1} - 3, 6).
    percents = [0, 22]
    while percents[-1] + max(percents[-1] - percents[-2] - 3, 6) <= 100:
        percents.append(percents[-1] + max(percents[-1] - percents[-2] - 3, 6))
    assert set(marks) == {-(-p * steps // 100) for p in percents}
    if steps == 100:
        assert marks == (0, 22, 41, 57, 70, 80, 87, 93, 99)


def reference_apgd(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, start: torch.Tensor, eps: float, steps: int, loss_name: str
) -> torch.Tensor:
    """Algorithm 1 of the paper for one L-inf sample at a time, with the loss history kept as a plain list."""
    loss_fn = (lambda z, t: F.cross_entropy(z, t, reduction="none")) if loss_name == "ce" else dlr_loss
    marks = [math.ceil(Fraction(p) * steps) for p in PUBLISHED]

    def project(v: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        return torch.min(torch.max(v, x0 - eps), x0 + eps).clamp(0, 1)

    def evaluate(v: torch.Tensor, t: torch.Tensor) -> tuple[float, torch.Tensor, bool]:
        leaf = v.clone().requires_grad_(True)
        logits = model(leaf)
        loss = loss_fn(logits, t).sum()
        loss.backward()
        return loss.item(), leaf.grad.detach(), bool(logits.argmax(1).item() != t.item())

    out = []
    for i in range(len(x)):
        x0, t = x[i : i + 1], y[i : i + 1]
        eta = 2 * eps
        cur = prev = start[i : i + 1]
        f, g, wrong = evaluate(cur, t)
        history, f_max, x_max, g_max = [f], f, cur, g
        fooled = cur if wrong else None
        last, f_max_last, halved_last = 0, f_max, False
        for k in range(steps):
            z = project(cur + eta * g.sign(), x0)
            nxt = z if k == 0 else project(cur + 0.75 * (z - cur) + 0.25 * (cur - prev), x0)
            prev, cur = cur, nxt
            f, g, wrong = evaluate(cur, t)
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
        out.append(fooled if fooled is not None else x_max)
    model.zero_grad(set_to_none=True)
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
    model.zero_grad(set_to_none=True)
    return model, x[1000:1300], y[1000:1300]


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-row correctness."""
    with torch.no_grad():
        return model(x).argmax(1) == y


@pytest.mark.parametrize("name,loss_name", [("apgd-ce", "ce"), ("apgd-dlr", "dlr")])
def test_batched_apgd_matches_the_papers_algorithm_run_one_sample_at_a_time(robust_model, name, loss_name) -> None:
    model, x, y = robust_model
    # In float64, so that batched and one-row forwards cannot break a near tie between two losses differently.
    model, x, y, eps, steps = copy.deepcopy(model).double(), x[:40].double(), y[:40], 0.15, 60
    start = make_attack(name, model, eps=eps, seed=4).random_start(x, eps, torch.tensor(0.0), torch.tensor(1.0))
    ours = make_attack(name, model, eps=eps, steps=steps, seed=4)(x, y)
    assert torch.allclose(ours, reference_apgd(model, x, y, start, eps, steps, loss_name), atol=1e-12)


@pytest.mark.parametrize("norm,eps", [("inf", 0.1), ("inf", 0.2), ("2", 0.6)])
def test_apgd_is_at_least_as_strong_as_pgd20_on_an_adversarially_trained_model(robust_model, norm, eps) -> None:
    model, x, y = robust_model
    pgd = accuracy(model, PGD(model, eps=eps, steps=20, norm=norm, seed=1)(x, y), y)
    ce = accuracy(model, make_attack("apgd-ce", model, eps=eps, norm=norm, seed=1)(x, y), y)
    dlr = accuracy(model, make_attack("apgd-dlr", model, eps=eps, norm=norm, seed=1)(x, y), y)
    clean = accuracy(model, x, y).float().mean()
    assert clean > 0.9 and 0.1 < pgd.float().mean() < clean - 0.1, "a budget where the attacks have work to do"
    assert ce.float().mean() <= pgd.float().mean() + 0.01
    assert dlr.float().mean() <= pgd.float().mean() + 0.03, "DLR alone may trail CE a little (Croce & Hein, Tab. 2)"
    assert (ce & dlr).float().mean() <= pgd.float().mean()


@pytest.mark.parametrize("name", ["apgd-ce", "apgd-dlr"])
def test_restarts_never_raise_robust_accuracy_and_keep_every_earlier_success(robust_model, name) -> None:
    model, x, y = robust_model
    runs = [make_attack(name, model, eps=0.2, steps=20, restarts=r, seed=7)(x, y) for r in (1, 2, 4)]
    correct = [accuracy(model, adv, y) for adv in runs]
    assert correct[0].sum() >= correct[1].sum() >= correct[2].sum()
    assert correct[2].sum() < correct[0].sum(), "restarts should find more at this budget"
    for earlier, later in itertools.pairwise(correct):
        assert not (later & ~earlier).any(), "a sample broken by fewer restarts stays broken"
    fooled_first = ~correct[0]
    assert torch.equal(runs[2][fooled_first], runs[0][fooled_first]), "the first run is the same with restarts"


@settings(max_examples=25, deadline=None)
@given(
    name=st.sampled_from(["apgd-ce", "apgd-dlr"]),
    norm=st.sampled_from(["inf", "2"]),
    eps=st.floats(0.0, 2.0),
    rows=st.integers(1, 5),
    restarts=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_apgd_stays_within_eps_and_per_feature_bounds(name, norm, eps, rows, restarts, seed) -> None:
    gen = torch.Generator().manual_seed(seed)
    lower = torch.rand(4, generator=gen) * 4 - 2
    upper = lower + torch.rand(4, generator=gen) * 3
    x = lower + (upper - lower) * torch.rand(rows, 4, generator=gen)
    y = torch.randint(0, 3, (rows,), generator=gen)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    attack = make_attack(name, model, eps=eps, steps=7, restarts=restarts, norm=norm, bounds=(lower, upper), seed=seed)
    adv = attack(x, y)
    assert adv.shape == x.shape and adv.dtype == x.dtype
    assert torch.all(adv >= lower) and torch.all(adv <= upper)
    delta = (adv - x).flatten(1)
    size = delta.abs().amax(1) if norm == "inf" else delta.norm(dim=1)
    assert torch.all(size <= eps * (1 + 1e-5) + 1e-6)


@settings(max_examples=100, deadline=None)
@given(
    logits=st.lists(st.floats(-50, 50), min_size=12, max_size=12),
    label=st.integers(0, 3),
    shift=st.floats(-100, 100),
    scale=st.floats(0.01, 100),
)
def test_dlr_is_invariant_to_shifting_and_rescaling_logits_and_positive_only_when_misclassified(
    logits, label, shift, scale
) -> None:
    z = torch.tensor(logits, dtype=torch.float64).view(3, 4)
    y = torch.full((3,), label)
    base = dlr_loss(z, y)
    spread = z.sort(dim=1, descending=True).values
    clear = (spread[:, 0] - spread[:, 2]) > 1e-3
    assert torch.allclose(dlr_loss(z * scale + shift, y)[clear], base[clear], rtol=1e-6, atol=1e-6)
    wrong = z.argmax(1) != y
    assert torch.all(base[clear & wrong] >= 0) and torch.all(base[clear & ~wrong] <= 0)


def test_dlr_refuses_models_with_fewer_than_three_classes_before_any_step() -> None:
    model = nn.Linear(4, 2)
    calls: list[int] = []
    model.register_forward_hook(lambda *_: calls.append(1))
    with pytest.raises(TooFewClassesError, match="classes >= 3") as info:
        APGDDLR(model, eps=0.1, steps=10)(torch.rand(5, 4), torch.zeros(5).long())
    assert info.value.classes == 2 and info.value.exit_code == 2 and isinstance(info.value, AttackConfigError)
    assert len(calls) == 1, "refused at the first forward, before any step"


@pytest.mark.parametrize(
    "kind,kwargs,match",
    [
        (APGDCE, {"steps": 0}, "steps"),
        (APGDCE, {"restarts": 0}, "restarts"),
        (APGDCE, {"loss": F.cross_entropy}, "loss= cannot be set"),
        (APGDDLR, {"targeted": True}, "untargeted"),
    ],
)
def test_unusable_apgd_settings_are_refused(kind, kwargs, match) -> None:
    with pytest.raises(AttackConfigError, match=match):
        kind(nn.Linear(4, 3), eps=0.1, **kwargs)


def test_targeted_apgd_ce_drives_inputs_to_the_target_class(robust_model) -> None:
    model, x, y = robust_model
    target = (y + 1) % 10
    adv = APGDCE(model, eps=0.3, steps=30, targeted=True, seed=0)(x, target)
    with torch.no_grad():
        assert (model(adv).argmax(1) == target).float().mean() > 0.8
