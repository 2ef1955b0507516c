#!/usr/bin/env bash
# The GPU machine's checks, in one call (see README "Supported versions ..." and ../shared/gpu/README.md).
# Here first:  ../shared/gpu/stage.sh && python3 -m pip wheel --no-deps --no-build-isolation -w .gpu .
# Then a device run with carry [".gpu"] and command:  bash tests/gpu/run_on_device.sh
# Everything it prints also lands in $OUT/ (gpu_checks.txt).
set -uo pipefail
exec > >(tee "${OUT:-/tmp}/gpu_checks.txt") 2>&1
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
python3 -m pip install -q --no-index --no-deps .gpu/flash_attn-*.whl .gpu/panovlm_flashpatch-*.whl || exit 1
cd /tmp  # run from outside the checkout: what is imported is the installed wheel
work=$(mktemp -d)
repo=$OLDPWD

echo "== environment"
nvidia-smi -L
python3 -c "import torch, transformers, flash_attn, wrapt; print('torch', torch.__version__, '| transformers', transformers.__version__, '| flash-attn', flash_attn.__version__, '| wrapt', wrapt.__version__)"

echo "== start-up cost (python -X importtime -c pass, our modules, microseconds: self | cumulative)"
python3 -X importtime -c pass 2>&1 | grep panovlm

echo "== doctor"
python3 -m panovlm_flashpatch

echo "== tiny checkpoints"
python3 - "$work" <<'PY'
import sys
from panovlm_flashpatch import tiny
tiny.build_lm(sys.argv[1] + "/lm"); tiny.build_llava(sys.argv[1] + "/llava", vision="siglip2")
PY
panovlm-flashpatch --model "$work/llava"

cat > "$work/user.py" <<'PY'
# Unmodified user code: no import of panovlm_flashpatch.
import sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], attn_implementation="sdpa", device_map="cuda")
ids = torch.randint(0, 120, (2, 32), device="cuda")
model(input_ids=ids)
print("RESULT backend", model.config._attn_implementation, "dtype", str(model.dtype).replace("torch.", ""))
PY
echo "== zero-code activation: unmodified script"
python3 "$work/user.py" "$work/lm"
echo "== DISABLE_FLASH_ATTN=1"
DISABLE_FLASH_ATTN=1 python3 "$work/user.py" "$work/lm"
echo "== flash-attn installed but its extension broken (a shadow flash_attn_2_cuda raising ImportError)"
mkdir -p "$work/broken" && echo "raise ImportError('flash_attn_2_cuda.so: undefined symbol: _ZN3c1017SymInt (simulated)')" > "$work/broken/flash_attn_2_cuda.py"
PYTHONPATH="$work/broken" python3 "$work/user.py" "$work/lm"

if [ -n "${ONLY_BENCH:-}" ]; then BENCH=$ONLY_BENCH; fi
if [ -z "${ONLY_BENCH:-}" ]; then
echo "== GPU test suite"
cd "$repo" && python3 -m pytest -q -m gpu tests/gpu -p no:cacheprovider -rs
fi
cd "$repo"

# Optional: BENCH=generate,train runs those workloads side by side (plain vs plugin), 2 interleaved repeats.
if [ -n "${BENCH:-}" ]; then
  echo "== benchmark: $BENCH"
  python3 benchmarks/run.py --repeats "${REPEATS:-2}" --workloads "$BENCH" ${MODES:+--modes "$MODES"} --root /tmp/ck \
    --out "${OUT:-/tmp}/bench"
fi
