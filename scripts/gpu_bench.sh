#!/usr/bin/env bash
# The GPU measurements behind the README's Performance tables, as one script for one short GPU session:
#
#   OUT=runs/gpu_bench bash scripts/gpu_bench.sh            # about 8 minutes on one H100/H200
#
# Each stage runs under its own time limit and appends to one log, and bench_train.py rewrites its JSON after
# every measurement, so a stage that fails or runs out of time keeps what it measured and costs no other stage.
# Stages, most important first:
#   bf16_b128     bf16 batch 128: dferjax vs PyTorch eager AMP and torch.compile (dferjax compiles cold)
#   bf16_eager    bf16 at the paper's batch (32), 128 again and 256 vs eager; the batch-128 step now loads from
#                 the compilation cache the first stage filled (compile_s: the warm-restart figure), and its
#                 throughput repeats the first stage's (the run-to-run spread)
#   profile       bf16 batch 128 under jax.profiler (warm from the cache): $OUT/profile.trace.json.gz and
#                 .xplane.pb, per-kernel device time (scripts/profile_summary.py reads the first)
#   fp32_eager    float32 (TF32 matmuls/convs on both sides) vs PyTorch eager
#   bf16_cudnn    bf16 batch 128 with cuDNN flash attention (attention_impl=cudnn), dferjax only
#   pool_reduce_window, pool_slices (only when named in STAGES): the stem max-pool's two implementations
#   Issue 17's options, each alone against opt_base (bf16 batch 128, dferjax only, 10 timed steps), in this
#   order (STAGES=issue17 runs them all, ~10 min with cold compiles, so the default BUDGET may skip the last;
#   each is exact, tests/test_fused.py and tests/test_pallas_attention.py):
#     opt_base          the defaults again, in the same run as the options
#     opt_pallas        attention_impl=pallas: one Pallas/Triton kernel per direction, a whole 49/17-token
#                       sequence (padded to 64/32) per program (dferjax/models/pallas_attention.py)
#     opt_cudnn_pad2    cuDNN flash attention on 49/17 tokens padded to 50/18 (masked by sequence lengths)
#     opt_heads_first   attention_layout=heads_first: no head split/merge transposes
#     opt_s2d           stem_conv_impl=space_to_depth: the 7x7/2 conv on 3 channels as a 4x4/1 conv on 12
#     opt_argmax_pool   max_pool_impl=argmax: ReLU after the pool, gradient from the forward's argmax
#     opt_fused_norm    norm_impl=fused: BN/LN with a hand-written two-reduction backward pass
#     opt_cudnn_pad8, opt_cudnn_pad32   cuDNN attention at 56/24 and 64/32 tokens
#   Issue 17 item 4, the whole trainer against its train step alone:
#     e2e               scripts/bench_e2e.py: a synthetic DFEW-layout dataset (700 clips, fold 1 as 112-px JPEG
#                       frames, written and built on all cores under /tmp/dferjax_e2e, reused), `python -m
#                       dferjax.main` on it (paper STT, bf16, batch 128, 1000 steps as one epoch, random init), its
#                       clips/s beside the device-only figure of $OUT/bf16_b128.json (measured in the stage when
#                       that is absent): `e2e: trainer N clips/s, device-only M clips/s, gap X %`, $OUT/e2e.json.
#                       One trainer run per E2E_WORKERS value (default 0,12: threads, then 12 worker processes).
#                       E2E_THREADS, E2E_PREFETCH, E2E_PROGRESS_BAR, E2E_ENCODING, E2E_STEPS set the trainer's
#                       input (defaults: the config's, below); ~5-6 min, limit E2E_LIMIT (420 s)
#     input             scripts/bench_input.py on the host's CPUs alone (no GPU work): 112-px `stt` clips read by
#                       8 threads and by 12 worker processes, and passes over a DFEW-sized test split (2,341
#                       clips) with each, after 5 s idle as between two evaluations; $OUT/input.json, ~1 min
#   Issue 17 item 5, each other model at its paper batch against its PyTorch transcription (see model_stage):
#     models            model_nr_dfernet model_aen model_ceflnet model_est: bf16 vs PyTorch eager, ~6 min
#     models_fp32       model_<m>_fp32: float32 vs PyTorch eager, ~6 min
#     models_compile    model_<m>_compile: bf16 vs torch.compile, limits summing to ~16 min (run after `models`)
# STAGES="..." picks stages and groups (default: the first five, in this order). All stages together stop after
# $BUDGET seconds (default 560): a late stage gets what is left, or is skipped.
# A host without the project's dependencies (a bare GPU image) may carry them as wheels in .whl/ (grain,
# ml_collections, ...; .whl/fallback/ holds flax/optax/orbax used only if the host's own fail to import).
set -u
OUT=${OUT:-runs/gpu_bench}
mkdir -p "$OUT"
LOG="$OUT/gpu_bench.log"
CACHE=${CACHE:-/tmp/dferjax_compilation_cache}
PYTHON=${PYTHON:-python3}
MODEL=${MODEL:-paper}  # tiny: a check of the script itself on any host
BUDGET=${BUDGET:-560}
START=$(date +%s)
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if compgen -G ".whl/*.whl" > /dev/null; then
  $PYTHON -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
