//! The plan as `omr plan` prints it, and what to change when it does not fit.

use super::{worst_case, AttentionImpl, Checkpointing, Plan, PlanInput, Trainable, F32, GIB};
use omr_model::lora::LoraConfig;
use std::fmt::Write as _;

/// The plan as a table: both phases by category, the peak and the verdict.
pub fn render(p: &PlanInput, plan: &Plan, device_bytes: u64, headroom: u64) -> String {
    let gib = |b: u64| b as f64 / GIB;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "B {} × T {} tokens, {} patches, {}, attention {}, checkpointing {}, grad_accum {}{}",
        p.batch,
        p.seq,
        p.patches(),
        if p.compute_bytes == F32 {
            "f32 compute"
        } else {
            "bf16 compute, f32 masters"
        },
        match p.attention {
            AttentionImpl::Eager => "eager",
            AttentionImpl::Fused => "fused",
        },
        match p.kept_decoder_layers {
            k if k > 0 && p.checkpointing.decoder() => {
                format!("{} (last {k} decoder layers kept)", p.checkpointing.name())
            }
            _ => p.checkpointing.name().to_string(),
        },
        p.grad_accum,
        if p.world > 1 {
            format!(", {} data-parallel ranks", p.world)
        } else {
            String::new()
        }
    );
    if let Some(g) = &p.grpo {
        let _ = writeln!(
            out,
            "GRPO: policy rows of {} prompt + {} completion tokens ({} scored), {} rows per \
             generation call, {}",
            g.prompt_tokens,
            g.completion_tokens,
            p.labelled,
            g.rollout_rows,
            if g.reference {
                "frozen reference model"
            } else {
                "no reference model"
            }
        );
    }
    let mut phases = vec![
        ("forward + backward", &plan.train_rows, plan.train_peak),
        ("optimizer step", &plan.optim_rows, plan.optim_peak),
    ];
    if !plan.exchange_rows.is_empty() {
        phases.insert(
            1,
            ("gradient exchange", &plan.exchange_rows, plan.exchange_peak),
        );
    }
    if !plan.rollout_rows.is_empty() {
        phases.push((
            "rollout (generation)",
            &plan.rollout_rows,
            plan.rollout_peak,
        ));
    }
    for (title, rows, total) in phases {
        let _ = writeln!(out, "\n| {title:<30} | {:>10} | {:<48} |", "GiB", "");
        let _ = writeln!(out, "|{:-<32}|{:->12}|{:-<50}|", "", "", "");
        for r in rows.iter() {
            let _ = writeln!(
                out,
                "| {:<30} | {:>10.3} | {:<48} |",
                r.category,
                gib(r.bytes),
                r.note
            );
        }
        let _ = writeln!(
            out,
            "| {:<30} | {:>10.3} | {:<48} |",
            "total",
            gib(total),
            ""
        );
    }
    let usable = device_bytes.saturating_sub(headroom);
    let _ = writeln!(
        out,
        "\npeak {:.2} GiB ({}) vs device {:.2} GiB − {:.2} GiB headroom = {:.2} GiB usable: {}",
        gib(plan.peak),
        peak_phase(plan),
        gib(device_bytes),
        gib(headroom),
        gib(usable),
        if plan.peak <= usable {
            "fits"
        } else {
            "does NOT fit"
        }
    );
    out
}

/// The phase the peak is in.
pub fn peak_phase(plan: &Plan) -> &'static str {
    let others = plan.train_peak.max(plan.optim_peak);
    if plan.rollout_peak > others.max(plan.exchange_peak) {
        "rollout (generation)"
    } else if plan.exchange_peak > others {
        "gradient exchange"
    } else if plan.train_peak >= plan.optim_peak {
        "forward + backward"
    } else {
        "optimizer step"
    }
}

/// With decoder checkpointing, the most decoder layers that can keep their activations (not be
/// recomputed) with the worst-case peak still within `usable`, and that peak: what `[train]
/// kept_decoder_layers` can be raised to. None without decoder checkpointing or when `p` itself
/// does not fit.
pub fn most_kept_decoder_layers(p: &PlanInput, usable: u64) -> Option<(usize, u64)> {
    if !p.checkpointing.decoder() {
        return None;
    }
    let peak = |k: usize| {
        let mut q = p.clone();
        q.kept_decoder_layers = k;
        worst_case(&q).1.peak
    };
    // The peak grows with every kept layer: the largest k that fits, by bisection.
    let (mut lo, mut hi) = (p.kept_decoder_layers, p.model.text.num_hidden_layers);
    let mut best = (lo, peak(lo));
    if best.1 > usable {
        return None;
    }
    let top = peak(hi);
    if top <= usable {
        return Some((hi, top));
    }
    while hi - lo > 1 {
        let mid = (lo + hi) / 2;
        let at = peak(mid);
        if at <= usable {
            (lo, best) = (mid, (mid, at));
        } else {
            hi = mid;
        }
    }
    Some(best)
}

