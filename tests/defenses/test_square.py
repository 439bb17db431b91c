"""Square Attack (Andriushchenko et al., 2020): the published p schedule and margin loss, forward passes only (it
breaks models whose gradients are masked or absent), each row queried until it breaks, and the Attack contract."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

from trainguard.defenses.attacks import PGD, Square, make_attack, margin_loss, square_fraction
from trainguard.defenses.attacks.square import square_pattern
from trainguard.defenses.errors import AttackConfigError, AttackInputError, TaskMismatchError

# The paper's schedule for 10,000 queries (and its reference code's): p = p_init / 2**k after the k-th of these.
PAPER_HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def paper_p(query: int, p_init: float) -> float:
    """p at 0-based `query` of 10,000, as the paper's code writes it: `if 10 < it <= 50: p_init / 2` and so on."""
    bounds = (0, *PAPER_HALVINGS, 10_000)
    for k, (low, high) in enumerate(itertools.pairwise(bounds)):
        if (low < query or query == 0) and query <= high:
            return p_init / 2**k
    raise AssertionError(query)


def test_the_window_share_follows_the_published_schedule_and_rescales_to_the_budget() -> None:
    assert [square_fraction(q, 10_000) for q in range(10_000)] == [paper_p(q, 0.8) for q in range(10_000)]
    assert square_fraction(10, 10_000) == 0.8 and square_fraction(11, 10_000) == 0.4
    assert square_fraction(9999, 10_000) == 0.8 / 512
    # AutoAttack's 5,000 queries run the same schedule twice as fast (query i is the paper's 2i).
    assert [square_fraction(q, 5000, 0.5) for q in range(5000)] == [paper_p(2 * q, 0.5) for q in range(5000)]


@settings(max_examples=100, deadline=None)
@given(
    logits=st.lists(st.floats(-1e3, 1e3), min_size=12, max_size=12),
    labels=st.lists(st.integers(0, 3), min_size=3, max_size=3),
)
def test_margin_loss_is_the_true_logit_minus_the_best_other_one(logits, labels) -> None:
    z = torch.tensor(logits, dtype=torch.float64).view(3, 4)
    ours = margin_loss(z, torch.tensor(labels))
    for row, label in enumerate(labels):
        others = [logits[4 * row + j] for j in range(4) if j != label]
        assert ours[row].item() == logits[4 * row + label] - max(others)
    assert margin_loss(z.float(), torch.tensor(labels)).dtype == torch.float32


