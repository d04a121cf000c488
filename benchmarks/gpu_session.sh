#!/usr/bin/env bash
# One call of the device tool (a lent GPU machine without network), about 9 minutes of work, in order of
# value, each part under its own time limit so that a slow part cannot starve the others:
#   1. the paper's setting end to end on CUDA: a Llama-shaped 1.1B model with a SentencePiece-style
#      tokenizer and zephyr's template, bf16 mixed precision, shared prompts (sdpa), HF generation
#      (benchmarks/gpu_check.py): per-stage times, train MFU, then the probes: a plain train step's MFU
#      and the HF backend's sampled tokens/s with a profile of its decoding loop (all in llama1b-amp.json);
#   2. the train step under torch.compile (the probes alone);
#   3. the tests that touch CUDA-specific code (the sampler's bits, shared prompts, log-prob paths).
# Rehearse first on a CPU: python benchmarks/gpu_check.py --dry-run --backend hf --precision amp --shared-prompt
# Packages the machine lacks travel as wheels in .whl/ (see the device tool's README):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 -d .whl datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 gguf==0.19.0
# and the call names .whl in carry:  bash benchmarks/gpu_session.sh   (results under $OUT)
# Smaller: TRAIN_SIZE=256 EVAL_SIZE=64 PYTEST_ARGS='tests/test_row_sampler.py' AMP_S=200 COMPILE_S=120 PYTEST_S=60
set -u
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 -c "import torch, transformers, accelerate, peft, datasets; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| transformers', transformers.__version__, '| accelerate', accelerate.__version__, '| peft', peft.__version__, '| datasets', datasets.__version__)"
} 2>&1 | tee "$OUT/versions.txt"

check() {  # check NAME SECONDS ARGS...: one gpu_check run, its log and JSON under $OUT
    local name=$1 limit=$2; shift 2
    echo "=== gpu_check $name ($*) $(date +%T)"
    HF_HUB_OFFLINE=1 timeout "$limit" python3 benchmarks/gpu_check.py --output-dir /tmp/gpu_runs --name "$name" \
        --train-size "${TRAIN_SIZE:-512}" --eval-size "${EVAL_SIZE:-128}" --json "$OUT/$name.json" "$@" \
        > "$OUT/$name.log" 2>&1
    echo "rc $? $(date +%T)"; grep -v "it/s\]" "$OUT/$name.log" | tail -40
}

check llama1b-amp "${AMP_S:-270}" --backend hf --random-llama 1b --precision amp --shared-prompt

check llama1b-compile "${COMPILE_S:-150}" --backend hf --random-llama 1b --precision amp --shared-prompt \
    --probes-only --compile

echo "=== pytest with CUDA visible $(date +%T)"
plugins=""  # xdist and pytest-timeout where the machine has them
python3 -c "import xdist" 2>/dev/null && plugins="-n 8"
python3 -c "import pytest_timeout" 2>/dev/null && plugins="$plugins --timeout 100"
timeout "${PYTEST_S:-120}" python3 -m pytest -q -p no:cacheprovider $plugins \
    --junitxml "$OUT/junit.xml" ${PYTEST_ARGS:-tests/test_row_sampler.py tests/test_shared_prompt.py \
    tests/test_token_logps.py tests/test_generate.py tests/test_speed.py} > "$OUT/pytest.log" 2>&1
echo "rc $? $(date +%T)"; tail -25 "$OUT/pytest.log"
