"""`prefixrt bench train` on small models: every arm trains (finite losses, timed steps), the report names the
backend the prefix arm ran and its ratios to PEFT and to the frozen base, and the plot is written."""

import json
import math

from prefixrt.cli import main


def test_bench_train_small(tmp_path):
    out = tmp_path / "train.json"
    argv = ["bench", "train", "--small", "--tasks", "2", "--rows-per-task", "2", "--seq-len", "8",
            "--prefix-lengths", "3", "4", "--steps", "1", "--warmup", "0", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    report = json.loads(out.read_text())
    arms = {(r["model"], r["arm"]) for r in report["results"]}
    assert arms == {(m, a) for m in ("gpt2", "bart") for a in ("prefixrt", "peft", "frozen_base")} | {
        ("bart", "prefixrt_peft_sites"),  # PEFT's sites (no encoder prefix): only where they differ from ours
        ("gpt2", "prefixrt_torch_modules"),  # torch's own dropout and GELU: only where prefixrt swaps them
    }
    swapped = {r["model"]: r["swapped_modules"] for r in report["results"] if r["arm"] == "prefixrt"}
    assert swapped["gpt2"] > 0 and swapped["bart"] == 0
    for r in report["results"]:
        assert math.isfinite(r["last_loss"]) and r["step_s"] > 0 and len(r["step_s_all"]) == 1
    for s in report["summary"]:
        assert s["prefixrt_backend"] in ("reference", "cpp", "triton")
        assert s["speedup_vs_peft"] > 0 and s["fraction_of_frozen_base"] > 0
        assert ("speedup_vs_peft_on_its_sites" in s) == (s["model"] == "bart")
        assert ("torch_modules_fraction_of_frozen_base" in s) == (s["model"] == "gpt2")
    assert [s["prefix_len"] for s in report["summary"]] == [3, 4]
    assert out.with_suffix(".png").stat().st_size > 0
