"""``prefixrt bench serve``: the HTTP server under load, against a straightforward server and the offline Engine.

One run measures, on the same requests (``--prefixes`` prefixes of ``--prefix-len``, ``--prompt-len``-token
prompts, exactly ``--new-tokens`` new tokens each, greedy), at each ``--concurrency`` level:

* ``prefixrt_serve`` -- ``prefixrt serve`` (the Engine, continuous batching) in its own process;
* ``hf_generate_serve`` -- the baseline: the same routes served by the same FastAPI app with
  ``--executor hf-generate``: HF ``generate()`` once per request on the plain model, the prefix copied into the
  cache PEFT-style (see :mod:`prefixrt.serve.hf_loop`);
* ``engine_offline`` -- :class:`prefixrt.Engine` in this process on the same requests (no HTTP): what the HTTP
  layer costs is ``1 - prefixrt_serve / engine_offline`` output tok/s.

The load generator (:mod:`prefixrt.serve.bench`) reports request/s, output tok/s, and TTFT, TPOT, ITL and E2EL
(mean, median, p99) as ``vllm bench serve`` names them; the servers run one at a time, the load generator in this
process. Before timing, one request per prefix checks that the three give the same tokens. Writes JSON (device,
versions, commit, date, load average, figures, targets) and a PNG plot.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

# Targets at the highest concurrency, for GPT-2-small shapes on a 2-core CPU (8 prefixes, prompt 32, 64 new tokens,
# 32 clients): output tok/s at least 4x the baseline's with a lower TTFT p99; the HTTP layer costs at most 15% of
# the offline Engine's tok/s.
TARGETS = {"speedup_vs_hf_generate_serve": 4.0, "max_http_overhead": 0.15}
METHODS = ("prefixrt_serve", "hf_generate_serve", "engine_offline")


def add_serve_parser(sub) -> None:
    p = sub.add_parser(
        "serve", help="the HTTP server under load (vs HF generate() per request)", description=__doc__
    )
    p.add_argument(
        "--model",
        default="gpt2-small",
        help="a built-in config or a local GPT-2 directory (default gpt2-small)",
    )
    p.add_argument(
        "--model-config",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config field of a built-in model",
    )
    p.add_argument("--tokenizer", help="tokenizer directory (default: the model's, else the shared data's)")
    p.add_argument("--prefixes", type=int, default=8)
    p.add_argument("--prefix-len", type=int, default=10)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument(
        "--num-requests",
        type=int,
        default=None,
        help="requests per level (default: 2 x concurrency, at least 8)",
    )
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument(
        "--threads", type=int, default=None, help="torch threads of the servers and the offline engine"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("serve_bench.json"), help="JSON output")
    p.add_argument("--plot", type=Path, default=None, help="PNG output (default: --out with .png)")  # fmt: skip


def _workload(args, vocab: int):
    import torch

    from prefixrt.serve.bench import BenchRequest

    g = torch.Generator().manual_seed(args.seed + 1)
    levels = {}
    for c in args.concurrency:
        n = args.num_requests or max(2 * c, 8)
        prompts = torch.randint(1, vocab - 1, (n, args.prompt_len), generator=g).tolist()  # no EOS in prompts
        levels[c] = [
            BenchRequest(p, f"prefix{i % args.prefixes}", args.new_tokens) for i, p in enumerate(prompts)
        ]
    return levels


def run_serve(args: argparse.Namespace) -> int:
    import torch

    from prefixrt.commands.bench import _load
    from prefixrt.commands.bench import environment as bench_environment
    from prefixrt.commands.serve import load
    from prefixrt.serve.bench import ServerProcess, fetch_tokens, offline_engine, run_level

    if args.threads:
        torch.set_num_threads(args.threads)
    options = argparse.Namespace(
        model=args.model,
        model_seed=0,
        model_config=args.model_config,
        tokenizer=args.tokenizer,
        served_model_name=None,
    )
    model, tokenizer, served = load(options)
    bank = _bank(model, args)
    levels = _workload(args, model.config.vocab_size)
    environment = {**bench_environment(args.threads), "load_before": _load()}
    check = [next(r for r in levels[max(levels)] if r.model == f"prefix{p}") for p in range(args.prefixes)]
    check = check[: min(len(check), 4)]
    engine_sizes = dict(max_prompt_tokens=args.prompt_len, max_new_tokens=args.new_tokens)
    results: list[dict] = []
    tokens: dict[str, list] = {}
    key = os.environ.get("PREFIXRT_API_KEY")  # the servers require it when it is set
    with tempfile.TemporaryDirectory() as tmp:
        bank_file = Path(tmp) / "bench_bank.safetensors"
        bank.save(bank_file)
        common = [
            "--model",
            args.model,
            "--bank",
            str(bank_file),
            "--max-batch-size",
            str(max(args.concurrency)),
        ]
        common += [f"--model-config={kv}" for kv in args.model_config]
        common += ["--max-prompt-tokens", str(args.prompt_len), "--max-new-tokens", str(args.new_tokens)]
        common += ["--max-waiting", str(max(args.num_requests or 0, 2 * max(args.concurrency), 8))]
        if args.tokenizer:
            common += ["--tokenizer", args.tokenizer]
        if args.threads:
            common += ["--threads", str(args.threads)]
        for method, extra in (("prefixrt_serve", []), ("hf_generate_serve", ["--executor", "hf-generate"])):
            if method not in args.methods:
                continue
            with ServerProcess(common + extra, Path(tmp) / f"{method}.log") as server:
                url = server.wait_ready()
                tokens[method] = fetch_tokens(url, check, key)  # also the warm-up
                for c, requests in levels.items():
                    row = {
                        "method": method,
                        **run_level(url, requests, c, api_key=key),
                        "load_after": _load(),
                    }
                    results.append(row)
                    print(_line(row), flush=True)
    if "engine_offline" in args.methods:
        check_run = offline_engine(model, bank, check, len(check), **engine_sizes)
        tokens["engine_offline"] = check_run["tokens"]
        for c, requests in levels.items():
            row = offline_engine(model, bank, requests, c, **engine_sizes)
            row.pop("tokens")
            results.append({"method": "engine_offline", **row, "load_after": _load()})
            print(_line(results[-1]), flush=True)
    reference = next(iter(tokens.values()), None)
    same = {m: t == reference for m, t in tokens.items()}
    summary = _summarize(results, args)
    report = {
        "workload": {
            "model": args.model,
            "model_config": args.model_config,
            "layers": model.config.n_layer,
            "hidden": model.config.n_embd,
            "prefixes": args.prefixes,
            "prefix_len": args.prefix_len,
            "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens,
            "concurrency": args.concurrency,
            "greedy": True,
        },
        "environment": environment,
        "same_tokens": same,
        "results": results,
        "summary": summary,
        "targets": TARGETS,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    plot = args.plot or args.out.with_suffix(".png")
    _plot(results, environment, plot)
    print(f"same tokens: {same}")
    for key, value in summary.items():
        print(f"{key}: {value}")
    print(f"wrote {args.out} and {plot}")
    return 0


def _bank(model, args):
    import torch

    from prefixrt.bank import PrefixBank

    bank = PrefixBank.for_model(model)
    spec = bank.spec.sites["decoder"]
    g = torch.Generator().manual_seed(args.seed)
    for p in range(args.prefixes):
        kv = torch.randn(spec.num_layers, 2, spec.num_heads, args.prefix_len, spec.head_dim, generator=g)
        bank.add(f"prefix{p}", kv)
    return bank


def _line(r: dict) -> str:
    parts = [
        f"{r['method']:<18} c={r['concurrency']:<3} {r['output_throughput']:8.1f} tok/s {r['request_throughput']:6.2f} req/s"
    ]
    if "p99_ttft_ms" in r and r["p99_ttft_ms"] is not None:
        parts.append(f"TTFT p50/p99 {r['median_ttft_ms']:.0f}/{r['p99_ttft_ms']:.0f} ms")
        parts.append(f"TPOT p50 {r['median_tpot_ms']:.1f} ms" if r["median_tpot_ms"] is not None else "")
    if r.get("failed"):
        parts.append(f"FAILED {r['failed']}: {r['errors']}")
    return "  ".join(p for p in parts if p)  # fmt: skip


def _summarize(results: list[dict], args) -> dict:
    top = max(args.concurrency)
    by = {r["method"]: r for r in results if r["concurrency"] == top}
    out: dict = {"concurrency": top}
    ours, base, offline = by.get("prefixrt_serve"), by.get("hf_generate_serve"), by.get("engine_offline")
    if ours and base:
        out["speedup_vs_hf_generate_serve"] = ours["output_throughput"] / base["output_throughput"]
        out["lower_ttft_p99_than_hf_generate_serve"] = bool(ours["p99_ttft_ms"] < base["p99_ttft_ms"])
        out["met_speedup"] = out["speedup_vs_hf_generate_serve"] >= TARGETS["speedup_vs_hf_generate_serve"]
    if ours and offline:
        out["http_overhead"] = 1.0 - ours["output_throughput"] / offline["output_throughput"]
        out["met_http_overhead"] = out["http_overhead"] <= TARGETS["max_http_overhead"]
    return out


def _plot(results: list[dict], environment: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for method in dict.fromkeys(r["method"] for r in results):
        rows = sorted((r for r in results if r["method"] == method), key=lambda r: r["concurrency"])
        xs = [r["concurrency"] for r in rows]
        axes[0].plot(xs, [r["output_throughput"] for r in rows], marker="o", label=method)
        if rows and rows[0].get("p99_ttft_ms") is not None:
            axes[1].plot(xs, [r["p99_ttft_ms"] for r in rows], marker="o", label=method)
    axes[0].set_title("output tokens / s (higher is better)")
    axes[1].set_title("TTFT p99, ms (lower is better)")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.legend(fontsize=8)
    fig.suptitle(
        f"prefixrt serve under load, {environment['cpu']} ({environment['threads']} threads)", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
