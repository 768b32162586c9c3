"""The reference side of `omr bench train`: the same training step in torch + transformers.

Builds `Qwen2_5_VLForConditionalGeneration` (or Qwen2-VL) from the same config.json with random
weights, reads the batch our side wrote (input_ids, attention_mask, labels, pixel_values,
image_grid_thw as safetensors), and runs warm-up + timed steps of forward + loss + backward +
AdamW (clip_grad_norm_ 1.0). `--precision fp32` (the default, what our side computes today)
or `bf16` (fp32 master weights under bf16 autocast, as a typical GPU node trains). On CUDA:
fused AdamW, SDPA attention, CUDA events after warm-up; on CPU: eager attention (what our CPU
path computes), wall-clock. Prints one JSON object on stdout.

    python scripts/bench/train_step.py --config configs/models/qwen2.5-vl-3b.json \
        --batch batch.safetensors --steps 10 --warmup 2 [--device cuda] [--threads N]
        [--precision fp32|bf16] [--freeze-vision] [--freeze-language] [--lora-rank R]
        [--grad-accum K]

`--grad-accum K`: K forward + backward passes of the batch per optimizer step, each loss
divided by K (the mean over the accumulated batch, as every micro-batch has the same labelled
tokens), then one clip and AdamW step; tokens per step count every micro-batch.

`--lora-rank R`: the base frozen and a LoRA adapter (PEFT's math and init: A Kaiming-uniform,
B zero, scale alpha / r with alpha = 2r) on every linear layer of the language model's decoder
layers, as our `all-linear`; written here so that no PEFT install is needed.
"""

import argparse
import json
import math
import resource
import statistics
import sys
import time

import torch
from safetensors.torch import load_file


class LoraLinear(torch.nn.Module):
    """base(x) + scale · B(A(x)), the base frozen (PEFT's LoRA without dropout)."""

    def __init__(self, base, r, alpha, dev):
        super().__init__()
        self.base = base
        self.lora_A = torch.nn.Linear(base.in_features, r, bias=False, device=dev)
        self.lora_B = torch.nn.Linear(r, base.out_features, bias=False, device=dev)
        torch.nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        torch.nn.init.zeros_(self.lora_B.weight)
        self.scale = alpha / r

    def forward(self, x):
        return self.base(x) + self.lora_B(self.lora_A(x)) * self.scale


def add_lora(model, r, alpha, dev):
    """LoRA on every nn.Linear of the language model's decoder layers (not the vision tower,
    not the head): the modules our `all-linear` selects."""
    chosen = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and "visual" not in name and ".layers." in name
    ]
    if not chosen:
        sys.exit("--lora-rank: no linear layer of the language model found")
    for name, m in chosen:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, LoraLinear(m, r, alpha, dev))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--batch", required=True)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--freeze-vision", action="store_true")
    ap.add_argument("--freeze-language", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--lora-rank", type=int, default=0)
    ap.add_argument("--grad-accum", type=int, default=1)
    a = ap.parse_args()

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
    cfg.use_cache = False
    # Initialised on the device itself: a 7B model's random init on the CPU takes minutes.
    with torch.device(dev):
        model = cls._from_config(cfg, attn_implementation=attn, torch_dtype=torch.float32)
    model.to(torch.float32)
    model.train()
    if a.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = a.lora_rank > 0
    for name, p in model.named_parameters():
        vision = "visual" in name
        if lora or (vision and a.freeze_vision) or (not vision and a.freeze_language):
            p.requires_grad_(False)
    if lora:
        add_lora(model, a.lora_rank, 2.0 * a.lora_rank, dev)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0, fused=cuda)

    batch = {k: v.to(dev) for k, v in load_file(a.batch).items()}
    if a.grad_accum < 1:
        sys.exit("--grad-accum must be at least 1")
    tokens = int(batch["input_ids"].numel()) * a.grad_accum

    def sync():
        if cuda:
            torch.cuda.synchronize()

    bf16 = a.precision == "bf16"

    def step():
        total = 0.0
        for _ in range(a.grad_accum):
            with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=bf16):
                out = model(**batch)
            (out.loss / a.grad_accum).backward()
            total += float(out.loss.detach())
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return total / a.grad_accum

    losses = []
    for _ in range(a.warmup):
        losses.append(step())
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(a.steps):
        if cuda:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            losses.append(step())
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000.0)
        else:
            t0 = time.perf_counter()
            losses.append(step())
            times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if cuda
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    )
    print(
        json.dumps(
            {
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "device": str(dev),
                "attention": attn,
                "precision": "bf16 autocast, fp32 masters" if bf16 else "fp32",
                "threads": torch.get_num_threads(),
                "params": sum(p.numel() for p in model.parameters()),
                "trainable": sum(p.numel() for p in params),
                "grad_accum": a.grad_accum,
                "tokens_per_step": tokens,
                "step_s": times,
                "median_step_s": med,
                "tokens_per_s": tokens / med,
                "losses": losses,
                "peak_mib": peak,
                "peak_kind": "torch.cuda.max_memory_allocated" if cuda else "process peak RSS",
            }
        )
    )


if __name__ == "__main__":
    main()
