"""What ``hidiff batch`` leaves in its output folder, and how a rerun reads it: a finished PNG (one
that reads back whole with its metadata), the temporary names images are written under, and
``manifest.jsonl`` (one line per image finished, appended under a lock by every process)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .metadata import METADATA_KEY

MANIFEST = "manifest.jsonl"


def is_done(path: Path) -> bool:
    """A PNG of that name that reads back whole and carries hidiff metadata (a JSON object)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            if image.format != "PNG" or not isinstance(json.loads(image.info[METADATA_KEY]), dict):
                return False
            image.verify()  # every chunk there, its CRC right
        return True
    except Exception:  # PIL raises many types on a broken file
        return False


def recorded_run(path: Path) -> dict:
    """The manifest fields of a finished PNG, from its metadata."""
    from PIL import Image

    with Image.open(path) as image:
        data = json.loads(image.info[METADATA_KEY])
    stored = data.get("run", {})
    return {
        "settings": data.get("request"),
        "seconds": stored.get("seconds"),
        "preset": stored.get("preset"),
        "device": stored.get("device"),
    }


def append_manifest(path: Path, entry: dict) -> None:
    """One JSON line, appended under a lock (several processes share the file); a line cut short by a
    killed run is ended first, so that the new one stands on its own."""
    data = (json.dumps(entry) + "\n").encode()
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX)
        except ImportError:  # Windows: appends of one write are not interleaved in practice
            pass
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            data = b"\n" + data
        os.write(fd, data)
    finally:
        os.close(fd)  # releases the lock


def read_manifest(path: Path) -> list[dict]:
    """The manifest's entries (a line cut short by a killed run is skipped)."""
    entries = []
    try:
        with open(path, encoding="utf-8") as f:
            for text in f:
                try:
                    entry = json.loads(text)
                except ValueError:
                    continue
                if isinstance(entry, dict):
                    entries.append(entry)
    except FileNotFoundError:
        pass
    return entries


def partial_name(name: str) -> str:
    return f".{name}.partial-{os.getpid()}.png"  # .png: PIL picks the format from the suffix


def remove_partials(out: Path, names: set) -> None:
    """Temporary files that a killed run of these jobs left."""
    for entry in os.listdir(out):
        if entry.startswith(".") and ".partial-" in entry:
            if entry[1:].split(".partial-")[0] in names:
                try:
                    os.remove(out / entry)
                except FileNotFoundError:
                    pass
