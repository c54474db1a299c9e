"""``prefixrt serve``: an OpenAI-compatible HTTP server over :class:`prefixrt.Engine`; the prefix is the model name.

With no ``--model`` it serves a small GPT-2 built from a config (``gpt2-tiny``, seeded random weights, as
``prefixrt demo`` builds it) and a demo bank of random prefixes, so it runs out of the box; its texts are not
fluent. ``--model`` takes a built-in config name or a local Hugging Face model directory; ``--bank`` and
``--peft`` say which prefixes to serve. One process: uvicorn's event loop answers HTTP, one thread steps the
engine (see :mod:`prefixrt.serve.engine_loop`).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

NAME = "serve"
HELP = "OpenAI-compatible server (/v1/completions, /v1/chat/completions, /v1/models): the prefix is the model name"

DEFAULT_MODEL = "gpt2-tiny"
# The demo bank: random prefixes of these lengths, named demo-1, demo-2, ...
DEMO_LENGTHS = (10, 20, 5, 40)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from prefixrt.commands.common import add_model_options

    m = parser.add_argument_group("model and prefixes")
    m.add_argument(
        "--model",
        help=f"a built-in config name (gpt2-tiny, gpt2-small, bart-tiny, ...: seeded random weights) or a local "
        f"model directory (default: {DEFAULT_MODEL} with initializer_range=0.1, as `prefixrt demo` builds it)",
    )
    add_model_options(m)
    m.add_argument("--served-model-name", help="the base model's name in the API (default: --model)")
    m.add_argument(
        "--bank",
        action="append",
        default=[],
        metavar="FILE",
        help="serve every entry of this prefix-bank file (repeat for several; names must not clash)",
    )
    m.add_argument(
        "--peft",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="serve a PEFT prefix-tuning adapter directory under the model name NAME (repeat for several)",
    )
    m.add_argument(
        "--demo-prefixes",
        type=int,
        default=None,
        help=f"random demo prefixes demo-1..demo-N (lengths {', '.join(map(str, DEMO_LENGTHS))}, ...; default: 3 "
        "when neither --bank nor --peft is given, else 0)",
    )
    m.add_argument("--chat-template", type=Path, help="a Jinja chat template file for /v1/chat/completions")

    e = parser.add_argument_group("engine")
    e.add_argument("--max-batch-size", type=int, default=16, help="requests running at once (default 16)")
    e.add_argument(
        "--max-prompt-tokens", type=int, default=256, help="longest prompt or source (default 256)"
    )
    e.add_argument("--max-new-tokens", type=int, default=128, help="most tokens per completion (default 128)")
    e.add_argument(
        "--max-waiting",
        type=int,
        default=256,
        help="requests that may wait for a free row; beyond, a 503 with Retry-After (default 256)",
    )
    e.add_argument("--backend", default="auto", help="attention backend: auto, reference, cpp, triton")
    e.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    e.add_argument(
        "--executor",
        choices=("engine", "hf-generate"),
        default="engine",
        help="engine: prefixrt.Engine (default); hf-generate: the benchmark's baseline, HF generate() per "
        "request with the prefix copied into the cache PEFT-style (GPT-2)",
    )

    h = parser.add_argument_group("HTTP")
    h.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    h.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free port)")
    h.add_argument(
        "--api-key",
        default=os.environ.get("PREFIXRT_API_KEY"),
        help="require 'Authorization: Bearer KEY' on every /v1 route (default: $PREFIXRT_API_KEY, else none)",
    )
    h.add_argument(
        "--allow-prefix-updates",
        action="store_true",
        help="enable POST /v1/prefixes and DELETE /v1/prefixes/{name}",
    )
    h.add_argument("--prefix-dir", type=Path, help="the only folder POST /v1/prefixes may read from")
    h.add_argument("--log-level", default="warning", help="uvicorn's log level (default warning)")


def demo_bank(model, count: int, seed: int = 0):
    """``count`` random prefixes ``demo-1``, ``demo-2``, ... (lengths cycling through :data:`DEMO_LENGTHS`)."""
    import torch

    from prefixrt.bank import PrefixBank

    bank = PrefixBank.for_model(model)
    g = torch.Generator().manual_seed(seed)
    for i in range(count):
        length = DEMO_LENGTHS[i % len(DEMO_LENGTHS)]
        kv = {
            site: torch.randn(s.num_layers, 2, s.num_heads, length, s.head_dim, generator=g)
            for site, s in bank.spec.sites.items()
        }
        bank.add(f"demo-{i + 1}", kv)
    return bank


def build_bank(model, args: argparse.Namespace):
    """The served bank: ``--bank`` files' entries, ``--peft`` adapters, and demo prefixes."""
    from prefixrt.bank import PrefixBank

    demo = args.demo_prefixes if args.demo_prefixes is not None else (0 if args.bank or args.peft else 3)
    bank = demo_bank(model, demo) if demo else PrefixBank.for_model(model)
    for path in args.bank:
        source = PrefixBank.load(path, device=bank.device, dtype=bank.dtype)
        for name in source.names:
            if name in bank:
                raise ValueError(f"--bank {path}: a prefix named {name!r} is already served")
            kv = {site: t for site, t in source.entry(name).items() if t.shape[3] > 0}
            bank.add(name, kv)
    for spec in args.peft:
        name, sep, directory = spec.partition("=")
        if not sep or not name or not directory:
            raise ValueError(f"--peft {spec!r}: expected NAME=DIR")
        if name in bank:
            raise ValueError(f"--peft {spec!r}: a prefix named {name!r} is already served")
        bank.add_peft(name, directory)
    return bank


