#!/usr/bin/env bash
# One lent-GPU session: install carried wheels (.whl), then run the stages named as arguments,
# each logged to $OUT/<stage>.log. Stages: env, gputests, ops, load, train, gen, peers, and the
# open issues' pending GPU work: dist (issue 19's NCCL tests), notebook (issue 14 target 0: the
# notebook job with its defaults, without graphs, unmerged, decoder offloaded; peak by phase), decode (issue 15's rows),
# longctx (issue 14 target 4: Llama-3.1-8B NF4 at 32k tokens, MLPs whole and in chunks), parity
# (issue 14 target 6: the Trainer's first losses against an HF+PEFT loop), target0 (issue 14 target 0:
# the peers' notebook job, unsloth and minift in one process tree, ~9 min; needs .peer), notebook16
# (the same job on a 16-bit base, unsloth's and minift's runs, ~8 min; bench/notebook.py --impls), woffload (workload W with checkpoints kept or offloaded, each with
# and without CUDA graphs, and the fused LoRA ops inside graphs, where their host cost is gone: the
# data for making "offload" and the fused MLP defaults; one W_SHAPES shape a call, ~5 min), budgets (issue 14 target 2: the
# memory planner's plan and tokens/s at 8-80 GiB budgets, and unsloth's three checkpointing settings,
# whose peaks say which fits each budget; BUDGET_SHAPE, default llama-3.1-8b; BUDGET_VARIANTS).
# firststep (issue 14 target 3): the notebook job's load + add_lora + first step, a cold compile cache then warm,
# then warm under cProfile (FS_RUNS).
# graphcheck: the vision tower's offloaded checkpoints inside CUDA graphs (the sixteenth session's
# fixes), then the notebook job with its defaults; about 330 s.
#   bash bench/gpu_session.sh env dist notebook decode
#   W_SHAPES=gemma-3-4b W_VARIANTS=offload+compile+graph,offload+compile+graph+mlpchunk2048 bash bench/gpu_session.sh woffload
#     (MLPs in 2048-token chunks: their 5 x intermediate activations a token for a quarter of W's tokens)
#   bash bench/gpu_session.sh decode   (default: the one-launch decode attention, split to fill the SMs and
#     unsplit, against the default path and transformers' static cache, with kernel profiles)
#   DECODE_ARGS="--shapes llama-3.2-1b --batch 1 --quant 4bit --impls minift,minift-lora" bash bench/gpu_session.sh decode
#     (QLoRA right after training: adapters in the one-row NF4 kernel's epilogue)
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >"$OUT/pip.log" 2>&1 || { echo "wheel install failed"; tail "$OUT/pip.log"; }
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1 TOKENIZERS_PARALLELISM=false
for stage in "$@"; do
  echo "=== $stage $(date +%T)"
  case $stage in
    env) python3 -c "import torch,triton,transformers;print(torch.__version__,triton.__version__,transformers.__version__,torch.cuda.get_device_name(0))"; nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm --format=csv ;;
    gputests) MINIFT_EAGER_FAILURES=1 MINIFT_HYPOTHESIS_PROFILE=${PROFILE:-gpu} timeout ${GPUTEST_TIMEOUT:-420} python3 -m pytest -q -m gpu -p no:cacheprovider ${GPUTEST_PATHS:-tests} ${GPUTEST_ARGS:-} 2>&1 | tee "$OUT/gputests.log" | tail -25 ;;
    ops) timeout ${OPS_TIMEOUT:-300} python3 bench/ops.py ${OPS_ARGS:-} 2>"$OUT/ops.err" | tee "$OUT/ops.jsonl" | cut -c1-400 ;;
    load) for sh in ${LOAD_SHAPES:-gemma-3-4b-vision}; do timeout 300 python3 bench/load.py --shape $sh --quant none,4bit 2>>"$OUT/load.err" | tee -a "$OUT/load.jsonl" | cut -c1-300; done ;;
    train) timeout ${TRAIN_TIMEOUT:-400} python3 bench/train.py ${TRAIN_ARGS:---shapes llama-3.2-1b} 2>"$OUT/train.err" | tee "$OUT/train.jsonl" | cut -c1-600 ;;
    gen) timeout ${GEN_TIMEOUT:-400} python3 bench/generate.py ${GEN_ARGS:---shapes llama-3.2-1b} 2>"$OUT/gen.err" | tee -a "$OUT/gen.jsonl" | cut -c1-700 ;;
    peers) timeout ${PEERS_TIMEOUT:-500} python3 .peer/peer_bench.py --out "$OUT" ${PEER_ARGS:---shapes llama-3.2-1b --impls hf,unsloth} 2>&1 | tail -12 ;;
    dist) MINIFT_EAGER_FAILURES=1 timeout ${DIST_TIMEOUT:-300} python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_distributed_gpu.py --durations=0 2>&1 | tee "$OUT/dist.log" | tail -15 ;;
    notebook) IFS=';' read -ra nbv <<< "${NB_VARIANTS-;--set cuda_graphs=False;--set merge_micro_batches=False;--set gradient_checkpointing=offload}"
      [[ ${#nbv[@]} -eq 0 ]] && nbv=("")  # NB_VARIANTS="": the defaults alone
      for v in "${nbv[@]}"; do  # --phases: only runs without graph replays report them
        timeout ${NB_TIMEOUT:-200} python3 bench/notebook.py --steps ${NB_STEPS:-12} --phases $v 2>>"$OUT/notebook.err" | tee -a "$OUT/notebook.jsonl" | tail -2; done ;;
    longctx) for v in offload+compile offload+compile+mlpchunk; do  # issue 14 target 4: the per-token peak, unchunked vs chunked MLPs
        timeout ${LONGCTX_TIMEOUT:-240} python3 bench/train.py --shapes llama-3.1-8b --quant 4bit --bs 1 --seq ${LONGCTX_SEQ:-32768} --warmup 1 --steps 1 --variants $v 2>>"$OUT/longctx.err" | tee -a "$OUT/longctx.jsonl" | cut -c1-400; done ;;
    parity) timeout ${PARITY_TIMEOUT:-500} python3 bench/parity.py ${PARITY_ARGS:---shapes llama-3.2-1b --quant none,4bit} 2>"$OUT/parity.err" | tee -a "$OUT/parity.jsonl" | cut -c1-900 ;;
    graphcheck) MINIFT_EAGER_FAILURES=1 timeout ${GPUTEST_TIMEOUT:-240} python3 -m pytest -q -m gpu -p no:cacheprovider \
        tests/test_train_graphs.py::test_vision_trainer_with_cuda_graphs_equals_without \
        tests/test_train_graphs.py::test_offloaded_checkpoints_inside_cuda_graphs \
        tests/test_train_graphs.py::test_chunked_mlps_inside_cuda_graphs \
        tests/test_train_gpu.py::test_trainer_vision_merged_peak_within_unmerged 2>&1 | tee "$OUT/graphcheck.log" | tail -15
      timeout ${NB_TIMEOUT:-200} python3 bench/notebook.py --steps ${NB_STEPS:-30} 2>>"$OUT/notebook.err" | tee -a "$OUT/notebook.jsonl" | tail -2 ;;
    target0) timeout ${TARGET0_TIMEOUT:-590} python3 .peer/vision_notebook_job.py --impls unsloth,minift --steps ${NB_STEPS:-30} \
        --timeout 400 2>"$OUT/target0.err" | tee -a "$OUT/target0.log" | tail -8 ;;
    notebook16) timeout ${NB_TIMEOUT:-590} python3 bench/notebook.py --quant none --impls ${NB16_IMPLS:-unsloth,minift} \
        --steps ${NB_STEPS:-30} --timeout 420 2>>"$OUT/notebook.err" \
        | tee -a "$OUT/notebook.jsonl" | tail -2 ;;
    woffload) for sh in ${W_SHAPES:-gemma-3-4b}; do
        timeout ${W_TIMEOUT:-400} python3 bench/train.py --shapes $sh --quant 4bit --steps 6 \
          --variants ${W_VARIANTS:-ckpt+compile+gcfreeze,ckpt+compile+graph,offload+compile+gcfreeze,offload+compile+graph,offload+compile+graph+fusedlora} 2>>"$OUT/woffload.err" | tee -a "$OUT/woffload.jsonl" | cut -c1-500; done ;;
    budgets) timeout ${BUDGET_TIMEOUT:-590} python3 bench/train.py --shapes ${BUDGET_SHAPE:-llama-3.1-8b} --quant 4bit --steps 4 \
        --variants ${BUDGET_VARIANTS:-auto@8+compile,auto@16+compile,auto@24+compile,auto@48+compile,auto@80+compile,unsloth,unsloth+ckpt,unsloth+nockpt} \
        2>"$OUT/budgets.err" | tee -a "$OUT/budgets.jsonl" | cut -c1-500 ;;
    firststep) cache=$(mktemp -d)  # issue 14 target 3: a cold compile cache, then the same cache warm
      for run in ${FS_RUNS:-cold warm warm-cprofile}; do  # warm-cprofile: where the warm load time goes
        TORCHINDUCTOR_CACHE_DIR=$cache TRITON_CACHE_DIR=$cache/triton timeout ${NB_TIMEOUT:-240} \
        python3 bench/notebook.py --steps 3 $([[ $run == *cprofile ]] && echo --cprofile) 2>>"$OUT/firststep.err" | sed "s/^{/{\"cache\": \"$run\", /" \
        | tee -a "$OUT/firststep.jsonl" | cut -c1-600; done ;;
    decode) bw=$(nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200 && echo 4.8e12 || echo 3.35e12)
      timeout ${GEN_TIMEOUT:-400} python3 bench/generate.py --bandwidth $bw ${DECODE_ARGS:---shapes llama-3.2-1b --batch 1,8 --impls minift,minift-attn,minift-attn1,hf-static --profile} 2>"$OUT/decode.err" | tee -a "$OUT/decode.jsonl" | tail -12 ;;
  esac
done
