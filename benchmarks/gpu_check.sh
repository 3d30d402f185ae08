#!/usr/bin/env bash
# The GPU check of issue 11, under 5 minutes on one GPU; appends its tables, with the device name, to
# benchmarks/results/gpu_check_<date>.md:
#   1. training images/s and MFU, astroformer_0 and astroformer_4 at 256 px, batch 128, bf16, eager and
#      regionally compiled (first-step time = compile time reported)            benchmarks/gpu_train.py
#   2. whole-run efficiency of `astroflow train` on 2,430 generated images at 128 px, astroformer_0,
#      batch 128, 12 workers, validation and checkpoints every epoch           benchmarks/train_stage.py
#   3. predict images/s with JPEGs decoded on the GPU (torchvision nvJPEG)     benchmarks/gpu_predict_decode.py
# Each step has its own time limit; one that fails or times out is recorded as such and the next one runs.
#
# Run from the repository root:   bash benchmarks/gpu_check.sh
#
# A GPU machine without internet. It needs torch, timm, h5py, pyarrow, Pillow, PyYAML and tqdm (present with
# torch/timm), plus what the train stage imports and such a machine may lack: pydantic (with pydantic-core,
# annotated-types, typing-inspection, typing-extensions), webdataset (with braceexpand). Prefect, DVC and
# great-expectations are not needed. On a machine with internet, in the repository root, fetch wheels for the
# GPU machine's Python (3.12 here):
#   bash benchmarks/gpu_check.sh --fetch-wheels          # = pip download --no-deps --only-binary=:all: \
#        --python-version 3.12 --platform manylinux2014_x86_64 -d .whl NAME==VERSION  for each of $WHEELS
# and carry .whl/ with the working tree (it is untracked; name it in the device tool's `carry` if git ignores
# it). On the GPU machine this script installs them without an index:
#   pip install --no-index --no-deps --target /tmp/site .whl/*.whl   and runs with PYTHONPATH=/tmp/site:$PWD
set -uo pipefail

WHEELS="pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
typing-extensions==4.16.0 webdataset==1.0.2 braceexpand==0.1.7"
PY=${PYTHON:-python3}

if [[ "${1:-}" == "--fetch-wheels" ]]; then
    for w in $WHEELS; do
        pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 -d .whl "$w" || exit 1
    done
    exit 0
fi

if ls .whl/*.whl >/dev/null 2>&1; then
    pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
missing=$($PY -c "
import importlib.util as u
print(' '.join(m for m in ('torch', 'timm', 'h5py', 'pyarrow', 'pydantic', 'webdataset', 'yaml', 'tqdm') if u.find_spec(m) is None))")
if [[ -n "$missing" ]]; then
    echo "missing Python packages: $missing (see the wheel notes at the top of $0)" >&2
    exit 2
fi

OUT=benchmarks/results/gpu_check_$(date -u +%Y-%m-%d).md
DEVICE=$($PY -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')")
{
    echo "# GPU check: $DEVICE ($(date -u +%Y-%m-%dT%H:%MZ))"
    echo
    echo "Command: \`bash benchmarks/gpu_check.sh\`; $(nproc) CPU cores; load average $(cut -d' ' -f1-3 /proc/loadavg)."
    echo
} >> "$OUT"
echo "device: $DEVICE; writing $OUT"

step() {  # step SECONDS TITLE COMMAND...: run with a limit, record a failure or timeout instead of stopping
    local limit=$1 title=$2
    shift 2
    local start=$SECONDS
    timeout --signal=INT --kill-after=10 "$limit" "$@"
    local rc=$?
    if [[ $rc -ne 0 ]]; then
        printf '%s: exit %s after %ss (124: over its %ss limit)\n\n' "$title" "$rc" "$((SECONDS - start))" "$limit" >> "$OUT"
    fi
    echo "$title: ${rc} in $((SECONDS - start)) s"
}

step 140 "training from memory" $PY benchmarks/gpu_train.py --models astroformer_0,astroformer_4 --modes eager,blocks \
    --img-size 256 --batch 128 --warmup 5 --steps 15 --out "$OUT"

step 95 "whole-run efficiency" bash -c "
    { echo '## Whole run: astroflow train, 2,430 generated images at 128 px, astroformer_0, batch 128, 10 epochs'; echo; } >> '$OUT'
    $PY benchmarks/train_stage.py --num-images 2430 --epochs 10 --rounds 1 --warmup 5 --steps 20 \
        --set data.synthetic.image_size=128 --set model.name=astroformer_0 --set model.img_size=128 \
        --set train.batch_size=128 --set train.workers=12 --set train.amp=bf16 --set train.channels_last=true \
        --set shard.max_samples_per_shard=128 | tee -a '$OUT'; echo >> '$OUT'"

step 40 "predict with GPU JPEG decoding" $PY benchmarks/gpu_predict_decode.py --model astroformer_0 --img-size 256 \
    --batch 256 --images 4096 --out "$OUT"

echo "done: $OUT"
