"""Every framework page reads side by side with the others: the sections of contract.PAGE_SECTIONS, in order, once each,
and its members (contract.PAGE_MEMBERS) each in its section and in the map's order. Read as text, no framework
imported. A page is an `implementations/*/trainer.py`, and any Rust or Haskell source of a row under its folder that has
a section banner; a row in another language has at least one such page (its other sources are its layers, its
protocol or its tests)."""

from __future__ import annotations

import ast
import re
from itertools import zip_longest
from pathlib import Path

import pytest

from implementations import FRAMEWORKS, contract

IMPLEMENTATIONS = Path(__file__).resolve().parents[1] / "implementations"
BUILD_FOLDERS = {"target", "dist-newstyle", ".stack-work"}  # cargo's and cabal's outputs hold generated sources
BANNER = re.compile(r"^\s*(#|//|--) --- (.+?) -+$", re.MULTILINE)
SOURCES = sorted(source for pattern in ("*/**/*.rs", "*/**/*.hs") for source in IMPLEMENTATIONS.glob(pattern)
                 if BUILD_FOLDERS.isdisjoint(source.relative_to(IMPLEMENTATIONS).parts))
PAGES = sorted([*IMPLEMENTATIONS.glob("*/trainer.py"), *(source for source in SOURCES if BANNER.search(source.read_text()))])


def page_id(page: Path) -> str:
    return str(page.relative_to(IMPLEMENTATIONS))


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_page_sections(page):
    banners = [match.group(2) for match in BANNER.finditer(page.read_text())]
    mismatches = [(position, banner, section) for position, (banner, section)
                  in enumerate(zip_longest(banners, contract.PAGE_SECTIONS), start=1) if banner != section]
    if mismatches:
        position, banner, section = mismatches[0]
        pytest.fail(f"{page.relative_to(IMPLEMENTATIONS.parent)}: banner {position} is {banner!r}, expected "
                    f"{section!r}; its banners: {banners}, contract.PAGE_SECTIONS: {list(contract.PAGE_SECTIONS)}",
                    pytrace=False)


# --- The member map ---------------------------------------------------------------------------------------------------
def spelled(name: str, language: str) -> list[str]:
    """A PAGE_MEMBERS entry's names as a page in `language` spells them (".train_step": trainStep in Haskell)."""
    names = name.lstrip(".").split("|")
    if language == "hs":
        names = [re.sub(r"_(\w)", lambda match: match.group(1).upper(), each) for each in names]
    return names


def expected_places(language: str) -> dict[str, tuple[int, str, str]]:
    """Each spelling of a mapped member -> (its position in the map, its section, the map's entry)."""
    places, position = {}, 0
    for section, members in contract.PAGE_MEMBERS.items():
        for member in members:
            for name in spelled(member, language):
                places[("." if member.startswith(".") and language == "py" else "") + name] = (position, section, member)
            position += 1
    return places


def members_in_order(text: str, language: str) -> list[tuple[int, str]]:
    """(line, name) of the page's definitions in file order: Python's top-level functions and classes and its
    Trainer's methods (".name"); Rust's functions and structs; Haskell's top-level signatures and data types."""
    if language == "py":
        found = []
        for node in ast.parse(text).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                found.append((node.lineno, node.name))
            is_trainer = isinstance(node, ast.ClassDef) and any(
                (base.attr if isinstance(base, ast.Attribute) else getattr(base, "id", "")) == "Trainer"
                for base in node.bases)
            if is_trainer:
                found += [(method.lineno, f".{method.name}") for method in node.body
                          if isinstance(method, ast.FunctionDef)]
        return sorted(found)
    pattern = (r"^\s*(?:pub(?:\(crate\))?\s+)?(?:fn|struct)\s+(\w+)" if language == "rs"
               else r"^(?:data\s+)?([A-Za-z]\w*)\s*(?:::|[=\s])")
    return [(text.count("\n", 0, match.start()) + 1, match.group(1)) for match in re.finditer(pattern, text, re.M)]


def misplaced_members(text: str, language: str) -> list[str]:
    """Why the page's members break PAGE_MEMBERS: one line each, empty if they keep it."""
    banners = [(text.count("\n", 0, match.start()) + 1, match.group(2)) for match in BANNER.finditer(text)]
    places, problems, last = expected_places(language), [], (-1, "")
    for line, name in members_in_order(text, language):
        if name not in places:
            continue  # one of the page's own helpers
        position, section, member = places[name]
        found = next((banner for start, banner in reversed(banners) if start <= line), "before the first banner")
        if found != section:
            problems.append(f"line {line}: {name} is under {found!r}; PAGE_MEMBERS puts {member!r} under {section!r}")
        elif position < last[0]:
            problems.append(f"line {line}: {name} comes after {last[1]}; PAGE_MEMBERS orders them the other way")
        last = max(last, (position, name))
    return problems


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_page_members_stand_in_their_sections_in_order(page):
    problems = misplaced_members(page.read_text(), page.suffix.lstrip("."))
    assert not problems, f"{page.relative_to(IMPLEMENTATIONS.parent)}:\n" + "\n".join(problems)


def test_the_member_check_catches_a_page_that_breaks_the_map():
    page = '''
# --- Model ----
class BasicBlock: ...
class ResNet18: ...
# --- State ----
class MyTrainer(contract.Trainer):
    def build(self, weights): ...
    def warm_up(self): ...
    # --- Train step ----
    def learning_rates(self, steps): ...
    def train_on_batch(self, images, labels): ...
'''
    assert misplaced_members(page, "py") == [
        "line 8: .warm_up is under 'State'; PAGE_MEMBERS puts '.warm_up' under 'Epoch'",
        "line 10: .learning_rates comes after .warm_up; PAGE_MEMBERS orders them the other way",
        "line 11: .train_on_batch comes after .warm_up; PAGE_MEMBERS orders them the other way",
    ]
    rust = "// --- Model ---\npub struct ResNet18 {}\n// --- State ---\nfn train_step() {}\n"
    assert misplaced_members(rust, "rs") == [
        "line 4: train_step is under 'State'; PAGE_MEMBERS puts '.train_step' under 'Train step'"]


# --- Registration -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", FRAMEWORKS)
def test_registered_page_exists(name):
    module, _, class_name = FRAMEWORKS[name].module.partition(":")
    page = IMPLEMENTATIONS.parent.joinpath(*module.split(".")).with_suffix(".py")
    assert page.is_file(), f"{name}: registered as {FRAMEWORKS[name].module}, but {page} does not exist"
    assert page in PAGES, f"{name}: {page} is not an implementations/<folder>/trainer.py, whose sections are checked"
    assert re.search(rf"^class {class_name}\(", page.read_text(), re.MULTILINE), f"{page}: no class {class_name}"


def test_each_trainer_class_is_named_after_its_page():
    """Two pages' classes of one name (both KerasTrainer) read as one thing in a traceback or a diff."""
    classes = {}
    for framework in FRAMEWORKS.values():
        module, _, class_name = framework.module.partition(":")
        classes.setdefault(class_name, set()).add(module)
    assert all(len(modules) == 1 for modules in classes.values()), classes


@pytest.mark.parametrize("row", sorted({source.relative_to(IMPLEMENTATIONS).parts[0] for source in SOURCES}))
def test_a_row_in_another_language_has_a_page_in_that_language(row):
    assert any(page.relative_to(IMPLEMENTATIONS).parts[0] == row and page.suffix != ".py" for page in PAGES), \
        f"implementations/{row}: no Rust or Haskell source carries the section banners"
