"""MkDocs hooks (no plugin to download): generate the reference pages before each build and expand the
generated-section markers of the hand-written pages (see ``docs/gen_ref.py``)."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gen_ref  # noqa: E402


def on_pre_build(config: Any, **_: Any) -> None:
    """Write the generated pages into the docs folder (only those whose content changed)."""
    gen_ref.write(Path(config["docs_dir"]))


def on_page_markdown(markdown: str, **_: Any) -> str:
    """Expand ``<!-- gen:... -->`` markers."""
    return gen_ref.expand_markers(markdown)
