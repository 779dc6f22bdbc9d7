"""Package boundaries: the filter core imports with torch alone; the public names load lazily."""

from __future__ import annotations

import subprocess
import sys

import pytest

import lightning_grokfast


@pytest.mark.parametrize(
    "module",
    [
        "lightning_grokfast.core.filters",
        "lightning_grokfast.integrations.hook",
        "lightning_grokfast.integrations.functional",
    ],
)
def test_the_filter_core_imports_without_lightning_or_matplotlib(module):
    code = (
        f"import sys, {module}\n"
        "heavy = sorted(m for m in ('lightning', 'matplotlib', 'jsonargparse', 'torchmetrics') if m in sys.modules)\n"
        "print(heavy)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_every_public_name_resolves_and_is_listed():
    for name in lightning_grokfast.__all__:
        assert getattr(lightning_grokfast, name) is not None
    assert set(lightning_grokfast.__all__) <= set(dir(lightning_grokfast))
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        lightning_grokfast.nothing  # noqa: B018


def test_the_version_has_one_source():
    from importlib.metadata import version

    assert version("lightning-grokfast") == lightning_grokfast.__version__ == "0.2.0"


def test_a_missing_extra_is_named():
    from lightning_grokfast.core.validation import require

    with pytest.raises(ImportError, match=r'pip install "lightning-grokfast\[dashboard\]"'):
        require("not_a_module_here", "dashboard", "The grokking figure")
