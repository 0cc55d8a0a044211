"""Exact global top-K% canary selection: against a brute-force reference, with ties, chunking,
the radix fallback, flat shards, and across two processes (torch.distributed, gloo)."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from immunizer import canaries as canaries_mod
from immunizer.canaries import CanaryScores, ScoreShard, canary_count, gather_selection, select_top_percent


def brute_force(named: dict[str, torch.Tensor], k_percent: float) -> dict[str, torch.Tensor]:
    """Concatenate everything and sort by (score desc, name asc, index asc): the definition."""
    rows = [(-float(v), name, i) for name in named for i, v in enumerate(named[name].tolist())]
    k = canary_count(len(rows), k_percent)
    chosen = sorted(rows)[:k]
    out: dict[str, list[int]] = {}
    for _, name, i in chosen:
        out.setdefault(name, []).append(i)
    return {n: torch.tensor(sorted(v)) for n, v in out.items()}


def assert_same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def example_scores(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "layer.0.weight": torch.rand(3000, generator=g) ** 3,
        "layer.1.weight": torch.randint(0, 4, (2000,), generator=g).float() / 4,  # heavy ties
        "bias": torch.zeros(50),
        "single": torch.tensor([0.5]),
    }


@pytest.mark.parametrize("k_percent", [0.01, 0.5, 1.0, 10.0, 33.3, 100.0])
def test_matches_brute_force(k_percent):
    named = example_scores()
    got = select_top_percent([ScoreShard(n, s) for n, s in named.items()], k_percent, chunk_elements=256)
    assert_same(got, brute_force(named, k_percent))


def test_radix_fallback_gives_the_same_answer(monkeypatch):
    named = example_scores(1)
    monkeypatch.setattr(canaries_mod, "_sampled_threshold", lambda *a, **k: None)
    for k_percent in (0.5, 10.0, 60.0):
        got = select_top_percent([ScoreShard(n, s) for n, s in named.items()], k_percent, chunk_elements=100)
        assert_same(got, brute_force(named, k_percent))


def test_all_equal_scores_break_ties_by_name_then_index():
    named = {"b": torch.ones(10), "a": torch.ones(10)}
    got = select_top_percent([ScoreShard(n, s) for n, s in named.items()], 25.0)
    assert list(got) == ["a"] and got["a"].tolist() == [0, 1, 2, 3, 4]


def test_massive_ties_take_the_bounded_path_and_stay_exact(monkeypatch):
    """All-zero scores (e.g. the refusal loss switched off): the fast path would keep every index,
    so it gives up at its cap and the radix path materializes only the ties it takes."""
    named = {"b": torch.zeros(5000), "a": torch.zeros(3000)}
    named["b"][[7, 4000]] = 1.0
    calls = []
    original = canaries_mod._radix_threshold
    monkeypatch.setattr(canaries_mod, "_radix_threshold", lambda *a: calls.append(1) or original(*a))
    got = select_top_percent([ScoreShard(n, s) for n, s in named.items()], 1.0, chunk_elements=64, sample_size=512)
    assert calls, "the fast path should have given up on 8,000 tied scores"
    assert_same(got, brute_force(named, 1.0))
    assert got["b"].tolist() == [7, 4000] and got["a"].tolist() == list(range(78))


def test_flat_shards_of_one_parameter_select_the_same_set():
    named = example_scores(2)
    whole = select_top_percent([ScoreShard(n, s) for n, s in named.items()], 5.0)
    w = named["layer.0.weight"]
    shards = [ScoreShard("layer.0.weight", w[:1234], 0), ScoreShard("layer.0.weight", w[1234:], 1234)]
    shards += [ScoreShard(n, s) for n, s in named.items() if n != "layer.0.weight"]
    assert_same(select_top_percent(shards, 5.0), whole)


def test_bad_scores_and_bad_k_are_rejected():
    with pytest.raises(ValueError, match="NaN or inf"):
        select_top_percent([ScoreShard("w", torch.tensor([1.0, float("nan"), 0.0]))], 50.0)
    with pytest.raises(ValueError, match="k_percent"):
        select_top_percent([ScoreShard("w", torch.rand(10))], 0.0)
    with pytest.raises(TypeError, match="float32"):
        select_top_percent([ScoreShard("w", torch.rand(10, dtype=torch.float64))], 10.0)


def test_canary_scores_accumulate_absolute_gradients(tiny):
    model, _ = tiny
    scores = CanaryScores(model)
    assert sum(s.numel() for s in scores.scores.values()) == sum(p.numel() for p in model.parameters())
    for sign in (1.0, -1.0):
        model.zero_grad()
        (sign * model(input_ids=torch.tensor([[1, 2, 3]])).logits.sum()).backward()
        scores.accumulate(model)
    name, param = next(iter(model.named_parameters()))
    assert torch.allclose(scores.scores[name], 2 * param.grad.reshape(-1).abs())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, named, k_percent, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        # rank 0 holds the first parameter and half of the second; rank 1 the rest
        names = sorted(named)
        second = named[names[1]]
        half = second.numel() // 2
        if rank == 0:
            shards = [ScoreShard(names[0], named[names[0]]), ScoreShard(names[1], second[:half], 0)]
        else:
            shards = [ScoreShard(names[1], second[half:], half)] + [ScoreShard(n, named[n]) for n in names[2:]]
        local = select_top_percent(shards, k_percent, chunk_elements=300)
        merged = gather_selection(local)
        if rank == 0:
            torch.save(merged, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("k_percent", [1.0, 20.0])
def test_two_processes_select_the_same_set_as_one(tmp_path, k_percent):
    named = example_scores(3)
    out = tmp_path / "merged.pt"
    mp.start_processes(_worker, args=(2, _free_port(), named, k_percent, str(out)), nprocs=2, join=True,
                       start_method="spawn")
    single = select_top_percent([ScoreShard(n, s) for n, s in named.items()], k_percent)
    assert_same(torch.load(out), single)
    assert_same(single, brute_force(named, k_percent))
