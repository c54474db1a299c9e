"""Sort-by-id plans (plain torch, no kernel): row segments, bank tiles, decode groups and their cache."""

import pytest
import torch

from prefixrt.ops.triton.tables import DecodePlan, bank_tiles, build_segments, decode_plan_for, segments_for


def offsets_of(lengths):
    return torch.tensor([0, *torch.tensor(lengths, dtype=torch.long).cumsum(0).tolist()])


def test_segments_group_rows_by_id_in_a_stable_order():
    seg = build_segments(torch.tensor([3, 0, 3, 1, -1, 3]), offsets_of([2, 5, 0, 4, 7]))
    assert seg.order.tolist() == [4, 1, 3, 0, 2, 5]
    assert seg.seg_offsets.tolist() == [1, 2, 3, 3, 6, 6]  # rows with id < e, the -1 row included
    assert seg.counts.tolist() == [1, 1, 0, 3, 0]
    assert seg.lengths.tolist() == [2, 5, 0, 4, 7]


def test_out_of_range_ids_count_as_no_prefix_like_in_the_kernels():
    seg = build_segments(torch.tensor([5, 0, -1, 1]), offsets_of([2, 3]))
    assert seg.counts.tolist() == [1, 1]
    assert seg.order[:2].tolist() == [0, 2] and seg.seg_offsets.tolist() == [2, 3, 4]


def brute_tiles(ids, lengths, block):
    return sorted((e, j) for e in set(ids) if e >= 0 for j in range(-(-lengths[e] // block)))


def brute_groups(ids, group):
    rows = sorted(range(len(ids)), key=lambda r: ids[r])  # stable, like the plan
    out = []
    for e in sorted(set(ids) - {-1}):
        mine = [r for r in rows if ids[r] == e]
        out += [(e, mine[i : i + group]) for i in range(0, len(mine), group)]
    return out


@pytest.mark.parametrize("seed", range(8))
def test_tables_match_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 7, (1,), generator=g))
    lengths = torch.randint(0, 70, (n,), generator=g).tolist()
    batch = int(torch.randint(1, 40, (1,), generator=g))
    ids = torch.randint(-1, n, (batch,), generator=g)
    seg = build_segments(ids, offsets_of(lengths))

    tiles = bank_tiles(seg, sum(lengths), 16)
    got = sorted((e, j) for e, j in zip(tiles.entry.tolist(), tiles.block.tolist(), strict=True) if e >= 0)
    assert got == brute_tiles(ids.tolist(), lengths, 16)
    assert tiles.entry.shape[0] == tiles.bound

    plan = DecodePlan.build(ids, offsets_of(lengths), group_size=16)
    order = plan.segments.order.tolist()
    got = [
        (e, order[s : s + r])
        for e, s, r in zip(
            plan.group_entry.tolist(), plan.group_start.tolist(), plan.group_rows.tolist(), strict=True
        )
        if e >= 0
    ]
    assert got == brute_groups(ids.tolist(), 16)
    assert all(
        r == 0 for e, r in zip(plan.group_entry.tolist(), plan.group_rows.tolist(), strict=True) if e < 0
    )


def test_large_group_is_cut_into_group_size_chunks():
    plan = DecodePlan.build(torch.tensor([1] * 20 + [0]), offsets_of([3, 4]), group_size=16)
    used = plan.group_entry >= 0
    assert plan.group_entry[used].tolist() == [0, 1, 1]
    assert plan.group_rows[used].tolist() == [1, 16, 4]


def test_default_group_size_follows_rows_per_entry():
    assert DecodePlan.build(torch.zeros(8, dtype=torch.long), offsets_of([3])).group_size == 16
    assert DecodePlan.build(torch.arange(256) % 8, offsets_of([3] * 8)).group_size == 32
    assert DecodePlan.build(torch.zeros(300, dtype=torch.long), offsets_of([3])).group_size == 64


def test_empty_bank_gives_idle_tables():
    seg = build_segments(torch.tensor([-1, -1]), torch.tensor([0]))
    assert seg.counts.numel() == 0
    assert (bank_tiles(seg, 0, 16).entry == -1).all()
    assert (DecodePlan.build(torch.tensor([-1, -1]), torch.tensor([0])).group_entry == -1).all()


def test_cache_hits_for_the_same_tensor_and_misses_after_an_in_place_change():
    ids, offsets = torch.tensor([2, 0, 2]), offsets_of([3, 1, 5])
    plan = decode_plan_for(ids, offsets)
    assert decode_plan_for(ids, offsets) is plan
    assert segments_for(ids, offsets) is plan.segments
    ids[1] = 1  # bumps the version counter
    fresh = decode_plan_for(ids, offsets)
    assert fresh is not plan
    assert fresh.segments.counts.tolist() == [0, 1, 2]
    # an equal but different tensor is planned anew (identity, not value, is the key)
    assert decode_plan_for(ids.clone(), offsets) is not fresh
    assert decode_plan_for(ids, offsets, group_size=32) is not fresh


def test_inference_tensors_are_planned_every_call():
    with torch.inference_mode():
        ids, offsets = torch.tensor([1, 0]), offsets_of([2, 2])
        first = decode_plan_for(ids, offsets)
        ids[0] = 0  # no version counter records this
        second = decode_plan_for(ids, offsets)
    assert second is not first and second.segments.counts.tolist() == [2, 0]
