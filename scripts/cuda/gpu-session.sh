#!/usr/bin/env bash
# One GPU lease's worth of checks and measurements with a `--features cuda` omr binary built
# elsewhere (see gpu-run.sh), correctness first:
#
#   scripts/cuda/gpu-session.sh [BIN] [OUT_DIR] [quick]
#
#   1. gpu-run.sh: every kernel against its CPU reference, the whole model (loss and every
#      gradient, candle ops / fused / fused + checkpointing) and the optimizer against the
#      CPU, then each kernel's achieved TB/s or TFLOP/s next to its floor;
#   2. `omr bench train` on the Qwen2.5-VL-3B shape (random init, full fine-tune) in bf16 with
#      the fused kernels, next to torch + transformers (python3 with both) on the same batch:
#      tokens/s, MFU, phases, GPU memory next to `omr plan`'s prediction; the same step with
#      activation checkpointing and --profile (where the time goes, segment by segment); and
#      8192-token rows with checkpointing on both sides; the opt-ins not yet measured
#      (OMR_BLOCK_OP=1 at T 2048 and 8192, OMR_MMA tilings at 8192, the wgmma
#      attention included); the 7B shape with LoRA
#      rank 16 at T 4096 on both sides; `omr bench generate` (GRPO's rollouts, 3B: the device
#      sampler against the host one, transformers' generate on the same prompts). With `quick`: the tiny
#      model's step, the first 3B run and the one-op layers at T 2048. (A 7B full fine-tune with AdamW needs ≈ 136 GiB before
#      activations: not on one 141 GB GPU; with candle ops instead of the fused kernels the 3B
#      step at T 2048 ran out of the H200's memory.)
#
#   3. with .gpu-bin/libomr_prof.so (scripts/cuda/prof/build.sh): a CUPTI kernel profile of
#      the 3B step;
#   4. the user's commands end to end on CUDA: `omr demo` (synthetic shards, tiny SFT with
#      checkpoints, GRPO, exports, eval) with the runtime on CUDA, `omr sft --resume auto`
#      continuing the demo's SFT run from its last checkpoint, `omr eval --device cuda` on
#      the SFT export, and a two-process data-parallel SFT on the one GPU against one process
#      with twice the accumulation.
#
# The third argument picks a part: `quick` (step 1, the tiny and 3B T 2048 steps), `e2e`
# (step 4 alone), `lease` (what a 15-minute device lease allows in one call of under 9
# minutes, most urgent first: step 1, the 3B step at T 2048 plain, with the decoder layer's
# halves as separate ops (OMR_ATTN_UNIT=0 OMR_MLP_UNIT=0) and as one-op layers, at
# T 8192 with as many decoder layers kept as fit (--kept-decoder-layers auto), the wgmma
# attention at T 8192 next to the default, a short 3B rollout, torch at T 8192),
# nothing for all of it (longer than one 10-minute device call: split it).
#
# Every step has its own timeout and a failing step does not stop the next. OUT_DIR gets
# session.log (all output), the JSON report of each `bench train` and summary.txt (each
# step's exit status and seconds), which also ends the output.
set -uo pipefail
bin=${1:-.gpu-bin/omr}
out=${2:-${OUT:-.}}
quick=${3:-}
mkdir -p "$out"
here=$(cd "$(dirname "$0")" && pwd)
lib=$(find /usr/local/cuda*/lib64 /opt /usr/lib /usr/local/lib -name 'libcublas.so.13*' 2>/dev/null | head -n 1)
[ -n "$lib" ] && export LD_LIBRARY_PATH=$(dirname "$lib")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
py=${PYTHON:-python3}
summary=()
step() { # name timeout_s command...
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  echo "=== $name: $*" | tee -a "$out/session.log"
  timeout "$limit" "$@" 2>&1 | tee -a "$out/session.log"
  local rc=${PIPESTATUS[0]}
  summary+=("$(printf '%-28s rc %-4s %4ss' "$name" "$rc" "$((SECONDS - t0))")")
}
e2e_steps() {
  local e2e=/tmp/omr-e2e
  rm -rf "$e2e"
  step demo-cuda 300 "$bin" demo --out "$e2e" --train 400 --test 40 \
    --set runtime.device=cuda --set train.max_steps=60 --set checkpoint.every_steps=30 \
    --grpo-set runtime.device=cuda --grpo-set train.max_steps=3
  step sft-resume-cuda 120 "$bin" sft --config "$e2e/sft/config.toml" --set train.max_steps=90 \
    --resume auto
  step eval-cuda 120 "$bin" eval --model "$e2e/sft/export" --data "$e2e/data" --limit 40 \
    --device cuda --out "$e2e/eval-cuda"
  # Data parallel on the one GPU: two ranks (both on device 0) with one sample each against one
  # process with grad_accum 2 on the same config; their losses per step side by side (equal
  # up to the attention backward's atomics, which make CUDA runs differ in the last bits).
  local one=(--set train.max_steps=20 --set data.batch.batch_size=1 --set export.at_end=false
    --set eval.every_steps=0 --resume never)
  step dp-one-cuda 120 "$bin" sft --config "$e2e/sft/config.toml" "${one[@]}" \
    --set "run.dir=\"$e2e/dp-one\"" --set train.grad_accum=2
  step dp-two-cuda 150 env WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=29517 bash -c '
    RANK=1 LOCAL_RANK=0 "$0" "$@" --set train.grad_accum=1 > "'"$out"'/dp-rank1.log" 2>&1 &
    RANK=0 LOCAL_RANK=0 "$0" "$@" --set train.grad_accum=1; a=$?; wait $!; b=$?
    exit $((a > b ? a : b))' "$bin" sft --config "$e2e/sft/config.toml" "${one[@]}" \
    --set "run.dir=\"$e2e/dp-two\""
  step dp-compare 20 "$py" -c '
import json, sys
loss = lambda d: [json.loads(l).get("train/loss") for l in open(d + "/metrics.jsonl")]
a, b = loss(sys.argv[1]), loss(sys.argv[2])
d = max(abs(x - y) for x, y in zip(a, b) if x is not None and y is not None)
print("one process:", a, "\ntwo processes:", b, "\nmax |diff|", d)
sys.exit(0 if len(a) == len(b) and d < 1e-2 else 1)' "$e2e/dp-one" "$e2e/dp-two"
}
if [ "$quick" = lease ]; then
  common=(--model-config 3b --device cuda --batch 1 --image-px 448)
  step kernels 140 "$here/gpu-run.sh" "$bin" "$out/kernels"
  step train-3b-2k 60 "$bin" bench train "${common[@]}" --seq 2048 --steps 3 --warmup 1 \
    --json "$out/train-3b-2k.json"
  # The decoder layer's halves as separate ops again (run 8's per-op path, with the gradient
  # sink): the units' time and GPU memory (ops::decoder_attention, ops::decoder_mlp).
  step train-3b-2k-nounit 45 env OMR_ATTN_UNIT=0 OMR_MLP_UNIT=0 "$bin" bench train \
    "${common[@]}" --seq 2048 --steps 3 --warmup 1 --json "$out/train-3b-2k-nounit.json"
  step train-3b-2k-block 60 env OMR_BLOCK_OP=1 "$bin" bench train "${common[@]}" --seq 2048 \
    --steps 3 --warmup 1 --json "$out/train-3b-2k-block.json"
  # Partial checkpointing at T 8192: as many decoder layers kept (not recomputed) as the plan
  # finds room for (35 of 36 on 80 GiB, all 36 on 141 GB). Against train-3b-8k-ckpt below
  # (every layer recomputed, attentions kept).
  step train-3b-8k-kept 50 "$bin" bench train "${common[@]}" --seq 8192 --steps 2 --warmup 1 \
    --activation-checkpointing all --kept-decoder-layers auto --json "$out/train-3b-8k-kept.json"
  step train-3b-8k-wg 50 env OMR_MMA=wg "$bin" bench train "${common[@]}" --seq 8192 \
    --steps 2 --warmup 1 --activation-checkpointing all --json "$out/train-3b-8k-wg.json"
  # GRPO's rollouts on the 3B shape: 4 prompts × a group of 8 (one prefill each), decoding
  # through the in-place key/value cache (the CUDA-core flash kernel over a view of it, split
  # across blocks), the GPU memory next to the plan's rollout phase; transformers' generate on
  # the same prompts (num_return_sequences 8) next to it.
  step gen-3b-lease 70 "$bin" bench generate --model-config 3b --device cuda --rows 32 \
    --group 8 --prompt 512 --image-px 448 --new 128 --repeats 1 --python "$py" \
    --json "$out/gen-3b-lease.json"
  step train-3b-8k-ckpt 110 "$bin" bench train "${common[@]}" --seq 8192 --steps 2 --warmup 1 \
    --activation-checkpointing all --python "$py" --json "$out/train-3b-8k-ckpt.json"
  echo "=== summary"
  printf '%s\n' "${summary[@]}" | tee "$out/summary.txt"
  exit 0
