//! Dermatology-photo-like images and their three tasks (diagnosis, management, risk).
//!
//! One lesion on a textured skin tone: a benign nevus (small, round, evenly brown), a melanoma
//! (large, asymmetric wobbly border, black/brown/blue-grey blotches: the ABCD signs), a basal
//! cell carcinoma (pearly pink nodule, central ulcer, fine red vessels) or a haemangioma
//! (bright red lobules). The field of view is 30 mm, so the stated diameters follow the radius.

use super::{link, pick, vignette, Built, Fact, Importance, Scene as AnyScene};
use crate::synth::draw::{mix, Canvas, Rgb};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use std::f32::consts::TAU;

const FIELD_MM: f32 = 30.0;
const TONES: [&Rgb; 4] = [
    &[235.0, 200.0, 175.0],
    &[215.0, 170.0, 140.0],
    &[185.0, 135.0, 105.0],
    &[240.0, 212.0, 192.0],
];
const COMPLAINTS: [&str; 4] = [
    "has a skin lesion on the back",
    "has a skin lesion on the arm",
    "has a skin lesion on the face",
    "has a skin lesion on the leg",
];

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Nevus,
    Melanoma,
    Bcc,
    Haemangioma,
}
const KINDS: [Kind; 4] = [Kind::Nevus, Kind::Melanoma, Kind::Bcc, Kind::Haemangioma];

pub(crate) struct Scene {
    kind: Kind,
    u: f32,
    v: f32,
    /// Radius as a fraction of the width.
    r: f32,
    tone: Rgb,
    /// Border wobble (amplitude, phase) for harmonics 2, 3 and 5 (melanoma only).
    wobble: [(f32, f32); 3],
    /// Kind-specific parts in units of `r` around the centre: melanoma blotches and
    /// haemangioma lobules are `[du, dv, radius, colour index]`, BCC vessels are chords
    /// `[angle0, angle1, depth, 0]`.
    parts: Vec<[f32; 4]>,
}

fn lesion(rng: &mut ChaCha8Rng, kind: Kind) -> (Scene, Fact, Fact) {
    let r = match kind {
        Kind::Nevus => rng.random_range(0.055..0.075),
        Kind::Melanoma => rng.random_range(0.16..0.22),
        Kind::Bcc => rng.random_range(0.09..0.12),
        Kind::Haemangioma => rng.random_range(0.10..0.14),
    };
    let (u, v) = (rng.random_range(0.4..0.6), rng.random_range(0.4..0.6));
    let wobble = std::array::from_fn(|k| {
        (
            rng.random_range(0.06..0.12) / (k as f32 + 1.0).sqrt(),
            rng.random_range(0.0..TAU),
        )
    });
    let parts = match kind {
        Kind::Melanoma => (0..rng.random_range(4..7))
            .map(|i| {
                [
                    rng.random_range(-0.5..0.5),
                    rng.random_range(-0.5..0.5),
                    rng.random_range(0.25..0.45),
                    (i % 3) as f32,
                ]
            })
            .collect(),
        Kind::Haemangioma => (0..rng.random_range(3..6))
            .map(|_| {
                [
                    rng.random_range(-0.35..0.35),
                    rng.random_range(-0.35..0.35),
                    rng.random_range(0.5..0.7),
                    0.0,
                ]
            })
            .collect(),
        Kind::Bcc => (0..rng.random_range(3..6))
            .map(|_| {
                [
                    rng.random_range(0.0..TAU),
                    rng.random_range(0.0..TAU),
                    rng.random_range(0.5..0.85),
                    0.0,
                ]
            })
            .collect(),
        Kind::Nevus => Vec::new(),
    };
    let tone = *pick(rng, &TONES);
    let what = match kind {
        Kind::Nevus => "a small, round, evenly brown lesion with a smooth border",
        Kind::Melanoma => {
            "an asymmetric lesion with an irregular border and black, brown and blue-grey areas"
        }
        Kind::Bcc => "a pearly pink nodule with a central ulcer and fine red surface vessels",
        Kind::Haemangioma => "a bright red, smooth, lobulated lesion",
    };
    let f = Fact::core(
        "appearance of the lesion",
        format!("The image shows {what}."),
        format!("the skin shows {what}"),
    );
    let mm = (2.0 * r * FIELD_MM).round() as u32;
    let size = format!("the lesion is about {mm} mm wide");
    let s = Fact::supporting(
        "lesion diameter",
        format!("The lesion is about {mm} mm wide."),
        size,
    );
    (
        Scene {
            kind,
            u,
            v,
            r,
            tone,
            wobble,
            parts,
        },
        f,
        s,
    )
}

