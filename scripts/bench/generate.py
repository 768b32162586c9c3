"""The reference side of `omr bench generate`: the same rollout with transformers' `generate`.

Builds `Qwen2_5_VLForConditionalGeneration` (or Qwen2-VL) from the same config.json with random
weights, reads the prompts our side wrote (input_ids, attention_mask, pixel_values,
image_grid_thw as safetensors) and times `generate` the way our side times itself: one call
with one new token (the prefill) and one with `--new` tokens, sampling at `--temperature`,
no end-of-sequence id (every row runs to the limit), medians of `--repeats` after one warm-up;
decoding ms a step = (full − prefill) / (new − 1). On CUDA: bf16 weights, SDPA attention,
transformers' default dynamic cache; on CPU: fp32, eager attention. Prints one JSON object on
stdout.

    python scripts/bench/generate.py --config configs/models/qwen2.5-vl-3b.json \
        --batch prompts.safetensors --new 256 [--temperature 1.0] [--repeats 3]
        [--device cuda] [--threads N] [--seed 0] [--group G]

`--group G`: G completions of each prompt (`num_return_sequences`, GRPO's group; transformers
expands the prompts before the prefill).
"""

import argparse
import json
import statistics
import sys
import time

import torch
from safetensors.torch import load_file


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--batch", required=True)
    ap.add_argument("--new", type=int, required=True)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--group", type=int, default=1)
    a = ap.parse_args()
    if a.new < 2:
        sys.exit("--new must be at least 2")

    import transformers
    from transformers import AutoConfig

    if a.threads > 0:
        torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    dev = torch.device(a.device)
    cuda = dev.type == "cuda"
    cfg = AutoConfig.from_pretrained(a.config)
    attn = "sdpa" if cuda else "eager"
    if cfg.model_type == "qwen2_5_vl":
        cls = transformers.Qwen2_5_VLForConditionalGeneration
    elif cfg.model_type == "qwen2_vl":
        cls = transformers.Qwen2VLForConditionalGeneration
    else:
        sys.exit(f"unsupported model_type {cfg.model_type}")
    cfg._attn_implementation = attn
    dtype = torch.bfloat16 if cuda else torch.float32
    with torch.device(dev):
        model = cls._from_config(cfg, attn_implementation=attn, torch_dtype=dtype)
    model.to(dtype)
    model.eval()

    batch = {k: v.to(dev) for k, v in load_file(a.batch).items() if k != "labels"}
    if "pixel_values" in batch:
        batch["pixel_values"] = batch["pixel_values"].to(dtype)
    rows = int(batch["input_ids"].shape[0]) * a.group

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def timed(n):
        sync()
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(
                **batch,
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=True,
                temperature=a.temperature,
                top_k=0,
                top_p=1.0,
                eos_token_id=None,
                pad_token_id=0,
                num_return_sequences=a.group,
            )
        sync()
        dt = time.perf_counter() - t0
        got = out.shape[1] - batch["input_ids"].shape[1]
        if got != n:
            sys.exit(f"generate made {got} tokens, not {n}")
        return dt

    timed(2)
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    def median(n):
        return statistics.median(timed(n) for _ in range(max(1, a.repeats)))

    prefill = median(1)
    full = median(a.new)
    print(
        json.dumps(
            {
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "device": str(dev),
                "attention": attn,
                "dtype": str(dtype).replace("torch.", ""),
                "rows": rows,
                "new": a.new,
                "prefill_ms": prefill * 1e3,
                "decode_ms_per_step": (full - prefill) / (a.new - 1) * 1e3,
                "new_tokens_per_s": rows * a.new / full,
                "call_s": full,
                "peak_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
            }
        )
    )


if __name__ == "__main__":
    main()
