#!/usr/bin/env bash
# The standard measurements of one GPU session, in order of value, each under its own time
# limit. Outputs are written under a scratch folder and packed into $OUT/session.tgz after
# every step (the device tool returns only a few files per call, so one archive carries all).
#
#   LIVELM_COMMIT=<sha> bash perf/gpu_session.sh [MODE]   (quick when none; the modes below)
#
# quick (about 6 minutes): the GPU tests of the attention kernels and the decode read-back,
# the step profile (with decode batch sizes, and by kernel without PDL), the host's share of
# a question (host_trace.py), the stream bench without baselines. full: the stream bench with
# its baselines and the agent bench instead of the last one. probe: the engine's 64-session
# decode graph over its own KV and over random KV, against step_profile's 64 sequences by
# kernel in the same call, and over its KV copied into ascending blocks; the attention
# kernel's deferred rescaling on and off for 64 questions; the stream bench without baselines.
# validate: the attention kernel tests on the GPU, the record-sized tile sweep, the step
# profile, the stream bench with its baselines and the agent bench with reuse. host:
# the GPU tests of the engine, the read-back steps and the block copy, the stream bench
# without baselines, and host_trace.py at three contexts. bench: the stream bench with its
# baselines and the agent bench. pipeline: the attention kernel tests on the GPU and
# pipeline_sweep.py (carried pages over tiles and stages). carry: the kernels before and as
# bound, the step profile, the stream bench with its baselines, the GPU tests. freeze: the
# stream bench with its baselines, then without them and with gc_freeze off. skinny: the
# fused down projection's one-row path by stage count, then the benches of record. onerow:
# the one-row qkv and o projections swept, then the step profile with the default tiles, with
# the sweep's best at one row, and with the default again. downrow: the attention kernels' GPU
# tests, then the step profile with the one-row down projection's default tiles, the 7490c47
# sweep's best, an alternative, and the default again. ingest: ingest_trace.py's 2.6k -> 8k
# fill (the push, each step's chunks, wall and GPU time) with steps of 4096 and of 8192 tokens.
# splits: the step profile with the one-row decode attention's split rule, with 16 splits (one
# program per SM), and with the rule again. ingestmap: the 8k ingest's chunks (4096 and 1109
# tokens, and the fill as one chunk) by kernel, then the fill under other chunk plans, the
# chunk's attention against SDPA's backends, cuBLAS at chunk-sized M.
# ingestprof: the fill's chunks timed alone, then ingest_trace.py's fill with budgets of 4096
# and 2048 tokens, each with the data graphs and without them (graph_max_data 0), each with a
# profiled fill (PLANS picks some). eagerhost: the host's time
# in eager steps (1, 404 and 1109 tokens), by function. datagraphs: the GPU exactness tests, the
# 8k fill with and without the data graphs, the stream bench without baselines. datanext: the
# GPU exactness tests, a profiled fill (the replayed data step's timeline), and the stream bench
# without baselines with the data graphs and without them. gemmsweep: the model's GEMMs timed
# at every 32nd row count from 192 to 2048 (and every 128th to 4352), cuBLAS and cuBLASLt.
# prune: the data graphs' start-up timing (tests, the profiled fill, the stream bench), and
# the fill and the stream bench with a step budget of 8192 tokens against 4096. waves: the
# long-chunk attention split over keys to balance its waves (by TMA and by pointer), then the
# fill with the GPU's clocks, power and throttle reasons sampled every 20 ms. record: the
# stream bench with its baselines, alone. packed: the fan-out push bench (4 and 8 sessions
# at 4k, FANOUT_SESSIONS; 16 measured on 2026-12-07) with the packed data graphs and without.
# gluon: the Gluon prefill attention's tests, its A/B against the Triton kernel at the bench's
# shapes (GLUON_CONFIGS: BLOCK_M/warps/stages/programs per SM), and the stream bench without
# baselines or 64 sessions, with the Triton prefill kernel (tma_prefill_policy.yaml) and with
# the default (Gluon on Hopper since 83531e3), packed graphs off (start-up 25 s shorter).
# handoff: host_trace.py at 19k (1- and 8-token answers) with the worker and engine carried in
# .device/ab_new/ and .device/ab_old/, new / old / new, then the stream bench without baselines.
set -u
MODE=${1:-quick}
FINAL=${OUT:-perf/results/session}
SCRATCH=$(mktemp -d)
mkdir -p "$FINAL"
source perf/gpu_setup.sh
export PYTHONUNBUFFERED=1

