"""FAB-T (Croce & Hein, 2020): the exact box-constrained projection, the closed-form minimal perturbation of a linear
model, the paper's algorithm run one row at a time in float64, and a batch that keeps the Attack contract."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from scipy.optimize import linprog
from torch import nn
from torch.nn import functional as F

from trainguard.defenses.attacks import FABT, boundary_step, make_attack
from trainguard.defenses.errors import AttackConfigError, TaskMismatchError, TooFewClassesError


def size(d: np.ndarray | torch.Tensor, norm: str) -> float:
    """The L-inf or L2 norm of a flat perturbation."""
    d = torch.as_tensor(d)
    return float(d.abs().max() if norm == "inf" else d.norm())


def reference_step(w: np.ndarray, r: float, low: np.ndarray, high: np.ndarray, norm: str) -> np.ndarray:
    """The least-norm d with w.d = r in the box, from the KKT conditions: d = clip(lam s sign(w), low, high) for L-inf
    and d = clip(lam s w, low, high) for L2 (s = sign r), w.d rising with lam; lam found by bisection."""
    s = 1.0 if r >= 0 else -1.0
    direction = s * (np.sign(w) if norm == "inf" else w)

    def at(lam: float) -> np.ndarray:
        return np.clip(lam * direction, low, high)

    top = 1.0
    while s * (w @ at(top)) < abs(r) and top < 1e15:
        top *= 2
    if s * (w @ at(top)) < abs(r):
        return at(top)
    bottom = 0.0
    for _ in range(80):  # 2**-80 of the bracket: below float64's resolution of the answer
        middle = (bottom + top) / 2
        bottom, top = (middle, top) if s * (w @ at(middle)) < abs(r) else (bottom, middle)
    return at(top)


@settings(max_examples=60, deadline=None)
@given(dims=st.integers(1, 8), seed=st.integers(0, 2**16), scale=st.floats(0.01, 3.0), zeros=st.booleans())
def test_boundary_step_is_the_least_norm_point_of_the_hyperplane_in_the_box(dims, seed, scale, zeros) -> None:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(1, dims, generator=gen, dtype=torch.float64)
    if zeros:
        w[0, 0] = 0.0
    t = torch.rand(1, dims, generator=gen, dtype=torch.float64)
    r = torch.randn(1, generator=gen, dtype=torch.float64) * scale
    low, high = -t, 1 - t
    for norm in ("inf", "2"):
        d = boundary_step(w, r, low, high, norm)[0].numpy()
        expected = reference_step(w[0].numpy(), r.item(), low[0].numpy(), high[0].numpy(), norm)
        assert np.allclose(d, expected, atol=1e-10)
        assert np.all(d >= low[0].numpy() - 1e-15) and np.all(d <= high[0].numpy() + 1e-15)
    # L-inf as a linear program: min tau s.t. |d_i| <= tau, w.d = r, low <= d <= high.
    eye, ones = np.eye(dims), np.ones((dims, 1))
    program = linprog(
        np.r_[np.zeros(dims), 1.0],
        A_ub=np.block([[eye, -ones], [-eye, -ones]]),
        b_ub=np.zeros(2 * dims),
        A_eq=np.r_[w[0].numpy(), 0.0][None],
        b_eq=r.numpy(),
        bounds=[*zip(low[0].numpy(), high[0].numpy(), strict=True), (0, None)],
    )
    d = boundary_step(w, r, low, high, "inf")[0]
    if program.status == 0:
        assert abs(float(w[0] @ d) - r.item()) < 1e-10 and size(d, "inf") == pytest.approx(program.fun, abs=1e-9)
    else:
        assert program.status == 2, "infeasible: the box corner gets w.d closest to r"
        corner = torch.where(w[0] * r.sign() > 0, high[0], low[0]) * (w[0] != 0)
        assert torch.allclose(d, corner, atol=1e-15)


def linear_problem(classes: int, norm: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A float64 linear model, 40 inputs it classifies, and each input's closed-form least distance to the boundary
    with its runner-up class (FAB-T's first target): (z_y - z_t) / |w_y - w_t|_dual."""
    torch.manual_seed(0)
    model = nn.Linear(6, classes).double()
    x = torch.rand(40, 6, dtype=torch.float64)
    with torch.no_grad():
        logits = model(x)
    top = logits.topk(2, dim=1).indices
    y, target = top[:, 0], top[:, 1]
    w = (model.weight[y] - model.weight[target]).detach()
    gap = logits.gather(1, y[:, None]).squeeze(1) - logits.gather(1, target[:, None]).squeeze(1)
    return model, x, y, gap / (w.abs().sum(1) if norm == "inf" else w.norm(dim=1))