fi
if [ "$quick" = e2e ]; then
  e2e_steps
  echo "=== summary"
  printf '%s\n' "${summary[@]}" | tee "$out/summary.txt"
  exit 0
fi
step kernels 120 "$here/gpu-run.sh" "$bin" /tmp/gpu-run
if [ -n "$quick" ]; then
  step train-tiny 40 "$bin" bench train --device cuda --model-config tiny --steps 3 \
    --json "$out/train-tiny.json"
fi
# B 1 × T 2048 with one 448² image (1024 patches, 256 image tokens).
common=(--model-config 3b --device cuda --batch 1 --image-px 448)
step train-3b-2k 120 "$bin" bench train "${common[@]}" --seq 2048 --steps 4 --warmup 2 \
  --python "$py" --json "$out/train-3b-2k.json"
# The opt-ins not yet measured on a GPU, against the default step above: decoder layers as
# one op (OMR_BLOCK_OP=1, omr_model::block; the model checks of step 1 cover it).
step train-3b-2k-block 90 env OMR_BLOCK_OP=1 "$bin" bench train "${common[@]}" --seq 2048 \
  --steps 4 --warmup 2
# Every weight's gradient through candle's GradStore (zeros + add), as before the sink.
step train-3b-2k-nosink 60 env OMR_GRAD_SINK=0 "$bin" bench train "${common[@]}" --seq 2048 \
  --steps 4 --warmup 2
