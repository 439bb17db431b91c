"""The AdversarialTraining callback: an unmodified module really trains on adversarial inputs, safely and resumably."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

from trainguard.defenses import AdversarialTraining
from trainguard.defenses.errors import AttackConfigError, AttackInputError, BatchFormatError

N, FEATURES = 48, 16


def data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(N, FEATURES, generator=gen)
    return x, (x[:, :8].sum(1) > x[:, 8:].sum(1)).long()


class Recorder(pl.LightningModule):
    """An ordinary classifier that records what `training_step` received (and the loss on it)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(FEATURES, 16), nn.ReLU(), nn.Linear(16, 2))
        self.seen: list[dict[str, torch.Tensor]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = (batch["x"], batch["y"]) if isinstance(batch, dict) else (batch[0], batch[1])
        loss = F.cross_entropy(self(x), y)
        record = {"x": x.detach().clone(), "loss": loss.detach()}
        if isinstance(batch, dict):
            with torch.no_grad():
                record["clean_loss"] = F.cross_entropy(self(batch["clean"]), y)
            record["clean"] = batch["clean"]
        self.seen.append(record)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class DictDigits(Dataset):
    def __init__(self) -> None:
        self.x, self.y = data()

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "y": self.y[i], "clean": self.x[i].clone()}


def fit(module: pl.LightningModule, loader: DataLoader, callbacks: list, **kwargs) -> pl.Trainer:
    trainer = pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        **{"max_epochs": 1, "devices": 1, **kwargs},
    )
    trainer.fit(module, train_dataloaders=loader)
    return trainer


def test_training_step_receives_adversarial_inputs_from_dict_batches() -> None:
    module = Recorder()
    callback = AdversarialTraining("pgd", eps=0.2, steps=5, input_key="x", target_key="y", seed=0)
    trainer = fit(module, DataLoader(DictDigits(), batch_size=16), [callback], max_epochs=2)

    assert len(module.seen) == 6
    for record in module.seen:
        delta = record["x"] - record["clean"]
        assert delta.abs().max() <= 0.2 + 1e-6 and delta.abs().max() > 0.19
        assert record["x"].min() >= 0 and record["x"].max() <= 1
        assert record["loss"] > record["clean_loss"], "the module must train on inputs that raise its loss"
    assert trainer.callback_metrics["adv/eps"] == pytest.approx(0.2)
    assert 0.0 <= trainer.callback_metrics["adv/success"].item() <= 1.0


def test_ratio_replaces_that_fraction_of_each_batch() -> None:
    x, y = data()
    module = Recorder()
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    fit(module, loader, [AdversarialTraining("fgsm-rs", eps=0.1, ratio=0.25, seed=0)])
    for i, record in enumerate(module.seen):
        changed = (record["x"] != x[16 * i : 16 * (i + 1)]).any(dim=1)
        assert int(changed.sum()) == 4


def test_tuple_batches_are_overwritten_in_place() -> None:
    x, y = data()
    module = Recorder()
    loader = DataLoader(
        TensorDataset(x, y),
        batch_size=16,
        collate_fn=lambda rows: tuple(torch.stack(c) for c in zip(*rows, strict=True)),
    )
    fit(module, loader, [AdversarialTraining("fgsm", eps=0.1)])
    assert all((r["x"] - x[16 * i : 16 * (i + 1)]).abs().max() > 0.09 for i, r in enumerate(module.seen))
    assert torch.equal(loader.dataset.tensors[0], x), "the dataset itself must stay clean"


class GradProbe(pl.Callback):
    """Snapshots parameter grads after each backward, and compares them when the next batch starts (after crafting)."""

    def __init__(self) -> None:
        self.snapshot: list[torch.Tensor] | None = None
        self.checked = 0

    def on_after_backward(self, trainer, pl_module) -> None:
        self.snapshot = [p.grad.clone() for p in pl_module.parameters()]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx % 2 == 1:
            assert self.snapshot is not None
            for p, g in zip(pl_module.parameters(), self.snapshot, strict=True):
                assert torch.equal(p.grad, g), "crafting changed gradients Lightning is accumulating"
            self.checked += 1


def test_gradient_accumulation_is_not_disturbed_by_crafting() -> None:
    x, y = data()
    probe = GradProbe()
    callbacks = [AdversarialTraining("pgd", eps=0.1, steps=3, seed=0), probe]
    fit(Recorder(), DataLoader(TensorDataset(x, y), batch_size=8), callbacks, accumulate_grad_batches=2)
    assert probe.checked == 3


class DtypeRecorder(Recorder):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        self.dtypes.append((self.net.training, out.dtype))
        return out