@pytest.mark.parametrize("norm", ["inf", "2"])
def test_fab_t_finds_the_closed_form_minimal_perturbation_of_a_linear_model(norm) -> None:
    model, x, y, distance = linear_problem(2, norm)
    adv = FABT(model, eps=50.0, norm=norm, bounds=(-50.0, 50.0))(x, y)
    found = torch.tensor([size(d, norm) for d in adv - x], dtype=torch.float64)
    assert torch.all(model(adv).argmax(1) != y)
    # On a linear model FAB steps over the boundary by eta = 1.05 and backs off by beta = 0.9; its best point
    # settles 0.5 % past the closest one.
    assert torch.all(found >= distance * (1 - 1e-9)) and torch.all(found <= distance * 1.01)


@pytest.mark.parametrize("norm", ["inf", "2"])
def test_fab_t_breaks_only_the_rows_it_can_break_within_eps_and_returns_the_others_unchanged(norm) -> None:
    model, x, y, distance = linear_problem(2, norm)
    eps = distance.median().item()
    adv = FABT(model, eps=eps, norm=norm, bounds=(-50.0, 50.0))(x, y)
    broken = model(adv).argmax(1) != y
    found = torch.tensor([size(d, norm) for d in adv - x], dtype=torch.float64)
    assert torch.all(found[broken] <= eps)
    assert torch.equal(adv[~broken], x[~broken])
    assert torch.equal(broken[distance * 1.01 < eps], torch.ones_like(broken[distance * 1.01 < eps]))
    assert not broken[distance > eps].any()


def reference_fab_t(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, norm: str, steps: int, targets: int
) -> torch.Tensor:
    """FAB-T one row at a time, in float64, with the KKT projections above: the top `targets` non-true classes in
    turn until one gives a misclassified point within eps; inputs in [0, 1]."""
    out = []
    for x0, label in zip(x, y, strict=True):
        with torch.no_grad():
            logits = model(x0[None])[0]
        result = x0
        ranked = logits.argsort(descending=True)
        for target in ranked[1 : 1 + targets] if ranked[0] == label else []:
            x1, best, best_size = x0.clone(), x0, float("inf")
            for _ in range(steps):
                leaf = x1.clone().requires_grad_(True)
                z = model(leaf[None])[0]
                gap = z[target] - z[label]
                (w,) = torch.autograd.grad(gap, leaf)
                w_np, x1_np, x0_np, gap_np = w.numpy(), x1.numpy(), x0.numpy(), gap.item()
                d1 = reference_step(w_np, -gap_np, -x1_np, 1 - x1_np, norm)
                d2 = reference_step(w_np, -gap_np - w_np @ (x0_np - x1_np), -x0_np, 1 - x0_np, norm)
                a1, a2 = max(size(d1, norm), 1e-8), max(size(d2, norm), 1e-8)
                alpha = min(a1 / (a1 + a2), 0.1)
                x1 = torch.from_numpy(((1 - alpha) * (x1_np + 1.05 * d1) + alpha * (x0_np + 1.05 * d2)).clip(0, 1))
                with torch.no_grad():
                    wrong = model(x1[None])[0].argmax() != label
                if wrong:
                    if size(x1 - x0, norm) < best_size:
                        best, best_size = x1, size(x1 - x0, norm)
                    x1 = x0 + 0.9 * (x1 - x0)
            if best_size <= eps:
                result = best
                break
        out.append(result)
    return torch.stack(out)


@pytest.fixture(scope="module")
def digits_mlp() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A small MLP trained briefly on 500 digits (pixels in [0, 1]), and 300 other digits."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.data / 16.0, dtype=torch.float32)
    y = torch.tensor(bunch.target, dtype=torch.long)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(10):
        for i in range(0, 500, 50):
            opt.zero_grad()
            F.cross_entropy(model(x[i : i + 50]), y[i : i + 50]).backward()
            opt.step()
    model.zero_grad(set_to_none=True)
    return model, x[1000:1300], y[1000:1300]


@pytest.mark.parametrize("norm,eps", [("inf", 0.12), ("2", 0.8)])
def test_batched_fab_t_matches_the_papers_algorithm_run_one_row_at_a_time(digits_mlp, norm, eps) -> None:
    model, x, y = digits_mlp
    model, x, y = copy.deepcopy(model).double(), x[:12].double(), y[:12]
    ours = FABT(model, eps=eps, norm=norm, steps=20, target_classes=3)(x, y)
    reference = reference_fab_t(model, x, y, eps, norm, steps=20, targets=3)
    assert torch.allclose(ours, reference, atol=1e-8)
    broken = (model(ours).argmax(1) != y).sum()
    assert 0 < broken < len(y), "a budget where some rows break and some do not"


