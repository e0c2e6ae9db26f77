"""Training objectives over per-sample losses: uniform, IR-DRO, online MidRanking, weighted.

    nll, segment = token_nll(model, batch)                   # per target token, and its sample
    losses, counts = per_sample_losses(nll, segment, n)       # mean NLL of each sample in the batch
    loss, weights = objective_loss("irdro", losses, counts, nll, kl_reg=1.0)   # weights: (samples,)

A sample's loss is the mean NLL of its own target tokens, found through `segment` (the sample index
of every target token), so padding never contributes and several samples packed into one row keep
separate losses. Under data parallelism each rank's loss is scaled so that the gradient DDP
averages equals the gradient of the objective over the global batch: counts (tokens, samples) are
summed across ranks, and with `gather=True` the IR-DRO weights and the MidRanking band are computed
over every rank's per-sample losses (docs/design.md §1).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from pipeline.shares import share_of

Objective = Literal["uniform", "irdro", "midranking_online", "weighted"]


def token_nll(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], head_chunk_tokens: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """NLL of every target token (fp32, with gradient) and the batch-local sample it belongs to.

    input_ids   BOS  a1  a2  BOS  b1  PAD        (a packed row: samples a and b)
    segment     -1   0   0   -1   1   -1         (-1: context or padding, never a target)
    logits[j] predicts input_ids[j + 1], so targets are where segment[:, 1:] >= 0.

    Padded rows come with an `attention_mask`; packed rows with restarting `position_ids` and no
    mask, so each sample attends only to itself (see TrainCollator).

    With `head_chunk_tokens`, full-vocabulary logits never exist: the model's forward keeps the
    logits of one position only, and the LM head runs on the target positions' final hidden
    states, `head_chunk_tokens` at a time, each chunk checkpointed (its logits are recomputed in
    the backward pass instead of kept). Only for models whose logits are `lm_head(hidden)`
    (`head_is_plain`) and whose parameters are not sharded (FSDP, ZeRO-3).
    """
    segment = batch["segment"][:, 1:]
    predicted = segment >= 0
    targets = batch["input_ids"][:, 1:][predicted]
    inputs = {
        "input_ids": batch["input_ids"],
        "attention_mask": batch.get("attention_mask"),
        "position_ids": batch.get("position_ids"),
        "use_cache": False,
    }
    if not head_chunk_tokens:
        logits = model(**inputs).logits
        nll = F.cross_entropy(logits[:, :-1][predicted].float(), targets, reduction="none")
        return nll, segment[predicted]
    inner = _unwrap(model)
    final = {}
    hook = inner.base_model.register_forward_hook(
        lambda _m, _i, out: final.update(hidden=out.last_hidden_state)
    )
    try:
        model(**inputs, logits_to_keep=1)  # through any DDP wrapper, so its gradient hooks are set
    finally:
        hook.remove()
    hidden = final["hidden"][:, :-1][predicted]
    head = inner.get_output_embeddings()
    nll = (
        torch.cat(
            [
                checkpoint(
                    _head_nll,
                    hidden[i : i + head_chunk_tokens],
                    targets[i : i + head_chunk_tokens],
                    head.weight,
                    head.bias,
                    use_reentrant=False,
                )
                for i in range(0, targets.numel(), head_chunk_tokens)
            ]
        )
        if targets.numel()
        else hidden.new_zeros(0, dtype=torch.float32)
    )
    return nll, segment[predicted]


def _head_nll(
    hidden: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    return F.cross_entropy(F.linear(hidden, weight, bias).float(), targets, reduction="none")


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    while hasattr(model, "module"):  # DDP, accelerate wrappers
        model = model.module
    return model


@torch.no_grad()
def head_is_plain(model: torch.nn.Module) -> bool:
    """Whether the model's logits are `lm_head(final hidden state)` (no soft-capping or scaling),
    so the chunked head of token_nll computes what the model's own forward would. Checked on a
    few tokens against the model's forward."""
    inner = _unwrap(model)
    device = next(inner.parameters()).device
    ids = torch.arange(16, device=device)[None] % inner.get_output_embeddings().weight.shape[0]
    batch = {"input_ids": ids, "segment": torch.zeros_like(ids)}
    was_training = inner.training
    inner.eval()
    try:
        full, _ = token_nll(inner, batch)
        chunked, _ = token_nll(inner, batch, head_chunk_tokens=4)
    finally:
        inner.train(was_training)
    tolerance = 1e-3 if inner.get_output_embeddings().weight.dtype == torch.float32 else 0.1
    return bool(torch.allclose(full, chunked, atol=tolerance, rtol=0))


def packing_isolates(model: torch.nn.Module, features: list[dict], collator) -> bool:
    """Whether `model` keeps packed samples apart. Packing relies on the model reading restarting
    `position_ids` with no attention mask as separate sequences, as transformers' own models do;
    a model with attention code of its own may not, and would let packed samples attend to each
    other. Checked on a few real samples: their losses packed into one row against alone."""
    device = next(model.parameters()).device

    def losses(batch_features: list[dict]) -> torch.Tensor:
        batch = {k: v.to(device) for k, v in collator(batch_features).items()}
        return per_sample_losses(*token_nll(model, batch), len(batch_features))[0]

    if collator(features)["input_ids"].shape[0] != 1:
        raise ValueError("packing_isolates needs features that share one packed row")
    was_training = model.training
    model.eval()
    with torch.no_grad():
        packed = losses(features)
        alone = torch.cat([losses([f]) for f in features])
    model.train(was_training)
    return bool(torch.allclose(packed.float(), alone.float(), atol=1e-3, rtol=0))