/// What to change when a plan does not fit, smallest resulting peak first, each alone, and the
/// three changes that need no smaller batch together. `p` is the image-heavy input; every
/// variant is planned at its worst case.
pub fn suggestions(p: &PlanInput, plan: &Plan, usable: u64) -> Vec<String> {
    let mut out: Vec<(u64, String)> = Vec::new();
    let try_with = |f: &dyn Fn(&mut PlanInput)| {
        let mut q = p.clone();
        f(&mut q);
        worst_case(&q).1.peak
    };
    let push = |out: &mut Vec<(u64, String)>, peak: u64, what: String| {
        if peak < plan.peak {
            let fits = if peak <= usable {
                "fits"
            } else {
                "still too large"
            };
            out.push((
                peak,
                format!("{what}: {:.2} GiB ({fits})", peak as f64 / GIB),
            ));
        }
    };
    if p.attention == AttentionImpl::Eager {
        push(
            &mut out,
            try_with(&|q| q.attention = AttentionImpl::Fused),
            "fused attention (the CUDA kernels)".into(),
        );
    }
    if p.checkpointing != Checkpointing::All {
        push(
            &mut out,
            try_with(&|q| q.checkpointing = Checkpointing::All),
            "train.activation_checkpointing = \"all\"".into(),
        );
    }
    if p.checkpointing.decoder() && p.kept_decoder_layers > 0 {
        push(
            &mut out,
            try_with(&|q| q.kept_decoder_layers = 0),
            "train.kept_decoder_layers = 0 (every checkpointed layer recomputed)".into(),
        );
    }
    if p.checkpointing != Checkpointing::None
        && p.attention == AttentionImpl::Fused
        && !p.recompute_attention
    {
        push(
            &mut out,
            try_with(&|q| q.recompute_attention = true),
            "train.recompute_attention = true (attention outputs not kept)".into(),
        );
    }
    if p.batch > 1 {
        let half = p.batch / 2;
        push(
            &mut out,
            try_with(&|q| {
                q.labelled = q.labelled / q.batch * half;
                q.batch = half;
                q.grad_accum *= 2;
            }),
            match p.grpo {
                None => format!("data.batch.batch_size = {half} (and double train.grad_accum)"),
                Some(_) => format!("grpo.micro_batch_size = {half}"),
            },
        );
    }
    if let Some(g) = p.grpo.as_ref().filter(|g| g.rollout_rows > 1) {
        let half = g.rollout_rows / 2;
        push(
            &mut out,
            try_with(&|q| {
                if let Some(g) = q.grpo.as_mut() {
                    g.rollout_rows = half;
                }
            }),
            format!("grpo.generation_batch_size = {half}"),
        );
    }
    if let Some(g) = p.grpo.as_ref().filter(|g| g.completion_tokens >= 256) {
        let half = g.completion_tokens / 2;
        push(
            &mut out,
            try_with(&|q| {
                q.seq -= half;
                q.labelled = q.labelled / (half * 2) * half;
                if let Some(g) = q.grpo.as_mut() {
                    g.completion_tokens = half;
                }
            }),
            format!("grpo.max_completion_length = {half}"),
        );
    }
    if p.seq >= 256 && p.grpo.is_none() {
        let half = p.seq / 2;
        push(
&mut out,
            try_with(&|q| {
                q.labelled = q.labelled * half / q.seq;
                q.seq = half;
                while q.images_per_row > 0 && q.image_tokens_per_row() + 2 * q.images_per_row > half {
                    q.images_per_row -= 1;
                }
            }),
            format!("max_length {half} (data.batch.max_length when packing, data.process.max_length when padding)"),
        );
    }
    if p.lora.is_none() {
        push(
            &mut out,
            try_with(&|q| {
                q.trainable = Trainable {
                    vision: false,
                    merger: false,
                    language: false,
                };
                q.lora = Some(LoraConfig {
                    r: 16,
                    alpha: 32.0,
                    dropout: 0.0,
                    targets: vec!["all-linear".into()],
                })
            }),
            "LoRA r = 16 on all-linear ([model.lora])".into(),
        );
    }
    if out.iter().all(|(peak, _)| *peak > usable) {
        let lora = LoraConfig {
            r: 16,
            alpha: 32.0,
            dropout: 0.0,
            targets: vec!["all-linear".into()],
        };
        push(
            &mut out,
            try_with(&|q| {
                q.attention = AttentionImpl::Fused;
                q.checkpointing = Checkpointing::All;
                q.trainable = Trainable {
                    vision: false,
                    merger: false,
                    language: false,
                };
                q.lora = Some(lora.clone());
            }),
            "fused attention + checkpointing \"all\" + LoRA r = 16 together".into(),
        );
    }
    out.sort_by_key(|(peak, _)| *peak);
    out.into_iter().map(|(_, s)| s).collect()
}

/// "80GiB", "141GB", "24G", "512MiB", "1e9" → bytes.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let x: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a size (e.g. 80GiB, 141GB)"))?;
    let mul = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kib" => 1024.0,
        "kb" => 1e3,
        "m" | "mib" => 1024.0 * 1024.0,
        "mb" => 1e6,
        "g" | "gib" => GIB,
        "gb" => 1e9,
        "t" | "tib" => GIB * 1024.0,
        "tb" => 1e12,
        u => {
            return Err(format!(
                "`{s}`: unknown unit `{u}` (B, KiB, MiB, GiB, TiB, KB, MB, GB, TB)"
            ))
        }
    };
    if !(x.is_finite() && x >= 0.0) {
        return Err(format!("`{s}` is not a size"));
    }
    Ok((x * mul) as u64)
}

/// Why `what` (a config's name) does not fit: the plan's peak against the usable memory, and
/// what each change of [`suggestions`] gives (`omr plan`'s refusal, and a run's at start-up).
pub fn refusal(what: &str, p: &PlanInput, plan: &Plan, usable: u64) -> String {
    let tips = suggestions(p, plan, usable);
    let mut msg = format!(
        "{what} needs {:.2} GiB at its peak but the device has {:.2} GiB usable",
        plan.peak as f64 / GIB,
        usable as f64 / GIB
    );
    if !tips.is_empty() {
        msg.push_str("; what each change gives:\n  - ");
        msg.push_str(&tips.join("\n  - "));
    }
    msg
}
