"""Install the pinned requirements that are missing from this interpreter, keep the ones present (``==``
pins are not enforced on what is there; a ``>=`` floor is: an older install is upgraded); a line whose
comment starts with "optional" may fail to install (the lint tool, on a machine without an index).

A GPU machine's CUDA torch and triton are already installed (and it has no network): they are kept,
never replaced by the CPU pins. Where pip may not reach an index (``PIP_NO_INDEX=1``, as
``scripts/gpu_check.sh`` sets), a missing package is reported and skipped rather than stopping the set-up.
Usage: python scripts/ensure_deps.py requirements-dev.txt
"""

import importlib.metadata
import importlib.util
import os
import re
import subprocess
import sys

IMPORT_NAMES = {"scikit-learn": "sklearn", "pytest-benchmark": "pytest_benchmark"}


def _no_index():
    return os.environ.get("PIP_NO_INDEX", "").strip().lower() in ("1", "true", "yes", "on")


def _older(name, floor):
    """Whether the installed ``name`` is older than ``floor`` (a ``name>=floor`` line: raised, not kept)."""

    def key(version):
        return tuple(int(part) for part in re.findall(r"\d+", version.split("+")[0])[:3])

    try:
        return key(importlib.metadata.version(name)) < key(floor)
    except importlib.metadata.PackageNotFoundError:
        return True


def main(path):
    missing, optional = [], []
    for line in open(path):
        req, _, comment = line.partition("#")
        req = req.strip()
        if not req:
            continue
        name, _, floor = req.partition(">=")
        name = name.split("==")[0].strip()
        module = IMPORT_NAMES.get(name, name.replace("-", "_"))
        if importlib.util.find_spec(module) is None or (floor and _older(name, floor.strip())):
            (optional if comment.strip().startswith("optional") else missing).append(req)
    if missing:
        print("installing:", " ".join(missing), flush=True)
        if subprocess.call([sys.executable, "-m", "pip", "install", "-q", *missing]) != 0:
            if not _no_index():
                sys.exit(f"could not install {' '.join(missing)} (pip's error above)")
            # a machine without an index (a lent GPU machine): what is there still builds and runs; the
            # parts that need the missing packages fail where they are used, naming them
            print(
                f"could not install {' '.join(missing)}: no package index (PIP_NO_INDEX); going on without", flush=True
            )
    if optional:  # tools the tests do not need (a GPU machine without a package index goes on without them)
        print("installing (optional):", " ".join(optional), flush=True)
        if subprocess.call([sys.executable, "-m", "pip", "install", "-q", *optional]) != 0:
            print("could not install", " ".join(optional), "(optional): going on without", flush=True)
    if not missing and not optional:
        print("dependencies already present", flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "requirements-dev.txt")
