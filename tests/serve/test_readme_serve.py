"""The README's Serve section is accurate: its command starts the server it describes, and its curl and Python
examples run as written against it (only the port differs: the test server takes a free one)."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shlex
import shutil
import subprocess

import pytest
from support.paths import REPO_ROOT


def serve_section() -> str:
    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    return text.split("\n## Serve\n", 1)[1].split("\n## ", 1)[0]


@pytest.fixture(scope="module")
def readme_server(launch):
    bash = re.findall(r"```bash\n(.*?)```", serve_section(), re.S)
    commands = [line for block in bash for line in block.splitlines() if line.startswith("prefixrt serve")]
    assert commands == ["prefixrt serve"], commands
    return launch(shlex.split(commands[0])[2:], "readme")  # the launcher adds --port 0 --threads 1


def test_readme_python_example(readme_server):
    block = re.findall(r"```python\n(.*?)```", serve_section(), re.S)[0]
    assert "http://127.0.0.1:8000/v1" in block
    code = block.replace("http://127.0.0.1:8000", readme_server.url)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md (Serve)", "exec"), {})
    first = out.getvalue().splitlines()[0]
    assert first == str(["gpt2-tiny", "demo-1", "demo-2", "demo-3"])  # what the README says it serves
    assert "completion_tokens=16" in out.getvalue()


def test_readme_curl_example(readme_server):
    if shutil.which("curl") is None:
        pytest.skip("no curl on this machine")
    block = re.findall(r"```bash\n(.*?)```", serve_section(), re.S)[1]
    command = block.replace("http://127.0.0.1:8000", readme_server.url).replace("\\\n", " ")
    assert command.strip().startswith("curl ")
    out = subprocess.run(
        ["bash", "-c", command.strip()], capture_output=True, text=True, timeout=60, check=True
    )
    answer = json.loads(out.stdout)
    assert answer["object"] == "text_completion" and answer["model"] == "demo-1"
    assert answer["usage"]["completion_tokens"] == 16 and answer["choices"][0]["finish_reason"] == "length"
