"""``prefixrt train``: train one or several prefixes (one mixed run) on src/tgt data and write them to a bank.

Example::

    prefixrt train --model gpt2-tiny --task e2e=../shared/data/e2e/devset.csv:10 \\
        --task dart=../shared/data/dart/dart-v1.1.1-full-dev.json:20 --max-steps 200 --out banks/tables.safetensors
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

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
    model.add_argument(
        "--model-seed", type=int, default=0, help="weight seed of a built-in model (default: 0)"
    )
    model.add_argument(
        "--tokenizer",
        help="tokenizer directory (default: the model's, else ../shared/data/{gpt2,bart}-tokenizer)",
    )
    model.add_argument("--device", help="cpu or cuda (default: cuda when available)")

    data = parser.add_argument_group("data")
    data.add_argument(
        "--task",
        action="append",
        required=True,
        metavar="NAME=PATH[:LEN]",
        help="a task: its name, its data (E2E .csv, JSONL {src, tgt}, DART .json/.xml, WebNLG) and optionally its "
        "prefix length; repeat for several tasks trained together in mixed batches",
    )
    data.add_argument(
        "--format", choices=("e2e", "dart", "webnlg", "jsonl"), help="data format (default: by suffix)"
    )
    data.add_argument("--max-rows", type=int, help="use at most this many rows per task (the first ones)")
    data.add_argument("--max-source-tokens", type=int, help="truncate sources to this many tokens")
    data.add_argument("--max-target-tokens", type=int, help="truncate targets to this many tokens")

    prefix = parser.add_argument_group("prefix")
    prefix.add_argument(
        "--prefix-len", type=int, default=10, help="prefix length of tasks without :LEN (default 10)"
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

    opt = parser.add_argument_group("optimization")
    opt.add_argument("--epochs", type=int, default=5, help="epochs over all tasks' rows (default 5)")
    opt.add_argument("--max-steps", type=int, help="total optimizer steps (overrides --epochs)")
    opt.add_argument("--batch-size", type=int, default=5, help="rows per batch, all tasks mixed (default 5)")
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

    out = parser.add_argument_group("output")
    out.add_argument("--out", required=True, help="the bank file to write (safetensors)")
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


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except (ValueError, FileNotFoundError, KeyError) as err:
        print(f"prefixrt train: error: {err}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    import torch

    from prefixrt.tasks import encode_examples, layout_for, load_examples, pad_token_id_for
    from prefixrt.train import PrefixTuner, TrainConfig, train
    from prefixrt.train.models import BUILTIN_MODELS, load_model, load_tokenizer

    default_length = None if args.init_text else args.prefix_len
    tasks = [parse_task(spec, default_length) for spec in args.task]
    names = [name for name, _, _ in tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"task names must be unique, got {names}")

    if args.model in BUILTIN_MODELS:
        model_type = BUILTIN_MODELS[args.model][0]
        tokenizer = load_tokenizer(model_type, args.tokenizer)
        model = load_model(args.model, seed=args.model_seed, vocab_size=len(tokenizer))
    else:
        model = load_model(args.model)
        tokenizer = load_tokenizer(model.config.model_type, args.tokenizer, model_path=args.model)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    layout = layout_for(model)

    data = {}
    for name, path, _ in tasks:
        examples = [ex for ex in load_examples(path, format=args.format) if ex.tgt is not None]
        if args.max_rows is not None:
            examples = examples[: args.max_rows]
        if not examples:
            raise ValueError(f"task {name!r}: {path} holds no (source, target) rows to train on")
        data[name] = encode_examples(
            examples,
            tokenizer,
            layout,
            task=name,
            max_source_tokens=args.max_source_tokens,
            max_target_tokens=args.max_target_tokens,
        )
        print(f"task {name}: {len(examples)} rows from {path}", file=sys.stderr)

    tuner = PrefixTuner(
        model,
        {name: length for name, _, length in tasks},
        reparam=args.reparam,
        mid_dim=args.mid_dim,
        prefix_dropout=args.prefix_dropout,
        sites=args.sites.split(",") if args.sites else None,
        init="text" if args.init_text else "random",
        init_text=args.init_text,
        tokenizer=tokenizer,
        seed=args.seed,
    )
    config = TrainConfig(
        lr=args.lr,
        batch_size=args.batch_size,
        epochs=args.epochs,
        max_steps=args.max_steps,
        warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm if args.max_grad_norm > 0 else None,
        seed=args.seed,
        gradient_checkpointing=args.gradient_checkpointing,
        log_every=args.log_every,
        save_every=args.save_every,
    )
    out = Path(args.out)
    stem = out.name.removesuffix(".safetensors")
    log_csv = Path(args.log_csv) if args.log_csv else out.with_name(f"{stem}.loss.csv")
    plot = Path(args.plot) if args.plot else out.with_name(f"{stem}.loss.png")
    result = train(
        model,
        tuner,
        data,
        pad_token_id=pad_token_id_for(tokenizer),
        config=config,
        checkpoint_dir=args.checkpoint_dir,
        resume=args.resume,
        log_path=log_csv,
        plot_path=plot,
        progress=not args.no_progress,
        stop_after=args.stop_after,
    )
    if result.step < result.total_steps:
        print(
            f"stopped after {result.step}/{result.total_steps} steps; continue with --resume "
            f"(checkpoint: {result.checkpoint})",
            file=sys.stderr,
        )
    bank = tuner.materialize()
    bank.save(out)
    lengths = ", ".join(f"{n} (P={tuner.task_lengths[n]})" for n in bank.names)
    print(f"trained {result.step} steps, final loss {result.final_loss:.4f}")
    print(f"bank: {out} -- {lengths}; {bank.spec.describe()}")
    if args.model in BUILTIN_MODELS:
        print(
            f"model: built-in {args.model} with --model-seed {args.model_seed} (rebuild it the same way to use it)"
        )
    plot_note = (
        f", plot: {result.plot_path}" if result.plot_path else " (no plot: matplotlib is not installed)"
    )
    print(f"loss log: {log_csv}{plot_note}")
    return 0
