"""README.md: every ```python block runs as written (each in a fresh namespace), every excerpt of
an example is that example's own code, it renders as a package description (no relative links),
and the set-up section is what CI runs."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README_TEXT = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"^```python\n(.*?)^```", README_TEXT, flags=re.M | re.S)
SETUP_HEADING = "## The two set-up commands\n"


def test_readme_has_code() -> None:
    assert len(BLOCKS) >= 2


def test_readme_is_read_in_ten_minutes() -> None:
    """The rest lives on the documentation site (docs/)."""
    assert len(README_TEXT.splitlines()) <= 300


def test_readme_needs_no_relative_link() -> None:
    """On PyPI a relative link leads nowhere: files are named as code, and the only relative
    targets are images (shown in the repository; their numbers are in the text as well)."""
    links = re.findall(r"(!?)\[[^\]]*\]\(([^)\s]+)\)", README_TEXT)
    for bang, target in links:
        if re.match(r"https?://", target):
            continue
        assert bang, f"relative link to {target}: name the file as code or link absolutely"
        assert (ROOT / target).is_file(), target


def test_example_excerpts_are_the_examples_code() -> None:
    """An unlabelled block whose preceding paragraph names ``examples/NAME.py`` is lines of that
    file (comments aside; compared with whitespace collapsed, so a line may wrap differently)."""
    checked = 0
    for fence in re.finditer(r"^```(\w*)\n(.*?)^```$", README_TEXT, flags=re.M | re.S):
        if fence.group(1):  # a labelled block: python (run above), bibtex
            continue
        paragraph = README_TEXT[:fence.start()].rstrip().rsplit("\n\n", 1)[-1]
        named = re.search(r"`(examples/\w+\.py)`", paragraph)
        if named is None:
            continue
        source = " ".join((ROOT / named.group(1)).read_text().split())
        for line in fence.group(2).splitlines():
            code = " ".join(line.split("  #", 1)[0].split())
            assert not code or code in source, f"{named.group(1)} has no line {code!r}"
        checked += 1
    assert checked >= 3


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block(index: int) -> None:
    code = compile(BLOCKS[index], f"README.md python block {index + 1}", "exec")
    exec(code, {"__name__": f"readme_block_{index + 1}"})


def setup_commands() -> list[str]:
    """The command lines of the set-up section's shell blocks (comments and blanks dropped)."""
    section = README_TEXT.split(SETUP_HEADING, 1)[1]
    section = re.split(r"^## ", section, maxsplit=1, flags=re.M)[0]
    commands = []
    for block in re.findall(r"^```[a-z]*\n(.*?)^```", section, flags=re.M | re.S):
        for line in block.splitlines():
            line = line.split(" #", 1)[0].strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def ci_commands() -> list[str]:
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def test_setup_section_has_the_main_job_and_the_tests_that_ci_runs() -> None:
    assert SETUP_HEADING in README_TEXT
    main_job, tests = setup_commands()  # exactly two
    assert shlex.split(main_job)[-2:] == ["python", "examples/digits_segmentation.py"]
    assert shlex.split(tests)[-4:] == ["python", "-m", "pytest", "-q"]
    # both set up through the same environment script, which CI calls the same way
    script = shlex.split(main_job)[:2]
    assert script == ["bash", "scripts/env.sh"] and (ROOT / script[1]).is_file()
    assert shlex.split(tests)[:2] == script
    assert tests in ci_commands()
    runs = [shlex.split(c) for c in ci_commands() if c.startswith("bash ")]
    assert runs and all(command[:2] == script for command in runs)
    assert script + ["ruff", "check", "."] in runs


def test_environment_script_documents_the_torch_choice() -> None:
    """The settings the README's set-up section names are the ones the script reads, and its
    help says where CPU and CUDA builds of torch come from."""
    script = (ROOT / "scripts" / "env.sh").read_text()
    section = README_TEXT.split(SETUP_HEADING, 1)[1].split("\n## ", 1)[0]
    help_text = subprocess.run(["bash", str(ROOT / "scripts" / "env.sh"), "--help"],
                               capture_output=True, text=True, check=True).stdout
    for name in ("PIXCONTRAST_TORCH", "PIXCONTRAST_TORCH_INDEX"):
        assert f"${{{name}:-" in script, name  # read, with a default
        assert name in section and name in help_text, name
    for url in ("https://download.pytorch.org/whl/cpu", "https://download.pytorch.org/whl/cu"):
        assert url in section and url in help_text, url


def test_readme_figures_are_the_committed_results() -> None:
    """The benchmark headline and the main job's table (here and on the recipe page) are the
    committed JSON's numbers."""
    bench = json.loads((ROOT / "benchmarks/results/bench_loss_headline_threads1.json").read_text())
    headline = bench["summary"]["headline"]
    assert f"{headline['speedup_torch_vs_reference']:.2f}x faster" in README_TEXT
    assert f"({headline['peak_memory_torch_over_reference']:.3f}x)" in README_TEXT
    assert f"{headline['time_torch_over_floor']:.2f}x the two unavoidable products" in README_TEXT
    digits = json.loads((ROOT / "examples/results/digits_results.json").read_text())["summary"]
    recipe_page = (ROOT / "docs" / "recipe.md").read_text()
    for text in (README_TEXT, recipe_page):
        for mode in ("ce", "ce+contrast"):
            for metric in ("miou", "shifted_miou", "probe"):
                value = digits[mode][metric]
                assert f"{100 * value['mean']:.2f} +- {100 * value['std']:.2f}" in text
        for metric in ("miou", "probe"):
            paired = digits["ce+contrast"][metric]["paired_diff"]
            assert f"{100 * paired['mean']:+.2f} +- {100 * paired['std']:.2f}" in text