fn dx(kind: Kind) -> (&'static str, &'static str, &'static str) {
    match kind {
        Kind::Nevus => (
            "benign melanocytic nevus",
            "a small, symmetric, evenly brown lesion with a smooth border is a benign nevus",
            "the lesion is small, symmetric and evenly brown",
        ),
        Kind::Melanoma => (
            "melanoma",
            "asymmetry, an irregular border, several colours and a diameter over 6 mm suggest melanoma",
            "the lesion is asymmetric, irregular, multicoloured and over 6 mm",
        ),
        Kind::Bcc => (
            "basal cell carcinoma",
            "a pearly nodule with central ulceration and fine surface vessels is a basal cell carcinoma",
            "the lesion is a pearly ulcerated nodule with fine vessels",
        ),
        Kind::Haemangioma => {
            ("haemangioma", "a bright red, soft, lobulated vascular lesion is a haemangioma", "the lesion is bright red and lobulated")
        }
    }
}

/// A task's own rule: its rubric topic and the clause for each kind.
type SecondRule = (&'static str, fn(Kind) -> &'static str);

/// Shared body: draw the kind uniformly; with `second` the trace states the diagnostic rule as
/// supporting knowledge and the task's own rule as core.
fn kind_task(
    rng: &mut ChaCha8Rng,
    stem: &str,
    choices: Vec<&'static str>,
    second: Option<SecondRule>,
) -> Built {
    let correct = rng.random_range(0..KINDS.len());
    let kind = KINDS[correct];
    let stem = format!("{} {stem}", vignette(rng, &COMPLAINTS));
    let (scene, finding, size) = lesion(rng, kind);
    let (name, dx_clause, because) = dx(kind);
    let (findings, rules, because) = match second {
        None => (
            vec![finding, size],
            vec![Fact::rule("diagnostic rule", dx_clause, Importance::Core)],
            because.to_string(),
        ),
        Some((topic, rule)) => (
            vec![finding],
            vec![
                Fact::rule("diagnostic rule", dx_clause, Importance::Supporting),
                Fact::rule(topic, rule(kind), Importance::Core),
            ],
            format!("this looks like {}", with_article(name)),
        ),
    };
    Built {
        stem,
        correct,
        findings,
        rules,
        link: link(&because, choices[correct]),
        choices,
        scene: AnyScene::Skin(scene),
    }
}

fn with_article(name: &str) -> String {
    match name.chars().next() {
        Some('a' | 'e' | 'i' | 'o' | 'u') => format!("an {name}"),
        _ => format!("a {name}"),
    }
}

pub(crate) fn diagnosis(rng: &mut ChaCha8Rng) -> Built {
    let choices = KINDS.iter().map(|&k| dx(k).0).collect();
    kind_task(
        rng,
        "Which diagnosis best fits this skin lesion?",
        choices,
        None,
    )
}

pub(crate) fn management(rng: &mut ChaCha8Rng) -> Built {
    let choices = vec![
        "reassurance and routine skin checks",
        "excisional biopsy with narrow margins",
        "Mohs surgery",
        "observation",
    ];
    fn rule(k: Kind) -> &'static str {
        match k {
            Kind::Nevus => "a benign-looking nevus needs only reassurance and routine skin checks",
            Kind::Melanoma => "a suspected melanoma needs an excisional biopsy with narrow margins",
            Kind::Bcc => "basal cell carcinoma on sun-exposed skin is treated with Mohs surgery",
            Kind::Haemangioma => "most haemangiomas regress, so observation is enough",
        }
    }
    kind_task(
        rng,
        "What is the best management?",
        choices,
        Some(("management rule", rule)),
    )
}

