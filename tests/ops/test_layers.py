"""The core stands alone: importing the op layer and the bank (or the bare package) never imports transformers,
peft or the upper layers, so a serving stack can embed them alone."""

import subprocess
import sys

import pytest

HEAVY = ("transformers", "peft", "prefixrt.hf", "prefixrt.engine", "prefixrt.train", "prefixrt.tasks")


@pytest.mark.parametrize("statement", ["import prefixrt", "import prefixrt.ops", "import prefixrt.bank"])
def test_core_imports_stay_light(statement):
    probe = (
        f"{statement}\nimport sys\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {{'transformers', 'peft'}} "
        f"or any(m == h or m.startswith(h + '.') for h in {HEAVY!r})))"
    )
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "[]", f"{statement} imported {loaded.stdout.strip()}"


def test_public_names_load_on_first_use():
    probe = "import prefixrt, sys\nprefixrt.attach\nprint('prefixrt.hf' in sys.modules, 'prefixrt.train' in sys.modules)"
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert loaded.stdout.split() == ["True", "False"]
