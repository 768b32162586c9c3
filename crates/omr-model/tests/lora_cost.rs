//! What a LoRA step costs next to a full step on the same model and batch: peak heap bytes
//! (a counting global allocator, this test binary only) and wall time of forward + backward.
//! The frozen base must cost no weight gradients (CANDLE.md §5), so the LoRA peak has to be
//! clearly lower. Prints the measurement; `cargo test -p omr-model --release --test lora_cost
//! -- --nocapture` gives the numbers the README quotes.

use candle_core::Device;
use omr_model::lora::{self, LoraConfig};
use omr_model::tiny::{TinySpec, TokenIds};
use omr_model::{loss, Ctx, Input, Qwen2VL};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::Instant;

struct Counting;
static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            let now = CURRENT.fetch_add(l.size(), Relaxed) + l.size();
            PEAK.fetch_max(now, Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) };
        CURRENT.fetch_sub(l.size(), Relaxed);
    }
}

#[global_allocator]
static A: Counting = Counting;

/// Peak bytes above the starting point and seconds of one forward + backward.
fn step(model: &Qwen2VL, input: &Input, labels: &[Vec<i64>]) -> (usize, f64) {
    let base = CURRENT.load(Relaxed);
    PEAK.store(base, Relaxed);
    let t = Instant::now();
    let logits = model.forward(input, &Ctx::default()).unwrap();
    let (sum, n) = loss::causal_lm_loss(&logits, labels).unwrap();
    let grads = (sum / n as f64).unwrap().backward().unwrap();
    let secs = t.elapsed().as_secs_f64();
    drop(grads);
    (PEAK.load(Relaxed) - base, secs)
}

#[test]
fn lora_backward_costs_less_than_full_backward() {
    let ids = TokenIds {
        vocab_size: 4096,
        image: 4090,
        video: 4091,
        vision_start: 4092,
        vision_end: 4093,
        bos: 4094,
        eos: vec![4095],
    };
    let spec = TinySpec {
        hidden_size: 256,
        num_hidden_layers: 4,
        intermediate_size: 768,
        tie_word_embeddings: false,
        ..TinySpec::default()
    };
    let dev = Device::Cpu;
    let (cfg, mut params) = spec.build(&ids, 1, &dev).unwrap();
    let (b, t) = (1, 64);
    let rows: Vec<Vec<u32>> = (0..b)
        .map(|r| (0..t).map(|i| ((i * 131 + r * 17) % 4000) as u32).collect())
        .collect();
    let labels: Vec<Vec<i64>> = rows
        .iter()
        .map(|r| r.iter().map(|&x| x as i64).collect())
        .collect();
    let input = Input::padded(rows, &vec![vec![1; t]; b], None, vec![]).unwrap();

    let full = Qwen2VL::new(&cfg, &params).unwrap();
    step(&full, &input, &labels); // warm-up
    let (full_peak, full_s) = step(&full, &input, &labels);
    drop(full);

    let lcfg = LoraConfig {
        r: 8,
        alpha: 16.0,
        dropout: 0.0,
        targets: vec!["all-linear".into()],
    };
    lora::apply(&mut params, &cfg, &lcfg, 2).unwrap();
    let adapted = Qwen2VL::new(&cfg, &params).unwrap();
    step(&adapted, &input, &labels);
    let (lora_peak, lora_s) = step(&adapted, &input, &labels);
    let (all, trainable) = params.counts();
    println!(
        "forward+backward, B={b} T={t}, {all} parameters ({trainable} LoRA):\n  \
         full: peak {:.1} MiB, {:.3} s\n  LoRA r=8 all-linear: peak {:.1} MiB, {:.3} s \
         ({:.2}x memory, {:.2}x time)",
        full_peak as f64 / 1048576.0,
        full_s,
        lora_peak as f64 / 1048576.0,
        lora_s,
        lora_peak as f64 / full_peak as f64,
        lora_s / full_s
    );
    assert!(
        (lora_peak as f64) < 0.8 * full_peak as f64,
        "a LoRA backward must not pay for base weight gradients: {lora_peak} vs {full_peak} bytes"
    );
}
