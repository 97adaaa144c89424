"""MkDocs hook of the site (mkdocs.yml): fills the pages' ``<!-- masq:... -->`` markers from
the committed datasets (masq.report.site)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from masq.report.site import expand


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """The page's Markdown with its markers filled."""
    return expand(markdown, Path(page.file.abs_src_path), Path(config["docs_dir"]))
