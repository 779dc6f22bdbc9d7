"""MkDocs hook: render the Sphinx-style cross-references of the docstrings (Lightning's style) as code.

The docstrings follow Lightning's conventions (``:class:`~lightning_grokfast.GrokfastCallback```, ``Example::``);
mkdocstrings renders them as Markdown, where those roles would show literally. This turns each role into inline
code holding the name (the last component for ``~`` paths, as Sphinx shows it) and ``Example::`` into a heading.
"""

from __future__ import annotations

import re
from typing import Any

_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|data|attr|exc|obj|paramref):<code>(~?)([\w.]+)(\(\))?</code>")
_EXAMPLE = re.compile(r"<p>(Examples?)::</p>")


def _role(match: re.Match[str]) -> str:
    tilde, path, call = match.groups()
    return f"<code>{path.rsplit('.', 1)[-1] if tilde else path}{call or ''}</code>"


def on_page_content(html: str, **kwargs: Any) -> str:
    """Rewrite the roles and ``Example::`` markers in a rendered page."""
    return _EXAMPLE.sub(r"<p><strong>\1</strong></p>", _ROLE.sub(_role, html))
