"""How the ranks of one selection job pool their partial results: through files on the shared
disk, as scoring's ranks already share it (no process group, no network port).

    exchange = exchange_for(layout.exchange())  # Local() when world_size is 1
    merged = exchange.gather("totals", my_partial_frame)         # every rank's frame, concatenated

Every rank calls `gather` in the same order with the same names (the selection maths is
deterministic given the merged results, so it does): call N of every rank is written to
`<dir>/<job>/<N>-<name>/rank-<r>.parquet` (atomically), then each rank waits until all ranks'
files are there and reads them all. `<job>` is the launcher's job id (torchrun's run id, the
Slurm job and step), so a job that died cannot hand a later one its stale partials; a launcher
that reuses an id (a fixed --rdzv-id, MIDRANK_JOB_ID) must not reuse it after a failed run. The
ranks run together: a Slurm array throttled to fewer tasks at once than it has waits, then fails. A rank that fails
writes `ABORTED` with its error there, and the others stop with it instead of waiting.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import polars as pl

from pipeline.launcher import rank_and_world

WAIT_SECONDS = 3600.0
ABORTED = "ABORTED"


class Local:
    """One process holds every score shard: nothing to pool."""

    rank, world_size = 0, 1

    def gather(self, name: str, frame: pl.DataFrame) -> pl.DataFrame:
        return frame

    def close(self) -> None:
        pass

    def abort(self, error: BaseException) -> None:
        pass


class FileExchange:
    """Ranks pool frames through a directory on a disk they all see."""

    def __init__(self, directory: Path, rank: int, world_size: int, timeout: float = WAIT_SECONDS) -> None:
        self.directory, self.rank, self.world_size, self.timeout = directory, rank, world_size, timeout
        self.calls = 0

    def gather(self, name: str, frame: pl.DataFrame) -> pl.DataFrame:
        step = self.directory / f"{self.calls:05d}-{name}"
        self.calls += 1
        step.mkdir(parents=True, exist_ok=True)
        mine = step / f"rank-{self.rank:05d}.parquet"
        partial = mine.with_name(f".{mine.name}.tmp")
        frame.write_parquet(partial)
        partial.replace(mine)  # readers never see half a file
        paths = [step / f"rank-{r:05d}.parquet" for r in range(self.world_size)]
        self._wait_for(paths, step)
        return pl.concat([pl.read_parquet(p) for p in paths], how="vertical_relaxed")

    def _wait_for(self, paths: list[Path], step: Path) -> None:
        started, pause = time.monotonic(), 0.01
        while missing := [p for p in paths if not p.is_file()]:
            if (self.directory / ABORTED).is_file():
                raise RuntimeError(
                    f"select stopped on another rank: {(self.directory / ABORTED).read_text()}"
                )
            if time.monotonic() - started > self.timeout:
                ranks = ", ".join(p.stem.rpartition("-")[2].lstrip("0") or "0" for p in missing)
                raise TimeoutError(
                    f"{step}: rank(s) {ranks} did not write their part within {self.timeout:.0f}s; "
                    "is every rank of the job running select?"
                )
            time.sleep(pause)
            pause = min(pause * 2, 1.0)

    def abort(self, error: BaseException) -> None:
        """Tell the other ranks, waiting in `gather`, that this one stopped (and why)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / ABORTED).write_text(f"rank {self.rank}: {type(error).__name__}: {error}")

    def close(self) -> None:
        """Every rank says it has read its last gather; then rank 0 removes the job's files (not
        before: a rank still waiting would never see the files it waits for)."""
        self.directory.mkdir(parents=True, exist_ok=True)  # a rerun with nothing to select gathered nothing
        (self.directory / f"left-{self.rank:05d}").touch()
        if self.rank == 0:
            self._wait_for([self.directory / f"left-{r:05d}" for r in range(self.world_size)], self.directory)
            shutil.rmtree(self.directory, ignore_errors=True)


LOCAL = Local()
Exchange = Local | FileExchange


def job_id() -> str:
    """The launcher's id of this job, with its restart count: a restarted job keeps its id, and
    must not read the partials its failed attempt left."""
    env = os.environ
    for name, restarts in (
        ("TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT"),
        ("SLURM_ARRAY_JOB_ID", "SLURM_RESTART_COUNT"),
        ("SLURM_JOB_ID", "SLURM_STEP_ID"),  # srun steps of one allocation share the job id
        ("MIDRANK_JOB_ID", ""),
    ):
        if env.get(name, "none") != "none":
            return f"{env[name]}-{env.get(restarts, '0')}"
    raise RuntimeError(
        "select on several ranks needs a job id shared by the ranks and new for each job: torchrun "
        "--standalone (or --rdzv-id) sets TORCHELASTIC_RUN_ID, Slurm sets SLURM_JOB_ID; or set MIDRANK_JOB_ID"
    )


def exchange_for(directory: Path) -> Exchange:
    rank, world_size = rank_and_world()
    if world_size == 1:
        return Local()
    return FileExchange(directory / job_id(), rank, world_size)
