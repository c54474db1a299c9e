"""`prefixrt bench generate` on a small model: every method runs, agrees on the tokens, and the report is whole."""

import json

from prefixrt.cli import main


def test_bench_generate_writes_a_complete_report(tmp_path):
    out = tmp_path / "bench.json"
    argv = ["bench", "generate", "--small", "--prefixes", "3", "--per-prefix", "2", "--prompt-len", "5"]
    argv += ["--new-tokens", "4", "--prefix-lengths", "2", "7", "--warmup-tokens", "1", "--out", str(out)]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    results = report["results"]
    assert {(r["prefix_len"], r["method"]) for r in results} == {
        (p, m) for p in (2, 7) for m in ("peft_style", "hf_attached", "prefixrt_generate", "prefixrt_engine")
    }
    for r in results:
        assert r["same_tokens_as_hf_attached"], r["method"]
        assert r["tokens"] == 3 * 2 * 4 and r["tokens_per_s"] > 0
    assert report["environment"]["device"] == "cpu" and report["workload"]["prefix_lengths"] == [2, 7]
    for entry in report["summary"]:
        assert entry["target_vs_peft_style"] == 3.0 and entry["target_vs_hf_attached"] == 1.5
        assert entry["met_vs_peft_style"] == (entry["speedup_vs_peft_style"] >= 3.0)
    assert out.with_suffix(".png").stat().st_size > 0
