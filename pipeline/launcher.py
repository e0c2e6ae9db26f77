"""Which part of the work this process does: rank and world size from torchrun or Slurm.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK (one GPU per local rank). A Slurm job array sets
SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT (one task per array element); `srun` with several
tasks sets SLURM_PROCID / SLURM_NTASKS. No process group is created: scoring ranks never talk.
"""

from __future__ import annotations

import os


class LaunchError(ValueError):
    """The launcher's environment does not say which part this process does."""


def rank_and_world() -> tuple[int, int]:
    env = os.environ
    if "WORLD_SIZE" in env:
        rank, world = number("RANK", "0"), number("WORLD_SIZE")
    elif "SLURM_ARRAY_TASK_COUNT" in env:
        rank = number("SLURM_ARRAY_TASK_ID") - number("SLURM_ARRAY_TASK_MIN", "0")
        world = number("SLURM_ARRAY_TASK_COUNT")
    elif number("SLURM_NTASKS", "1") > 1:
        rank, world = number("SLURM_PROCID"), number("SLURM_NTASKS")
    else:
        return 0, 1
    if not 0 <= rank < world:
        raise LaunchError(
            f"rank {rank} of {world} processes: the launcher's variables disagree (RANK/WORLD_SIZE or SLURM_*)"
        )
    return rank, world


def check_joinable(world: int) -> None:
    """Training's ranks talk (gradients): they meet at MASTER_ADDR:MASTER_PORT, which torchrun sets
    and a WORLD_SIZE set by hand does not."""
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if world > 1 and name not in os.environ]
    if missing:
        raise LaunchError(
            f"{' and '.join(missing)}: not set, while WORLD_SIZE={world} asks for a job of {world} "
            "processes that must meet; start them with torchrun"
        )


def number(name: str, default: str | None = None) -> int:
    """A whole number the launcher set in the environment."""
    value = os.environ.get(name, default)
    if value is None:
        raise LaunchError(f"{name}: not set, while the launcher set the other variables of its kind")
    try:
        return int(value)
    except ValueError:
        raise LaunchError(
            f"{name}: {value!r} is not a whole number (set by torchrun, Slurm or by hand?)"
        ) from None


def shards_of_rank(num_shards: int, rank: int, world_size: int) -> list[int]:
    return [shard for shard in range(num_shards) if shard % world_size == rank]
