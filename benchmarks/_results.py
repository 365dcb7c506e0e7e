"""Writing a benchmark script's result: ``<out>.json`` (the numbers) and ``<out>.md`` (the committed report)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable


def save(out: str, result: dict, write_markdown: Callable[[str, dict], None]) -> None:
    """Write ``result`` to ``out + '.json'`` and its markdown report (by ``write_markdown``) to ``out + '.md'``."""
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out + ".json", "w") as fh:
        json.dump(result, fh, indent=1)
    write_markdown(out + ".md", result)
    print(f"wrote {out}.json and {out}.md")