def test_fab_t_breaks_at_least_as_many_rows_as_apgd_ce_on_a_digits_mlp(digits_mlp) -> None:
    model, x, y = digits_mlp
    x, y = x[:150], y[:150]
    with torch.no_grad():
        fab = model(FABT(model, eps=0.1)(x, y)).argmax(1) != y
        apgd = model(make_attack("apgd-ce", model, eps=0.1, steps=100, seed=0)(x, y)).argmax(1) != y
    assert 0.2 < apgd.float().mean() < 0.9, "a budget where the attacks have work to do"
    assert fab.sum() >= apgd.sum() - 3


def test_later_restarts_keep_every_row_the_first_run_broke_and_follow_the_seed(digits_mlp) -> None:
    model, x, y = digits_mlp
    x, y = x[:60], y[:60]
    runs = [make_attack("fab-t", model, eps=0.06, steps=15, restarts=r, seed=3)(x, y) for r in (1, 2, 2)]
    broken = [model(adv).argmax(1) != y for adv in runs]
    assert not (broken[0] & ~broken[1]).any()
    assert torch.equal(runs[1], runs[2])


def test_fab_t_ignores_its_crafting_precision_and_the_autocast_around_it(digits_mlp) -> None:
    model, x, y = digits_mlp
    x, y = x[:50], y[:50]
    plain = FABT(model, eps=0.1, steps=20)(x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = FABT(model, eps=0.1, steps=20, crafting_precision=torch.bfloat16)(x, y)
    assert torch.equal(plain, half)


@settings(max_examples=25, deadline=None)
@given(
    norm=st.sampled_from(["inf", "2"]),
    eps=st.floats(0.0, 2.0),
    rows=st.integers(1, 6),
    restarts=st.integers(1, 2),
    classes=st.integers(2, 4),
    seed=st.integers(0, 2**16),
)
@example(norm="2", eps=1.0, rows=2, restarts=1, classes=4, seed=399)  # a point found on a tied boundary
def test_every_row_comes_back_unchanged_or_misclassified_within_eps_and_bounds(
    norm, eps, rows, restarts, classes, seed
) -> None:
    gen = torch.Generator().manual_seed(seed)
    lower = torch.rand(4, generator=gen) * 4 - 2
    upper = lower + torch.rand(4, generator=gen) * 3
    x = lower + (upper - lower) * torch.rand(rows, 4, generator=gen)
    y = torch.randint(0, classes, (rows,), generator=gen)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, classes))
    attack = FABT(model, eps=eps, steps=6, restarts=restarts, norm=norm, bounds=(lower, upper), seed=seed)
    adv = attack(x, y)
    assert adv.shape == x.shape and adv.dtype == x.dtype
    assert torch.all(adv >= lower) and torch.all(adv <= upper)
    delta = (adv - x).flatten(1)
    sizes = delta.abs().amax(1) if norm == "inf" else delta.norm(dim=1)
    assert torch.all(sizes <= eps * (1 + 1e-5) + 1e-6)
    with torch.no_grad():
        wrong = model(adv).argmax(1) != y
    changed = (adv != x).any(1)
    assert not (changed & ~wrong).any(), "a changed row is misclassified"


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"steps": 0}, AttackConfigError, "steps"),
        ({"restarts": 0}, AttackConfigError, "restarts"),
        ({"target_classes": 0}, AttackConfigError, "target_classes"),
        ({"loss": F.cross_entropy}, AttackConfigError, "loss= cannot be set"),
        ({"targeted": True}, AttackConfigError, "picks its own targets"),
        ({"task": "regression"}, TaskMismatchError, "classification"),
    ],
)
def test_unusable_fab_t_settings_are_refused(kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        FABT(nn.Linear(4, 3), eps=0.1, **kwargs)


def test_make_attack_gives_fab_t_its_steps_and_restarts() -> None:
    attack = make_attack("fab-t", nn.Linear(4, 3), eps=0.1, steps=7, restarts=3)
    assert isinstance(attack, FABT) and (attack.steps, attack.restarts, attack.target_classes) == (7, 3, 9)


def test_fab_t_refuses_a_model_with_one_output() -> None:
    with pytest.raises(TooFewClassesError, match="classes >= 2") as info:
        FABT(nn.Linear(4, 1), eps=0.1)(torch.rand(3, 4), torch.zeros(3).long())
    assert info.value.classes == 1
