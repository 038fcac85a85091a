"""Install the pinned requirements that are missing from this interpreter, keep the ones present.

A GPU machine's CUDA torch and triton are already installed (and it has no network): they are kept,
never replaced by the CPU pins. Usage: python scripts/ensure_deps.py requirements-dev.txt
"""
import importlib.util
import subprocess
import sys

IMPORT_NAMES = {"scikit-learn": "sklearn", "pytest-benchmark": "pytest_benchmark"}


def main(path):
    missing = []
    for line in open(path):
        req = line.split("#", 1)[0].strip()
        if not req:
            continue
        name = req.split("==")[0].split(">=")[0].strip()
        module = IMPORT_NAMES.get(name, name.replace("-", "_"))
        if importlib.util.find_spec(module) is None:
            missing.append(req)
    if missing:
        print("installing:", " ".join(missing), flush=True)
        subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", *missing])
    else:
        print("dependencies already present", flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "requirements-dev.txt")