# The decoder layer's two halves as separate ops, as before the units (ops::decoder_attention,
# ops::decoder_mlp; run 8's default): their time and GPU memory against the default above.
step train-3b-2k-nounit 60 env OMR_ATTN_UNIT=0 OMR_MLP_UNIT=0 "$bin" bench train "${common[@]}" \
  --seq 2048 --steps 4 --warmup 2
if [ -z "$quick" ]; then
  step train-3b-2k-profile 90 "$bin" bench train "${common[@]}" --seq 2048 --steps 3 --warmup 1 \
    --activation-checkpointing all --profile --json "$out/train-3b-2k-profile.json"
  step train-3b-8k-ckpt 120 "$bin" bench train "${common[@]}" --seq 8192 --steps 3 --warmup 1 \
    --activation-checkpointing all --python "$py" --json "$out/train-3b-8k-ckpt.json"
  # The attentions recomputed too (what torch's checkpointing does), and 16 decoder layers not
  # recomputed at all (omr plan: room for 20 on 80 GiB; the lease runs auto).
  step train-3b-8k-recompute-attn 90 "$bin" bench train "${common[@]}" --seq 8192 --steps 3 \
    --warmup 1 --activation-checkpointing all --recompute-attention
  step train-3b-8k-kept16 90 "$bin" bench train "${common[@]}" --seq 8192 --steps 3 --warmup 1 \
    --activation-checkpointing all --kept-decoder-layers 16
  # Four micro-batches per optimizer step (the presets accumulate): the AdamW pass amortised,
  # the fused in-place accumulation timed.
  step train-3b-2k-accum4 60 "$bin" bench train "${common[@]}" --seq 2048 --grad-accum 4 \
    --steps 2 --warmup 1 --json "$out/train-3b-2k-accum4.json"
  # Attention tilings (OMR_MMA, flash_mma::Tiling; checked last in step 1, timed one by one
  # in its bench rows: pick the best forward and backward there for a rerun) and the one-op
  # layers at long rows.
  step train-3b-8k-mma 90 env OMR_MMA=f4x2,b8r64,q4 "$bin" bench train "${common[@]}" --seq 8192 \
    --steps 3 --warmup 1 --activation-checkpointing all
  # The wgmma attention (OMR_MMA=wg, sm_90a; its layout probe and checks end step 1).
  step train-3b-8k-wg 90 env OMR_MMA=wg "$bin" bench train "${common[@]}" --seq 8192 \
    --steps 3 --warmup 1 --activation-checkpointing all
  step train-3b-8k-block 90 env OMR_BLOCK_OP=1 "$bin" bench train "${common[@]}" --seq 8192 \
    --steps 3 --warmup 1 --activation-checkpointing all
  # PERFORMANCE.md's LoRA anchor: 7B, rank 16 on every decoder linear, T 4096 (NeMo ≈ 14.1k
  # tokens/s), checkpointing on both sides.
  step train-7b-lora-4k 150 "$bin" bench train --model-config 7b --device cuda --batch 1 \
    --image-px 448 --seq 4096 --lora-rank 16 --steps 3 --warmup 1 \
    --activation-checkpointing all --python "$py" --json "$out/train-7b-lora-4k.json"
  step train-7b-lora-4k-block 120 env OMR_BLOCK_OP=1 "$bin" bench train --model-config 7b \
    --device cuda --batch 1 --image-px 448 --seq 4096 --lora-rank 16 --steps 3 --warmup 1 \
    --activation-checkpointing all
  # A GRPO policy update's micro-batch: the same step through the fused linear log-prob (its
  # backward recomputes the logits tiles) against train-3b-2k's cross-entropy.
  step train-3b-2k-logps 60 "$bin" bench train "${common[@]}" --seq 2048 --steps 3 --warmup 1 \
    --objective logps --json "$out/train-3b-2k-logps.json"
  # GRPO's rollout engine on the 3B shape: 64 prompts of 1024 tokens (one 448² image) to 256
  # new tokens, the Gumbel-max sampler on the GPU against sampling on the host (the rows read
  # back), with the GPU memory next to the plan's rollout phase.
  step gen-3b 180 "$bin" bench generate --model-config 3b --device cuda --rows 64 \
    --prompt 1024 --image-px 448 --new 256 --python "$py" --json "$out/gen-3b.json"
  step gen-3b-host 150 "$bin" bench generate --model-config 3b --device cuda --rows 64 \
    --prompt 1024 --image-px 448 --new 256 --sampler host --json "$out/gen-3b-host.json"
fi
# Kernel-level profile (CUPTI; scripts/cuda/prof) of the fused 3B step, when built and the
# machine has libcupti (torch's CUDA 13 wheels bring it): calls and time per kernel, GPU busy
# time against the span of the run, the driver calls that cost the host most.
if [ -f "$here/../../.gpu-bin/libomr_prof.so" ]; then
  step prof-3b-2k 120 "$here/prof/run.sh" "$out/prof-3b-2k.txt" "$bin" bench train "${common[@]}" \
    --seq 2048 --steps 2 --warmup 1
fi
[ -z "$quick" ] && e2e_steps
echo "=== summary"
printf '%s\n' "${summary[@]}" | tee "$out/summary.txt"
