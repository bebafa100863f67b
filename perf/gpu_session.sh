#!/usr/bin/env bash
# The standard measurements of one GPU session, in order of value, each under its own time
# limit, every output kept under $OUT (or perf/results/session when OUT is unset).
#
#   LIVELM_COMMIT=<sha> bash perf/gpu_session.sh [quick|full]
#
# quick (about 9 minutes): kernel resources, the TMA probe and the TMA kernel's GPU tests, the
# step profile with 16-token blocks against 64-token blocks with TMA loads, the stream bench
# with the TMA candidates, the step profile by kernel without PDL, the 64-session trace, the
# stream bench without baselines. full adds the baselines and the agent bench.
set -u
MODE=${1:-quick}
OUT=${OUT:-perf/results/session}
mkdir -p "$OUT"
source perf/gpu_setup.sh
export PYTHONUNBUFFERED=1

step() {  # step NAME SECONDS COMMAND...: runs it, keeps its output, prints the tail
    local name=$1 limit=$2
    shift 2
    echo "== $name"
    timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
    echo "rc=$?"
    grep -v "compiling kernel variants\|capturing CUDA graphs" "$OUT/$name.txt" | tail -30
}

nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw --format=csv > "$OUT/gpu.txt"
step kernel_resources 60 python3 perf/kernel_resources.py --out "$OUT/kernel_resources.json"
step tma_probe 120 python3 perf/tma_probe.py --out "$OUT/tma_probe.json"
step tma_tests 150 python3 -m pytest -q tests/test_triton_kernels.py -k "tma or gpu_question"
step step_16 150 python3 perf/step_profile.py --contexts 3000,19000 --out "$OUT/step_16.json"
step step_tma64 150 python3 perf/step_profile.py --contexts 3000,19000 --block-size 64 \
    --kernel-policy perf/tma_policy.yaml --out "$OUT/step_tma64.json"
if [ "$MODE" = quick ]; then  # the TMA candidates end to end, while the A/B is fresh
    step stream_bench_tma64 200 python3 perf/stream_bench.py --skip-hf --skip-stateless \
        --repeats 8 --push-samples 50 --block-size 64 --kernel-policy perf/tma_policy.yaml \
        --out "$OUT/tma64"
fi
step step_profile 150 python3 perf/step_profile.py --no-pdl --kernels --contexts 19000 \
    --out "$OUT/step_profile.json"
step sessions_trace 150 python3 perf/sessions_trace.py --rounds 1 --out "$OUT/sessions_trace.json"
if [ "$MODE" = full ]; then
    step stream_bench 300 python3 perf/stream_bench.py --repeats 8 --push-samples 50 --out "$OUT"
    step agent_bench 240 python3 perf/agent_bench.py --kernel-policy perf/bench_policy.yaml \
        --runs reuse,no_reuse --out "$OUT"
else
    step stream_bench 150 python3 perf/stream_bench.py --skip-hf --skip-stateless --repeats 8 \
        --push-samples 50 --out "$OUT"
fi
echo done
