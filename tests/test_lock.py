"""requirements/dev.lock, the development and CI lock, against pyproject.toml's ranges: a lock that
no longer satisfies a range (or misses a dependency) would make CI test something users cannot get.
Refresh it with `bash .ci/run --relock`."""

from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


def _lock() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements" / "dev.lock").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"dev.lock: {line!r} is not an exact pin (name==version)"
            pins[canonicalize_name(name)] = version
    return pins


def _requirements(*extras: str) -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in extras:
        reqs += [Requirement(r) for r in project["optional-dependencies"][extra]]
    return [r for r in reqs if canonicalize_name(r.name) != "llrd-search"]  # an extra naming others


def test_the_lock_pins_every_dependency_of_the_dev_install_within_its_range():
    pins = _lock()
    for req in _requirements("dev"):
        if req.marker is not None and not req.marker.evaluate():
            continue
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is a dependency but requirements/dev.lock lacks it: bash .ci/run --relock"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"requirements/dev.lock pins {req.name}=={pins[name]}, outside pyproject's {req}: bash .ci/run --relock"
        )


def test_the_lock_pins_the_cpu_torch_the_readme_installs():
    # The README installs torch==2.13.0 first; a lock pinning another torch would pull a CUDA build.
    assert _lock()["torch"] == "2.13.0"