def per_sample_losses(
    nll: torch.Tensor, segment: torch.Tensor, n_samples: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean NLL per sample, target tokens per sample), both of shape (n_samples,)."""
    sums = torch.zeros(n_samples, dtype=nll.dtype, device=nll.device).index_add(0, segment, nll)
    counts = torch.zeros(n_samples, dtype=torch.long, device=nll.device).index_add(
        0, segment, torch.ones_like(segment)
    )
    return sums / counts.clamp(min=1), counts


def irdro_weights(losses: torch.Tensor, kl_reg: float) -> torch.Tensor:
    """softmax(l / lambda) in fp32, detached: the closed-form maximiser of
    sum_i p_i l_i - lambda KL(p || uniform) over the simplex. softmax subtracts the max first,
    so extreme losses do not overflow."""
    return torch.softmax(losses.detach().float() / kl_reg, dim=0)


def midranking_mask(losses: torch.Tensor, skip: float, keep: float) -> torch.Tensor:
    """The paper's per-batch band: rank by loss (hardest first, ties by position), drop the top
    `skip` share, keep the next `keep` share."""
    n = losses.numel()
    n_skip, n_keep = share_of(n, skip), share_of(n, keep)
    if n_keep < 1 or n_skip >= n:
        raise ValueError(f"a batch of {n} keeps no sample with skip={skip}, keep={keep}")
    order = torch.sort(losses.detach(), descending=True, stable=True).indices
    mask = torch.zeros(n, dtype=torch.bool, device=losses.device)
    mask[order[n_skip : n_skip + n_keep]] = True
    return mask


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _sum_across_ranks(value: torch.Tensor) -> torch.Tensor:
    if _world() > 1:
        value = value.detach().clone()
        dist.all_reduce(value)
    return value


def _gather(losses: torch.Tensor) -> tuple[torch.Tensor, slice]:
    """Every rank's per-sample losses (detached), and where this rank's lie among them."""
    world = _world()
    if world == 1:
        return losses.detach(), slice(0, losses.numel())
    sizes = [torch.zeros(1, dtype=torch.long, device=losses.device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([losses.numel()], device=losses.device))
    longest = int(max(s.item() for s in sizes))
    padded = torch.full((longest,), float("nan"), dtype=losses.dtype, device=losses.device)
    padded[: losses.numel()] = losses.detach()
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    everything = torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes, strict=True)])
    start = int(sum(s.item() for s in sizes[: dist.get_rank()]))
    return everything, slice(start, start + losses.numel())


def objective_loss(
    objective: Objective,
    losses: torch.Tensor,
    counts: torch.Tensor,
    nll: torch.Tensor,
    *,
    kl_reg: float = 1.0,
    skip: float = 0.1,
    keep: float = 0.5,
    weights: torch.Tensor | None = None,
    gather: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(the scalar to backpropagate on this rank, each of this rank's samples' weight in it).
    `losses`/`counts` per sample, `nll` per token. The weights (detached, unnormalised) say how
    much each sample counts: its target tokens (uniform), its IR-DRO or offline weight, 1 or 0 (the
    online band). A sample is trained on when its weight is not zero; (sum w)^2 / sum w^2 is how
    many samples the step effectively learns from.

    - uniform: mean token NLL over the global batch.
    - irdro: sum_i w_i l_i, w = softmax(l / kl_reg) over this rank's batch, or the global one.
    - midranking_online: mean of l_i over the kept band of this rank's batch, or the global one.
    - weighted: sum_i w_i l_i / (samples), with w from the dataset (offline IR-DRO weights, mean 1).
    """
    world = _world()
    if objective == "uniform":
        tokens = _sum_across_ranks(counts.sum())
        return nll.sum() / tokens.clamp(min=1) * world, counts.detach().to(losses.dtype)
    if objective == "weighted":
        if weights is None:
            raise ValueError("objective 'weighted' needs a `weight` column in the training data")
        samples = _sum_across_ranks(torch.tensor(losses.numel(), device=losses.device))
        w = weights.to(losses.dtype)
        return (w * losses).sum() / samples * world, w.detach()
    pool, own = _gather(losses) if gather else (losses.detach(), slice(0, losses.numel()))
    scale = world if gather else 1  # gathered: each rank holds part of one global objective
    if objective == "irdro":
        w = irdro_weights(pool, kl_reg)[own]
        return (w * losses).sum() * scale, w.detach()
    if objective == "midranking_online":
        kept = midranking_mask(pool, skip, keep)
        return losses[kept[own]].sum() / kept.sum() * scale, kept[own].to(losses.dtype)
    raise ValueError(f"unknown objective {objective!r}")
