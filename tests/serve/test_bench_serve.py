"""``prefixrt bench serve`` runs end to end on a tiny config (two servers, the offline engine, JSON and a plot);
its figures are not checked (the full-size workload is what the targets are about), its bookkeeping is."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from support.paths import REPO_ROOT, SHARED_DATA

pytestmark = pytest.mark.slow

VLLM_NAMES = [
    f"{stat}_{name}_ms" for name in ("ttft", "tpot", "itl", "e2el") for stat in ("mean", "median", "p99")
]


def test_bench_serve_runs_tiny(tmp_path):
    out = tmp_path / "serve_bench.json"
    cmd = [sys.executable, "-m", "prefixrt", "bench", "serve", "--model", "gpt2-tiny", "--concurrency", "1", "2",
           "--num-requests", "3", "--new-tokens", "4", "--prefixes", "2", "--threads", "1", "--out", str(out)]  # fmt: skip
    env = {**os.environ, "PREFIXRT_SHARED_DATA": str(SHARED_DATA), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=420)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 0
    assert report["same_tokens"] == {
        "prefixrt_serve": True,
        "hf_generate_serve": True,
        "engine_offline": True,
    }
    rows = {(r["method"], r["concurrency"]): r for r in report["results"]}
    assert set(rows) == {
        (m, c) for m in ("prefixrt_serve", "hf_generate_serve", "engine_offline") for c in (1, 2)
    }
    for (method, _), row in rows.items():
        assert row["completed"] == 3 and row["total_output_tokens"] == 3 * 4
        assert row["request_throughput"] > 0 and row["output_throughput"] > 0
        if method != "engine_offline":
            assert row["failed"] == 0, row["errors"]
            assert all(row[name] is not None and row[name] >= 0 for name in VLLM_NAMES)
            assert row["p99_ttft_ms"] >= row["median_ttft_ms"]
    summary = report["summary"]
    assert summary["concurrency"] == 2
    assert {"speedup_vs_hf_generate_serve", "http_overhead", "lower_ttft_p99_than_hf_generate_serve"} <= set(
        summary
    )
    assert report["environment"]["threads"] == 1 and report["workload"]["new_tokens"] == 4
