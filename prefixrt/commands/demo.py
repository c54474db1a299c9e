"""``prefixrt demo``: the whole job offline in well under a minute on a laptop CPU.

1. builds a small GPT-2 from a config (``gpt2-tiny``, seeded random weights: nothing is downloaded);
2. trains two prefixes in one mixed run on real E2E rows (``../shared/data/e2e/devset.csv`` when present, else a
   built-in sample): ``e2e`` (P=10) writes the description of a meaning representation, ``name`` (P=4) just
   the restaurant's name;
3. writes them into a prefix bank (optionally saved with ``--out``) and attaches it;
4. generates for one mixed batch: the same source with the ``e2e`` prefix, with the ``name`` prefix, and
   without prefix (the plain model).

With random weights and a few steps the texts are not fluent; the point is the mechanics (and the loss curve).
"""

from __future__ import annotations

import argparse
import time

NAME = "demo"
HELP = "offline demo: a small GPT-2 from a config, train two prefixes on E2E rows, generate for a mixed batch"

# A few rows of the E2E NLG dev set (CC BY-SA 4.0), used when ../shared/data is not there.
SAMPLE = [
    (
        "name[The Vaults], eatType[pub], priceRange[more than £30], customer rating[5 out of 5], near[Café Adriatic]",
        "The Vaults pub near Café Adriatic has a 5 star rating. Prices start at £30.",
    ),
    (
        "name[The Cambridge Blue], eatType[pub], food[English], priceRange[cheap], near[Café Brazil]",
        "Close to Café Brazil, The Cambridge Blue pub serves delicious English food for a cheap price.",
    ),
    (
        "name[The Eagle], eatType[coffee shop], food[Japanese], priceRange[less than £20], customer rating[low], "
        "area[riverside], familyFriendly[yes], near[Burger King]",
        "The Eagle is a low rated coffee shop near Burger King and the riverside that is family friendly and is "
        "less than £20 for Japanese food.",
    ),
    (
        "name[The Mill], eatType[coffee shop], food[French], priceRange[£20-25], area[riverside], near[The Sorrento]",
        "Located near The Sorrento is a French theme eatery and coffee shop called The Mill, with a price range at "
        "£20-£25 it is in the riverside area.",
    ),
    (
        "name[Loch Fyne], food[French], customer rating[high], area[riverside], near[The Rice Boat]",
        "For luxurious French food, the Loch Fyne is located by the river next to The Rice Boat.",
    ),
    (
        "name[Bibimbap House], food[English], priceRange[moderate], area[riverside], near[Clare Hall]",
        "Bibimbap House is a moderately priced restaurant who's main cuisine is English food. You will find this "
        "local gem near Clare Hall in the Riverside area.",
    ),
    (
        "name[The Rice Boat], food[French], customer rating[1 out of 5], area[city centre], familyFriendly[no]",
        "The Rice Boat is a French restaurant in the city centre with a rating of 1 out of 5 and is not family "
        "friendly.",
    ),
    (
        "name[Alimentum], food[Chinese], priceRange[high], area[riverside], familyFriendly[yes], near[Yippee Noodle Bar]",
        "Alimentum is a family-friendly Chinese restaurant in the high price range near Yippee Noodle Bar in the "
        "riverside area.",
    ),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=30, help="training steps (default 30)")
    parser.add_argument("--rows", type=int, default=200, help="E2E rows to train on (default 200)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--lr", type=float, default=3e-2, help="learning rate (default 3e-2: a tiny random model)"
    )
    parser.add_argument(
        "--data", help="an E2E CSV (default: ../shared/data/e2e/devset.csv, else a built-in sample)"
    )
    parser.add_argument("--out", help="also save the bank to this file")
    parser.add_argument("--seed", type=int, default=0)


