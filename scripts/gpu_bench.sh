#!/usr/bin/env bash
# The GPU benchmarks (issue 16), prepared here and run once on a GPU machine.
#
#   bash scripts/gpu_bench.sh prepare   # here: wheels into .whl/, the real CT into .devrun/ (both git-ignored)
#   bash scripts/gpu_bench.sh run       # there, from the repository root; tables to stdout and to $OUT (if set)
#
# The GPU machine has python3 with torch, torchvision, CuPy, SciPy and NumPy but none of
# the node's other packages and no network: "prepare" downloads them as wheels for its
# Python (3.12, x86-64) and "run" installs them into /tmp/site. Each step has its own
# time limit, so one slow step cannot take the others' figures with it.
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS=(monai==1.6.1 pydicom==3.0.2 pynetdicom==3.0.4 highdicom==0.28.2 pyjpegls==1.5.1 pydantic==2.14.4
        pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing_extensions==4.16.0
        nibabel==5.4.2 pytorch-ignite==0.5.5 edt==3.1.2
        connected-components-3d==4.1.1)
REAL_CT="../shared/fixtures/real_ct/lung-pet-ct-dx-a0002-8mm-B70f"

prepare() {
    mkdir -p .whl .devrun
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || printf '/.whl/\n/.devrun/\n' >> .git/info/exclude
    for wheel in "${WHEELS[@]}"; do
        python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
            --platform manylinux2014_x86_64 --platform any -d .whl "$wheel"
    done
    if [ -d "$REAL_CT" ]; then
        rm -rf .devrun/real_ct && mkdir -p .devrun/real_ct && cp -r "$REAL_CT" .devrun/real_ct/B70f
    else
        echo "no real CT at $REAL_CT: the real-CT step will be skipped" >&2
    fi
    du -sh .whl .devrun
}

step() {  # name, seconds, command...
    local name=$1 limit=$2
    shift 2
    echo "=== $name ($(date +%T))"
    timeout "$limit" "$@" 2>&1 | grep -v -i "warn" | tee "${OUT:-/tmp}/$name.txt"
    echo "=== $name: exit $? ($(date +%T))"
}

run() {
    export PYTHONUNBUFFERED=1
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/site:$PWD"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    python3 -c "import torch, monai, cupy; print('torch', torch.__version__, 'monai', monai.__version__, \
'cupy', cupy.__version__, 'cuda', torch.cuda.is_available())"
    step jobs-cuda 170 python3 -m bench.jobs --device cuda --rounds 5 --compare-cpu --concurrency 1,2 --studies 8
    step jobs-cpu 75 python3 -m bench.jobs --device cpu --rounds 3
    step real-cuda 45 python3 -m bench.jobs --series .devrun/real_ct/B70f --open-criteria --device cuda \
        --rounds 3 --compare-cpu
    step wholebody-cuda 110 python3 -m bench.jobs --plugin wholeBody_ct_segmentation --device cuda --rounds 2
    step detector-cuda 65 python3 -m bench.jobs --plugin lung_nodule_ct_detection --device cuda --rounds 2
}

case "${1:-}" in
    prepare) prepare ;;
    run) run ;;
    *) echo "usage: bash scripts/gpu_bench.sh prepare|run" >&2; exit 2 ;;
esac
