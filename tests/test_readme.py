"""Every code block of README.md runs as written, except those marked illustrative.

A block is illustrative when the line before its opening fence is
``<!-- illustrative: WHY -->`` (installing packages, a second host).  Python
blocks run in a fresh interpreter, shell blocks with ``bash -e`` in an empty
directory, JSON blocks must be definitions the daemon accepts.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

import pytest

from tunnel.daemon import validate_definition

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FENCE = re.compile(r"^```(\w+)\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def blocks() -> list[tuple[str, str, int, bool]]:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    found = []
    for match in FENCE.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        found.append((match.group(1), match.group(2), line, before.startswith("<!-- illustrative:")))
    return found


def test_the_readme_has_no_indented_code_blocks_left() -> None:
    """Indented blocks cannot carry a language or a marker: every block is fenced."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = FENCE.sub("", f.read())
    assert not re.search(r"\n\n {4}\S", text)


@pytest.mark.parametrize(("lang", "code", "line", "illustrative"), blocks(), ids=lambda v: str(v) if isinstance(v, int) else None)
def test_readme_block_runs_as_written(lang: str, code: str, line: int, illustrative: bool) -> None:
    if illustrative:
        pytest.skip(f"README.md line {line} is marked illustrative")
    env = {**os.environ, "PYTHONPATH": ROOT}
    env.pop("TUNNEL_URI", None)
    if lang == "python":
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False, env=env)
    elif lang == "sh":
        with tempfile.TemporaryDirectory(prefix="readme-") as tmp:
            done = subprocess.run(["bash", "-e", "-c", code], cwd=tmp, capture_output=True, text=True, timeout=90, check=False,
                                  env=env, stdin=subprocess.DEVNULL)
            leftovers = sorted(os.listdir(tmp))
        assert not [name for name in leftovers if name.endswith(".sock")], leftovers  # the daemons stopped and removed them
    elif lang == "json":
        validate_definition(json.loads(code))
        return
    else:
        raise AssertionError(f"README.md line {line}: a {lang!r} block; mark it illustrative or teach this test to run it")
    assert done.returncode == 0, f"README.md line {line} failed:\n{done.stdout}\n{done.stderr}"
