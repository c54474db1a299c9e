"""``prefixrt train``: train one or several prefixes (one mixed run) on src/tgt data and write them to a bank;
or, with ``--finetune``, the fine-tuning baseline on the same data and budget.

Examples::

    # E2E and DART prefixes trained together in mixed batches (the paper's defaults per task kind)
    prefixrt train --model /models/gpt2-medium --task e2e=e2e/trainset.csv --task dart=dart/train.json \\
        --dev e2e=e2e/devset.csv --eval-every 1000 --out runs/tables/bank.safetensors

    # low-data mode: 50 sources, three seeds, averaged; and the fine-tuning baseline on the same rows
    prefixrt train --model gpt2-tiny --task e2e=../shared/data/e2e/devset.csv --low-data 50 --seeds 1,2,3 \\
        --dev e2e=../shared/data/e2e/testset_w_refs.csv --out runs/low/bank.safetensors
    prefixrt train --finetune --model gpt2-tiny ... --out runs/low-ft

    # several processes (gloo on CPU, NCCL on GPU); --batch-size is the global batch
    torchrun --nproc_per_node 2 -m prefixrt train ...

Outputs: the bank (or, with ``--finetune``, a model directory with its tokenizer), the loss log (CSV: training
loss every ``--log-every`` steps, dev loss at every evaluation) and its plot (PNG), and a run summary
(``*.summary.json`` / ``.md``: steps, losses, dev metrics, time; per seed and their mean and standard deviation).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from prefixrt.commands.common import add_model_options, default_device, run_reporting_errors

NAME = "train"
HELP = "train prefixes (several tasks in one mixed run) on src/tgt data and write them into a prefix bank"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    model = parser.add_argument_group("model")
    model.add_argument(
        "--model",
        default="gpt2-tiny",
        help="a local model directory (from_pretrained) or a built-in config with seeded random weights: "
        "gpt2-tiny, gpt2-small, gpt2-medium, bart-tiny, bart-base, bart-large (default: gpt2-tiny)",
    )
    add_model_options(model)

    data = parser.add_argument_group("data")
    data.add_argument(
        "--task",
        action="append",
        required=True,
        metavar="NAME=PATH[:LEN]",
        help="a task: its name, its data (E2E .csv, JSONL {src, tgt}, DART .json/.xml, WebNLG, or a Hugging Face "
        "dataset name) and optionally its prefix length; repeat for several tasks trained together in mixed "
        "batches. JSONL and text datasets are summarization, the others table-to-text",
    )
    data.add_argument(
        "--dev",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="dev data of a task (same formats; a dataset name reads its 'validation' split): its loss is logged "
        "at the start, every --eval-every steps and at the end",
    )
    data.add_argument(
        "--format", choices=("e2e", "dart", "webnlg", "jsonl"), help="data format (default: by suffix)"
    )
    data.add_argument("--max-rows", type=int, help="use at most this many rows per task (the first ones)")
    data.add_argument("--dev-max-rows", type=int, help="use at most this many dev rows per task")
    data.add_argument(
        "--max-source-tokens",
        type=int,
        help="truncate sources to this many tokens (default: none for table-to-text, 512 for summarization)",
    )
    data.add_argument(
        "--max-target-tokens",
        type=int,
        help="truncate targets to this many tokens (default: none for table-to-text, 60 for summarization)",
    )

    low = parser.add_argument_group("low-data mode and seeds")
    low.add_argument(
        "--low-data",
        type=int,
        metavar="N",
        help="train on N sources per task (with all their references), drawn with each seed "
        "(prefixrt.tasks.subsample)",
    )
    low.add_argument(
        "--seeds",
        help="comma-separated seeds: one run per seed (the data draw, the prefix start, the batch order), "
        "outputs suffixed .seedS, and the mean and standard deviation in the summary (default: --seed)",
    )

    prefix = parser.add_argument_group("prefix")
    prefix.add_argument(
        "--prefix-len",
        type=int,
        help="prefix length of tasks without :LEN (default: 10 for table-to-text, 200 for summarization)",
    )
    prefix.add_argument(
        "--reparam", choices=("mlp", "none"), default="mlp", help="MLP reparameterization or direct K/V"
    )
    prefix.add_argument("--mid-dim", type=int, default=512, help="hidden width of the MLP (default 512)")
    prefix.add_argument(
        "--prefix-dropout", type=float, default=0.0, help="dropout on the prefix K/V (default 0)"
    )
    prefix.add_argument(
        "--init-text",
        help="start every prefix from these words' activations (a task without :LEN gets the words' length)",
    )
    prefix.add_argument(
        "--sites", help="BART: comma-separated sites to train (default: encoder,decoder,cross)"
    )
    prefix.add_argument(
        "--finetune",
        action="store_true",
        help="the baseline: fine-tune the whole model on the same data, loop and budget (no prefix); --out is "
        "then a model directory",
    )

    opt = parser.add_argument_group("optimization")
    opt.add_argument("--epochs", type=int, default=5, help="epochs over all tasks' rows (default 5)")
    opt.add_argument("--max-steps", type=int, help="total optimizer steps (overrides --epochs)")
    opt.add_argument(
        "--batch-size",
        type=int,
        default=5,
        help="rows per batch, all tasks mixed; the global batch under torchrun (default 5)",
    )
    opt.add_argument("--lr", type=float, default=5e-5, help="peak learning rate (default 5e-5)")
    opt.add_argument("--warmup-steps", type=int, default=0, help="linear warm-up steps (default 0)")
    opt.add_argument("--weight-decay", type=float, default=0.0)
    opt.add_argument(
        "--max-grad-norm", type=float, default=1.0, help="per-task gradient clipping (<= 0: off)"
    )
    opt.add_argument("--seed", type=int, default=101, help="seed of the prefixes, batch order and dropout")
    opt.add_argument(
        "--gradient-checkpointing", action="store_true", help="recompute activations in backward"
    )
    opt.add_argument(
        "--micro-batch-size",
        type=int,
        help="rows per forward/backward inside a batch, gradients accumulated (the same update); for devices "
        "where a smaller batch runs faster (default: the whole batch)",
    )
    opt.add_argument(
        "--torch-modules",
        action="store_true",
        help="keep torch's own dropout and GELU modules on the CPU (default: prefixrt's vectorized Philox "
        "dropout and the fused tanh GELU while training)",
    )

    ev = parser.add_argument_group("dev evaluation")
    ev.add_argument(
        "--eval-every", type=int, help="steps between dev evaluations (default: at the start and the end)"
    )
    ev.add_argument(
        "--dev-generate",
        type=int,
        default=0,
        metavar="N",
        help="at each dev evaluation also decode the first N dev sources per task (greedy) and log their "
        "scores (BLEU etc. for table-to-text, ROUGE for summarization); default 0: off",
    )

    out = parser.add_argument_group("output")
    out.add_argument(
        "--out",
        required=True,
        help="the bank file to write (safetensors); with --finetune, the model directory",
    )
    out.add_argument("--checkpoint-dir", help="write training checkpoints here (they keep the MLP)")
    out.add_argument("--save-every", type=int, help="steps between checkpoints (default: only at the end)")
    out.add_argument("--resume", action="store_true", help="continue from the checkpoint in --checkpoint-dir")
    out.add_argument(
        "--stop-after",
        type=int,
        help="stop after this many steps in total (the schedule stays the full run's)",
    )
    out.add_argument("--log-every", type=int, default=10, help="steps per row of the loss log (default 10)")
    out.add_argument("--log-csv", help="loss log (default: next to --out, *.loss.csv)")
    out.add_argument("--plot", help="loss curve PNG (default: next to --out, *.loss.png)")
    out.add_argument("--no-progress", action="store_true", help="no progress bar")


def parse_task(spec: str, default_length: int | None) -> tuple[str, str, int | None]:
    """``NAME=PATH[:LEN]`` -> (name, path, length)."""
    name, sep, rest = spec.partition("=")
    if not sep or not name or not rest:
        raise ValueError(f"--task {spec!r}: expected NAME=PATH[:LEN]")
    path, length = rest, default_length
    head, colon, tail = rest.rpartition(":")
    if colon and tail.isdigit():
        path, length = head, int(tail)
        if length < 1:
            raise ValueError(f"--task {spec!r}: the prefix length must be >= 1")
    return name, path, length


def parse_pair(spec: str, option: str) -> tuple[str, str]:
    """``NAME=VALUE`` -> (name, value)."""
    name, sep, value = spec.partition("=")
    if not sep or not name or not value:
        raise ValueError(f"{option} {spec!r}: expected NAME=VALUE")
    return name, value


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError as err:
        raise ValueError(f"--seeds {text!r}: expected comma-separated integers") from err
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds {text!r}: expected distinct comma-separated integers")
    return seeds


def with_tag(path: Path, tag: str | None) -> Path:
    """``runs/bank.safetensors`` + ``seed1`` -> ``runs/bank.seed1.safetensors``."""
    if tag is None:
        return path
    return path.with_name(f"{path.stem}.{tag}{path.suffix}") if path.suffix else path / tag


def run(args: argparse.Namespace) -> int:
    return run_reporting_errors(NAME, _run, args)


def _run(args: argparse.Namespace) -> int:
    import os

    from prefixrt.tasks import KIND_DEFAULTS, encode_examples, kind_of, layout_for, load_examples
    from prefixrt.train.distributed import init_from_env
    from prefixrt.train.models import load_model_and_tokenizer, parse_overrides

    overrides = parse_overrides(args.model_config)
    if args.finetune and (args.init_text or args.sites):
        raise ValueError("--init-text and --sites configure prefixes; --finetune trains the whole model")
    if args.low_data is not None and args.low_data < 1:
        raise ValueError(f"--low-data must be >= 1, got {args.low_data}")
    if args.dev_generate < 0:
        raise ValueError("--dev-generate must be >= 0")
    seeds = parse_seeds(args.seeds) if args.seeds else [args.seed]

    tasks = [parse_task(spec, None) for spec in args.task]
    names = [name for name, _, _ in tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"task names must be unique, got {names}")
    kinds = {name: kind_of(path, args.format) for name, path, _ in tasks}
    dev_paths = dict(parse_pair(spec, "--dev") for spec in args.dev)
    unknown = sorted(set(dev_paths) - set(names))
    if unknown:
        raise ValueError(f"--dev names tasks {unknown} that are not trained ({names})")
    if args.dev_generate and not dev_paths:
        raise ValueError("--dev-generate needs dev data (--dev NAME=PATH)")

    device = default_device(args.device)
    if device == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    dist = init_from_env(device)

    def say(*parts: Any) -> None:
        if dist.is_main:
            print(*parts, file=sys.stderr)

    def fresh_model():
        return load_model_and_tokenizer(
            args.model, seed=args.model_seed, tokenizer=args.tokenizer, overrides=overrides
        )

    model, tokenizer = fresh_model()
    model.to(device)
    layout = layout_for(model)

    def limits(name: str) -> dict[str, int | None]:
        d = KIND_DEFAULTS[kinds[name]]
        return {
            "max_source_tokens": args.max_source_tokens
            if args.max_source_tokens is not None
            else d.max_source_tokens,
            "max_target_tokens": args.max_target_tokens
            if args.max_target_tokens is not None
            else d.max_target_tokens,
        }

    def load(name: str, path: str, split: str, limit: int | None) -> list:
        examples = [ex for ex in load_examples(path, format=args.format, split=split) if ex.tgt is not None]
        if limit is not None:
            examples = examples[:limit]
        if not examples:
            raise ValueError(f"task {name!r}: {path} holds no (source, target) rows")
        return examples

    train_examples = {name: load(name, path, "train", args.max_rows) for name, path, _ in tasks}
    for name, path, _ in tasks:
        say(f"task {name} ({kinds[name]}): {len(train_examples[name])} rows from {path}")
    dev_examples = {
        name: load(name, path, "validation", args.dev_max_rows) for name, path in dev_paths.items()
    }
    dev_data = {
        name: encode_examples(ex, tokenizer, layout, task=name, **limits(name))
        for name, ex in dev_examples.items()
    }
    for name, path in dev_paths.items():
        say(f"dev {name}: {len(dev_examples[name])} rows from {path}")
    lengths = {}
    for name, _, length in tasks:
        if length is None and not args.init_text:
            length = args.prefix_len or KIND_DEFAULTS[kinds[name]].prefix_length
        lengths[name] = length

    runs = []
    for i, seed in enumerate(seeds):
        tag = f"seed{seed}" if len(seeds) > 1 else None
        if args.finetune and i > 0:  # every seed fine-tunes the same starting model
            model, _ = fresh_model()
            model.to(device)
        examples = train_examples
        if args.low_data is not None:
            from prefixrt.tasks import subsample

            examples = {name: subsample(ex, args.low_data, seed) for name, ex in train_examples.items()}
        data = {
            name: encode_examples(ex, tokenizer, layout, task=name, **limits(name))
            for name, ex in examples.items()
        }
        if len(seeds) > 1:
            say(f"\n== seed {seed}: " + ", ".join(f"{n} {len(r)} rows" for n, r in data.items()))
        summary = _train_one(
            args, seed, tag, model, tokenizer, data, dev_data, dev_examples, kinds, lengths, limits, dist, say
        )
        summary["rows"] = {name: len(ex) for name, ex in examples.items()}
        summary["sources"] = {name: len({ex.group for ex in rows}) for name, rows in examples.items()}
        runs.append(summary)
    if dist.is_main:
        _write_summary(args, runs, kinds, lengths, say)
    return 0


def _train_one(
    args, seed, tag, model, tokenizer, data, dev_data, dev_examples, kinds, lengths, limits, dist, say
) -> dict[str, Any]:
    from prefixrt.tasks import pad_token_id_for
    from prefixrt.train import PrefixTuner, RunOptions, TrainConfig, finetune, train
    from prefixrt.train.models import BUILTIN_MODELS

    out = with_tag(Path(args.out), tag)
    if args.finetune:
        log_csv = with_tag(Path(args.log_csv), tag) if args.log_csv else out / "loss.csv"
        plot = with_tag(Path(args.plot), tag) if args.plot else out / "loss.png"
    else:
        stem = out.name.removesuffix(".safetensors")
        log_csv = with_tag(Path(args.log_csv), tag) if args.log_csv else out.with_name(f"{stem}.loss.csv")
        plot = with_tag(Path(args.plot), tag) if args.plot else out.with_name(f"{stem}.loss.png")
    checkpoint_dir = args.checkpoint_dir
    if checkpoint_dir is not None and tag is not None:
        checkpoint_dir = str(Path(checkpoint_dir) / tag)
    config = TrainConfig(
        lr=args.lr,
        batch_size=args.batch_size,
        epochs=args.epochs,
        max_steps=args.max_steps,
        warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm if args.max_grad_norm > 0 else None,
        seed=seed,
        gradient_checkpointing=args.gradient_checkpointing,
        log_every=args.log_every,
        save_every=args.save_every,
    )
    start = time.perf_counter()
    tuner = None
    if not args.finetune:
        tuner = PrefixTuner(
            model,
            {name: lengths[name] for name in data},
            reparam=args.reparam,
            mid_dim=args.mid_dim,
            prefix_dropout=args.prefix_dropout,
            sites=args.sites.split(",") if args.sites else None,
            init="text" if args.init_text else "random",
            init_text=args.init_text,
            tokenizer=tokenizer,
            seed=seed,
        )
    prefix_id_of = (lambda task: None) if tuner is None else tuner.id_of
    options = RunOptions(
        pad_token_id=pad_token_id_for(tokenizer),
        config=config,
        checkpoint_dir=checkpoint_dir,
        resume=args.resume,
        log_path=log_csv,
        plot_path=plot,
        progress=not args.no_progress,
        stop_after=args.stop_after,
        dev_data=dev_data or None,
        eval_every=args.eval_every,
        eval_hook=_generation_hook(args, tokenizer, dev_examples, kinds, limits, prefix_id_of),
        micro_batch_size=args.micro_batch_size,
        fast_modules=not args.torch_modules,
        dist=dist,
    )
    result = finetune(model, data, options) if tuner is None else train(model, tuner, data, options)
    seconds = time.perf_counter() - start

    if result.step < result.total_steps:
        say(
            f"stopped after {result.step}/{result.total_steps} steps; continue with --resume "
            f"(checkpoint: {result.checkpoint})"
        )
    if dist.is_main:
        if args.finetune:
            model.save_pretrained(out)
            tokenizer.save_pretrained(out)
            what = (
                f"model: {out} (fine-tuned, {result.trainable_parameters:,} parameters; with its tokenizer)"
            )
        else:
            bank = tuner.materialize()
            bank.save(out)
            lengths_text = ", ".join(f"{n} (P={tuner.task_lengths[n]})" for n in bank.names)
            what = f"bank: {out} -- {lengths_text}; {bank.spec.describe()}"
        print(f"trained {result.step} steps, final loss {result.final_loss:.4f}")
        print(what)
        if args.model in BUILTIN_MODELS and not args.finetune:
            config = "".join(f" --model-config {c}" for c in args.model_config)
            print(
                f"model: built-in {args.model} with --model-seed {args.model_seed}{config} "
                "(rebuild it the same way to use it)"
            )
        plot_note = (
            f", plot: {result.plot_path}" if result.plot_path else " (no plot: matplotlib is not installed)"
        )
        print(f"loss log: {log_csv}{plot_note}")

    summary: dict[str, Any] = {
        "run": tag or "run",
        "seed": seed,
        "output": str(out),
        "steps": result.step,
        "total_steps": result.total_steps,
        "trainable_parameters": result.trainable_parameters,
        "world_size": dist.world_size,
        "seconds": round(seconds, 2),
        "metrics": {"train_loss": result.final_loss},
    }
    evals = result.dev
    if evals:
        first, last = evals[0], evals[-1]
        summary["metrics"].update({k: v for k, v in last.items() if k.startswith("dev_")})
        if first["step"] != last["step"] and "dev_loss" in first:
            summary["metrics"]["dev_loss_start"] = first["dev_loss"]
        summary["dev_steps"] = [int(r["step"]) for r in evals]
    return summary


def _generation_hook(args, tokenizer, dev_examples, kinds, limits, prefix_id_of):
    """The eval hook that decodes the first ``--dev-generate`` dev sources per task (greedy) and scores them."""
    if not args.dev_generate:
        return None
    from prefixrt.train.evaluate import Decoding, evaluate_examples

    def hook(model, step: int) -> dict[str, float]:
        out = {}
        for task, examples in dev_examples.items():
            result = evaluate_examples(
                model,
                tokenizer,
                examples,
                kinds[task],
                prefix_id=prefix_id_of(task),
                decoding=Decoding.for_kind(kinds[task], num_beams=1, batch_size=16),
                max_sources=args.dev_generate,
                max_source_tokens=limits(task)["max_source_tokens"],
            )
            out.update({f"dev_{metric}/{task}": value for metric, value in result.scores.items()})
        return out

    return hook


def _write_summary(args, runs, kinds, lengths, say) -> None:
    from prefixrt.fileio import atomic_write_json, atomic_write_text
    from prefixrt.tasks import format_markdown_table, mean_std

    out = Path(args.out)
    base = (
        out / "summary"
        if args.finetune
        else out.with_name(out.name.removesuffix(".safetensors") + ".summary")
    )
    json_path, md_path = Path(f"{base}.json"), Path(f"{base}.md")
    table = {r["run"]: r["metrics"] for r in runs}
    spread = None
    if len(runs) > 1:
        spread = mean_std([r["metrics"] for r in runs])
        table["mean"] = {k: v["mean"] for k, v in spread.items()}
        table["std"] = {k: v["std"] for k, v in spread.items()}
    method = "fine-tuning" if args.finetune else "prefix-tuning"
    setting = {
        "method": method,
        "model": args.model,
        "model_seed": args.model_seed,
        "model_config": args.model_config,
        "tasks": {
            t: {"kind": kinds[t], "prefix_length": None if args.finetune else lengths[t]} for t in kinds
        },
        "low_data": args.low_data,
        "seeds": [r["seed"] for r in runs],
        "epochs": args.epochs,
        "max_steps": args.max_steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "warmup_steps": args.warmup_steps,
        "mid_dim": None if args.finetune else args.mid_dim,
        "command": "prefixrt " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["train"] else None,
    }
    atomic_write_json(json_path, {"setting": setting, "runs": runs, "mean_std": spread})
    head = (
        f"# {method}: {', '.join(kinds)} on {args.model}\n\n"
        + "".join(f"- {r['run']}: {r['steps']} steps, {r['seconds']} s, rows {r.get('rows')}\n" for r in runs)
        + "\n"
    )
    atomic_write_text(md_path, head + format_markdown_table(table, digits=4, row_header="run", note=False))
    say(f"summary: {json_path}, {md_path}")
