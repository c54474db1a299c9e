"""Multi-process training (gloo on CPU, 2 processes) takes the steps of one process on the whole batch.

The data are chosen so the sharding has every hard case: the epoch's row count is not a multiple of the world
size (the sampler's repeated row must be dropped), the last global batch leaves one process without rows, and
the small task is missing from one process's shard while present in the global batch (it must still be updated,
and a task absent from the global batch must not be).
"""

import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
from support.threads import one_thread  # noqa: F401  (fixture)
from support.training import PAD, task_rows, tiny_model

from prefixrt.cli import main
from prefixrt.train import Dist, PrefixTuner, RunOptions, TrainConfig, finetune, train

pytestmark = pytest.mark.usefixtures("one_thread")

WORLD = 2
CASES = ("prefix-gpt2", "prefix-bart", "finetune-gpt2")
# 7 + 2 = 9 rows, global batch 4: 3 steps per epoch, the last holding one row (process 1 gets none).
CONFIG = dict(lr=2e-2, batch_size=4, max_steps=7, warmup_steps=2, log_every=1, seed=5, max_grad_norm=0.5)


def rows(kind: str, target: list[int], n: int, seed: int):
    return task_rows(kind, target, n, seed, source_lengths=(2, 7))


def run_case(case: str, dist: Dist | None) -> dict:
    """One training run; returns the trained parameters and the logged (global) losses."""
    method, kind = case.split("-")
    model = tiny_model(kind)
    data = {"a": rows(kind, [10, 11, 12, 13], 7, 0), "b": rows(kind, [20, 21, 22], 2, 1)}
    dev = {"a": rows(kind, [10, 11, 12, 13], 3, 2), "b": rows(kind, [20, 21, 22], 3, 3)}
    config = TrainConfig(**CONFIG)
    options = RunOptions(
        pad_token_id=PAD, config=config, progress=False, dev_data=dev, eval_every=3, dist=dist
    )
    if method == "prefix":
        # Task "c" has no rows at all: it must never move (weight decay would move it if it got an update).
        tuner = PrefixTuner(model, {"a": 3, "b": 2, "c": 2}, mid_dim=16, seed=0)
        result = train(model, tuner, data, options)
        params = {k: v.detach().clone() for k, v in tuner.state_dict().items()}
    else:
        result = finetune(model, data, options)
        params = {k: v.detach().clone() for k, v in model.named_parameters()}
    losses = [[r.get(k, float("nan")) for k in ("loss", "loss/a", "loss/b", "dev_loss")] for r in result.log]
    return {"params": params, "losses": torch.tensor(losses, dtype=torch.float64), "step": result.step}


def _worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        for case in CASES:
            torch.save(run_case(case, Dist.current()), os.path.join(out_dir, f"{case}.rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    return {
        case: [torch.load(out / f"{case}.rank{r}.pt", weights_only=True) for r in range(WORLD)]
        for case in CASES
    }


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_two_processes_take_the_steps_of_one(case, two_process_results):
    one = run_case(case, Dist())
    ranks = two_process_results[case]
    for r in ranks:
        assert r["step"] == one["step"] == CONFIG["max_steps"]
    # The processes hold identical parameters (same update everywhere) ...
    for name, value in ranks[0]["params"].items():
        assert torch.equal(value, ranks[1]["params"][name]), name
    # ... equal to one process's, up to summation order.
    for name, value in one["params"].items():
        got = ranks[0]["params"][name]
        if name.endswith("attn.c_attn.bias"):
            # The key bias's exact gradient is 0 (softmax ignores a shift shared by all keys): what it gets is
            # rounding noise, which Adam normalizes into full-size steps. Compare the query and value parts.
            keep = torch.ones_like(value, dtype=torch.bool)
            keep[32:64] = False
            got, value = got[keep], value[keep]
        torch.testing.assert_close(got, value, rtol=1e-5, atol=5e-6, msg=name)  # Adam amplifies rounding
    # The training loss rows (global, all tasks and per task) and the dev loss agree too.
    torch.testing.assert_close(ranks[0]["losses"], one["losses"], rtol=1e-5, atol=1e-6, equal_nan=True)
    if case.startswith("prefix"):
        start = PrefixTuner(tiny_model(case.split("-")[1]), {"a": 3, "b": 2, "c": 2}, mid_dim=16, seed=0)
        for name, value in start.state_dict().items():
            moved = not torch.equal(value, ranks[0]["params"][name])
            assert moved == (not name.startswith("prefixes.2.")), name  # "c" had no rows anywhere


@pytest.mark.slow
def test_torchrun_cli_matches_one_process(tmp_path, shared_data):
    """``torchrun --nproc_per_node 2 -m prefixrt train`` writes the bank one process writes."""
    toy = tmp_path / "toy.jsonl"
    toy.write_text(
        "".join(f'{{"src": "city : Paris | stars : {i}", "tgt": "A {i} star hotel."}}\n' for i in range(7))
    )
    common = [
        "train", "--model", "gpt2-tiny", "--tokenizer", str(shared_data / "gpt2-tokenizer"),
        # no dropout: each process draws its own masks
        "--model-config", "resid_pdrop=0", "--model-config", "embd_pdrop=0", "--model-config", "attn_pdrop=0",
        "--task", f"e2e={shared_data / 'e2e' / 'devset.csv'}:3", "--task", f"toy={toy}:2", "--max-rows", "9",
        "--max-steps", "3", "--batch-size", "4", "--mid-dim", "16", "--lr", "1e-2", "--no-progress",
        "--dev", f"e2e={shared_data / 'e2e' / 'testset_w_refs.csv'}", "--dev-max-rows", "4",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = tmp_path / "one.safetensors"
    assert main([*common, "--out", str(one)]) == 0
    two = tmp_path / "two.safetensors"
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
    ]
    subprocess.run([*torchrun, "-m", "prefixrt", *common, "--out", str(two)], check=True, env=env)

    import prefixrt

    a, b = prefixrt.PrefixBank.load(one), prefixrt.PrefixBank.load(two)
    assert a.names == b.names == ["e2e", "toy"]
    for name in a.names:
        torch.testing.assert_close(b.entry(name)["decoder"], a.entry(name)["decoder"], rtol=1e-4, atol=1e-5)
