"""``prefixrt eval``: generate for a task's sources with the paper's decoding and score the outputs.

Example::

    prefixrt eval --model /models/gpt2-medium --bank runs/e2e/bank.safetensors \\
        --task e2e=e2e/testset_w_refs.csv --out results/e2e

Each source is generated for once (the rows of a multi-reference source are grouped) and scored against all of
its references with :func:`prefixrt.tasks.score`: BLEU (the official E2E scorer's), NIST, CIDEr, ROUGE-L, TER and
chrF for table-to-text, ROUGE-1/2/L for summarization. Decoding defaults to the paper's per task kind (beam 5 for
table-to-text; beam 6 with length penalty 0.8 for summarization), each setting overridable.

Writes, in ``--out``: ``{task}.json`` (scores, the decoding, data and model, per run when several), ``{task}.md``
(the table), ``{task}[.{run}].outputs.txt`` (one output per line; for table-to-text also
``...outputs-refs.txt``, the official E2E scorer's reference file) and ``results.md`` / ``results.json`` (all
tasks). Several ``--bank`` files (e.g. the seeds of a low-data run), or several fine-tuned ``--model``
directories without a bank, are each evaluated and averaged (mean and standard deviation).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from prefixrt.commands.common import add_model_options, default_device, run_reporting_errors

NAME = "eval"
HELP = (
    "generate with the paper's decoding and score (BLEU/NIST/CIDEr/ROUGE/TER/chrF), per task: JSON + Markdown"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    model = parser.add_argument_group("model and prefixes")
    model.add_argument(
        "--model",
        action="append",
        default=[],
        help="a local model directory or a built-in config (gpt2-tiny, ..., bart-large) with --model-seed; "
        "repeat (without --bank) to evaluate several fine-tuned models (default: gpt2-tiny)",
    )
    add_model_options(model)
    model.add_argument(
        "--bank",
        action="append",
        default=[],
        help="a prefix bank (prefixrt train --out); repeat for several runs to average (e.g. seeds). "
        "Without --bank the plain model is evaluated (a fine-tuned model)",
    )

    data = parser.add_argument_group("data")
    data.add_argument(
        "--task",
        action="append",
        required=True,
        metavar="NAME=PATH",
        help="a task to evaluate: its name (the bank entry of the same name is used) and its data (E2E .csv, "
        "DART .json/.xml, WebNLG, JSONL, or a Hugging Face dataset name); repeat for several",
    )
    data.add_argument(
        "--prefix",
        action="append",
        default=[],
        metavar="NAME=ENTRY",
        help="use bank entry ENTRY for task NAME ('none': no prefix)",
    )
    data.add_argument(
        "--kind",
        action="append",
        default=[],
        metavar="NAME=KIND",
        help="table-to-text or summarization (default: JSONL and text datasets are summarization)",
    )
    data.add_argument(
        "--format", choices=("e2e", "dart", "webnlg", "jsonl"), help="data format (default: by suffix)"
    )
    data.add_argument("--split", default="test", help="split of a Hugging Face dataset (default test)")
    data.add_argument("--max-examples", type=int, help="evaluate the first N sources of each task")
    data.add_argument(
        "--max-source-tokens",
        type=int,
        help="truncate sources (default: none for table-to-text, 512 for summarization)",
    )

    dec = parser.add_argument_group("decoding (default: the paper's per task kind)")
    dec.add_argument("--num-beams", type=int, help="beam width (table-to-text 5, summarization 6)")
    dec.add_argument(
        "--length-penalty", type=float, help="length penalty (table-to-text 1.0, summarization 0.8)"
    )
    dec.add_argument(
        "--max-new-tokens", type=int, help="at most this many tokens (table-to-text 100, summarization 61)"
    )
    dec.add_argument(
        "--min-new-tokens", type=int, help="at least this many tokens (table-to-text 0, summarization 10)"
    )
    dec.add_argument("--no-repeat-ngram-size", type=int, help="default: the model's generation config")
    dec.add_argument("--batch-size", type=int, default=8, help="sources per generate() call (default 8)")

    out = parser.add_argument_group("output")
    out.add_argument("--out", required=True, help="directory for the JSON, Markdown and output files")
    out.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    return run_reporting_errors(NAME, _run, args)


def _run(args: argparse.Namespace) -> int:

    import prefixrt
    from prefixrt.commands.train import parse_pair
    from prefixrt.tasks import KIND_DEFAULTS, TASK_KINDS, kind_of, load_examples
    from prefixrt.train.evaluate import Decoding, evaluate_examples
    from prefixrt.train.models import load_model_and_tokenizer, parse_overrides

    models = args.model or ["gpt2-tiny"]
    if len(models) > 1 and args.bank:
        raise ValueError("several --model runs are for fine-tuned models without a bank; give one --model")
    tasks = [parse_pair(spec, "--task") for spec in args.task]
    names = [name for name, _ in tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"task names must be unique, got {names}")
    entries = {name: name for name in names}
    for name, entry in (parse_pair(spec, "--prefix") for spec in args.prefix):
        if name not in entries:
            raise ValueError(f"--prefix names task {name!r}, which is not evaluated ({names})")
        entries[name] = None if entry.lower() == "none" else entry
    kinds = {name: kind_of(path, args.format) for name, path in tasks}
    for name, kind in (parse_pair(spec, "--kind") for spec in args.kind):
        if kind not in TASK_KINDS:
            raise ValueError(f"--kind {name}={kind}: the kind must be one of {TASK_KINDS}")
        kinds[name] = kind
    if args.max_examples is not None and args.max_examples < 1:
        raise ValueError("--max-examples must be >= 1")
    overrides = parse_overrides(args.model_config)
    device = default_device(args.device)

    data = {}
    for name, path in tasks:
        data[name] = load_examples(path, format=args.format, split=args.split)
        print(f"task {name} ({kinds[name]}): {len(data[name])} rows from {path}", file=sys.stderr)

    # One run per bank (one model), or per model (no bank).
    runs = [(models[0], bank) for bank in args.bank] or [(m, None) for m in models]
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    loaded: tuple[str, Any, Any] | None = None
    for model_name, bank_path in runs:
        if loaded is None or loaded[0] != model_name:
            model, tokenizer = load_model_and_tokenizer(
                model_name, seed=args.model_seed, tokenizer=args.tokenizer, overrides=overrides
            )
            loaded = (model_name, model.to(device).eval(), tokenizer)
        _, model, tokenizer = loaded
        bank = None
        if bank_path is not None:
            bank = prefixrt.PrefixBank.load(bank_path, device=device)
            prefixrt.attach(model, bank)
        label = _run_label(bank_path or model_name, len(runs))
        try:
            for name in names:
                entry = entries[name] if bank is not None else None
                if entry is not None and entry not in bank:
                    raise KeyError(f"bank {bank_path} has no entry {entry!r} (entries: {bank.names})")
                kind = kinds[name]
                decoding = Decoding.for_kind(
                    kind,
                    num_beams=args.num_beams,
                    length_penalty=args.length_penalty,
                    max_new_tokens=args.max_new_tokens,
                    min_new_tokens=args.min_new_tokens,
                    no_repeat_ngram_size=args.no_repeat_ngram_size,
                    batch_size=args.batch_size,
                )
                max_source_tokens = (
                    args.max_source_tokens
                    if args.max_source_tokens is not None
                    else KIND_DEFAULTS[kind].max_source_tokens
                )
                start = time.perf_counter()
                result = evaluate_examples(
                    model,
                    tokenizer,
                    data[name],
                    kind,
                    # a row without prefix on an attached model is id -1; a plain model gets no prefix_ids
                    prefix_id=bank.id_of(entry) if entry is not None else (-1 if bank is not None else None),
                    decoding=decoding,
                    max_sources=args.max_examples,
                    max_source_tokens=max_source_tokens,
                    progress=not args.no_progress,
                )
                seconds = time.perf_counter() - start
                _write_outputs(Path(args.out), name, label, kind, result)
                results[name].append(
                    {
                        "run": label or "run",
                        "model": model_name,
                        "bank": str(bank_path) if bank_path is not None else None,
                        "entry": entry,
                        "scores": result.scores,
                        "sources": len(result.sources),
                        "references": result.num_references,
                        "seconds": round(seconds, 2),
                        "decoding": decoding.__dict__,
                        "max_source_tokens": max_source_tokens,
                    }
                )
                main = "BLEU" if kind == "table-to-text" else "ROUGE_L"
                print(
                    f"{name}{f' [{label}]' if label else ''}: {main} {result.scores[main]:.2f} on "
                    f"{len(result.sources)} sources ({result.num_references} references), {seconds:.1f} s",
                    file=sys.stderr,
                )
        finally:
            if bank is not None:
                prefixrt.detach(model)
    _write_reports(Path(args.out), args, tasks, kinds, results)
    return 0


def _run_label(path: str, num_runs: int) -> str | None:
    """A short name for a run: the bank file's or model directory's name (None for a single run)."""
    if num_runs == 1:
        return None
    p = Path(path)
    return p.name.removesuffix(".safetensors") if p.suffix == ".safetensors" else p.name


def _write_outputs(out: Path, name: str, label: str | None, kind: str, result) -> None:
    from prefixrt.fileio import atomic_write_text
    from prefixrt.tasks import write_e2e_scorer_files

    stem = f"{name}.{label}.outputs" if label else f"{name}.outputs"
    if kind == "table-to-text" and not any("\n" in r for rs in result.refs for r in rs):
        write_e2e_scorer_files(out, result.hyps, result.refs, name=stem)
    else:
        atomic_write_text(out / f"{stem}.txt", "".join(h + "\n" for h in result.hyps))


def _write_reports(out: Path, args, tasks, kinds, results) -> None:
    from prefixrt.fileio import atomic_write_json, atomic_write_text
    from prefixrt.tasks import NOT_COMPUTED, format_markdown_table, mean_std

    summary_rows: dict[str, dict[str, Any]] = {}
    everything = {}
    for name, path in tasks:
        runs = results[name]
        spread = mean_std([r["scores"] for r in runs])
        mean = {k: v["mean"] for k, v in spread.items()}
        table: dict[str, dict[str, Any]] = {}
        if len(runs) > 1:
            for r in runs:
                table[r["run"]] = r["scores"]
            table["mean"] = mean
            table["std"] = {k: v["std"] for k, v in spread.items()}
            summary_rows[f"{name} (mean of {len(runs)})"] = mean
            summary_rows[f"{name} (std)"] = table["std"]
        else:
            table[name] = mean
            summary_rows[name] = mean
        first = runs[0]
        record = {
            "name": name,
            "scores": mean,
            "meta": {
                "kind": kinds[name],
                "data": path,
                "split": args.split,
                "sources": first["sources"],
                "references": first["references"],
                "decoding": first["decoding"],
                "max_source_tokens": first["max_source_tokens"],
                "model": first["model"],
                "model_seed": args.model_seed,
                "model_config": args.model_config,
            },
            "std": {k: v["std"] for k, v in spread.items()} if len(runs) > 1 else None,
            "runs": runs,
            "not_computed": NOT_COMPUTED,
        }
        everything[name] = record
        atomic_write_json(out / f"{name}.json", record)
        decoding = ", ".join(f"{k}={v}" for k, v in first["decoding"].items() if k != "batch_size")
        head = (
            f"# {name} ({kinds[name]})\n\n{first['sources']} sources, {first['references']} references, "
            f"from {path}; decoding: {decoding}\n\n"
        )
        atomic_write_text(
            out / f"{name}.md",
            head + format_markdown_table(table, row_header="run" if len(runs) > 1 else "task"),
        )
    atomic_write_json(out / "results.json", everything)
    atomic_write_text(out / "results.md", "# results\n\n" + format_markdown_table(summary_rows))
    print(f"wrote {out / 'results.md'} and per-task JSON/Markdown in {out}", file=sys.stderr)
