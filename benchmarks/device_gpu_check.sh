#!/usr/bin/env bash
# `make gpu-check` on a lent GPU machine that has no internet and whose python3 holds a CUDA torch
# but not TRL or datasets (the `device` tool's nvidia-h200 image: torch 2.11, transformers 5.17).
#
#   here:   bash benchmarks/device_gpu_check.sh fetch   # pure-Python wheels into .whl/ (~15 MB)
#   there:  bash benchmarks/device_gpu_check.sh run     # device run, carry [".whl"], ~7-8 min
#
# Arguments after `run` go to gpu_check.py (`run --layers 2 --quick --device cpu`: a dry run).
# `run` installs the wheels into /tmp/site, prints the versions it will use, and runs
# benchmarks/gpu_check.py with its table and JSON under $OUT (or benchmarks/). The wheels are the
# versions the CPU tests ran with here; pyarrow (55 MB, over the carry limit with the rest) is
# the image's own: datasets 5.2 wants pyarrow >= 24, printed below so a mismatch is visible;
# transformers 5.24 wants tokenizers >= 0.23.1 and huggingface_hub >= 1.31 (the image had
# 0.23.2 and 1.33 in 2026-11). Wheels are for Python 3.12, the image's.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=(trl==1.16.0 datasets==5.2.0 transformers==5.24.0 dill==0.4.1 multiprocess==0.70.19)
case "${1:-}" in
  fetch)
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 -d .whl "${WHEELS[@]}"
    ls -la .whl ;;
  run)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1 \
      TQDM_DISABLE=1  # progress bars off: the log is the stages' lines and the table
    python3 -c "import torch, transformers, trl, datasets, pyarrow; print('torch', \
torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU', \
'| transformers', transformers.__version__, \
'| trl', trl.__version__, '| datasets', datasets.__version__, '| pyarrow', pyarrow.__version__)"
    out="${OUT:-benchmarks}"
    python3 benchmarks/gpu_check.py --out "$out/gpu_check.json" "${@:2}" 2>&1 \
      | tee "$out/gpu_check.log" ;;
  *)
    echo "usage: $0 fetch|run" >&2; exit 2 ;;
esac
