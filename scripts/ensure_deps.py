"""Install the pinned requirements that are missing from this interpreter, keep the ones present; a line
whose comment starts with "optional" may fail to install (the lint tool, on a machine without an index).

A GPU machine's CUDA torch and triton are already installed (and it has no network): they are kept,
never replaced by the CPU pins. Usage: python scripts/ensure_deps.py requirements-dev.txt
"""

import importlib.util
import subprocess
import sys

IMPORT_NAMES = {"scikit-learn": "sklearn", "pytest-benchmark": "pytest_benchmark"}


def main(path):
    missing, optional = [], []
    for line in open(path):
        req, _, comment = line.partition("#")
        req = req.strip()
        if not req:
            continue
        name = req.split("==")[0].split(">=")[0].strip()
        module = IMPORT_NAMES.get(name, name.replace("-", "_"))
        if importlib.util.find_spec(module) is None:
            (optional if comment.strip().startswith("optional") else missing).append(req)
    if missing:
        print("installing:", " ".join(missing), flush=True)
        subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", *missing])
    if optional:  # tools the tests do not need (a GPU machine without a package index goes on without them)
        print("installing (optional):", " ".join(optional), flush=True)
        if subprocess.call([sys.executable, "-m", "pip", "install", "-q", *optional]) != 0:
            print("could not install", " ".join(optional), "(optional): going on without", flush=True)
    if not missing and not optional:
        print("dependencies already present", flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "requirements-dev.txt")
