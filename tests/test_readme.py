"""README.md as a new user reads it: every snippet runs as written.

- Each ```python block runs as written in a fresh interpreter (in an empty
  folder, with the checkout under test first on PYTHONPATH); it must exit 0
  and print no warning.
- ```bash blocks: every `python -m pyconvext ...` command in them is parsed by
  the command line's own parser (an option or choice that does not exist
  fails), every `pip install -r FILE` names a file of the repository, and the
  `--help` of the command line and of each subcommand runs in a subprocess.
- An HTML comment on the last non-blank line before a block's opening fence
  marks it:
  `<!-- snippet: run -->` runs a bash block as written (from the repository
  root; only for commands that take seconds), and
  `<!-- snippet: skip (REASON) -->` skips a block with that reason (one that
  needs a GPU or the network). Any other `<!-- snippet: ... -->` is an error.
"""

import contextlib
import dataclasses
import io
import os
import re
import shlex
import subprocess
import sys

import pytest

from pyconvext.__main__ import make_parser
from test_build import ROOT

README = ROOT / "README.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.M | re.S)
MARK = re.compile(r"<!-- snippet: (?:(run)|skip \((.+)\)) -->")
WARNING = re.compile(r"warn", re.I)
PYCONVEXT = ["python", "-m", "pyconvext"]


@dataclasses.dataclass
class Snippet:
    language: str
    code: str
    line: int  # of the opening fence, from 1
    run: bool = False
    skip: str | None = None  # the reason


def snippets(text):
    """The fenced blocks of a Markdown text, with their marks."""
    found = []
    for block in FENCE.finditer(text):
        before = text[:block.start()].rstrip("\n").rsplit("\n", 1)[-1]
        snippet = Snippet(block.group(1), block.group(2), text.count("\n", 0, block.start()) + 1)
        if "<!-- snippet:" in before:
            mark = MARK.fullmatch(before.strip())
            if mark is None:
                raise ValueError(f"line {snippet.line - 1}: not a snippet mark: {before}")
            snippet.run, snippet.skip = bool(mark.group(1)), mark.group(2)
        found.append(snippet)
    return found


def commands(code):
    """The commands of a bash block, as token lists: comments dropped,
    continuation lines joined, split at `&&`, `||`, `;` and `|`."""
    for line in code.replace("\\\n", " ").splitlines():
        command = []
        for token in shlex.split(line, comments=True):
            if token in ("&&", "||", ";", "|"):
                yield command
                command = []
            else:
                command.append(token)
        if command:
            yield command


SNIPPETS = snippets(README.read_text())
PYTHON = [s for s in SNIPPETS if s.language == "python"]
BASH = [s for s in SNIPPETS if s.language == "bash"]


def env():
    """The checkout under test first on PYTHONPATH, and this interpreter as `python`."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])}


def test_snippets_are_found():
    text = ("a\n```python\nx = 1\n```\n<!-- snippet: skip (needs a GPU) -->\n```python\ny\n```\n"
            "<!-- snippet: run -->\n\n```bash\npython -m pyconvext info  # a comment\n```\n")
    assert snippets(text) == [
        Snippet("python", "x = 1\n", 2), Snippet("python", "y\n", 6, skip="needs a GPU"),
        Snippet("bash", "python -m pyconvext info  # a comment\n", 11, run=True)]
    with pytest.raises(ValueError, match="line 1: not a snippet mark"):
        snippets("<!-- snippet: skip -->\n```python\nx\n```\n")
    assert list(commands("pip install -r r.txt && python -m pyconvext demo  # x\na \\\n  b | c\n")) == [
        ["pip", "install", "-r", "r.txt"], ["python", "-m", "pyconvext", "demo"], ["a", "b"], ["c"]]
    # The README has both kinds, and the Quick start commands among them.
    assert PYTHON and BASH
    assert any(command[:3] == PYCONVEXT for s in BASH for command in commands(s.code))


@pytest.mark.parametrize("snippet", PYTHON, ids=[f"line{s.line}" for s in PYTHON])
def test_python_snippet_runs(snippet, tmp_path):
    if snippet.skip:
        pytest.skip(f"README.md line {snippet.line}: {snippet.skip}")
    result = subprocess.run([sys.executable, "-c", snippet.code], cwd=tmp_path, env=env(),
                            capture_output=True, text=True, timeout=600)
    where = f"the README.md snippet at line {snippet.line}"
    assert result.returncode == 0, f"{where} failed:\n{result.stderr}"
    assert not WARNING.search(result.stderr), f"{where} warned:\n{result.stderr}"


def test_bash_commands_are_valid():
    """Every pyconvext command the README shows parses with the real command
    line; every requirements file it installs exists."""
    parser = make_parser()
    checked = 0
    for snippet in BASH:
        if snippet.skip:
            continue
        for command in commands(snippet.code):
            where = f"README.md line {snippet.line}: {shlex.join(command)}"
            if command[:3] == PYCONVEXT:
                try:
                    with contextlib.redirect_stdout(io.StringIO()):  # --help prints and exits 0
                        parser.parse_args(command[3:])
                except SystemExit as stop:
                    if stop.code != 0:
                        pytest.fail(f"{where}: the command line refuses it")
                checked += 1
            if command[:2] == ["pip", "install"] and "-r" in command:
                assert (ROOT / command[command.index("-r") + 1]).is_file(), where
    assert checked >= 5


def subcommands():
    parser = make_parser()
    return sorted(next(a for a in parser._actions if a.dest == "command").choices)


@pytest.mark.parametrize("subcommand", [None, *subcommands()])
def test_help(subcommand):
    command = [sys.executable, "-m", "pyconvext", *([subcommand] if subcommand else []), "--help"]
    result = subprocess.run(command, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: python -m pyconvext"), result.stdout
    assert not WARNING.search(result.stderr), result.stderr


@pytest.mark.parametrize("snippet", [s for s in BASH if s.run],
                         ids=[f"line{s.line}" for s in BASH if s.run])
def test_quick_bash_snippet_runs(snippet):
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", snippet.code], cwd=ROOT, env=env(),
                            capture_output=True, text=True, timeout=600)
    where = f"the README.md snippet at line {snippet.line}"
    assert result.returncode == 0, f"{where} failed:\n{result.stdout}\n{result.stderr}"
    assert not WARNING.search(result.stderr), f"{where} warned:\n{result.stderr}"