def _examples(args):
    from prefixrt.tasks import Example, load_e2e_csv, parse_e2e_mr
    from prefixrt.tasks.linearize import linearize_e2e_mr
    from prefixrt.train.models import shared_data_dir

    path = args.data
    if (
        path is None
        and (shared := shared_data_dir()) is not None
        and (shared / "e2e" / "devset.csv").is_file()
    ):
        path = shared / "e2e" / "devset.csv"
    if path is not None:
        rows = [ex for ex in load_e2e_csv(path) if ex.tgt is not None][: args.rows]
        where = str(path)
    else:
        rows = [Example(linearize_e2e_mr(mr), ref, (ref,), mr) for mr, ref in SAMPLE]
        where = "the built-in sample"
    names = []
    for ex in rows:
        name = dict(parse_e2e_mr(ex.group)).get("name", "")
        names.append(Example(ex.src, name, (name,), ex.group))
    return rows, names, where


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    import torch

    import prefixrt
    from prefixrt.tasks import Collator, encode_examples, encode_prompt, pad_token_id_for
    from prefixrt.train import PrefixTuner, RunOptions, TrainConfig, train
    from prefixrt.train.models import build_model, byte_level_tokenizer, load_tokenizer

    try:
        tokenizer, tok_note = load_tokenizer("gpt2"), "GPT-2 BPE"
    except FileNotFoundError:
        tokenizer, tok_note = byte_level_tokenizer(), "byte-level fallback (no GPT-2 tokenizer files found)"
    model = build_model("gpt2-tiny", seed=args.seed, vocab_size=len(tokenizer), initializer_range=0.1)
    c = model.config
    print(
        f"model: gpt2-tiny from a config ({c.n_layer} layers, {c.n_head} heads, width {c.n_embd}, random weights)"
    )
    print(f"tokenizer: {tok_note}")

    rows, names, where = _examples(args)
    print(f"data: {len(rows)} E2E rows from {where}")
    data = {
        "e2e": encode_examples(rows, tokenizer, "causal", task="e2e"),
        "name": encode_examples(names, tokenizer, "causal", task="name"),
    }
    tuner = PrefixTuner(model, {"e2e": 10, "name": 4}, mid_dim=256, seed=args.seed)
    config = TrainConfig(
        lr=args.lr, batch_size=args.batch_size, max_steps=args.steps, log_every=5, seed=args.seed
    )
    options = RunOptions(pad_token_id=pad_token_id_for(tokenizer), config=config, progress=True)
    result = train(model, tuner, data, options)
    first, last = result.log[0], result.log[-1]
    print(
        f"trained both prefixes in one mixed run, {result.step} steps: loss "
        + ", ".join(f"{t} {first[f'loss/{t}']:.2f} -> {last[f'loss/{t}']:.2f}" for t in ("e2e", "name"))
    )

    bank = tuner.materialize()
    lengths = ", ".join(f"{n} (id {bank.id_of(n)}, P={tuner.task_lengths[n]})" for n in bank.names)
    print(f"bank: {lengths}; the MLPs dropped, {bank.dtype}")
    if args.out:
        bank.save(args.out)
        print(f"saved the bank to {args.out}")
    prefixrt.attach(model, bank)

    src = rows[0].src
    prompts = [encode_prompt(src, tokenizer, task=t) for t in ("e2e", "name", None)]
    batch = Collator(pad_token_id_for(tokenizer), padding_side="left")(prompts)
    prefix_ids = bank.ids(["e2e", "name", None])
    with torch.no_grad():
        out = model.generate(
            batch["input_ids"],
            attention_mask=batch["attention_mask"],
            prefix_ids=prefix_ids,
            max_new_tokens=24,
            do_sample=False,
            pad_token_id=pad_token_id_for(tokenizer),
            eos_token_id=tokenizer.eos_token_id,
        )
    prefixrt.detach(model)
    new = out[:, batch["input_ids"].shape[1] :]
    print(f"\nsource: {src}")
    print(f"mixed batch, prefix_ids={prefix_ids.tolist()} (one generate() call):")
    for label, tokens in zip(("e2e", "name", "no prefix"), new, strict=True):
        text = tokenizer.decode(tokens, skip_special_tokens=True).strip()
        print(f"  [{label:>9}] {text!r}")
    print(f"\ndone in {time.perf_counter() - start:.1f} s")
    return 0
