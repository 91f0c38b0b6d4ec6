#!/usr/bin/env bash
# On a machine with a CUDA GPU: install what is needed, check the engines on the GPU (packed equals solo, no
# host sync per step), run the quickstart study on CUDA, then the P4 and P1 benchmarks on the GPU, and print the
# figures. It ends within its time budget (10 minutes by default): each step has its own time limit, cut to what
# is left of the budget; a step with too little left is skipped, a failed or skipped step does not stop the next
# ones. The script exits 1 if any step failed; the steps the budget cut short or left out are listed apart.
#
#   bash bench/gpu_check.sh            # from the repository root; ../shared/data holds the SDSS file
#
# Environment (all optional):
#   TUNER_GPU_PYTHON  an interpreter that already has torch with CUDA: no virtualenv is made.
#   TUNER_GPU_WHEELS  a folder of wheels of the project's other dependencies, for a machine without a package
#                     index: installed with `pip --no-index --no-deps` into a scratch folder put on PYTHONPATH
#                     (the interpreter's own packages serve the rest); bench/gpu_wheels.sh DIR downloads them.
#   TUNER_GPU_SDSS    the SDSS file (default ../shared/data/sdss_dr14_10k.csv.gz).
#   TUNER_GPU_DEVICE  cuda (default) or cuda:N; cpu rehearses the script on a machine without a GPU.
#   TUNER_GPU_BUDGET  seconds the whole script may take, installing included (default 570).
#   TUNER_GPU_STEPS   the steps to run, by name, separated by spaces (default all): environment tests quickstart
#                     p4-sdss p4-simulated p1-sdss p1-simulated gradients p4-profile.
#   OUT               where each step's output is written (default gpu-check/).
set -uo pipefail
cd "$(dirname "$0")/.."
root=$PWD
out=${OUT:-gpu-check}
mkdir -p "$out"
device=${TUNER_GPU_DEVICE:-cuda}
sdss=${TUNER_GPU_SDSS:-../shared/data/sdss_dr14_10k.csv.gz}
budget=${TUNER_GPU_BUDGET:-570}
all_steps="environment tests quickstart p4-sdss p4-simulated p1-sdss p1-simulated gradients p4-profile"
wanted=${TUNER_GPU_STEPS:-$all_steps}
for name in $wanted; do
    [[ " $all_steps " == *" $name "* ]] || { echo "TUNER_GPU_STEPS: no step named '$name'; the steps: $all_steps"; exit 2; }
done
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

