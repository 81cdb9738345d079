"""Every framework page has the sections of contract.PAGE_SECTIONS, in order, once each: read as text, no framework
imported. A page is an `implementations/*/trainer.py`, and any Rust or Haskell source of a row under its folder that has
a section banner; a row in another language has at least one such page (its other sources are its layers, its
protocol or its tests)."""

from __future__ import annotations

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


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(IMPLEMENTATIONS)))
def test_page_sections(page):
    banners = [match.group(2) for match in BANNER.finditer(page.read_text())]
    mismatches = [(position, banner, section) for position, (banner, section)
                  in enumerate(zip_longest(banners, contract.PAGE_SECTIONS), start=1) if banner != section]
    if mismatches:
        position, banner, section = mismatches[0]
        pytest.fail(f"{page.relative_to(IMPLEMENTATIONS.parent)}: banner {position} is {banner!r}, expected "
                    f"{section!r}; its banners: {banners}, contract.PAGE_SECTIONS: {list(contract.PAGE_SECTIONS)}",
                    pytrace=False)


@pytest.mark.parametrize("name", FRAMEWORKS)
def test_registered_page_exists(name):
    module, _, class_name = FRAMEWORKS[name].module.partition(":")
    page = IMPLEMENTATIONS.parent.joinpath(*module.split(".")).with_suffix(".py")
    assert page.is_file(), f"{name}: registered as {FRAMEWORKS[name].module}, but {page} does not exist"
    assert page in PAGES, f"{name}: {page} is not an implementations/<folder>/trainer.py, whose sections are checked"
    assert re.search(rf"^class {class_name}\(", page.read_text(), re.MULTILINE), f"{page}: no class {class_name}"


@pytest.mark.parametrize("row", sorted({source.relative_to(IMPLEMENTATIONS).parts[0] for source in SOURCES}))
def test_a_row_in_another_language_has_a_page_in_that_language(row):
    assert any(page.relative_to(IMPLEMENTATIONS).parts[0] == row and page.suffix != ".py" for page in PAGES), \
        f"implementations/{row}: no Rust or Haskell source carries the section banners"
