#!/usr/bin/env bash
# The GPU figures in one run, on a machine with one CUDA GPU and the project installed (about 5-8 minutes on an
# H100, most of it compilation): resnet32x4 -> resnet8x4 kd step images/s eager vs compiled vs compiled with the
# teachers in CUDA graphs, bf16 vs float32, the ASMB synergy path eager vs compiled (phases A and B), the data
# pipeline's share of the step and the projected time of a 240-epoch run, each as ratios measured in one process.
#
#   bash bench/gpu_check.sh              # on the GPU machine; paste the output into BENCHMARKS.md
#   bash bench/gpu_check.sh --dry-run    # any machine: the same commands on the CPU with tiny sizes
#
# Every section has its own time limit (SECTION_LIMIT_S, default 150 s), so one slow compile cannot eat the run.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
LIMIT="${SECTION_LIMIT_S:-150}"
if ((DRY)); then
    DEV=cpu
    STEP=(--rounds 1 --steps 1 --warmup 1 --train-size 400 --batch 8 --threads 1 --hand --no-ablations)
    SYN=(--iters 1 --warmup 1 --batch 4 --threads 1)
    EPOCH=(--images 64 --batch 8 --split-steps 2 --no-reference --threads 1)
    LIMIT="${SECTION_LIMIT_S:-900}"  # compiling on a CPU takes minutes
else
    python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'gpu_check: no CUDA GPU')" || exit 1
    DEV=cuda
    STEP=(--rounds 5 --steps 20 --train-size 20000 --hand --no-ablations)
    SYN=(--iters 100)
    EPOCH=(--images 12800 --split-steps 100 --no-reference)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
python -c "import torch; print('torch', torch.__version__)"

FAILED=0
section() {  # section TITLE COMMAND...: run with the time limit, keep going after a failure
    local title="$1"; shift
    echo
    echo "== $title"
    echo "\$ $*"
    local start=$SECONDS
    timeout "$LIMIT" "$@"
    local rc=$?
    ((rc == 0)) || { echo "!! $title: exit $rc (124 = over ${LIMIT}s)"; FAILED=1; }
    echo "-- $title: $((SECONDS - start)) s"
}

# 1. The kd step: ours = first flags, alt = --alt-flags, ref = the toolboxes' float32 eager loop; ratios ours/alt.
section "kd step: bf16 compiled (ours) vs bf16 eager (alt)" \
    python bench/step.py --device "$DEV" --pairs cifar --methods kd "${STEP[@]}" \
    --flags "--run.amp bf16 --run.compile True" --alt-flags "--run.amp bf16"
section "kd step: compiled + teachers compiled frozen (CUDA graphs on GPU) (ours) vs compiled (alt)" \
    python bench/step.py --device "$DEV" --pairs cifar --methods kd "${STEP[@]}" \
    --flags "--run.amp bf16 --run.compile True --teachers.compile True" --alt-flags "--run.amp bf16 --run.compile True"
section "kd step: bf16 student + bf16 teachers (ours) vs float32 everything (alt)" \
    python bench/step.py --device "$DEV" --pairs cifar --methods kd "${STEP[@]}" \
    --flags "--run.amp bf16 --teachers.precision bf16" --alt-flags "--run.amp off --teachers.precision fp32"
# 2. ASMB's fused synergy path, eager vs torch.compile, phase A and B (target on GPU: compiled >= 1.5x eager).
section "synergy path eager vs compiled (phase A and B)" \
    python bench/synergy.py --device "$DEV" "${SYN[@]}"
# 3. One epoch's time split (data share of the step) and the projected 240-epoch run.
section "epoch split and 240-epoch projection (bf16, compiled)" \
    python bench/epoch.py --device "$DEV" "${EPOCH[@]}" --flags "--run.amp bf16 --run.compile True"

echo
((FAILED)) && { echo "gpu_check: some sections failed (above)"; exit 1; }
echo "gpu_check: done in $SECONDS s"
