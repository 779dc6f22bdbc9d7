"""The README and the documentation site: short README, CI's test command, tables equal to the results, every
public module in the API reference, present tense."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.test_docstrings import MODULES

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
RESULTS = ROOT / "benchmarks" / "results"
PAGES = sorted([ROOT / "README.md", *DOCS.rglob("*.md")])


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def _rows(path: Path) -> list[list[str]]:
    lines = [line for line in path.read_text().splitlines() if line.startswith("|")]
    return [_cells(line) for line in lines[2:]]  # without the header and its rule


def test_readme_is_at_most_250_lines() -> None:
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250


def test_readme_test_command_is_the_one_ci_runs() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = (
        "python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0"
        ' && pip install -e ".[dev]" && pytest'
    )
    assert command in readme and command in ci


def test_readme_main_job_runs_a_shipped_config() -> None:
    main_job = next(line for line in (ROOT / "README.md").read_text().splitlines() if "lightning-grokfast fit" in line)
    assert main_job.endswith("lightning-grokfast fit --config ema")
    assert (ROOT / "lightning_grokfast" / "configs" / "ema.yaml").is_file()


def test_paper_table_in_the_docs_matches_the_results() -> None:
    page = (DOCS / "benchmarks.md").read_text()
    for row in _rows(RESULTS / "grokking.md"):
        assert "| " + " | ".join(row[:-1]) + " |" in page, row[0]  # every column but the command


def test_leaderboard_tables_in_the_docs_match_the_results() -> None:
    page = (DOCS / "benchmarks.md").read_text()
    for task, label, wd, seeds, steps, time, reached, ratio, per_seed, _command in _rows(
        RESULTS / "grokking_leaderboard.md"
    ):
        expected = f"| {label} | {wd} | {seeds} | {steps} | {reached} | {ratio} | {per_seed} | {time} |"
        assert expected in page, (task, label)


def test_safe_default_table_in_the_docs_matches_the_results() -> None:
    page = (DOCS / "which-filter-new-tasks.md").read_text()
    for row in _rows(RESULTS / "safe_default.md"):
        assert "| " + " | ".join(row[:-1]) + " |" in page, row[:2]  # every column but the command


def test_every_public_module_has_an_api_reference_entry() -> None:
    reference = "\n".join(path.read_text() for path in (DOCS / "reference").glob("*.md"))
    documented = set(re.findall(r"^::: ([\w.]+)$", reference, re.MULTILINE))
    owned = ("integrations.hook", "integrations.hf", "core.binding", "core.metrics")  # documented by their owners
    expected = {*MODULES, *(f"lightning_grokfast.{name}" for name in owned)}
    assert expected <= documented, sorted(expected - documented)


def test_changelog_page_includes_the_changelog() -> None:
    assert '--8<-- "CHANGELOG.md"' in (DOCS / "changelog.md").read_text()
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert "## [Unreleased]" in changelog and "## [0.2.0]" in changelog and "## [0.1.0]" in changelog


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_docs_describe_current_behaviour_without_history(page: Path) -> None:
    history = re.compile(r"\b(used to|no longer|since this release|in this release|before this release|0\.[12] did)\b")
    assert not history.findall(page.read_text().lower()), "history goes into CHANGELOG.md"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_python_blocks_left_out_of_the_tests_say_why(page: Path) -> None:
    lines = page.read_text().splitlines()
    for i, line in enumerate(lines):
        if line.strip().startswith("```") and "notest" in line:
            assert line.strip() == "```{.python notest}", line  # the form both pytest-markdown-docs and MkDocs read
            assert lines[i + 1].startswith("# "), f"{page.name}:{i + 2}: the first line says why the block cannot run"
