"""The README's Python example runs as written (a claim in the README is something that ran)."""

import re

from support.paths import REPO_ROOT


def test_readme_python_example_runs():
    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "README.md has no python example"
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    out, prefix_ids = namespace["out"], namespace["prefix_ids"]
    assert out.shape == (3, 4 + 8)
    assert prefix_ids.tolist() == [0, 1, -1]
