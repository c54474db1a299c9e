"""Write the synthetic summarization JSONL of docs/reproducing.md (XSUM itself is not available offline).

Each "document" is a news-like first sentence (who did what, where, when) followed by 2-4 filler sentences in
random order; its "summary" is the first sentence without the place and time. The rule is fixed, so the task is
learnable from the source alone, and the summary is shorter than the document, as in XSUM.

    python docs/results/synthetic_summaries.py OUT_DIR     # writes train.jsonl (2000), dev.jsonl (200), test.jsonl (200)
"""

import json
import random
import sys
from pathlib import Path

WHO = [
    "The mayor", "A local farmer", "The health minister", "Police", "The city council", "A primary school teacher",
    "Scientists", "The football club", "A charity", "The prime minister", "Firefighters", "Two students",
]  # fmt: skip
WHAT = [
    "opened a new bridge", "warned of floods", "closed the hospital ward", "found a rare bird", "raised council tax",
    "cancelled the festival", "rescued a family", "won the cup", "launched an appeal", "banned night flights",
]  # fmt: skip
WHERE = [
    "in Leeds",
    "near the river",
    "in Cardiff",
    "in the north of Scotland",
    "at the harbour",
    "in Belfast",
]
WHEN = ["on Monday", "after the storm", "last week", "this morning", "despite protests"]
FILLER = [
    "Residents said they were surprised by the news.", "The decision was criticised by opposition members.",
    "More details are expected later this week.", "Officials declined to comment on the matter.",
    "It was the first such event this year.", "A spokesperson said lessons would be learned.",
    "Local businesses welcomed the announcement.", "The plan had been discussed for several months.",
]  # fmt: skip


def rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        who, what = rng.choice(WHO), rng.choice(WHAT)
        first = f"{who} {what} {rng.choice(WHERE)} {rng.choice(WHEN)}."
        out.append(
            {"src": " ".join([first, *rng.sample(FILLER, rng.randint(2, 4))]), "tgt": f"{who} {what}."}
        )
    return out


def main(out_dir: str) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, n, seed in (("train", 2000, 0), ("dev", 200, 1), ("test", 200, 2)):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows(n, seed)))


if __name__ == "__main__":
    main(sys.argv[1])
