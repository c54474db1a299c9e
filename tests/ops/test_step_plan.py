"""Step plans (plain torch, no kernel): validation of the ids, the sort-by-id tables, decode groups and bank
tiles sized by the ids the step uses, the same tables with or without reading the ids on the host."""

import pytest
import torch

from prefixrt.ops import StepPlan


def brute_tiles(ids, lengths, block):
    return sorted((e, j) for e in set(ids) if e >= 0 for j in range(-(-lengths[e] // block)))


def brute_groups(ids, group):
    rows = sorted(range(len(ids)), key=lambda r: ids[r])  # stable, like the plan
    out = []
    for e in sorted(set(ids) - {-1}):
        mine = [r for r in rows if ids[r] == e]
        out += [(e, mine[i : i + group]) for i in range(0, len(mine), group)]
    return out


def groups_of(plan):
    order = plan.order.tolist()
    return [
        (e, order[s : s + r])
        for e, s, r in zip(
            plan.group_entry.tolist(), plan.group_start.tolist(), plan.group_rows.tolist(), strict=True
        )
        if e >= 0
    ]


def tiles_of(plan, lengths, block):
    entry, index = plan.bank_tiles(torch.tensor(lengths, dtype=torch.long), block)
    return sorted((e, j) for e, j in zip(entry.tolist(), index.tolist(), strict=True) if e >= 0)


def test_rows_sorted_by_id_in_a_stable_order():
    plan = StepPlan.build(torch.tensor([3, 0, 3, 1, -1, 3]), [2, 5, 0, 4, 7])
    assert plan.order.tolist() == [4, 1, 3, 0, 2, 5]
    assert plan.seg_offsets.tolist() == [1, 2, 3, 3, 6, 6]  # rows with id < e, the -1 row included
    assert plan.counts().tolist() == [1, 1, 0, 3, 0]
    assert plan.used.tolist() == [0, 1, 3]
    assert plan.max_used_length == 5 and plan.bank_rows == 18


@pytest.mark.parametrize("read_ids", [True, False], ids=["host", "device"])
@pytest.mark.parametrize("seed", range(8))
def test_tables_match_brute_force(seed, read_ids):
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 7, (1,), generator=g))
    lengths = torch.randint(0, 70, (n,), generator=g).tolist()
    batch = int(torch.randint(1, 40, (1,), generator=g))
    ids = torch.randint(-1, n, (batch,), generator=g)
    plan = StepPlan.build(ids, lengths, group_size=16, read_ids=read_ids)
    assert groups_of(plan) == brute_groups(ids.tolist(), 16)
    assert tiles_of(plan, lengths, 16) == brute_tiles(ids.tolist(), lengths, 16)
    assert all(
        r == 0 for e, r in zip(plan.group_entry.tolist(), plan.group_rows.tolist(), strict=True) if e < 0
    )
    regrouped = plan.with_group_size(32)
    assert groups_of(regrouped) == brute_groups(ids.tolist(), 32)
    assert regrouped.order.tolist() == plan.order.tolist()


def test_tables_are_sized_by_the_ids_the_step_uses_not_by_the_bank():
    lengths = [10] * 5000  # a large bank with two hot prefixes
    ids = torch.tensor([7, 4000] * 64)
    plan = StepPlan.build(ids, lengths)
    assert plan.used.tolist() == [7, 4000]
    assert plan.group_size == 64  # 64 rows per used entry, not 128 / 5000
    assert plan.n_groups == 2
    entry, _ = plan.bank_tiles(torch.tensor(lengths), 16)
    assert entry.numel() == 2  # one 16-key tile per used entry, whatever the bank holds


def test_large_group_is_cut_into_group_size_chunks():
    plan = StepPlan.build(torch.tensor([1] * 20 + [0]), [3, 4], group_size=16)
    assert plan.group_entry.tolist() == [0, 1, 1]
    assert plan.group_rows.tolist() == [1, 16, 4]


def test_default_group_size_follows_rows_per_used_entry():
    assert StepPlan.build(torch.zeros(8, dtype=torch.long), [3]).group_size == 16
    assert StepPlan.build(torch.arange(256) % 8, [3] * 8).group_size == 32
    assert StepPlan.build(torch.zeros(300, dtype=torch.long), [3]).group_size == 64


def test_no_prefix_rows_and_empty_banks_give_empty_tables():
    plan = StepPlan.build(torch.tensor([-1, -1]), [])
    assert plan.n_entries == 0 and plan.n_used == 0 and plan.n_groups == 0
    entry, _ = plan.bank_tiles(torch.zeros(0, dtype=torch.long), 16)
    assert entry.numel() == 0
    device = StepPlan.build(torch.tensor([-1, -1]), [], read_ids=False)
    assert (device.group_entry == -1).all()


@pytest.mark.parametrize(
    "ids,lengths,message",
    [
        (torch.tensor([0, 2]), [3, 4], r"prefix_ids holds ids \[2\]; valid ids are -1 \(no prefix\) or 0..1"),
        (torch.tensor([-2]), [3], r"holds ids \[-2\]"),
        (torch.tensor([0]), [], r"valid ids are -1 \(the bank is empty\)"),
        (torch.tensor([0.0]), [3], "prefix_ids must be an integer tensor"),
        (torch.tensor([[0]]), [3], "prefix_ids must be an integer tensor"),
        (torch.tensor([0]), [3, -1], "bank offsets must be non-decreasing"),
    ],
)
def test_bad_ids_are_refused_with_the_valid_range(ids, lengths, message):
    with pytest.raises(ValueError, match=message):
        StepPlan.build(ids, lengths)


def test_group_size_must_suit_tl_dot():
    with pytest.raises(ValueError, match="power of two >= 16"):
        StepPlan.build(torch.tensor([0]), [3], group_size=8)


def test_int32_ids_and_inference_tensors_plan_alike():
    lengths = [2, 3]
    want = StepPlan.build(torch.tensor([1, 0, 1]), lengths)
    with torch.inference_mode():
        got = StepPlan.build(torch.tensor([1, 0, 1], dtype=torch.int32), lengths)
    assert got.prefix_ids.dtype == torch.long
    assert torch.equal(got.table, want.table) and got.dims == want.dims


def test_op_inputs_round_trip():
    plan = StepPlan.build(torch.tensor([2, 0, 2]), [1, 0, 4])
    again = StepPlan.from_op_inputs(*plan.op_inputs())
    assert again.dims == plan.dims and torch.equal(again.table, plan.table)
    assert again.group_entry.tolist() == plan.group_entry.tolist()