if ! $PYTHON -c 'import dferjax.train' 2>> "$LOG" && compgen -G ".whl/fallback/*.whl" > /dev/null; then
  echo "dferjax.train does not import with this host's packages: using .whl/fallback" | tee -a "$LOG"
  $PYTHON -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site_fallback \
    .whl/fallback/*.whl && export PYTHONPATH="$PWD:/tmp/site_fallback:/tmp/site"
fi

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  $PYTHON - <<'EOF'
import importlib.metadata as m, jax
print({n: m.version(n) for n in ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'torch', 'numpy')})
print(jax.devices())
import dferjax.train  # noqa: F401
print('dferjax imports')
EOF
} 2>&1 | tee -a "$LOG"

limited() {  # limited NAME LIMIT_S COMMAND...: COMMAND under the stage's limit, cut to what is left of BUDGET
  local name=$1 limit=$2
  shift 2
  local left=$((START + BUDGET - $(date +%s)))
  if [ "$left" -lt 30 ]; then echo "== $name: skipped, ${left}s of the budget left" | tee -a "$LOG"; return; fi
  [ "$left" -lt "$limit" ] && limit=$left
  echo "== $name: start $(date -u +%T), limit ${limit}s: $*" | tee -a "$LOG"
  timeout -k 15 "$limit" "$@" >> "$LOG" 2>&1
  echo "== $name: exit $? at $(date -u +%T)" | tee -a "$LOG"
}

stage() {  # stage NAME LIMIT_S ARGS...: one bench_train.py run, its JSON at $OUT/NAME.json
  local name=$1 limit=$2 json
  shift 2
  json="$OUT/$name.json"
  [ "$name" = profile ] && json=/tmp/dferjax_profile.json
  limited "$name" "$limit" $PYTHON scripts/bench_train.py --model="$MODEL" --compilation_cache="$CACHE" \
    --out="$json" "$@"
}

# Issue 17 item 5: each model's paper config at the paper's batch (its config's batch_size) against its PyTorch
# transcription, 10 timed steps (2 warm-up). Three stages per model, so that a run cut short keeps whole JSONs
# (bench_train.py writes its report at the end) and the cheap comparison comes first:
#   model_<m>          bf16 vs PyTorch eager AMP (group `models`)
#   model_<m>_fp32     float32 (TF32 on both sides) vs PyTorch eager (group `models_fp32`)
#   model_<m>_compile  bf16 vs torch.compile (group `models_compile`); the dferjax step loads from the compilation
#                      cache that model_<m> filled, so the extra time is torch.compile's (STT: 50 s train + 19 s eval)
# The limits are for cold compiles on an H200, scaled from STT's (dferjax 25 s at batch 32, docs/performance.md):
# about 35-45 s for the dferjax worker, 15 s each for the CPU FLOP count and PyTorch eager, which with the
# 224-px models' larger programs (CEFLNet, EST: 35 frames, a full ResNet18) makes `models` about 6 minutes.
# Cut to fit that: float32 and torch.compile (their own groups), the largest-batch search, and timed steps
# (bench_train.py's 20 + 3 -> 10 + 2).
declare -A MODEL_LIMITS=([nr_dfernet]=80 [aen]=90 [ceflnet]=100 [est]=100 [stt]=80)
model_stage() {  # model_stage model_<m>[_fp32|_compile]
  local model=${1#model_} dtype=bfloat16 torch=eager extra=0 batch
  case $model in
    *_fp32) model=${model%_fp32}; dtype=float32 ;;
    *_compile) model=${model%_compile}; torch=compile; extra=150 ;;
  esac
  if [ -z "${MODEL_LIMITS[$model]:-}" ]; then echo "unknown stage $1" | tee -a "$LOG"; return; fi
  batch=$($PYTHON -c "from configs import ${model}_dfew as c; print(c.get_config().batch_size)" 2>> "$LOG")
  if [ -z "$batch" ]; then echo "== $1: no batch_size from configs/${model}_dfew.py" | tee -a "$LOG"; return; fi
  stage "$1" $((MODEL_LIMITS[$model] + extra)) --model_name="$model" --dtypes="$dtype" --batch_sizes="$batch" \
    --torch="$torch" --nomax_batch --steps=10 --warmup=2 --window=5
}

run_stage() {
  case $1 in
    bf16_b128) stage bf16_b128 240 --dtypes=bfloat16 --batch_sizes=128 --torch=eager,compile --nomax_batch ;;
    bf16_eager) stage bf16_eager 170 --dtypes=bfloat16 --batch_sizes=32,128,256 --torch=eager --nomax_batch ;;
    profile)
      rm -rf /tmp/dferjax_profile
      stage profile 60 --dtypes=bfloat16 --batch_sizes=128 --torch=none --nomax_batch --steps=5 --warmup=2 \
        --window=5 --profile_dir=/tmp/dferjax_profile
      for suffix in trace.json.gz xplane.pb; do
        found=$(find /tmp/dferjax_profile -name "*.$suffix" 2>/dev/null | head -1)
        [ -n "$found" ] && cp "$found" "$OUT/profile.$suffix"
      done ;;
    fp32_eager) stage fp32_eager 140 --dtypes=float32 --batch_sizes=32,128 --torch=eager --nomax_batch ;;
    bf16_cudnn) stage bf16_cudnn 70 --dtypes=bfloat16 --batch_sizes=128 --torch=none --attention_impl=cudnn --nomax_batch ;;
    pool_reduce_window | pool_slices)  # the stem max-pool's two implementations, dferjax only
      stage "$1" 110 --dtypes=bfloat16 --batch_sizes=128 --torch=none --nomax_batch --max_pool_impl="${1#pool_}" ;;
    opt_*)  # one issue-17 option alone; cuDNN stages fail fast (a ValueError) if cuDNN still refuses the lengths
      local option
      case $1 in
        opt_base) option=() ;;
        opt_pallas) option=(--attention_impl=pallas) ;;
        opt_cudnn_pad*) option=(--attention_impl=cudnn "--attention_pad_multiple=${1#opt_cudnn_pad}") ;;
        opt_heads_first) option=(--attention_layout=heads_first) ;;
        opt_s2d) option=(--stem_conv_impl=space_to_depth) ;;
        opt_argmax_pool) option=(--max_pool_impl=argmax) ;;
        opt_fused_norm) option=(--norm_impl=fused) ;;
        *) echo "unknown stage $1" | tee -a "$LOG"; return ;;
      esac
      stage "$1" 80 --dtypes=bfloat16 --batch_sizes=128 --torch=none --nomax_batch --steps=10 --warmup=2 --window=5 \
        "${option[@]}" ;;
    model_*) model_stage "$1" ;;
    e2e)  # issue 17 item 4: the whole trainer on a synthetic dataset vs its train step alone (scripts/bench_e2e.py)
      limited e2e "$E2E_LIMIT" $PYTHON scripts/bench_e2e.py --model="$MODEL" --compilation_cache="$CACHE" \
        --device_json="$OUT/bf16_b128.json" --out="$OUT/e2e.json" --num_threads="$E2E_THREADS" \
        --num_workers="$E2E_WORKERS" \
        --prefetch="$E2E_PREFETCH" --progress_bar="$E2E_PROGRESS_BAR" ${E2E_STEPS:+--steps=$E2E_STEPS} \
        ${E2E_ENCODING:+--frame_encoding=$E2E_ENCODING} ;;
    input)  # issue 17 item 4 on the GPU host's CPUs: the readers' ceilings, training and evaluation
      local clips=2341 seconds=4
      [ "$MODEL" = tiny ] && clips=300 seconds=1
      limited input 120 $PYTHON scripts/bench_input.py --sizes=112 --recipes=stt --batch_size=128 \
        --seconds=$seconds --readers=threads:8,workers:12 --eval_clips=$clips --eval_pause=5 --out="$OUT/input.json" ;;
    *) echo "unknown stage $1" | tee -a "$LOG" ;;
  esac
}
# The e2e stage's input-pipeline settings (the trainer's defaults unless set; see scripts/bench_e2e.py):
E2E_THREADS=${E2E_THREADS:-0}  # config.input.num_threads, 0: the config's 8; a list (8,16) runs the trainer per value
# config.input.num_workers, a trainer run each: 0 (threads, the default) and 12 processes. On a CPU the threads stop
# scaling at ~1,300 clips/s whatever the core count (docs/performance.md), below what STT's step takes on an H200.
E2E_WORKERS=${E2E_WORKERS:-0,12}
E2E_PREFETCH=${E2E_PREFETCH:-0}  # config.input.prefetch, 0: the config's 4 batches
E2E_PROGRESS_BAR=${E2E_PROGRESS_BAR:-true}  # false: no per-step wait for the bar
E2E_STEPS=${E2E_STEPS:-}  # trainer steps (bench_e2e.py's default: 1000, the benchmark's steps_per_epoch)
E2E_ENCODING=${E2E_ENCODING:-}  # raw: uint8 frames instead of JPEG (a dataset of its own)
E2E_LIMIT=${E2E_LIMIT:-420}  # dataset < 1 min on 16 cores, each trainer run 1.5-2.5 min; more for longer lists

declare -A STAGE_GROUPS=(
  [issue17]="opt_base opt_pallas opt_cudnn_pad2 opt_heads_first opt_s2d opt_argmax_pool opt_fused_norm
             opt_cudnn_pad8 opt_cudnn_pad32"
  [models]="model_nr_dfernet model_aen model_ceflnet model_est"
  [models_fp32]="model_nr_dfernet_fp32 model_aen_fp32 model_ceflnet_fp32 model_est_fp32"
  [models_compile]="model_nr_dfernet_compile model_aen_compile model_ceflnet_compile model_est_compile"
)
STAGES=${STAGES:-bf16_b128 bf16_eager profile fp32_eager bf16_cudnn}
for group in $STAGES; do
  for name in ${STAGE_GROUPS[$group]:-$group}; do run_stage "$name"; done
done

echo "== summary" | tee -a "$LOG"
grep -E '^(dferjax|torch) .*(clips/s|memory|Error)|^== |^\| |^[A-Z_]+ \((paper|tiny)\)|^largest|^e2e: |^ *112px ' "$LOG"
