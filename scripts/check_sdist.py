"""Check that a source distribution holds every file of the repository (as git tracks it).

    python scripts/check_sdist.py dist/pixcontrast-X.Y.Z.tar.gz

The tests need more than the package: the root conftest.py, tests/_helpers.py, the examples and
benchmarks they run, the README and .ci/run they read. Shipping every tracked file (but the ones
named in NOT_SHIPPED) keeps `python -m pytest` working from an unpacked sdist. Run from a clone.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
from pathlib import Path

NOT_SHIPPED = {".gitignore"}  # git's own configuration


def main(sdist: str) -> int:
    root = Path(__file__).resolve().parent.parent
    tracked = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True,
                             check=True).stdout.splitlines()
    with tarfile.open(sdist) as archive:
        # members are "<name>-<version>/<path>"
        shipped = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    missing = sorted(set(tracked) - NOT_SHIPPED - shipped)
    if missing:
        print(f"{sdist} lacks {len(missing)} tracked files (add them to MANIFEST.in):",
              *missing, sep="\n  ")
        return 1
    print(f"{sdist}: every tracked file is in it ({len(shipped)} members)")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1]))
