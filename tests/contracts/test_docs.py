"""The documentation site (docs/): every public name has an API entry, and every ```python block
of a page runs as written (each in a fresh namespace). Sphinx itself builds the site in .ci/run."""

from __future__ import annotations

import importlib
import pkgutil
import re
from pathlib import Path
from types import ModuleType

import pytest

import pixcontrast

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))
BLOCKS = [
    (page, index, code)
    for page in PAGES
    for index, code in enumerate(
        re.findall(r"^```python\n(.*?)^```", page.read_text(), flags=re.M | re.S))
]
DIRECTIVE = re.compile(r"^\.\. auto(class|function|data|module|attribute|exception):: (\S+)"
                       r"((?:\n   :.*)*)", flags=re.M)


def api_entries() -> tuple[set[str], set[str]]:
    """The names the API pages document, and the modules they document with their members."""
    names: set[str] = set()
    modules: set[str] = set()
    for page in (DOCS / "api").glob("*.rst"):
        for kind, target, options in DIRECTIVE.findall(page.read_text()):
            if kind != "module":
                names.add(target)
            elif ":no-members:" not in options:
                modules.add(target)
    return names, modules


def public_modules() -> list[ModuleType]:
    """pixcontrast's modules whose dotted path has no private part."""
    found = [pixcontrast]
    for info in pkgutil.walk_packages(pixcontrast.__path__, "pixcontrast."):
        if not any(part.startswith("_") for part in info.name.split(".")):
            found.append(importlib.import_module(info.name))
    return found


def top_level_name(value: object) -> str | None:
    """The name under which ``pixcontrast`` itself exports ``value`` (by identity), if any."""
    if isinstance(value, (bool, int, float, str)):
        return None
    return next((name for name in pixcontrast.__all__
                 if getattr(pixcontrast, name) is value), None)


def undocumented(module: ModuleType, names: set[str], modules: set[str]) -> list[str]:
    """The names of ``module.__all__`` that no API page documents."""
    if module.__name__ in modules:
        return []
    missing = []
    for name in getattr(module, "__all__", ()):
        value = getattr(module, name)
        if name == "__version__":
            continue
        if isinstance(value, ModuleType):
            missing += undocumented(value, names, modules)
            continue
        exported = top_level_name(value)
        if f"{module.__name__}.{name}" not in names and (
                exported is None or f"pixcontrast.{exported}" not in names):
            missing.append(f"{module.__name__}.{name}")
    return missing


def test_every_public_name_has_an_api_entry() -> None:
    """What `pixcontrast.__all__` and the public modules' `__all__` name is on an API page, under
    its top-level name when pixcontrast exports it (so the site has one entry per object)."""
    names, modules = api_entries()
    missing = sorted({name for module in public_modules()
                      for name in undocumented(module, names, modules)})
    assert not missing, f"add these to a page of docs/api/: {missing}"


def test_api_entries_exist() -> None:
    """Every entry of the API pages names something importable (a renamed or removed name fails
    here, before the site's build in .ci/run)."""
    names, modules = api_entries()
    for target in sorted(modules):
        importlib.import_module(target)
    for target in sorted(names):
        module, _, attribute = target.rpartition(".")
        assert hasattr(importlib.import_module(module), attribute), target


@pytest.mark.parametrize("page, index, code", BLOCKS,
                         ids=[f"{page.relative_to(DOCS)}:{index + 1}" for page, index, _ in BLOCKS])
def test_docs_block(page: Path, index: int, code: str) -> None:
    compiled = compile(code, f"{page.relative_to(ROOT)} python block {index + 1}", "exec")
    exec(compiled, {"__name__": f"docs_block_{index + 1}"})
