#!/usr/bin/env bash
# The GPU figures in docs/BENCHMARKS.md and docs/VERIFY.md: run on a GPU machine from the repo root,
# after `python scripts/gpu_check.py prepare .gpu` here (a CPU) and copying .gpu there. Results go to $OUT.
# Wheels in .whl/ (optional) are installed first, for machines without a package index.
set -o pipefail
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
  python3 -c "import datasets; datasets.Dataset.from_list([{'a': [1]}]).map(lambda r: r)" >/dev/null 2>&1 ||
    python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/alt/*.whl
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
python3 -c "import torch, transformers, peft, datasets, accelerate, blake3; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'datasets', datasets.__version__, torch.cuda.get_device_name())" || exit 1
nvidia-smi --query-gpu=name,clocks.sm,memory.used --format=csv,noheader
python3 scripts/gpu_check.py gpu .gpu --out "$OUT" 2>&1 | grep -v -i warn | tee "$OUT/gpu_check.log" | grep -E "^(exact|CPU|GPU)|Error|rror:"
{
  python3 scripts/bench_hash.py
  timeout 150 python3 scripts/bench_record.py --kinds tiny-lora --hidden 2048 --layers 16 --batch 16 --grad-accum 2 \
    --precision bf16 --steps 20 --rounds 2 --json "$OUT/record_lora.json"
  timeout 150 python3 scripts/bench_record.py --kinds tiny-lora --hidden 2048 --layers 16 --batch 33 --grad-accum 3 \
    --precision bf16 --steps 20 --rounds 2 --json "$OUT/record_lora_b33.json"
  timeout 100 python3 scripts/bench_record.py --kinds tiny-full --hidden 1024 --layers 8 --batch 16 --grad-accum 2 \
    --precision bf16 --steps 20 --rounds 2 --json "$OUT/record_full.json"
  timeout 60 python3 scripts/bench_inference.py --device cuda --batch 4 --json "$OUT/inference.json"
} 2>&1 | grep -v -i -E "warn|Loading weights|Map:|it/s\]" | tee "$OUT/bench.log" | grep -E "GB/s|^tiny|^model|x faster|ratio|rror"
