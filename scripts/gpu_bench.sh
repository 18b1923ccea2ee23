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
# STAGES="..." picks stages (default: the first five, in this order). All stages together stop after $BUDGET
# seconds (default 560): a late stage gets what is left, or is skipped.
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

stage() {  # stage NAME LIMIT_S ARGS...: one bench_train.py run, its JSON at $OUT/NAME.json
  local name=$1 limit=$2 json
  shift 2
  local left=$((START + BUDGET - $(date +%s)))
  if [ "$left" -lt 30 ]; then echo "== $name: skipped, ${left}s of the budget left" | tee -a "$LOG"; return; fi
  [ "$left" -lt "$limit" ] && limit=$left
  json="$OUT/$name.json"
  [ "$name" = profile ] && json=/tmp/dferjax_profile.json
  echo "== $name: start $(date -u +%T), limit ${limit}s: $*" | tee -a "$LOG"
  timeout -k 15 "$limit" $PYTHON scripts/bench_train.py --model="$MODEL" --compilation_cache="$CACHE" \
    --out="$json" "$@" >> "$LOG" 2>&1
  echo "== $name: exit $? at $(date -u +%T)" | tee -a "$LOG"
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
    *) echo "unknown stage $1" | tee -a "$LOG" ;;
  esac
}
ISSUE17="opt_base opt_pallas opt_cudnn_pad2 opt_heads_first opt_s2d opt_argmax_pool opt_fused_norm"
ISSUE17+=" opt_cudnn_pad8 opt_cudnn_pad32"
STAGES=${STAGES:-bf16_b128 bf16_eager profile fp32_eager bf16_cudnn}
for name in ${STAGES/issue17/$ISSUE17}; do run_stage "$name"; done

echo "== summary" | tee -a "$LOG"
grep -E '^(dferjax|torch) .*(clips/s|memory|Error)|^== |^\| |^STT \(|^largest' "$LOG"
