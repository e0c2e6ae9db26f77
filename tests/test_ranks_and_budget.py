"""Rank assignment from launcher environments, and the out-of-memory budget halving."""

import numpy as np
import pytest
import torch

from pipeline.launcher import rank_and_world, shards_of_rank
from pipeline.nll import BatchNLL, BudgetedScorer

LAUNCHER_VARS = (
    "RANK",
    "WORLD_SIZE",
    "SLURM_ARRAY_TASK_ID",
    "SLURM_ARRAY_TASK_COUNT",
    "SLURM_ARRAY_TASK_MIN",
    "SLURM_NTASKS",
    "SLURM_PROCID",
)


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, (0, 1)),
        ({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3"}, (3, 8)),
        ({"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "2"}, (3, 4)),
        ({"SLURM_NTASKS": "4", "SLURM_PROCID": "1"}, (1, 4)),
        ({"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}, (0, 1)),
    ],
)
def test_rank_and_world_from_launchers(monkeypatch, env, expected):
    for var in LAUNCHER_VARS:
        monkeypatch.delenv(var, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert rank_and_world() == expected


def test_every_shard_has_exactly_one_rank():
    for world in (1, 2, 3, 8):
        owned = sorted(s for rank in range(world) for s in shards_of_rank(10, rank, world))
        assert owned == list(range(10))


class RunsOutOfMemory:
    """A scorer that fails above a token count, as a GPU would, and records what it ran."""

    def __init__(self, limit: int):
        self.limit, self.shapes = limit, []

    def __call__(self, input_ids, attention_mask, target_mask):
        if input_ids.numel() > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        self.shapes.append(tuple(input_ids.shape))
        rows = input_ids.shape[0]
        return BatchNLL(input_ids[:, 0].double(), target_mask.sum(1), torch.zeros(rows))


def test_out_of_memory_halves_the_budget_and_keeps_every_row():
    scorer = RunsOutOfMemory(limit=40)
    budgeted = BudgetedScorer(scorer, 1000)
    ids = torch.arange(16 * 10).view(16, 10)
    batch = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "target_mask": torch.ones_like(ids).bool(),
    }
    out = budgeted(batch)
    assert budgeted.batch_tokens < 1000  # halved until batches fit
    assert np.array_equal(out[0], ids[:, 0].numpy())  # every row, in order
    assert all(rows * length <= 40 for rows, length in scorer.shapes)


def test_a_single_row_that_does_not_fit_is_an_error():
    ids = torch.ones(1, 100, dtype=torch.long)
    batch = {"input_ids": ids, "attention_mask": ids, "target_mask": ids.bool()}
    with pytest.raises(torch.OutOfMemoryError):
        BudgetedScorer(RunsOutOfMemory(limit=10), 1000)(batch)