step() {  # step NAME SECONDS COMMAND...: runs it, keeps its output, prints the tail
    local name=$1 limit=$2 t0=$SECONDS
    shift 2
    echo "== $name"
    timeout "$limit" "$@" > "$SCRATCH/$name.txt" 2>&1
    echo "rc=$? in $((SECONDS - t0)) s"
    grep -v "compiling kernel variants\|capturing CUDA graphs" "$SCRATCH/$name.txt" | tail -30
    tar czf "$FINAL/session.tgz" -C "$SCRATCH" .
}

records() {  # records PUSH_SAMPLES: the stream bench with its baselines, then agent turns
    step stream_bench 330 python3 perf/stream_bench.py --repeats 8 --push-samples "$1" \
        --out "$SCRATCH/stream"
    step agent_bench 150 python3 perf/agent_bench.py --kernel-policy perf/bench_policy.yaml \
        --runs reuse --out "$SCRATCH/agent"
}

nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw --format=csv > "$SCRATCH/gpu.txt"
if [ "$MODE" = validate ]; then  # a change's GPU tests, its sweep, and the benches of record
    step gpu_tests 120 python3 -m pytest -q tests/test_triton_kernels.py -k "gpu or plan"
    step sweep_record 90 python3 perf/prefill_sweep.py --grid long --contexts 19000,34000 \
        --q 51,128,256 --tiles 128/64/4/2,64/64/4/2 --out "$SCRATCH/sweep_record.json"
    step step 90 python3 perf/step_profile.py --contexts 3000,19000,34000 \
        --out "$SCRATCH/step.json"
    records 50
    echo done
    exit 0
fi
if [ "$MODE" = host ]; then  # a change's GPU tests, the stream bench, the host's share
    step gpu_tests 150 python3 -m pytest -q tests/test_gpu_exactness.py tests/test_pdl.py \
        tests/test_pending_step.py tests/test_triton_kernels.py -k "block_cop or cuda or pdl or pending"
    step stream 120 python3 perf/stream_bench.py --skip-hf --skip-stateless --repeats 8 \
        --push-samples 100 --out "$SCRATCH/stream"
    step host_trace 120 python3 perf/host_trace.py --contexts 3000,19000,32000 --questions 20 \
        --out "$SCRATCH"
    echo done
    exit 0
fi
if [ "$MODE" = pipeline ]; then  # the attention kernels' carried pages: tests, sweep
    step gpu_tests 240 python3 -m pytest -q tests/test_triton_kernels.py -k "gpu or plan or tma"
    step pipeline_sweep 400 python3 perf/pipeline_sweep.py --out "$SCRATCH/pipeline.json"
    echo done
    exit 0
fi
if [ "$MODE" = carry ]; then  # the carried pages as bound: kernels, steps, benches, tests
    step pipeline_quick 90 python3 perf/pipeline_sweep.py --quick --out "$SCRATCH/pipeline.json"
    step step 100 python3 perf/step_profile.py --contexts 19000,34000 --out "$SCRATCH/step.json"
    step stream_bench 240 python3 perf/stream_bench.py --repeats 8 --push-samples 100 \
        --out "$SCRATCH/stream"
    step gpu_tests 240 python3 -m pytest -q -x tests/test_gpu_exactness.py \
        tests/test_triton_kernels.py -k "gpu or cuda"
    echo done
    exit 0
fi
if [ "$MODE" = freeze ]; then  # the benches of record, and push latency with gc_freeze off
    step stream_bench 240 python3 perf/stream_bench.py --repeats 8 --push-samples 100 \
        --out "$SCRATCH/stream"
    step stream_nofreeze 150 python3 perf/stream_bench.py --skip-hf --skip-stateless \
        --repeats 4 --push-samples 100 --no-gc-freeze --out "$SCRATCH/stream_nofreeze"
    echo done
    exit 0
fi
if [ "$MODE" = skinny ]; then  # the CUDA-core path's pipelining, then the benches of record
    step skinny 150 python3 perf/skinny_gemm_bench.py --shapes down_swiglu --rows 1,2 \
        --out "$SCRATCH"
    records 100
    echo done
    exit 0
