"""Unpack pure-Python wheels into a folder on PYTHONPATH: what ``pip install --target`` does, without pip.

    python3 scripts/unpack_wheels.py SITE_DIR WHEEL...

scripts/gpu_check.sh falls back to it where ``pip install`` of the carried wheels fails (no pip, an
externally managed Python).
"""

import sys
import zipfile

if __name__ == "__main__":
    site, wheels = sys.argv[1], sys.argv[2:]
    if not wheels:
        sys.exit("usage: unpack_wheels.py SITE_DIR WHEEL...")
    for w in wheels:
        with zipfile.ZipFile(w) as z:
            z.extractall(site)
        print(f"unpacked {w} into {site}")
