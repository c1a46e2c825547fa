"""Writing a job's or benchmark's figures as JSON: one place for the folder creation and the message."""

from __future__ import annotations

import json
import os


def write_json(path: str, payload: dict) -> None:
    """Write `payload` to `path` (creating its folder), indented, and say where."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    from jobs import refuse_to_run

    refuse_to_run("jobs.results", "the entry points' JSON result writer")