@pytest.mark.parametrize("crafting_precision,crafted", [("trainer", torch.bfloat16), ("fp32", torch.float32)])
def test_mixed_precision_crafts_at_the_trainers_autocast_or_in_float32(crafting_precision, crafted) -> None:
    x, y = data()
    module = DtypeRecorder()
    module.dtypes = []
    callback = AdversarialTraining("pgd", eps=0.1, steps=2, crafting_precision=crafting_precision, seed=0)
    fit(module, DataLoader(TensorDataset(x, y), batch_size=16), [callback], precision="bf16-mixed")
    crafting_dtypes = {dtype for training, dtype in module.dtypes if not training}
    training_dtypes = {dtype for training, dtype in module.dtypes if training}
    assert crafting_dtypes == {crafted} and training_dtypes == {torch.bfloat16}
    for i, record in enumerate(module.seen):
        assert record["x"].dtype == torch.float32, "the perturbation stays in the input's float32"
        delta = (record["x"] - x[16 * i : 16 * (i + 1)]).abs().max().item()
        assert 0.099 < delta <= 0.1 + 1e-6, "steps and projection are exact in float32, not rounded to bf16"


class CountingRecorder(Recorder):
    """Counts forward calls per mode and records which rows its training forward misclassifies."""

    def __init__(self, bypass: bool = False) -> None:
        super().__init__()
        self.bypass = bypass
        self.calls = {True: 0, False: 0}
        self.wrong = self.attacked = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls[self.net.training] += 1
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y, clean = batch
        logits = self.net(x) if self.bypass else self(x)
        attacked = (x != clean).any(dim=1)
        self.wrong += int((logits.argmax(1) != y)[attacked].sum())
        self.attacked += int(attacked.sum())
        return F.cross_entropy(logits, y)


@pytest.mark.parametrize("attack,ratio", [("pgd", 1.0), ("fgsm-rs", 0.5)])
def test_success_comes_from_the_training_forward_without_an_extra_pass(attack, ratio) -> None:
    x, y = data()
    module = CountingRecorder()
    callback = AdversarialTraining(attack, eps=0.3, steps=3, ratio=ratio, seed=0)
    trainer = fit(module, DataLoader(TensorDataset(x, y, x.clone()), batch_size=16), [callback])

    steps = 3 if attack == "pgd" else 1
    guard = 5 + 1 if attack == "fgsm-rs" else 0  # once per epoch: the overfitting guard's PGD-5 and its prediction
    assert module.calls == {True: 3, False: 3 * steps + guard}, "crafting steps plus the training forward, no more"
    assert module.attacked == round(ratio * 16) * 3
    assert trainer.callback_metrics["adv/success"].item() == pytest.approx(module.wrong / module.attacked)


def test_success_falls_back_to_an_eval_forward_when_training_step_bypasses_the_module() -> None:
    x, y = data()
    module = CountingRecorder(bypass=True)
    callback = AdversarialTraining("fgsm", eps=0.3, seed=0)
    with pytest.warns(UserWarning, match="extra forward pass"):
        trainer = fit(module, DataLoader(TensorDataset(x, y, x.clone()), batch_size=16), [callback])
    assert module.calls == {True: 0, False: 3 + 3}, "one crafting and one counting forward per batch"
    assert trainer.callback_metrics["adv/success"].item() == pytest.approx(module.wrong / module.attacked)


class MaskedRecorder(Recorder):
    """A model with an extra input: `forward(features, mask)`, both packed in the batch input (features, then mask)."""

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.net(features * mask)

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.seen.append({"x": x.detach().clone()})
        return F.cross_entropy(self(x[:, :FEATURES], x[:, FEATURES:]), y)


def masked_forward(module, batch, x):
    from trainguard.defenses import batch_input

    return module(x[:, :FEATURES], batch_input(batch)[:, FEATURES:])


