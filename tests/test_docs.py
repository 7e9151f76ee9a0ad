"""The documentation cannot drift from the code.

- the generated reference pages (tools/gen_reference.py) equal what the generator writes today;
- the site builds with ``mkdocs build --strict`` (warnings are errors);
- every ``llrd-search ...`` command line in README.md and docs/ parses with the real parser;
- every Python block of README.md and docs/ runs, except the few marked
  ``<!-- not-run: reason -->`` on the line above (they need real training or a finished study).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# docs/results/ holds reports the package wrote (data, not documentation): not checked here.
PAGES = [ROOT / "README.md", *sorted(p for p in (ROOT / "docs").rglob("*.md") if "results" not in p.relative_to(ROOT / "docs").parts)]
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.S | re.M)
NOT_RUN = re.compile(r"<!--\s*not-run:\s*(\S.*?)\s*-->\s*$")
# `llrd-search ARGS`, or the image's entrypoint: `ghcr.io/OWNER/llrd-search:TAG ARGS`
COMMAND = re.compile(r"(?:^|[\s`(;&|])llrd-search(?::\S+)?\s+(.+)")


def _gen():
    spec = importlib.util.spec_from_file_location("gen_reference", ROOT / "tools" / "gen_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_reference_is_current(tmp_path):
    gen = _gen()
    written = gen.write(tmp_path)
    assert {p.name for p in written} == {"cli.md", "study-file.md", "exit-codes.md"}
    for page in written:
        committed = ROOT / "docs" / "reference" / page.name
        assert committed.is_file(), f"{committed} is missing: run python tools/gen_reference.py"
        assert committed.read_text(encoding="utf-8") == page.read_text(encoding="utf-8"), (
            f"docs/reference/{page.name} is stale: run python tools/gen_reference.py and commit the result")


def test_generated_reference_covers_the_code():
    """What the generator reads is what the pages list: every command, every key, every error class."""
    from llrd_search import exceptions, spec
    from llrd_search.cli import build_parser

    cli = (ROOT / "docs" / "reference" / "cli.md").read_text(encoding="utf-8")
    commands = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction").choices
    for name, sub in commands.items():
        assert f"\n## {name}\n" in cli
        for action in sub._actions:
            for option in action.option_strings:
                if action.help != "==SUPPRESS==" and option not in ("-h", "--help"):
                    assert f"`{option}" in cli, f"{name} {option} missing from docs/reference/cli.md"
    study = (ROOT / "docs" / "reference" / "study-file.md").read_text(encoding="utf-8")
    for section in (spec.StudySection, spec.ModelSection, spec.DataSection, spec.TrainSection, spec.SpaceSection):
        for key in section.model_fields:
            assert f"| `{key}` |" in study, f"{section.__name__}.{key} missing from docs/reference/study-file.md"
    codes = (ROOT / "docs" / "reference" / "exit-codes.md").read_text(encoding="utf-8")
    for cls in vars(exceptions).values():
        if isinstance(cls, type) and issubclass(cls, exceptions.LLRDSearchError):
            assert f"`{cls.__name__}`" in codes


def test_site_builds_strict(tmp_path):
    # mkdocs-material is in the dev extra: a missing install is a failure, not a skip.
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "site" / "reference" / "cli" / "index.html").is_file()


def _command_lines() -> list[tuple[str, str]]:
    """(where, argument text) for each llrd-search command line in code blocks and inline code."""
    found = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        rel = page.relative_to(ROOT)
        # Lines of code blocks, and table cells that are a whole command (the README's command table);
        # a command's name in prose (`llrd-search proxy`) is a name, not a command line.
        lines = [line for m in FENCE.finditer(text) if m.group(1) != "python" for line in m.group(2).splitlines()]
        lines += re.findall(r"^\|\s*`(llrd-search [^`]+)`\s*\|", FENCE.sub("", text), re.M)
        for line in lines:
            if line.lstrip().startswith(("usage:", "#")):
                continue  # usage lines are argparse's own
            m = COMMAND.search(line)
            if m and "`" not in line[: m.start() + 1]:  # `llrd-search confirm` quoted inside output is a name
                # up to a comment, the next command of a chain, a background `&` or a note in parentheses
                args = re.split(r"\s+#\s|\s&&\s|\s\|\s|;\s|\s&$|\s{2,}\(", m.group(1))[0].strip()
                found.append((f"{rel}: {line.strip()}", args))
    return found


COMMAND_LINES = _command_lines()


def test_command_lines_are_found():
    # The README's quickstart, its command table and the docs' examples: a collector that finds
    # nothing would pass the parse test vacuously.
    assert len(COMMAND_LINES) >= 40
    assert any("README.md" in where and args.startswith("run studies/sst2-minilm.toml") for where, args in COMMAND_LINES)


@pytest.mark.parametrize(("where", "args"), COMMAND_LINES, ids=[w[:90] for w, _ in COMMAND_LINES])
def test_command_line_parses(where, args):
    from llrd_search.cli import build_parser

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            build_parser().parse_args(shlex.split(args))
    except SystemExit as exc:
        pytest.fail(f"{where}\n  does not parse (exit {exc.code}): {err.getvalue().strip().splitlines()[-1]}")


def _python_blocks() -> list[tuple[str, str, str | None]]:
    """(where, code, reason it is not run or None) for every Python block."""
    blocks = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for m in FENCE.finditer(text):
            if m.group(1) != "python":
                continue
            before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
            reason = NOT_RUN.search(before)
            line = text[: m.start()].count("\n") + 1
            blocks.append((f"{page.relative_to(ROOT)}:{line}", m.group(2), reason.group(1) if reason else None))
    return blocks


PYTHON_BLOCKS = _python_blocks()


def test_few_python_blocks_are_left_unrun():
    run = [w for w, _, why in PYTHON_BLOCKS if why is None]
    skipped = [w for w, _, why in PYTHON_BLOCKS if why is not None]
    assert len(run) >= 3, "the docs' Python examples should mostly run"
    assert len(skipped) <= 6, f"too many Python blocks marked not-run: {skipped}"


@pytest.mark.parametrize(("where", "code"), [(w, c) for w, c, why in PYTHON_BLOCKS if why is None],
                         ids=[w for w, _, why in PYTHON_BLOCKS if why is None])
def test_python_block_runs(where, code, tmp_path):
    # Each block alone, in a fresh interpreter from the repository root (they name studies/...),
    # as a reader would paste it.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    script = tmp_path / "block.py"
    script.write_text(code, encoding="utf-8")
    proc = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{where} failed:\n{proc.stderr[-3000:]}"