def load(args: argparse.Namespace):
    """``(model, tokenizer, name)`` as the options say; a built-in model without tokenizer files gets the
    byte-level fallback tokenizer (as ``prefixrt demo`` does)."""
    from prefixrt.train.models import (
        BUILTIN_MODELS,
        build_model,
        byte_level_tokenizer,
        load_model_and_tokenizer,
        parse_overrides,
    )

    name = args.model or DEFAULT_MODEL
    overrides = parse_overrides(args.model_config)
    if args.model is None:
        overrides = {"initializer_range": 0.1, **overrides}
    try:
        model, tokenizer = load_model_and_tokenizer(
            name, seed=args.model_seed, tokenizer=args.tokenizer, overrides=overrides
        )
    except FileNotFoundError:
        if name not in BUILTIN_MODELS or args.tokenizer is not None or BUILTIN_MODELS[name][0] != "gpt2":
            raise
        tokenizer = byte_level_tokenizer()
        print(
            "prefixrt serve: no GPT-2 tokenizer files found; using the byte-level fallback", file=sys.stderr
        )
        model = build_model(name, seed=args.model_seed, vocab_size=len(tokenizer), **overrides)
    served = args.served_model_name or (name if name in BUILTIN_MODELS else Path(name).resolve().name)
    return model.requires_grad_(False), tokenizer, served


def build_app(args: argparse.Namespace):
    """The FastAPI app the options describe (the model, bank, engine and loop are built here)."""
    import torch

    from prefixrt.commands.common import default_device
    from prefixrt.engine import Engine
    from prefixrt.serve import EngineLoop, ServeConfig, ServeState, create_app
    from prefixrt.serve.hf_loop import HFGenerateLoop
    from prefixrt.serve.metrics import ServeMetrics

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.allow_prefix_updates and args.prefix_dir is None:
        raise ValueError(
            "--allow-prefix-updates needs --prefix-dir (the only folder prefixes are loaded from)"
        )
    if args.prefix_dir is not None and not args.prefix_dir.is_dir():
        raise ValueError(f"--prefix-dir {args.prefix_dir}: not a directory")
    if args.max_waiting < 0:
        raise ValueError(f"--max-waiting must be >= 0, got {args.max_waiting}")
    model, tokenizer, served = load(args)
    model = model.to(default_device(args.device))
    if args.chat_template is not None:
        tokenizer.chat_template = args.chat_template.read_text(encoding="utf-8")
    bank = build_bank(model, args)
    config = ServeConfig(
        model_name=served,
        api_key=args.api_key,
        max_waiting=args.max_waiting,
        allow_prefix_updates=args.allow_prefix_updates,
        prefix_dir=args.prefix_dir,
    )
    sizes = dict(
        max_batch_size=args.max_batch_size,
        max_prompt_tokens=args.max_prompt_tokens,
        max_new_tokens=args.max_new_tokens,
    )
    metrics = ServeMetrics()
    if args.executor == "engine":
        engine = Engine(model, bank, backend=args.backend, **sizes)
        loop, position_offset = EngineLoop(engine, metrics), engine.position_offset
    else:
        loop = HFGenerateLoop(model, bank, max_batch_size=args.max_batch_size, metrics=metrics)
        position_offset = "prefix"  # PEFT's positions
    state = ServeState(
        config=config,
        model=model,
        tokenizer=tokenizer,
        bank=bank,
        loop=loop,
        position_offset=position_offset,
        metrics=metrics,
        **sizes,
    )
    return create_app(state), state


def run(args: argparse.Namespace) -> int:
    from prefixrt.commands.common import run_reporting_errors

    return run_reporting_errors("serve", _serve, args)


def _serve(args: argparse.Namespace) -> int:
    import socket

    import uvicorn

    app, state = build_app(args)
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as err:
        raise ValueError(f"cannot listen on {args.host}:{args.port}: {err}") from None
    host, port = sock.getsockname()[:2]
    prefixes = ", ".join(state.prefixes) or "none"
    print(
        f"prefixrt serve: {state.config.model_name} ({state.model_type}, executor {args.executor}) with prefixes "
        f"[{prefixes}] on http://{host}:{port}/v1",
        flush=True,
    )
    logging.basicConfig(level=args.log_level.upper())
    config = uvicorn.Config(
        app, log_level=args.log_level, access_log=False, timeout_graceful_shutdown=5, lifespan="on"
    )
    uvicorn.Server(config).run(sockets=[sock])
    return 0
