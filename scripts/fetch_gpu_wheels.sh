#!/usr/bin/env bash
# Download, on a machine WITH registry access, the pure-Python wheels that scripts/gpu_check.sh installs
# on a lent GPU machine (which has torch, triton, cupy, jax, numba, pytest and hypothesis but no registry):
#   array-api-compat and array-api-strict (the versions installed here) and adamp==0.3.0 (the oracle).
# They go to .whl/ (git-ignored; carry it with the tree). adamp 0.3.0 is published as an sdist only, so
# when no wheel can be downloaded one is built here with `pip wheel --no-deps` (it is pure Python).
#
#   bash scripts/fetch_gpu_wheels.sh            # from the repository root
#   ARRAY_API_COMPAT_VERSION=1.16.0 ARRAY_API_STRICT_VERSION=2.6.1 bash scripts/fetch_gpu_wheels.sh
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
DEST=.whl

installed() {  # the version of an installed distribution, or nothing
    "$PYTHON" -c 'import importlib.metadata as m, sys
try:
    print(m.version(sys.argv[1]))
except m.PackageNotFoundError:
    pass' "$1"
}

COMPAT=${ARRAY_API_COMPAT_VERSION:-$(installed array-api-compat)}
STRICT=${ARRAY_API_STRICT_VERSION:-$(installed array-api-strict)}
ADAMP=0.3.0
if [[ -z "$COMPAT" || -z "$STRICT" ]]; then
    echo "fetch_gpu_wheels: array-api-compat or array-api-strict is not installed here;" \
         "set ARRAY_API_COMPAT_VERSION and ARRAY_API_STRICT_VERSION" >&2
    exit 2
fi

# The GPU machine runs CPython 3.12 on x86-64 Linux; these packages are pure Python ("any").
TARGET=(--only-binary=:all: --python-version 3.12 --implementation cp
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any)

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

echo "+ pip download array-api-compat==$COMPAT array-api-strict==$STRICT"
"$PYTHON" -m pip download --no-deps "${TARGET[@]}" -d "$tmp" \
    "array-api-compat==$COMPAT" "array-api-strict==$STRICT"

echo "+ pip download adamp==$ADAMP (a wheel, if one is published)"
if ! "$PYTHON" -m pip download --no-deps "${TARGET[@]}" -d "$tmp" "adamp==$ADAMP"; then
    echo "+ no adamp==$ADAMP wheel: building one from the sdist (pip wheel --no-deps)"
    "$PYTHON" -m pip wheel --no-deps --no-binary=:all: -w "$tmp" "adamp==$ADAMP"
fi

# Every wheel must be pure Python, or it will not install on the GPU machine's Python 3.12.
shopt -s nullglob
for w in "$tmp"/*.whl; do
    case "$(basename "$w")" in
        *-none-any.whl) ;;
        *) echo "fetch_gpu_wheels: $(basename "$w") is not a pure-Python wheel" >&2; exit 1 ;;
    esac
done
n=$(ls "$tmp"/*.whl | wc -l)
if [[ "$n" -ne 3 ]]; then
    echo "fetch_gpu_wheels: expected 3 wheels, got $n: $(ls "$tmp")" >&2
    exit 1
fi

# Replace any other version of these three in .whl/, leave everything else there alone.
mkdir -p "$DEST"
rm -f "$DEST"/array_api_compat-*.whl "$DEST"/array_api_strict-*.whl "$DEST"/adamp-*.whl
mv "$tmp"/*.whl "$DEST"/
echo "fetch_gpu_wheels: $DEST/ now holds:"
(cd "$DEST" && sha256sum array_api_compat-*.whl array_api_strict-*.whl adamp-*.whl)
