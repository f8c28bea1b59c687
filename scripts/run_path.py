"""The path of one run through the code: which project files it enters, and how often it changes module.

    OMP_NUM_THREADS=1 TELEPATHY_OUTPUTS=/tmp/run_path python -m scripts.run_path budget=tiny [--path]

Runs ``python train.py <overrides>`` in this process under ``sys.setprofile`` and follows the
innermost frame of a project function (train.py, telepathy/; module and class bodies, i.e.
imports, left out) from Hydra's call of train.py's ``main`` to its end, in the main thread:

    files      distinct project files whose functions ran
    changes    how often the file changes along the first call of each function (the shape of
               the path, whatever the number of steps and batches); ``every call`` counts every
               call and return (it grows with steps and batches)

``--path`` also prints the first-call sequence. docs/ARCHITECTURE.md quotes the numbers.
"""

from __future__ import annotations

import runpy
import sys
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROJECT = (str(REPO / "train.py"), str(REPO / "telepathy") + "/")
OPTIMIZED = 0x1  # CO_OPTIMIZED: a function's code; module and class bodies lack it


def trace(overrides: list[str]) -> list[tuple[str, str, str]]:
    """(event, file relative to the repo, function) of every call and return of a project function."""
    events, main_thread = [], threading.get_ident()

    def record(frame, event, arg):
        name = frame.f_code.co_filename
        if event in ("call", "return") and name.startswith(PROJECT) and frame.f_code.co_flags & OPTIMIZED:
            if threading.get_ident() == main_thread:
                events.append((event, str(Path(name).relative_to(REPO)), frame.f_code.co_name))

    sys.argv = ["train.py", *overrides]
    sys.setprofile(record)
    try:
        runpy.run_path(str(REPO / "train.py"), run_name="__main__")
    except SystemExit:
        pass
    finally:
        sys.setprofile(None)
    start = next(i for i, (ev, file, fn) in enumerate(events) if (ev, file, fn) == ("call", "train.py", "main"))
    return events[start:]


def first_calls(events: list[tuple[str, str, str]]) -> list[str]:
    """The file of each function's first call, consecutive repeats folded."""
    seen, path = set(), []
    for event, file, function in events:
        if event == "call" and (file, function) not in seen:
            seen.add((file, function))
            if not path or path[-1] != file:
                path.append(file)
    return path


def every_change(events: list[tuple[str, str, str]]) -> int:
    """How often the innermost project file changes over every call and return."""
    stack, changes, current = [], 0, None
    for event, file, _ in events:
        if event == "call":
            stack.append(file)
        elif stack:
            stack.pop()
        if stack and stack[-1] != current:
            changes += current is not None
            current = stack[-1]
    return changes


def main(argv: list[str]) -> None:
    show = "--path" in argv
    events = trace([a for a in argv if a != "--path"])
    path = first_calls(events)
    files = list(dict.fromkeys(path))
    print(f"{len(files)} files, {len(path) - 1} changes of module (first calls), {every_change(events)} (every call)")
    print("files, in order of first entry:", ", ".join(files))
    if show:
        print(" → ".join(path))


if __name__ == "__main__":
    main(sys.argv[1:])
