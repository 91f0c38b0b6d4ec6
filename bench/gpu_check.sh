#!/usr/bin/env bash
# On a machine with a CUDA GPU: install what is needed, run the quickstart study on CUDA, then the P1 and P4
# benchmarks on the GPU, and print the figures. Meant to finish in under 10 minutes.
#
#   bash bench/gpu_check.sh            # from the repository root; ../shared/data holds the SDSS file
#
# Set TUNER_GPU_PYTHON to an interpreter that already has torch with CUDA (and the project's dependencies) to
# skip the install, e.g. on a machine without a package index.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-check}
mkdir -p "$out"
if [[ -n "${TUNER_GPU_PYTHON:-}" ]]; then
    py=$TUNER_GPU_PYTHON
else
    python3 -m venv .venv-gpu
    py=.venv-gpu/bin/python
    # The default torch wheel on Linux is the CUDA build: here that is what is wanted.
    "$py" -m pip install --quiet --upgrade pip
    "$py" -m pip install --quiet "torch==2.13.0"
    "$py" -m pip install --quiet -e '.[dev]'
fi
"$py" - <<'EOF'
import torch
assert torch.cuda.is_available(), "no CUDA device visible to torch"
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}")
EOF
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "== quickstart on CUDA (study.pack auto: packed on the GPU)"
start=$(date +%s)
"$py" -m tuner.cli run studies/quickstart.yaml --device cuda --quiet --study-name quickstart-gpu \
    --storage "sqlite:///$work/optuna.db" --tracking-uri "sqlite:///$work/mlflow.db" | tee "$out/quickstart.txt"
echo "quickstart wall: $(( $(date +%s) - start )) s" | tee -a "$out/quickstart.txt"
"$py" -m tuner.cli best quickstart-gpu --storage "sqlite:///$work/optuna.db" | tee -a "$out/quickstart.txt"

echo "== P1 (one trial at a time) and P4 (packed): tuner on CUDA against the hand-wired loop on the CPU"
# bench_pack.py keeps the hand-wired baseline on the CPU (bench_loop.py measures CPU only): on a GPU machine the
# figures say how far tuner on the GPU is ahead of the hand-wired loop as it runs on this machine's CPU.
for pack in 1 16; do
    "$py" bench/bench_pack.py --device cuda --dataset simulated --trials 16 --epochs 3 --pack "$pack" \
        --repeats 3 --no-workers | tee "$out/pack-$pack.txt"
done