def test_a_masked_model_is_attacked_through_its_hook_and_success_read_from_its_training_forward() -> None:
    """The hook perturbs the features only (the mask comes from the clean batch); a training forward on views of
    the batch input (its feature and mask columns) counts as the training forward: no extra pass, no warning."""
    import warnings

    x, y = data()
    mask = (torch.rand(N, FEATURES, generator=torch.Generator().manual_seed(1)) > 0.3).float()
    packed = torch.cat([x, mask], 1)
    callback = AdversarialTraining("fgsm", eps=0.2, ratio=1.0, forward=masked_forward, bounds=(0.0, 1.0), seed=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = fit(MaskedRecorder(), DataLoader(TensorDataset(packed, y), batch_size=16), [callback])
    assert not [w for w in caught if "extra forward pass" in str(w.message)]
    assert 0.0 <= trainer.callback_metrics["adv/success"].item() <= 1.0
    seen = torch.cat([r["x"] for r in trainer.lightning_module.seen])
    assert torch.equal(seen[:, FEATURES:], mask[: len(seen)]), "the mask is never perturbed"
    assert (seen[:, :FEATURES] - x[: len(seen)]).abs().max() > 0.1


def _max_perturbation(module: Recorder, x: torch.Tensor, batch: int) -> list[float]:
    per_epoch = N // batch
    return [(r["x"] - x[batch * (i % per_epoch) : batch * (i % per_epoch + 1)]).abs().max().item()
            for i, r in enumerate(module.seen)]  # fmt: skip


def test_eps_warms_up_and_a_resumed_run_repeats_the_uninterrupted_schedule(tmp_path: Path) -> None:
    x, y = data()

    def loader() -> DataLoader:
        return DataLoader(TensorDataset(x, y), batch_size=16)

    def callback() -> AdversarialTraining:
        return AdversarialTraining("pgd", eps=0.3, steps=4, warmup_epochs=2, seed=11)

    whole = Recorder()
    fit(whole, loader(), [callback()], max_epochs=3)
    expected = [0.3 * min(1.0, (e + (b + 1) / 3) / 2) for e in range(3) for b in range(3)]
    assert _max_perturbation(whole, x, 16) == pytest.approx(expected, abs=1e-5)

    first = Recorder()
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, callbacks=[callback(), checkpoint],
                         enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(first, train_dataloaders=loader())
    resumed = Recorder()
    trainer = pl.Trainer(max_epochs=3, accelerator="cpu", logger=False, callbacks=[callback()],
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)  # fmt: skip
    trainer.fit(resumed, train_dataloaders=loader(), ckpt_path=str(tmp_path / "last.ckpt"))

    assert len(resumed.seen) == 6
    for got, want in zip(resumed.seen, whole.seen[3:], strict=True):
        assert torch.allclose(got["x"], want["x"], atol=1e-6)


def test_dict_batches_without_keys_fail_with_a_clear_error() -> None:
    with pytest.raises(BatchFormatError, match="input_key= and target_key="):
        fit(Recorder(), DataLoader(DictDigits(), batch_size=16), [AdversarialTraining("fgsm", eps=0.1)])


@pytest.mark.parametrize("bad_batch", [0, 2])
def test_a_batch_outside_the_bounds_stops_the_fit_at_the_next_batch_or_the_epochs_end(bad_batch) -> None:
    x, y = data()
    x[bad_batch * 16] = 2.0  # batches of 16: the first row of batch `bad_batch` (2 is the last batch)
    module = Recorder()
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    with pytest.raises(AttackInputError, match="16 input values lie outside the attack bounds"):
        fit(module, loader, [AdversarialTraining("fgsm-rs", eps=0.1)])
    assert len(module.seen) == bad_batch + 1


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"attack": "cw", "eps": 0.1}, "unknown attack"),
        ({"eps": 0.1, "ratio": 1.5}, "ratio"),
        ({"eps": -0.1}, "eps"),
        ({"eps": 0.1, "crafting_precision": "fp16"}, "crafting_precision must be 'trainer' or 'fp32'"),
    ],
)
def test_unusable_settings_are_refused_at_construction(kwargs, match) -> None:
    with pytest.raises(AttackConfigError, match=match):
        AdversarialTraining(**kwargs)


def test_attacking_every_row_warns_that_clean_accuracy_may_drop_and_a_mixed_batch_does_not() -> None:
    with pytest.warns(UserWarning, match="clean accuracy may drop; ratio=0.5") as every_row:
        AdversarialTraining("pgd", eps=0.1)
    assert len(every_row) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        AdversarialTraining("pgd", eps=0.1, ratio=0.5)


def test_ddp_ranks_craft_locally_and_log_success_summed_over_ranks() -> None:
    """Two CPU ranks (gloo) forked from this process, which has torch and Lightning imported already: a spawned rank
    would import them again (~7 CPU s each) for the same DDP fit."""
    x, y = data()
    callback = AdversarialTraining("pgd", eps=0.2, steps=2, seed=0)
    trainer = fit(Recorder(), DataLoader(TensorDataset(x, y), batch_size=8), [callback], max_epochs=1,
                  strategy="ddp_fork", devices=2)  # fmt: skip
    assert trainer.callback_metrics["adv/eps"] == pytest.approx(0.2)
    assert 0.0 <= trainer.callback_metrics["adv/success"].item() <= 1.0
