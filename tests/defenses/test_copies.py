"""Batched copies: chunking never changes results, batch norm stays frozen, chunks too large for memory are halved."""

from __future__ import annotations

import torch
from torch import nn

from trainguard.defenses.copies import _in_chunks, finetune_heldout_scores
from trainguard.defenses.heldout import LabeledData


def _bn_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    net.train()
    with torch.no_grad():
        net(torch.randn(64, 8) * 3 + 1)  # running statistics that differ from a fresh batch's
    return net


def _shards(count: int) -> list[LabeledData]:
    generator = torch.Generator().manual_seed(1)
    return [
        LabeledData(torch.randn(10 + i, 8, generator=generator), torch.randint(0, 3, (10 + i,), generator=generator))
        for i in range(count)
    ]


def test_chunk_size_does_not_change_the_scores() -> None:
    net, shards, holdout = _bn_net(), _shards(7), _shards(1)[0]
    whole = finetune_heldout_scores(net, shards, holdout, lr=0.1, steps=3)
    chunked = finetune_heldout_scores(net, shards, holdout, lr=0.1, steps=3, chunk_size=3)
    sequential = finetune_heldout_scores(net, shards, holdout, lr=0.1, steps=3, batched=False)
    assert (whole.chunk_size, chunked.chunk_size) == (128, 3)
    assert torch.allclose(whole.scores, chunked.scores, atol=1e-6)
    assert torch.allclose(whole.scores, sequential.scores, atol=1e-5)


def test_each_checkpoint_reads_the_copy_after_that_many_steps() -> None:
    net, shards, holdout = _bn_net(), _shards(3), _shards(1)[0]

    def margin(outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.stack([outputs.gather(-1, y.unsqueeze(-1)).squeeze(-1), outputs.sum(-1)], -1)

    along = finetune_heldout_scores(net, shards, holdout, lr=0.1, steps=5, checkpoints=(2, 5), readout=margin)
    assert along.scores.shape == (3, 2, len(holdout), 2)
    for steps, index in ((2, 0), (5, 1)):
        alone = finetune_heldout_scores(net, shards, holdout, lr=0.1, steps=steps, readout=margin, batched=False)
        assert torch.allclose(along.scores[:, index], alone.scores[:, 0], atol=1e-5)


def test_batch_norm_copies_use_the_frozen_running_statistics_and_leave_them_unchanged() -> None:
    net, shards, holdout = _bn_net(), _shards(2), _shards(1)[0]
    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    zero_steps_equivalent = finetune_heldout_scores(net, shards, holdout, lr=1e-12, steps=1)
    net.eval()
    with torch.no_grad():
        deployed = net(holdout.x).softmax(-1).gather(-1, holdout.y.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(zero_steps_equivalent.scores[:, -1, :, 0], deployed.expand(2, -1), atol=1e-6)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_a_chunk_that_runs_out_of_memory_is_retried_in_halves() -> None:
    seen: list[int] = []

    def train(chunk):
        seen.append(len(chunk))
        if len(chunk) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return torch.stack([shard.y.float()[:1] for shard in chunk])

    shards = [LabeledData(torch.zeros(1, 1), torch.tensor([i])) for i in range(5)]
    told: list[int] = []
    done = _in_chunks(train, shards, 8, torch.device("cpu"), told.append)
    assert seen == [5, 2, 2, 1]
    assert told == [2, 2, 1]  # progress counts the copies that finished, not the chunk that ran out
    assert done.chunk_size == 2
    assert done.scores.squeeze(1).tolist() == [0, 1, 2, 3, 4]
