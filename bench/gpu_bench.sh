#!/usr/bin/env bash
# The bench on a GPU machine, in one command that stops itself in time and keeps what it finished.
#
#   bench/gpu_bench.sh OUT DEADLINE_SECONDS [immunizer bench options...]
#   e.g. bench/gpu_bench.sh runs/gpu 420 --preset quick --methods immunizer-inner,sft,none
#   or, to add method-seeds to the committed CPU matrix (same configuration; each seed records its machine):
#        bench/gpu_bench.sh bench/results/bench_quick 540 --preset quick --methods booster,vaccine,repnoise
#
# Prints the machine (nvidia-smi, torch, transformers), runs `immunizer bench --out OUT ...` until
# DEADLINE_SECONDS have passed (the bench writes report.json after every method and seed and resumes from OUT
# when run again), then packs what it finished into OUT.tar.gz: report.json/html, samples.jsonl, every
# method's metrics.jsonl (wall time, device, peak memory) and every run/evaluation record, without weights.
# Needs `immunizer` importable (an installed venv, or PYTHONPATH=src) and the embedded model installed.
set -uo pipefail
out=${1:?usage: bench/gpu_bench.sh OUT DEADLINE_SECONDS [bench options]}
deadline=${2:?usage: bench/gpu_bench.sh OUT DEADLINE_SECONDS [bench options]}
shift 2
python=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
"$python" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
'| transformers', transformers.__version__)"
started=$(date +%s)
# SIGINT first (the bench's writes are atomic; a killed method resumes from its checkpoint next time)
timeout --signal=INT --kill-after=20 "$deadline" "$python" -m immunizer bench --out "$out" "$@"
rc=$?
echo "bench exit $rc after $(( $(date +%s) - started )) s"
(cd "$(dirname "$out")" && find "$(basename "$out")" \( -name '*.json' -o -name '*.jsonl' -o -name '*.jsonl.gz' -o -name '*.html' \) \
    -not -path '*/model/*' -not -path '*/adapter/*' -not -path '*/checkpoint/*' -print0 \
    | tar --null -czf "$(basename "$out").tar.gz" -T -)
ls -la "$out.tar.gz"
exit $rc
