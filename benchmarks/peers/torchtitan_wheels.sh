#!/usr/bin/env bash
# The wheels torchtitan needs on the GPU image (Python 3.12, x86_64, no internet) beyond the project's own
# wheelhouse: 0.2.2 (TITAN=0.2.2, the default: row 11 of benchmarks/peers/compare.py, runs on torch 2.11) or 0.3.0
# (TITAN=0.3.0: row 12, needs a torch newer than 2.11). Run here, from the repo root, where pip reaches PyPI:
#   bash benchmarks/peers/torchtitan_wheels.sh [DIR]            # DIR defaults to .whl_tt (git-ignored), ~3.5 MB
#   bash benchmarks/peers/torchtitan_wheels.sh DIR --pyarrow    # also pyarrow (55 MB: a call of its own, below)
# then carry DIR to the GPU machine and install it beside the other wheels:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target .site .whl/*.whl DIR/*.whl
#
# torchtitan's trainer imports, for a run with our config (random tokens, no checkpoints, no tensorboard/wandb
# logging): torchdata, tyro (+ docstring_parser, typeguard), for 0.3.0 spmd_types and torch_checkpointing,
# torch.utils.tensorboard (tensorboard,
# protobuf, absl-py) and, through its validator, HF datasets (+ pyarrow, pandas, dill, multiprocess, xxhash).
# The image already has tensorboard, protobuf, absl-py, pyarrow, pandas, xxhash, fsspec, huggingface-hub and
# tokenizers, so only the rest travels. Should the image's pyarrow be older than datasets needs (>= 21), the
# --pyarrow wheel goes in a call of its own on the same warm machine (ignored folders persist between calls):
# carry DIR_PYARROW alone and install it into .site, then carry the rest in the next call.
set -euo pipefail
DIR=${1:-.whl_tt}
mkdir -p "$DIR"
EXCLUDE=$(git rev-parse --git-path info/exclude 2>/dev/null || true)
if [ -n "$EXCLUDE" ] && ! grep -qx "/$DIR/" "$EXCLUDE" 2>/dev/null; then mkdir -p "$(dirname "$EXCLUDE")"; echo "/$DIR/" >> "$EXCLUDE"; fi
TITAN=${TITAN:-0.2.2}
PKGS=(torchtitan==$TITAN torchdata==0.11.0 tyro==1.0.17 docstring_parser==0.18.0 typeguard==4.6.1
      "datasets==4.7.0" dill==0.4.0 multiprocess==0.70.18 pytz tzdata)
[ "$TITAN" = 0.3.0 ] && PKGS+=(torch_checkpointing==0.1.1 spmd_types==0.2.3)
[ "${2:-}" = "--pyarrow" ] && PKGS+=(pyarrow==26.0.1)
PLAT=(--platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform any)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLAT[@]}" \
    -d "$DIR" "${PKGS[@]}"
du -sh "$DIR"; ls "$DIR"
