"""Canary scores and the exact global top-K% selection.

Written here because no library selects an exact global top-k over many tensors (possibly
sharded over processes) without concatenating them. The method is a two-level radix select on
the bit patterns of the fp32 scores: for non-negative floats the int32 bit pattern orders the
same way as the value, so

1. a 65,536-bin histogram of the high 16 bits (summed over tensors and processes) finds the bin
   that holds the k-th largest score;
2. a second histogram of the low 16 bits, over the elements of that bin only, gives the k-th
   largest score t exactly;
3. every score > t is a canary, and the remaining slots go to scores == t in a fixed global
   order (parameter name, then flat index), so ties never depend on sharding or thread timing.

The fast path runs first: a uniform random sample of ~1M scores brackets t, and one pass over all
scores keeps the indices above the bracket plus the few candidates inside it, from which t is
read exactly. When the bracket misses (it is validated by counts), the radix passes run.

Memory: the scores themselves (one fp32 per parameter), two histograms, and per-chunk
temporaries of `chunk_elements` entries. No pass ever holds all parameters at once.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from immunizer.sharding import LocalRange, is_sharded, local

BINS = 1 << 16
CHUNK_ELEMENTS = 1 << 22


@dataclass
class ScoreShard:
    """Scores for elements [offset, offset + scores.numel()) of parameter `name` (flattened)."""

    name: str
    scores: torch.Tensor
    offset: int = 0


class CanaryScores:
    """Accumulated |∂L_refusal/∂w| per parameter: one fp32 buffer per trainable parameter, or, in a data-parallel
    run, per process a contiguous slice of it (`part` = (rank, world size)): the selection below reads the slices
    where they are, and gradients, averaged before they are read, are the same on every process. Under FSDP the
    slice is the process's own piece of the parameter (sharding.py), read from its piece of the gradient."""

    def __init__(self, model: torch.nn.Module, part: tuple[int, int] = (0, 1)):
        rank, world = part
        self.slices: dict[str, tuple[int, int]] = {}
        self.scores: dict[str, torch.Tensor] = {}
        for n, p in model.named_parameters():
            if p.requires_grad:
                if is_sharded(p):
                    piece = LocalRange.of(p)
                    start, end = piece.start, piece.end
                else:
                    per = -(-p.numel() // world)  # ceil: the last slice may be shorter (parallel.gather_slices joins them)
                    start, end = min(p.numel(), rank * per), min(p.numel(), (rank + 1) * per)
                self.slices[n] = (start, end)
                self.scores[n] = torch.zeros(end - start, dtype=torch.float32, device=local(p).device)

    def accumulate(self, model: torch.nn.Module) -> None:
        for name, p in model.named_parameters():
            if p.grad is not None and name in self.scores:
                start, end = self.slices[name]
                grad = local(p.grad).detach().reshape(-1) if is_sharded(p.grad) else p.grad.detach().reshape(-1)[start:end]
                self.scores[name].add_(grad.abs().float())

    def shards(self) -> list[ScoreShard]:
        return [ScoreShard(n, s, self.slices[n][0]) for n, s in self.scores.items()]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """This process's slices (whole tensors in a one-process run; parallel.gather_slices joins them)."""
        return self.scores

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """From whole tensors (a checkpoint), whatever world size wrote them."""
        for name, value in state.items():
            start, end = self.slices[name]
            self.scores[name].copy_(value.reshape(-1)[start:end])


def _distributed(group) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def _all_reduce(tensor: torch.Tensor, group) -> torch.Tensor:
    if _distributed(group):
        dist.all_reduce(tensor, group=group)
    return tensor


def _chunks(bits: torch.Tensor, chunk: int):
    for start in range(0, bits.numel(), chunk):
        yield start, bits[start:start + chunk]


def _bits(shard: ScoreShard) -> torch.Tensor:
    scores = shard.scores.detach().reshape(-1)
    if scores.dtype != torch.float32:
        raise TypeError(f"canary scores for {shard.name} must be float32, not {scores.dtype}")
    return scores.contiguous().view(torch.int32)


def _kth_bin(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """The bin holding the k-th largest element, and how many elements lie in higher bins."""
    above = torch.flip(torch.cumsum(torch.flip(hist, [0]), 0), [0])  # above[b] = count in bins >= b
    b = int(torch.nonzero(above >= k).max())
    return b, int(above[b] - hist[b])


def canary_count(num_parameters: int, k_percent: float) -> int:
    if not 0 < k_percent <= 100:
        raise ValueError(f"k_percent must be in (0, 100], got {k_percent}")
    return max(1, min(num_parameters, round(num_parameters * k_percent / 100.0)))


def _all_gather_objects(obj, group) -> list:
    if not _distributed(group):
        return [obj]
    gathered = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, obj, group=group)
    return gathered


def _radix_threshold(bits: list[torch.Tensor], k: int, group, chunk: int) -> int:
    """The k-th largest score's bit pattern, from two 65,536-bin histograms (always exact)."""
    device = bits[0].device if bits else torch.device("cpu")
    hist = torch.zeros(BINS, dtype=torch.int64, device=device)
    for b in bits:
        for _, c in _chunks(b, chunk):
            hist += torch.bincount(c >> 16, minlength=BINS)
    high, above_high = _kth_bin(_all_reduce(hist, group), k)
    hist.zero_()
    for b in bits:
        for _, c in _chunks(b, chunk):
            inside = c[(c >> 16) == high]
            if inside.numel():
                hist += torch.bincount(inside & 0xFFFF, minlength=BINS)
    low, _ = _kth_bin(_all_reduce(hist, group), k - above_high)
    return (high << 16) | low


def _empty(device) -> torch.Tensor:
    return torch.zeros(0, dtype=torch.long, device=device)


def _at_least(bits: list[torch.Tensor], low: int, chunk: int, cap: int) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """Per tensor: the ascending flat indices with score >= low, and their bit patterns; None as
    soon as more than `cap` would be kept (many scores tied at the bracket, e.g. all zero)."""
    out, n = [], 0
    for b in bits:
        parts = [_empty(b.device)]
        for start, c in _chunks(b, chunk):
            parts.append(torch.nonzero(c >= low).squeeze(1) + start)
            n += parts[-1].numel()
            if n > cap:
                return None
        idx = torch.cat(parts)
        out.append((idx, b[idx]))
    return out


def _split_at(bits: list[torch.Tensor], threshold: int, chunk: int) -> tuple[list[torch.Tensor], list[int]]:
    """Per tensor: the flat indices with score > threshold (fewer than k in all) and how many equal it."""
    greater, tie_counts = [], []
    for b in bits:
        parts, ties = [_empty(b.device)], 0
        for start, c in _chunks(b, chunk):
            parts.append(torch.nonzero(c > threshold).squeeze(1) + start)
            ties += int((c == threshold).sum())
        greater.append(torch.cat(parts))
        tie_counts.append(ties)
    return greater, tie_counts


def _first_equal(b: torch.Tensor, value: int, m: int, chunk: int) -> torch.Tensor:
    """The m lowest flat indices where b == value; stops scanning once it has them."""
    parts, n = [_empty(b.device)], 0
    for start, c in _chunks(b, chunk):
        if n >= m:
            break
        parts.append(torch.nonzero(c == value).squeeze(1)[: m - n] + start)
        n += parts[-1].numel()
    return torch.cat(parts)


def _sampled_threshold(bits: list[torch.Tensor], k: int, total: int, group, chunk: int, sample_size: int):
    """Fast path, one full pass: a random sample brackets the k-th largest score; the pass keeps
    every index at or above the bracket's low end; the exact threshold is read from the few
    candidates inside the bracket. Returns None when the bracket missed or would keep too many
    (then the radix path runs)."""
    # A uniform random sample, not a strided one: gradient magnitudes are structured by row and
    # column (outlier hidden dimensions), and a stride aliases with that structure and biases the
    # bracket (on SmolLM2 a stride of 128 missed every time). The seed only affects speed, never the result.
    gen = torch.Generator().manual_seed(0)
    share = min(1.0, sample_size / total)
    sample = torch.cat([b[torch.randint(0, b.numel(), (round(b.numel() * share),), generator=gen).to(b.device)].cpu()
                        for b in bits if b.numel()] + [torch.zeros(0, dtype=torch.int32)])
    sample = torch.cat(_all_gather_objects(sample, group))
    n = sample.numel()
    rank = k * n / total
    margin = 6.0 * (rank * (1 - k / total)) ** 0.5 + 64
    hi_rank, lo_rank = int(rank - margin), int(rank + margin)
    # Only the top lo_rank+1 of the sample matter: a partial top-k is ~10x cheaper than sorting it.
    top = torch.topk(sample, min(n, lo_rank + 1), sorted=True).values
    high = int(top[hi_rank]) if hi_rank >= 0 else 0x7FFFFFFF  # no upper bound
    low = int(top[lo_rank]) if lo_rank < n else -1
    # The bracket should keep about (lo_rank+1)/n of all scores; twice that means massive ties.
    kept = _at_least(bits, low, chunk, cap=int(2 * (lo_rank + 1) * total / max(n, 1)) + chunk)
    inside = [] if kept is None else [values[values <= high].cpu() for _, values in kept]
    n_kept = 0 if kept is None else sum(idx.numel() for idx, _ in kept)
    n_inside = sum(x.numel() for x in inside)
    counts = _all_reduce(torch.tensor([n_kept - n_inside, n_inside, kept is None], dtype=torch.int64,
                                      device=bits[0].device if bits else None), group)
    n_above, n_cand, overflowed = (int(x) for x in counts)
    if overflowed or not n_above < k <= n_above + n_cand:
        return None
    everyone = torch.cat(_all_gather_objects(torch.cat(inside + [torch.zeros(0, dtype=torch.int32)]), group))
    threshold = int(torch.topk(everyone, k - n_above, sorted=True).values[-1])
    return threshold, kept


def select_top_percent(shards: list[ScoreShard], k_percent: float, group=None,
                       chunk_elements: int = CHUNK_ELEMENTS, sample_size: int = 1 << 20) -> dict[str, torch.Tensor]:
    """Exact global top-K% of all scores in `shards` (across all processes of `group` when
    torch.distributed is initialized). Returns, for this process's shards, the selected flat
    indices into each full parameter (int64, ascending).

    Ties at the threshold go to the lowest (parameter name, flat index), whatever the sharding."""
    bits = [_bits(s) for s in shards]
    device = bits[0].device if bits else torch.device("cpu")
    total = int(_all_reduce(torch.tensor([sum(b.numel() for b in bits)], dtype=torch.int64, device=device), group))
    if total == 0:
        raise ValueError("no canary scores to select from (the model has no trainable parameters?)")
    k = canary_count(total, k_percent)

    found = _sampled_threshold(bits, k, total, group, chunk_elements, sample_size)
    if found is not None:
        threshold, kept = found
        greater = [idx[values > threshold] for idx, values in kept]
        ties = [idx[values == threshold] for idx, values in kept]
        tie_counts = [t.numel() for t in ties]
        first_ties = lambda i, m: ties[i][:m]  # noqa: E731
    else:  # never materializes the ties beyond the ones taken: all-equal scores stay cheap
        threshold = _radix_threshold(bits, k, group, chunk_elements)
        greater, tie_counts = _split_at(bits, threshold, chunk_elements)
        first_ties = lambda i, m: _first_equal(bits[i], threshold, m, chunk_elements)  # noqa: E731

    n_greater = int(_all_reduce(torch.tensor([sum(g.numel() for g in greater)], dtype=torch.int64, device=device), group))
    everyone = [row for rows in _all_gather_objects(
        [(s.name, s.offset, count) for s, count in zip(shards, tie_counts)], group) for row in rows]
    take, remaining = {}, k - n_greater
    for name, offset, count in sorted(everyone):
        take[(name, offset)] = min(count, remaining)
        remaining -= take[(name, offset)]

    selected: dict[str, list[torch.Tensor]] = {}
    for i, s in enumerate(shards):
        idx, m = greater[i], take[(s.name, s.offset)]
        if m:
            idx = torch.sort(torch.cat([idx, first_ties(i, m)])).values
        # NaN and inf sort above every finite score, so checking the winners catches them all;
        # (scores come from |grad|, so the sign bit is never set and negatives cannot occur.)
        if bool((bits[i][idx] >= 0x7F800000).any()):
            raise ValueError(f"canary scores for {s.name} contain NaN or inf; the refusal loss diverged")
        if idx.numel():
            selected.setdefault(s.name, []).append(idx + s.offset)
    return {name: torch.sort(torch.cat(parts)).values if len(parts) > 1 else parts[0]
            for name, parts in selected.items()}


def gather_selection(selection: dict[str, torch.Tensor], group=None) -> dict[str, torch.Tensor]:
    """Merge every process's selection (for writing one manifest). A no-op in one process."""
    if not _distributed(group):
        return selection
    gathered = _all_gather_objects({k: v.cpu() for k, v in selection.items()}, group)
    merged: dict[str, list[torch.Tensor]] = {}
    for part in gathered:
        for name, idx in part.items():
            merged.setdefault(name, []).append(idx)
    return {name: torch.sort(torch.cat(parts)).values for name, parts in sorted(merged.items())}


def canary_values(model: torch.nn.Module, selection: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Current fp32 values of the model's parameters at the selected flat indices."""
    params = dict(model.named_parameters())
    return {name: params[name].detach().reshape(-1)[idx.to(params[name].device)].float().cpu()
            for name, idx in selection.items()}
