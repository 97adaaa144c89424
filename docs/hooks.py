"""MkDocs hooks of the site (mkdocs.yml): the pages' ``<!-- masq:... -->`` markers filled from
the committed datasets, and the docstrings' Sphinx roles turned into links (masq.report.site)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from masq.cli import build_parser
from masq.report.site import expand, link_roles


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """The page's Markdown with its markers filled."""
    return expand(markdown, Path(page.file.abs_src_path), Path(config["docs_dir"]), build_parser())


def on_page_content(html: str, page: Any, config: Any, files: Any) -> str:
    """The page's HTML with the docstrings' roles as links (or code)."""
    return link_roles(html)
