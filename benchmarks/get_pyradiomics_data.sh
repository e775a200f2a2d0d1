#!/usr/bin/env bash
# Fetch the real sample CTs (with lesion masks) shipped in pyradiomics 3.0.1's source archive, from PyPI.
# Used by tests/test_real_ct.py and benchmarks/phantom_calibration.py. Target: $LNM_PYRADIOMICS_DATA or
# /tmp/pyradiomics_data. Needs numpy and versioneer for pip to read the sdist's metadata.
set -euo pipefail
target="${LNM_PYRADIOMICS_DATA:-/tmp/pyradiomics_data}"
if [ -f "$target/lung1_image.nrrd" ] && [ -f "$target/lung2_image.nrrd" ]; then
  echo "pyradiomics sample data already in $target"; exit 0
fi
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
python -m pip install --quiet versioneer numpy
python -m pip download --quiet --no-deps --no-build-isolation --no-binary :all: pyradiomics==3.0.1 -d "$tmp"
mkdir -p "$target"
tar -xzf "$tmp"/pyradiomics-3.0.1.tar.gz -C "$tmp"
cp "$tmp"/pyradiomics-3.0.1/data/*.nrrd "$target"/
echo "pyradiomics sample data in $target"
