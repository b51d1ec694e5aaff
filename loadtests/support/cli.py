"""The command line of a measurement (``python -m loadtests.<name>``): its parser, with
the ``--json`` option they share, and the result printed and written there."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def measurement_parser(name: str, doc: str) -> argparse.ArgumentParser:
    """``python -m loadtests.<name>``, described by the first paragraph of ``doc``."""
    parser = argparse.ArgumentParser(
        prog=f"python -m loadtests.{name}", description=doc.split("\n\n")[0]
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    return parser


def publish(result: Any, path: Path | None) -> int:
    """Print ``result`` as indented JSON, and write it to ``path`` too when given."""
    text = json.dumps(result, indent=2)
    print(text)
    if path:
        path.write_text(text + "\n")
    return 0