pub(crate) fn risk(rng: &mut ChaCha8Rng) -> Built {
    let choices = vec![
        "negligible, a benign melanocytic lesion",
        "high, it can metastasise early",
        "very low, it grows only locally",
        "negligible, a benign vascular tumour",
    ];
    fn rule(k: Kind) -> &'static str {
        match k {
            Kind::Nevus => "a benign nevus does not metastasise",
            Kind::Melanoma => "melanoma can spread early through lymph and blood",
            Kind::Bcc => "basal cell carcinoma invades locally and almost never metastasises",
            Kind::Haemangioma => {
                "a haemangioma is a benign vascular tumour that does not metastasise"
            }
        }
    }
    kind_task(
        rng,
        "What is this lesion's risk of spreading to distant sites?",
        choices,
        Some(("risk rule", rule)),
    )
}

pub(crate) fn render(s: &Scene, w: u32, h: u32, rng: &mut ChaCha8Rng) -> Canvas {
    let (fa, fb, ph): (f32, f32, f32) = (
        rng.random_range(60.0..90.0),
        rng.random_range(60.0..90.0),
        rng.random_range(0.0..TAU),
    );
    let tone = s.tone;
    let mut c = Canvas::from_fn(w, h, |u, v| {
        // Fine skin creases: a faint cross-hatch of slightly darker lines.
        let crease = ((u * fa + v * 20.0 + ph).sin() * (v * fb - u * 15.0).sin())
            .max(0.0)
            .powi(8);
        mix(tone, [tone[0] * 0.85, tone[1] * 0.8, tone[2] * 0.8], crease)
    });
    let wf = w as f32;
    let (x, y, r) = (c.x(s.u), c.y(s.v), s.r * wf);
    let at = |p: &[f32; 4]| (x + p[0] * r, y + p[1] * r, p[2] * r);
    match s.kind {
        Kind::Nevus => {
            c.disc(x, y, r, [130.0, 85.0, 55.0], 0.95, 1.5);
            c.disc(x, y, r * 0.6, [112.0, 70.0, 45.0], 0.4, r * 0.4);
        }
        Kind::Melanoma => {
            let wob = s.wobble;
            let m = r * 1.5;
            c.blend(
                (x - m, y - m, x + m, y + m),
                [95.0, 55.0, 35.0],
                |px, py| {
                    let (dx, dy) = (px - x, py - y);
                    let t = dy.atan2(dx);
                    let k = [2.0f32, 3.0, 5.0];
                    let edge = r
                        * (1.0
                            + (0..3)
                                .map(|i| wob[i].0 * (k[i] * t + wob[i].1).sin())
                                .sum::<f32>());
                    0.95 * crate::synth::draw::ramp(edge - (dx * dx + dy * dy).sqrt())
                },
            );
            let colors: [Rgb; 3] = [
                [35.0, 25.0, 25.0],
                [95.0, 105.0, 125.0],
                [150.0, 100.0, 70.0],
            ];
            for p in &s.parts {
                let (bx, by, br) = at(p);
                c.disc(bx, by, br, colors[p[3] as usize % 3], 0.8, br * 0.5);
            }
        }
        Kind::Bcc => {
            c.disc(x, y, r, [245.0, 200.0, 195.0], 0.9, 2.0);
            c.disc(x, y, r * 0.8, [228.0, 160.0, 160.0], 0.9, r * 0.2);
            for p in &s.parts {
                let (a0, a1, d) = (p[0], p[1], p[2] * r);
                c.line(
                    x + a0.cos() * d,
                    y + a0.sin() * d,
                    x + a1.cos() * d,
                    y + a1.sin() * d,
                    (wf * 0.005).max(1.0),
                    [200.0, 40.0, 50.0],
                    0.9,
                );
            }
            c.disc(x, y, r * 0.28, [120.0, 40.0, 40.0], 0.95, 1.5);
        }
        Kind::Haemangioma => {
            for p in &s.parts {
                let (bx, by, br) = at(p);
                c.disc(bx, by, br, [205.0, 30.0, 45.0], 0.95, 1.5);
                c.disc(
                    bx - br * 0.3,
                    by - br * 0.3,
                    br * 0.25,
                    [240.0, 90.0, 100.0],
                    0.5,
                    br * 0.2,
                );
            }
        }
    }
    c.noise(rng, 8.0, false);
    c
}