fi
if [ "$MODE" = onerow ]; then  # one-row qkv / o tiles from the sweep, A/B inside the step
    step skinny 120 python3 perf/skinny_gemm_bench.py --shapes qkv,o --rows 1 --out "$SCRATCH"
    step step 80 python3 perf/step_profile.py --contexts 3000,19000,34000 \
        --out "$SCRATCH/step.json"
    step step_swept 80 python3 perf/step_profile.py --contexts 3000,19000,34000 \
        --gemm-configs "$SCRATCH/$(date +%Y-%m-%d)-nvidia-h200-skinny-gemm.json" \
        --gemm-configs-max-rows 1 --out "$SCRATCH/step_swept.json"
    step step_again 80 python3 perf/step_profile.py --contexts 3000,19000,34000 \
        --out "$SCRATCH/step_again.json"
    echo done
    exit 0
fi
if [ "$MODE" = downrow ]; then  # the one-row down projection's tiles inside the step; tests
    step gpu_tests 150 python3 -m pytest -q tests/test_triton_kernels.py -k "gpu or cuda"
    swept=perf/results/2026-12-03-nvidia-h200-skinny-down1-7490c47.json
    for run in default best alt default_again; do
        case $run in
            best) extra="--swiglu-configs $swept --gemm-configs-max-rows 1" ;;
            alt) extra="--swiglu-configs perf/swiglu_m1_alt.json --gemm-configs-max-rows 1" ;;
            *) extra="" ;;
        esac
        # shellcheck disable=SC2086
        step "step_$run" 80 python3 perf/step_profile.py --contexts 3000,19000,34000 $extra \
            --out "$SCRATCH/step_$run.json"
    done
    echo done
    exit 0
fi
if [ "$MODE" = ingest ]; then  # where the 8k ingest's time goes, at two step budgets
    step ingest_4096 150 python3 perf/ingest_trace.py --out "$SCRATCH/ingest_4096"
    step ingest_8192 150 python3 perf/ingest_trace.py --max-batch-tokens 8192 \
        --out "$SCRATCH/ingest_8192"
    echo done
    exit 0
fi
if [ "$MODE" = splits ]; then  # the one-row decode attention at one program per SM, in-step
    for run in default 16 default_again; do
        extra=""
        [ "$run" = 16 ] && extra="--decode-splits 16"
        # shellcheck disable=SC2086
        step "step_$run" 80 python3 perf/step_profile.py --contexts 3000,19000,34000 $extra \
            --out "$SCRATCH/step_$run.json"
    done
    echo done
    exit 0
fi
if [ "$MODE" = ingestmap ]; then  # what a fill's chunking, attention and GEMMs cost
    step chunks 150 python3 perf/step_profile.py --no-pdl --kernels --contexts "" \
        --sessions 0 --chunks 4096@2600,1109@6696,5205@2600 --out "$SCRATCH/chunks.json"
    # the 2.6k -> 7.8k fill as the daemon could chunk it: 4096 + tail, two halves, 4224 +
    # tail, one chunk, 2048s + tail, three thirds (PDL on, as the daemon runs)
    step chunk_plans 150 python3 perf/step_profile.py --contexts "" --sessions 0 --chunks \
        4096@2600,1109@6696,2603@2600,2602@5203,4224@2600,981@6824,5205@2600,2048@2600,\
2048@4648,1735@2600,1735@4335,1735@6070,1024@2600,1152@2600,1280@2600,1536@2600,3072@2600,\
3584@2600,4608@2600 --out "$SCRATCH/chunk_plans.json"
    step attention_probe 120 python3 perf/chunk_attention_probe.py \
        --shapes 4096@6696,1109@7805,2603@5203,2602@7805 --out "$SCRATCH/attention_probe.json"
    step gemm_rows 90 python3 perf/gemm_bench.py \
        --rows 981,1024,1109,1152,1280,1536,1735,2048,2603,3072,4096,4224 \
        --out "$SCRATCH/gemm_rows.json"
    echo done
    exit 0
fi
if [ "$MODE" = ingestprof ]; then  # the 8k fill traced, and profiled for kernels and gaps
    step chunk_plans 150 python3 perf/step_profile.py --contexts "" --sessions 0 --chunks \
        2624@2600,2581@5224,4096@2600,1109@6696,1792@2600,1728@4392,1685@6120,2112@2600,\
1985@4712,1@6696 \
        --out "$SCRATCH/chunk_plans.json"
    for plan in ${PLANS:-4096 4096-nographs 2048 2048-nographs}; do
        extra=""
        [ "${plan#*-}" = nographs ] && extra="--no-data-graphs"
        # shellcheck disable=SC2086
        step "ingest_$plan" 200 python3 perf/ingest_trace.py --max-batch-tokens "${plan%-*}" \
            --repeats 3 --profile $extra --out "$SCRATCH/ingest_$plan"
    done
    echo done
    exit 0
