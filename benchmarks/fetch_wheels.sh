#!/usr/bin/env bash
# Download the wheels that the GPU machine lacks (it has no network) into a git-ignored folder,
# for `gpu_suite.sh --wheels DIR` there: anndata and scvi-tools 1.4.2 with what they import
# beyond the packages of the GPU image (torch, lightning, torchmetrics, pandas, numba, h5py,
# scikit-learn, xarray, rich, tqdm, tensorboard... are there). Python 3.12, manylinux x86_64,
# about 15 MB; docrep is a source distribution only, so its wheel is built here.
#
#   bash benchmarks/fetch_wheels.sh [DIR]        # default DIR: wheels (in the repository root)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
DIR="${1:-wheels}"
PY="${PYTHON:-python3}"
mkdir -p "$DIR"
PKGS=(
  anndata==0.12.19 array-api-compat==1.16.0 donfig==0.8.1.post1 google-crc32c==1.9.0
  legacy-api-wrap==1.5 ml-collections==1.1.0 mudata==0.3.10 natsort==8.4.0 numcodecs==0.16.6
  pyro-api==0.1.2 pyro-ppl==1.9.2 scanpy==1.11.5 scverse-misc==0.0.3 scvi-tools==1.4.2
  session-info2==0.4.1 sparse==0.19.3 zarr==3.1.6 pynndescent==0.7.0 umap-learn==0.5.12
  pytz tzdata
)
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --abi cp312 --platform manylinux_2_28_x86_64 \
  --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any \
  -d "$DIR" "${PKGS[@]}"
# pure Python, so a wheel built with this machine's Python installs on 3.12
"$PY" -m pip wheel -q --no-deps --no-binary docrep -w "$DIR" docrep==0.3.2
ls "$DIR"
du -sh "$DIR"
