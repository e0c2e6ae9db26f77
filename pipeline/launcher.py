"""Which part of the work this process does: rank and world size from torchrun or Slurm.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK (one GPU per local rank). A Slurm job array sets
SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT (one task per array element); `srun` with several
tasks sets SLURM_PROCID / SLURM_NTASKS. No process group is created: scoring ranks never talk.
"""

from __future__ import annotations

import os


def rank_and_world() -> tuple[int, int]:
    env = os.environ
    if "WORLD_SIZE" in env:
        return int(env.get("RANK", "0")), int(env["WORLD_SIZE"])
    if "SLURM_ARRAY_TASK_COUNT" in env:
        first = int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
        return int(env["SLURM_ARRAY_TASK_ID"]) - first, int(env["SLURM_ARRAY_TASK_COUNT"])
    if int(env.get("SLURM_NTASKS", "1")) > 1:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
    return 0, 1


def shards_of_rank(num_shards: int, rank: int, world_size: int) -> list[int]:
    return [shard for shard in range(num_shards) if shard % world_size == rank]