if [[ -n "${TUNER_GPU_WHEELS:-}" ]]; then
    py=${TUNER_GPU_PYTHON:-python3}
    "$py" -m pip install --quiet --no-index --no-deps --no-compile --target "$work/site" "$TUNER_GPU_WHEELS"/*.whl \
        || { echo "installing the wheels of $TUNER_GPU_WHEELS failed"; exit 2; }
    export PYTHONPATH="$root:$work/site"
elif [[ -n "${TUNER_GPU_PYTHON:-}" ]]; then
    py=$TUNER_GPU_PYTHON
    export PYTHONPATH="$root"
else
    python3 -m venv .venv-gpu
    py=.venv-gpu/bin/python
    # The default torch wheel on Linux is the CUDA build: here that is what is wanted.
    "$py" -m pip install --quiet --upgrade pip
    "$py" -m pip install --quiet "torch==2.13.0"
    "$py" -m pip install --quiet -e '.[dev]'
fi
export PYTHONUNBUFFERED=1

failed=()
short=()
# step NAME SECONDS COMMAND...: run it, if wanted, with a time limit (no more than what is left of the budget),
# its output shown and kept in $out/NAME.txt.
step() {
    local name=$1 limit=$2
    shift 2
    [[ " $wanted " == *" $name "* ]] || return 0
    local left=$((budget - SECONDS))
    echo
    if ((left < 20)); then
        echo "== $name: skipped, ${left} s of the ${budget} s budget left" | tee "$out/$name.txt"
        short+=("$name (skipped)")
        return 0
    fi
    local cut=0
    ((limit <= left)) || { limit=$left; cut=1; }
    echo "== $name (limit ${limit} s)"
    local started=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee "$out/$name.txt"
    local code=${PIPESTATUS[0]}
    echo "-- $name: exit $code after $((SECONDS - started)) s" | tee -a "$out/$name.txt"
    if ((code == 124 && cut)); then
        short+=("$name (stopped at the budget's end)")
    elif ((code != 0)); then
        failed+=("$name (exit $code)")
    fi
}

step environment 60 "$py" - "$device" <<'EOF'
import sys

import mlflow
import optuna
import torch

device = torch.device(sys.argv[1])
if device.type == "cuda":
    assert torch.cuda.is_available(), "no CUDA device visible to torch"
    name = f"{torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}"
else:
    name = "CPU rehearsal"
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, optuna {optuna.__version__}, "
      f"mlflow {mlflow.__version__}; {name}")
EOF

# The pack engine's tests on the GPU (packed equals solo to 1e-5, one NaN trial fails alone) and the host-sync check.
step tests 120 env TUNER_TEST_DEVICE="$device" "$py" -m pytest -q -p no:cacheprovider tests/test_cuda.py \
    tests/test_packed.py

step quickstart 150 bash -c '
    "$1" -m tuner.cli run studies/quickstart.yaml --device "$2" --quiet --study-name quickstart-gpu \
        --storage "sqlite:///$3/optuna.db" --tracking-uri "sqlite:///$3/mlflow.db" &&
    "$1" -m tuner.cli best quickstart-gpu --storage "sqlite:///$3/optuna.db"' _ "$py" "$device" "$work"

# P4: 16 trials as one pack on the GPU against the hand-wired loop on the GPU (on an H200 the baseline took 19-24 s
# a repetition on SDSS, 36 s on the simulated catalogue).
step p4-sdss 150 "$py" bench/bench_pack.py --device "$device" --baseline-device "$device" --dataset sdss \
    --sdss "$sdss" --trials 16 --epochs 5 --pack 16 --repeats 3 --no-workers --baseline-threads 1
step p4-simulated 200 "$py" bench/bench_pack.py --device "$device" --baseline-device "$device" \
    --dataset simulated --batch-size 256 --trials 16 --epochs 2 --pack 16 --repeats 3 --no-workers \
    --baseline-threads 1

# P1: one trial at a time on the GPU against the bare loop on the GPU and the hand-wired loop (its DataLoader's
# batches moved to the GPU, as the examples do); one torch thread each.
step p1-sdss 120 "$py" bench/bench_loop.py --device "$device" --datasets sdss --sdss "$sdss" --epochs 3 \
    --repeats 3 --baseline-threads 1
step p1-simulated 150 "$py" bench/bench_loop.py --device "$device" --datasets simulated --epochs 2 --repeats 3 \
    --batch-sizes 64 256 512 --baseline-threads 1

# A pack's gradients by hand against autograd's, per step, on the GPU (on the CPU 1.2-1.7x faster by hand).
step gradients 60 "$py" bench/bench_gradients.py --device "$device" --repeats 3

# Where the packed study's time goes on the GPU: the 25 costliest calls. (On an H200 under Python 3.12 cProfile gave
# torch.save 20 s of own time in a 3 s run, while a direct timing gave under 1 ms a save: read it with care.)
step p4-profile 90 "$py" bench/bench_pack.py --device "$device" --dataset sdss --sdss "$sdss" --trials 16 \
    --epochs 5 --pack 16 --profile 25

echo
if [[ ${#short[@]} -gt 0 ]]; then
    echo "gpu_check: not run in full within the ${budget} s budget (TUNER_GPU_BUDGET): ${short[*]}"
fi
if [[ ${#failed[@]} -eq 0 ]]; then
    echo "gpu_check: no step failed; outputs in $out/"
else
    echo "gpu_check: failed steps: ${failed[*]}; outputs in $out/"
    exit 1
fi