fi
if [ "$MODE" = eagerhost ]; then  # the host time of eager steps, by function
    step eager_host 150 python3 perf/eager_host_profile.py --chunks 1@2600,404@2600,1109@6696 \
        --out "$SCRATCH/eager_host.json"
    echo done
    exit 0
fi
if [ "$MODE" = datagraphs ]; then  # the data graphs: GPU exactness, the fill A/B, the stream bench
    step gpu_tests 150 python3 -m pytest -q tests/test_gpu_exactness.py
    for plan in 4096 4096-nographs; do
        extra=""
        [ "${plan#*-}" = nographs ] && extra="--no-data-graphs"
        # shellcheck disable=SC2086
        step "ingest_$plan" 120 python3 perf/ingest_trace.py --max-batch-tokens 4096 \
            --repeats 3 $extra --out "$SCRATCH/ingest_$plan"
    done
    step stream 170 python3 perf/stream_bench.py --skip-hf --skip-stateless --repeats 8 \
        --push-samples 100 --out "$SCRATCH/stream"
    echo done
    exit 0
fi
if [ "$MODE" = datanext ]; then  # the data graphs checked, profiled, and A/B'd in the stream bench
    step gpu_tests 150 python3 -m pytest -q tests/test_gpu_exactness.py
    step ingest_profile 120 python3 perf/ingest_trace.py --max-batch-tokens 4096 --repeats 2 \
        --profile --out "$SCRATCH/ingest_profile"
    for graphs in 2048 0; do
        step "stream_$graphs" 170 python3 perf/stream_bench.py --skip-hf --skip-stateless \
            --repeats 8 --push-samples 100 --graph-max-data "$graphs" --out "$SCRATCH/stream_$graphs"
    done
    echo done
    exit 0
fi
if [ "$MODE" = prune ]; then  # data graphs timed at start-up, the slow sizes dropped
    step gpu_tests 150 python3 -m pytest -q tests/test_gpu_exactness.py
    step ingest_profile 120 python3 perf/ingest_trace.py --max-batch-tokens 4096 --repeats 3 \
        --profile --out "$SCRATCH/ingest_profile"
    step ingest_8192 60 python3 perf/ingest_trace.py --max-batch-tokens 8192 --repeats 3 \
        --out "$SCRATCH/ingest_8192"
    for budget in 4096 8192; do
        step "stream_$budget" 170 python3 perf/stream_bench.py --skip-hf --skip-stateless \
            --repeats 8 --push-samples 100 --max-batch-tokens "$budget" \
            --out "$SCRATCH/stream_$budget"
    done
    echo done
    exit 0
fi
if [ "$MODE" = waves ]; then  # key splits for wave balance in long chunks; clocks in the fill
    for tma in "" --tma-splits; do
        step "waves$tma" 150 python3 perf/prefill_sweep.py --tma $tma --tiles 64/64/4/3 \
            --splits 1,2,3,4 --contexts 8205 --q 1040,1056,1072,1088,1105,4096 \
            --out "$SCRATCH/waves$tma.json"
    done
    nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,\
clocks_event_reasons.active --format=csv,noheader -lms 20 > "$SCRATCH/clocks.csv" &
    smi=$!
    step ingest_clocks 90 python3 perf/ingest_trace.py --max-batch-tokens 4096 --repeats 5 \
        --out "$SCRATCH/ingest_clocks"
    kill $smi
    tar czf "$FINAL/session.tgz" -C "$SCRATCH" .
    echo done
    exit 0
fi
if [ "$MODE" = gemmsweep ]; then  # cuBLAS's pick by row count, over the data buckets' range
    for blas in default cublaslt; do
        step "gemm_$blas" 150 python3 perf/gemm_bench.py --shapes qkv,o,gate_up,down \
            --rows 192:2048:32,2176:4352:128 --blas "$blas" --out "$SCRATCH/gemm_$blas.json"
    done
    echo done
    exit 0
fi
if [ "$MODE" = packed ]; then  # several sessions' data in packed graphs, A/B'd at few sessions
    for sessions in ${FANOUT_SESSIONS:-4 8}; do
        for seqs in 64 0; do
            step "fanout_${sessions}_$seqs" 120 python3 perf/fanout_bench.py --sessions \
                "$sessions" --context 4096 --rounds 30 --graph-max-data-seqs "$seqs" \
                --out "$SCRATCH/fanout_${sessions}_$seqs"
        done
    done
    echo done
    exit 0