def reference_rectangles(rows: int, cols: int) -> torch.Tensor:
    """The paper's code for half an L2 window: rings of 1 / (k + 1)^2 grown from the centre, scaled to unit norm."""
    delta = torch.zeros(rows, cols, dtype=torch.float64)
    top, left = rows // 2, cols // 2
    for k in range(max(rows // 2 + 1, cols // 2 + 1)):
        delta[max(top, 0) : min(top + 2 * k + 1, rows), max(left, 0) : min(left + 2 * k + 1, cols)] += 1 / (k + 1) ** 2
        top, left = top - 1, left - 1
    return delta / delta.norm() if delta.numel() else delta


@pytest.mark.parametrize("side", range(1, 13))
def test_the_l2_window_pattern_is_the_papers(side) -> None:
    reference = torch.cat([reference_rectangles(side // 2, side), -reference_rectangles(side - side // 2, side)])
    assert torch.allclose(square_pattern(side), reference / reference.norm(), atol=1e-15)


class Quantised(nn.Module):
    """x -> round(x * levels) / levels: gradient zero almost everywhere, so gradient attacks see a flat loss."""

    def __init__(self, levels: int) -> None:
        super().__init__()
        self.levels = levels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x * self.levels) / self.levels


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """Digits as 1x8x8 images in [0, 1], and their labels."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return torch.tensor(bunch.data / 16.0, dtype=torch.float32).view(-1, 1, 8, 8), torch.tensor(bunch.target)


def fit_linear(digits: tuple[torch.Tensor, torch.Tensor], front: nn.Module) -> nn.Module:
    """`front` then a linear classifier, trained on 1,000 digits."""
    x, y = digits
    torch.manual_seed(0)
    model = nn.Sequential(front, nn.Flatten(), nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(20):
        for i in range(0, 1000, 100):
            opt.zero_grad()
            F.cross_entropy(model(x[i : i + 100]), y[i : i + 100]).backward()
            opt.step()
    return model.eval()


def correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).argmax(1) == y


@pytest.mark.parametrize("norm,eps", [("inf", 0.15), ("2", 1.5)])
def test_square_breaks_a_quantised_model_on_the_rows_where_gradient_attacks_fail(digits, norm, eps) -> None:
    model = fit_linear(digits, Quantised(4))
    x, y = digits[0][1000:1080], digits[1][1000:1080]
    clean = correct(model, x, y)
    pgd = correct(model, PGD(model, eps=eps, norm=norm, steps=20, seed=0)(x, y), y)
    apgd = correct(model, make_attack("apgd-ce", model, eps=eps, norm=norm, steps=50, seed=0)(x, y), y)
    square = correct(model, Square(model, eps=eps, norm=norm, queries=500, seed=0)(x, y), y)
    assert clean.float().mean() > 0.9
    assert pgd.float().mean() > clean.float().mean() - 0.1 and apgd.float().mean() > clean.float().mean() - 0.1
    assert square.float().mean() < 0.2
    assert (~square & pgd & apgd).sum() > 0.6 * clean.sum(), "Square breaks most rows PGD and APGD-CE leave"


class NumpyLinear(nn.Module):
    """A linear classifier computed in numpy: it has no autograd graph at all."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.weight = linear.weight.detach().numpy().T.copy()
        self.bias = linear.bias.detach().numpy().copy()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(x.flatten(1).numpy() @ self.weight + self.bias)


def test_square_works_through_a_model_without_gradients(digits) -> None:
    model = NumpyLinear(fit_linear(digits, nn.Identity())[2])
    x, y = digits[0][1000:1050], digits[1][1000:1050]
    with pytest.raises(RuntimeError):
        PGD(model, eps=0.1, steps=2, seed=0)(x, y)
    square = correct(model, Square(model, eps=0.2, queries=300, seed=0)(x, y), y)
    assert correct(model, x, y).float().mean() > 0.9 and square.float().mean() < 0.3


def test_rows_the_model_already_misclassifies_cost_one_forward_pass_and_come_back_unchanged(digits) -> None:
    model = fit_linear(digits, nn.Identity())
    x = digits[0][1000:1020]
    with torch.no_grad():
        y = (model(x).argmax(1) + 1) % 10  # every label wrong
    batches: list[int] = []
    model.register_forward_hook(lambda _module, inputs, _output: batches.append(len(inputs[0])))
    adv = Square(model, eps=0.1, queries=50, seed=0)(x, y)
    assert batches == [20] and torch.equal(adv, x)


def test_each_row_is_queried_until_its_first_misclassified_point_and_no_further(digits) -> None:
    model = fit_linear(digits, nn.Identity())
    x, y = digits[0][1000:1030].flatten(1), digits[1][1000:1030]
    eps, queries = 0.06, 200
    assert (x[:, None] - x[None]).abs().amax(2).add(torch.eye(30) * 9).min() > 2 * eps, "rows told apart by x"
    flat = nn.Sequential(nn.Unflatten(1, (1, 8, 8)), model)
    asked: list[tuple[torch.Tensor, torch.Tensor]] = []
    hook = flat.register_forward_hook(lambda _module, inputs, out: asked.append((inputs[0].clone(), out.argmax(1))))
    adv = Square(flat, eps=eps, queries=queries, seed=0)(x, y)
    hook.remove()
    wrong = ~correct(flat, adv, y)
    assert 0 < wrong.sum() < correct(flat, x, y).sum(), "a budget where some rows break and some do not"
    for row in range(30):
        answers = [pred[(batch - x[row]).abs().amax(1) <= eps + 1e-6] for batch, pred in asked[1:]]
        seen = torch.cat(answers)
        if not correct(flat, x[row : row + 1], y[row : row + 1]):
            assert len(seen) == 0, "misclassified at the start: never queried"
        elif wrong[row]:
            assert seen[-1] != y[row] and torch.all(seen[:-1] == y[row]), "queried until it first breaks"
        else:
            assert len(seen) == queries + 1 and torch.all(seen == y[row]), "the start and every query"


@settings(max_examples=25, deadline=None)
@given(
    image=st.booleans(),
    l2=st.booleans(),
    eps=st.floats(0.0, 2.0),
    rows=st.integers(1, 6),
    classes=st.integers(2, 4),
    seed=st.integers(0, 2**16),
)
def test_square_stays_within_eps_and_per_feature_bounds(image, l2, eps, rows, classes, seed) -> None:
    gen = torch.Generator().manual_seed(seed)
    image = image or l2  # L2 windows need images
    shape = (2, 7, 5) if image else (6,)
    lower = torch.rand(shape, generator=gen) * 4 - 2
    upper = lower + torch.rand(shape, generator=gen) * 3
    x = lower + (upper - lower) * torch.rand((rows, *shape), generator=gen)
    y = torch.randint(0, classes, (rows,), generator=gen)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(shape)), 8), nn.Tanh(), nn.Linear(8, classes))
    adv = Square(model, eps=eps, norm="2" if l2 else "inf", queries=20, bounds=(lower, upper), seed=seed)(x, y)
    assert adv.shape == x.shape and adv.dtype == x.dtype
    assert torch.all(adv >= lower) and torch.all(adv <= upper)
    delta = (adv - x).flatten(1)
    sizes = delta.norm(dim=1) if l2 else delta.abs().amax(1)
    assert torch.all(sizes <= eps * (1 + 1e-5) + 1e-6)


def test_the_seed_decides_the_search(digits) -> None:
    model = fit_linear(digits, Quantised(4))
    x, y = digits[0][1000:1020], digits[1][1000:1020]
    runs = [Square(model, eps=0.05, queries=30, seed=seed)(x, y) for seed in (1, 1, 2)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


def test_make_attack_gives_square_fifty_queries_per_step() -> None:
    attack = make_attack("square", nn.Linear(4, 3), eps=0.1, steps=100)
    assert isinstance(attack, Square) and attack.queries == 5000 and attack.p_init == 0.8


def test_square_l2_refuses_inputs_that_are_not_images() -> None:
    with pytest.raises(AttackInputError, match=r"\(N, C, H, W\)"):
        Square(nn.Linear(6, 3), eps=0.5, norm="2")(torch.rand(4, 6), torch.zeros(4).long())


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"queries": 0}, AttackConfigError, "queries"),
        ({"p_init": 0.0}, AttackConfigError, "p_init"),
        ({"loss": F.cross_entropy}, AttackConfigError, "loss= cannot be set"),
        ({"targeted": True}, AttackConfigError, "untargeted"),
        ({"task": "regression"}, TaskMismatchError, "classification"),
    ],
)
def test_unusable_square_settings_are_refused(kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        Square(nn.Linear(4, 3), eps=0.1, **kwargs)


def test_square_l2_searches_on_the_eps_sphere_where_the_bounds_allow() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(2 * 9 * 9, 3))
    x = torch.rand(30, 2, 9, 9)
    with torch.no_grad():
        y = model(x).argmax(1)
    adv = Square(model, eps=0.05, norm="2", queries=40, bounds=(-10.0, 10.0), seed=0)(x, y)
    unbroken = correct(model, adv, y)
    assert unbroken.sum() > 10
    assert torch.allclose((adv - x)[unbroken].flatten(1).norm(dim=1), torch.tensor(0.05), rtol=1e-4)
