"""Write the JSON Schema of every Conveyor message to contracts/schema/, for other systems to use.

Run `python tools/export_schema.py` after changing a message model; `--check` only reports drift.
"""

import argparse
import json
import sys
from pathlib import Path

from conveyor.contracts import TYPED_MESSAGES, QueueMessage

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "contracts" / "schema"
ENVELOPE_FILE = "queue_message.json"


def _text(model: type[QueueMessage]) -> str:
    return json.dumps(model.model_json_schema(), indent=2, sort_keys=True) + "\n"


def render() -> dict[str, str]:
    """Every schema file the code produces now: file name -> its exact text."""
    files = {ENVELOPE_FILE: _text(QueueMessage)}
    for model in TYPED_MESSAGES:
        name = f"{model.model_fields['action'].default.value}.json"
        if name in files:
            raise ValueError(f"two messages would both be written to {name}")
        files[name] = _text(model)
    return files


def problems(directory: Path = SCHEMA_DIR) -> list[str]:
    """What in `directory` differs from `render()`: one line per missing, stale or extra file."""
    wanted = render()
    found = {path.name for path in directory.glob("*.json")}
    lines = []
    for name in sorted(wanted.keys() | found):
        path = directory / name
        if name not in found:
            lines.append(f"missing: {path}")
        elif name not in wanted:
            lines.append(f"extra: {path}")
        elif path.read_text(encoding="utf-8") != wanted[name]:
            lines.append(f"stale: {path}")
    return lines


def write(directory: Path = SCHEMA_DIR) -> list[str]:
    """Bring `directory` up to date: write changed files, remove extra ones; say what changed."""
    directory.mkdir(parents=True, exist_ok=True)
    wanted = render()
    changes = []
    for path in sorted(directory.glob("*.json")):
        if path.name not in wanted:
            path.unlink()
            changes.append(f"removed: {path}")
    for name, text in sorted(wanted.items()):
        path = directory / name
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")
            changes.append(f"wrote: {path}")
    return changes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check",
        action="store_true",
        help="write nothing; exit 1 listing every missing, stale or extra schema file",
    )
    args = parser.parse_args(argv)
    if args.check:
        found = problems(SCHEMA_DIR)
        for line in found:
            print(line)
        if found:
            print("schema files are out of date; run: python tools/export_schema.py")
            return 1
        return 0
    for line in write(SCHEMA_DIR):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