fi
if [ "$MODE" = gluon ]; then  # the Gluon prefill attention: tests, kernel A/B, stream bench A/B
    step gluon_tests 150 python3 -m pytest -q -x tests/test_gluon_attention.py
    step gluon_ab 150 python3 perf/gluon_ab.py \
        --configs "${GLUON_CONFIGS:-128/8/4/1,128/8/2/1,64/4/3/2}" --out "$SCRATCH/gluon_ab.json"
    for policy in tma_prefill bench; do  # the Triton kernel, then Gluon (the default now)
        step "stream_$policy" 130 python3 perf/stream_bench.py --skip-hf --skip-stateless \
            --repeats 8 --push-samples 50 --sessions 0 --graph-max-data-seqs 0 \
            --kernel-policy "perf/${policy}_policy.yaml" --out "$SCRATCH/stream_$policy"
    done
    echo done
    exit 0
fi
if [ "$MODE" = record ]; then  # the stream bench with its baselines only (no agent turns)
    step stream_bench 330 python3 perf/stream_bench.py --repeats 8 --push-samples 100 \
        --out "$SCRATCH/stream"
    echo done
    exit 0
fi
if [ "$MODE" = handoff ]; then  # the worker's report handoff (4934cc6) against the worker before
    # it, in one process each, new / old / new: the files are carried in .device/ab_{old,new}/
    # (see perf/NOTES.md, fourteenth session); the new files are restored at the end
    for v in new old new; do
        cp .device/ab_$v/worker.py .device/ab_$v/engine.py daemon/engine/
        for mt in 1 8; do
            step "host_${v}_mt$mt" 90 python3 perf/host_trace.py --contexts 19000 --questions 20 \
                --max-tokens $mt --out "$SCRATCH/host_${v}_mt$mt"
        done
    done
    step stream 150 python3 perf/stream_bench.py --skip-hf --skip-stateless --repeats 8 \
        --push-samples 50 --out "$SCRATCH/stream"
    echo done
    exit 0
fi
if [ "$MODE" = bench ]; then  # the benches of record (stream with baselines, agent turns)
    step gpu_tests 60 python3 -m pytest -q tests/test_triton_kernels.py -k "block_cop"
    records 100
    echo done
    exit 0
fi
if [ "$MODE" = probe ]; then  # the 64-session decode attention lead of perf/NOTES.md
    step gpu_tests 120 python3 -m pytest -q tests/test_triton_kernels.py -k "gpu or rescal or tma"
    step sessions_trace 180 python3 perf/sessions_trace.py --rounds 1 --relayout --noise-kv \
        --out "$SCRATCH/sessions_trace.json"
    step step_kernels 120 python3 perf/step_profile.py --no-pdl --kernels --contexts 19000 \
        --out "$SCRATCH/step_kernels.json"
    step ab_lazy 60 python3 perf/prefill_sweep.py --ab-lazy --tma --contexts 4096 --q 32 \
        --seqs 64 --out "$SCRATCH/ab_lazy_64q.json"
    step stream 150 python3 perf/stream_bench.py --skip-hf --skip-stateless --repeats 8 \
        --push-samples 50 --out "$SCRATCH/stream"
    echo done
    exit 0
fi
step gpu_tests 150 python3 -m pytest -q tests/test_pending_step.py \
    tests/test_triton_kernels.py -k "gpu or collect or plan"
step step 90 python3 perf/step_profile.py --contexts 3000,19000,34000 --decode-batches 1,8,32,64 \
    --out "$SCRATCH/step.json"
step step_kernels 120 python3 perf/step_profile.py --no-pdl --kernels --contexts 19000 \
    --out "$SCRATCH/step_kernels.json"
step host_trace 120 python3 perf/host_trace.py --contexts 3000,19000 --questions 30 \
    --out "$SCRATCH"
if [ "$MODE" = full ]; then
    step stream_bench 240 python3 perf/stream_bench.py --repeats 8 --push-samples 50 \
        --out "$SCRATCH/stream"
    step agent_bench 240 python3 perf/agent_bench.py --kernel-policy perf/bench_policy.yaml \
        --runs reuse,no_reuse --out "$SCRATCH/agent"
else
    step stream 150 python3 perf/stream_bench.py --skip-hf --skip-stateless --repeats 8 \
        --push-samples 50 --out "$SCRATCH/stream"
fi
echo done
