"""`prefixrt bench generate` on a small model: every method runs, agrees on the tokens, and the report is whole."""

import json
import sys

from prefixrt.cli import main


def test_bench_generate_writes_a_complete_report(tmp_path):
    out = tmp_path / "bench.json"
    argv = ["bench", "generate", "--small", "--prefixes", "3", "--per-prefix", "2", "--prompt-len", "5"]
    argv += ["--new-tokens", "4", "--prefix-lengths", "2", "7", "--warmup-tokens", "1", "--out", str(out)]
    argv += ["--methods", "peft_style", "hf_attached", "prefixrt_generate", "prefixrt_engine"]
    argv += ["prefixrt_engine_plain", "hf_no_prefix"]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    results = report["results"]
    methods = ("peft_style", "hf_attached", "prefixrt_generate", "prefixrt_engine", "prefixrt_engine_plain")
    assert {(r["prefix_len"], r["method"]) for r in results} == {
        (p, m) for p in (2, 7) for m in (*methods, "hf_no_prefix")
    }
    for r in results:
        if r["method"] == "hf_no_prefix":
            assert "same_tokens_as_hf_attached" not in r  # no prefix: other tokens
        else:
            assert r["same_tokens_as_hf_attached"], r["method"]
        assert r["tokens"] == 3 * 2 * 4 and r["tokens_per_s"] > 0
        assert r["process_peak_rss_bytes"] > r["peak_memory_bytes"] >= 0
    assert report["environment"]["device"] == "cpu" and report["workload"]["prefix_lengths"] == [2, 7]
    for entry in report["summary"]:
        assert entry["target_vs_peft_style"] == 3.0 and entry["target_vs_hf_attached"] == 1.5
        assert entry["met_vs_peft_style"] == (entry["speedup_vs_peft_style"] >= 3.0)
        assert entry["plain_gemm_floor_s"] > 0 and entry["packed_gemm_floor_s"] > 0
        assert entry["engine_share_met"] == (entry["engine_share_of_packed_floor"] >= 0.8)
    assert report["vllm"] is None and "engine_vs_vllm" not in report["summary"][0]
    assert out.with_suffix(".png").stat().st_size > 0


def test_bench_generate_compiled_hf_arm_gives_the_attached_tokens(tmp_path):
    """HF's compiled decoding (torch.compile + the static cache) on the attached model: same tokens as eager."""
    out = tmp_path / "bench.json"
    argv = ["bench", "generate", "--small", "--prefixes", "2", "--per-prefix", "2", "--prompt-len", "5"]
    argv += ["--new-tokens", "3", "--prefix-lengths", "3", "--methods", "hf_attached", "hf_compiled"]
    assert main(argv + ["--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [r["method"] for r in report["results"]] == ["hf_attached", "hf_compiled"]
    assert all(r["same_tokens_as_hf_attached"] for r in report["results"])
    assert report["startup_s"]["hf_compiled_P3"] > 0


def test_bench_generate_reports_a_vllm_interpreter_that_fails(tmp_path):
    """--vllm-python runs the vLLM arm in that interpreter; one that fails is reported, not fatal."""
    out = tmp_path / "bench.json"
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho no vllm here >&2\nexit 3\n")
    fake.chmod(0o755)
    argv = ["bench", "generate", "--small", "--prefixes", "2", "--per-prefix", "1", "--prompt-len", "4"]
    argv += ["--new-tokens", "2", "--prefix-lengths", "2", "--methods", "prefixrt_engine", "hf_no_prefix"]
    assert main(argv + ["--vllm-python", str(fake), "--out", str(out)]) == 0
    vllm = json.loads(out.read_text())["vllm"]
    assert vllm["error"] == "exit 3" and "no vllm here" in vllm["output_tail"]


def test_bench_generate_reads_the_vllm_arms_report(tmp_path):
    """The arm's JSON (here from a stand-in interpreter that answers zeros) becomes the report's vLLM figures,
    with its tokens checked against HF's without prefixes."""
    out = tmp_path / "bench.json"
    fake = tmp_path / "python"
    fake.write_text(
        "#!" + sys.executable + "\n"
        "import json, sys\n"
        "a = sys.argv[1:]\n"
        "arg = lambda k: a[a.index(k) + 1]\n"
        "rows = len(json.load(open(arg('--prompts'))))\n"
        "n = int(arg('--new-tokens'))\n"
        "json.dump({'rounds_s': [0.5, 0.25], 'tokens': [[0] * n] * rows, 'startup_s': 1.0, 'rss_bytes': 2**30,\n"
        "           'versions': {'vllm': 'stand-in'}, 'env': {}}, open(arg('--out'), 'w'))\n"
    )
    fake.chmod(0o755)
    argv = ["bench", "generate", "--small", "--prefixes", "2", "--per-prefix", "1", "--prompt-len", "4"]
    argv += ["--new-tokens", "2", "--prefix-lengths", "2", "--methods", "prefixrt_engine", "hf_no_prefix"]
    assert main(argv + ["--vllm-python", str(fake), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    vllm = report["vllm"]
    assert vllm["tokens"] == 4 and vllm["seconds"] == 0.25 and vllm["tokens_per_s"] == 16.0
    assert vllm["same_tokens_as_hf_no_prefix"] is False  # zeros are not the model's tokens
    engine = next(r for r in report["results"] if r["method"] == "prefixrt_engine")
    assert report["summary"][0]["engine_vs_vllm"] == engine["tokens_per_s"] / 16.0
