//! Chart images: a four-bar chart (which bar is highest) and a five-visit creatinine line chart
//! with a dashed upper limit of normal (trend, kidney risk, next step).
//!
//! Charts carry no text labels (no font rendering): the stem names the bars by position and
//! the dashed line's meaning, so reading the chart needs only the geometry. The tallest bar
//! wins by a clear margin and the line patterns are well separated, so a small model can read
//! them from a 224 px image.

use super::{link, ordinal, pick, vignette, Built, Fact, Importance, Scene as AnyScene};
use crate::synth::draw::{gray, Canvas, Rgb};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

pub(crate) struct Bars {
    /// Bar heights as fractions of the plot height, left to right.
    values: [f32; 4],
    color: Rgb,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Pattern {
    Rise,
    Fall,
    Stable,
    Spike,
}

pub(crate) struct Line {
    /// Creatinine at five visits as fractions of the plot height; the normal limit is 0.5.
    values: [f32; 5],
}

const PATTERNS: [Pattern; 4] = [
    Pattern::Rise,
    Pattern::Fall,
    Pattern::Stable,
    Pattern::Spike,
];
const PALETTE: [&Rgb; 4] = [
    &[70.0, 110.0, 180.0],
    &[200.0, 90.0, 60.0],
    &[80.0, 150.0, 90.0],
    &[120.0, 80.0, 160.0],
];
const LIMIT: f32 = 0.5;
const COMPLAINTS: [&str; 4] = [
    "has diabetes",
    "has high blood pressure",
    "was admitted with pneumonia",
    "takes ibuprofen daily",
];
const LINE_STEM: &str = "The chart plots serum creatinine at five visits; the dashed line is the upper limit of normal.";

fn argmin(xs: &[f32]) -> usize {
    (0..xs.len()).fold(0, |m, i| if xs[i] < xs[m] { i } else { m })
}
fn argmax(xs: &[f32]) -> usize {
    (0..xs.len()).fold(0, |m, i| if xs[i] > xs[m] { i } else { m })
}

pub(crate) fn highest_bar(rng: &mut ChaCha8Rng) -> Built {
    let choices = vec!["ward 1", "ward 2", "ward 3", "ward 4"];
    let correct = rng.random_range(0..4usize);
    let metric = pick(
        rng,
        &[
            "infection rate",
            "readmission rate",
            "fall rate",
            "average length of stay",
        ],
    );
    let top = rng.random_range(0.7..0.95);
    let mut values = [0.0f32; 4];
    // Redraw until the shortest bar is clearly shortest, so the supporting finding is readable.
    for _ in 0..16 {
        values = std::array::from_fn(|i| {
            if i == correct {
                top
            } else {
                rng.random_range(0.15..top - 0.12)
            }
        });
        let lo = argmin(&values);
        if values
            .iter()
            .enumerate()
            .all(|(i, &x)| i == lo || x - values[lo] >= 0.05)
        {
            break;
        }
    }
    let low = argmin(&values);
    let stem = format!(
        "The bar chart shows the {metric} in four wards, from ward 1 on the left to ward 4 on the right. Which ward has the highest value?"
    );
    let tallest = format!("the {} bar from the left is the tallest", ordinal(correct));
    let shortest = format!("the {} bar is the shortest", ordinal(low));
    Built {
        stem,
        findings: vec![
            Fact::core(
                "tallest bar",
                format!("The image shows that {tallest}."),
                tallest.clone(),
            ),
            Fact::supporting(
                "shortest bar",
                format!("The image shows that {shortest}."),
                shortest,
            ),
        ],
        rules: vec![Fact::rule(
            "reading a bar chart",
            "bar height encodes the value, so the tallest bar has the highest value",
            Importance::Core,
        )],
        link: link(&tallest, choices[correct]),
        choices,
        correct,
        scene: AnyScene::Bars(Bars {
            values,
            color: *pick(rng, &PALETTE),
        }),
    }
}

fn line_values(rng: &mut ChaCha8Rng, p: Pattern) -> [f32; 5] {
    let jitter = |rng: &mut ChaCha8Rng| rng.random_range(-0.02..0.02);
    match p {
        Pattern::Rise | Pattern::Fall => {
            let (y0, step) = (rng.random_range(0.15..0.3), rng.random_range(0.12..0.17));
            let up: [f32; 5] = std::array::from_fn(|i| y0 + step * i as f32);
            let mut v = up.map(|y| y + jitter(rng));
            if p == Pattern::Fall {
                v.reverse();
            }
            v
        }
        Pattern::Stable => {
            let base = rng.random_range(0.22..0.36);
            std::array::from_fn(|_| base + rng.random_range(-0.04..0.04))
        }
        Pattern::Spike => {
            let base = rng.random_range(0.2..0.32);
            let at = rng.random_range(1..=3usize);
            std::array::from_fn(|i| {
                if i == at {
                    rng.random_range(0.75..0.9)
                } else {
                    base + jitter(rng)
                }
            })
        }
    }
}

/// Shared part of the three line-chart tasks: pattern, values, core and supporting findings.
fn line_task(rng: &mut ChaCha8Rng) -> (usize, Pattern, Line, Vec<Fact>) {
    let correct = rng.random_range(0..4usize);
    let p = PATTERNS[correct];
    let values = line_values(rng, p);
    let clause = match p {
        Pattern::Rise => {
            "the line climbs at every visit and ends above the dashed normal limit".to_string()
        }
        Pattern::Fall => {
            "the line drops at every visit and ends below the dashed normal limit".to_string()
        }
        Pattern::Stable => {
            "the line stays flat and below the dashed normal limit at all visits".to_string()
        }
        Pattern::Spike => format!(
            "the line jumps above the dashed normal limit at visit {} and then returns below it",
            argmax(&values) + 1
        ),
    };
    let peak = format!("the highest value is at visit {}", argmax(&values) + 1);
    let findings = vec![
        Fact::core(
            "shape of the trend",
            format!("The image shows that {clause}."),
            clause,
        ),
        Fact::supporting("peak visit", format!("The image shows that {peak}."), peak),
    ];
    (correct, p, Line { values }, findings)
}

fn pattern_because(p: Pattern) -> &'static str {
    match p {
        Pattern::Rise => "the creatinine climbs at every visit",
        Pattern::Fall => "the creatinine drops at every visit",
        Pattern::Stable => "the creatinine stays flat within normal",
        Pattern::Spike => "the creatinine rises once and comes back to normal",
    }
}

pub(crate) fn trend(rng: &mut ChaCha8Rng) -> Built {
    let choices = vec![
        "a steady rise",
        "a steady fall",
        "stable values",
        "a single transient spike",
    ];
    let (correct, p, line, findings) = line_task(rng);
    Built {
        stem: format!(
            "{} {LINE_STEM} Which pattern does it show?",
            vignette(rng, &COMPLAINTS)
        ),
        findings,
        rules: vec![Fact::rule(
            "reading the chart",
            "the dashed line marks the upper limit of normal creatinine",
            Importance::Core,
        )],
        link: link(pattern_because(p), choices[correct]),
        choices,
        correct,
        scene: AnyScene::Line(line),
    }
}

pub(crate) fn risk(rng: &mut ChaCha8Rng) -> Built {
    let choices = vec![
        "worsening kidney injury, high risk",
        "recovering kidney function, falling risk",
        "stable kidney function, low risk",
        "a transient rise that resolved, low ongoing risk",
    ];
    let (correct, p, line, mut findings) = line_task(rng);
    findings.truncate(1);
    let clause = match p {
        Pattern::Rise => {
            "a creatinine that keeps rising above normal signals worsening kidney injury"
        }
        Pattern::Fall => "a creatinine falling back to normal signals recovering kidney function",
        Pattern::Stable => {
            "a creatinine that stays flat within normal signals stable kidney function"
        }
        Pattern::Spike => "a single rise that returns to normal is a transient, reversible insult",
    };
    Built {
        stem: format!(
            "{} {LINE_STEM} What does the trend mean for kidney risk?",
            vignette(rng, &COMPLAINTS)
        ),
        findings,
        rules: vec![Fact::rule("risk rule", clause, Importance::Core)],
        link: link(pattern_because(p), choices[correct]),
        choices,
        correct,
        scene: AnyScene::Line(line),
    }
}

pub(crate) fn workup(rng: &mut ChaCha8Rng) -> Built {
    let choices = vec![
        "renal ultrasound and urine studies",
        "repeat creatinine in one month",
        "routine yearly creatinine",
        "review of drugs and fluids given at the spike",
    ];
    let (correct, p, line, mut findings) = line_task(rng);
    findings.truncate(1);
    let clause = match p {
        Pattern::Rise => {
            "a persistently rising creatinine needs renal ultrasound and urine studies"
        }
        Pattern::Fall => "a recovering creatinine is rechecked in about a month",
        Pattern::Stable => "a stable normal creatinine needs only routine yearly checks",
        Pattern::Spike => "a brief spike prompts a review of drugs and fluids given at that time",
    };
    Built {
        stem: format!(
            "{} {LINE_STEM} Which step should follow?",
            vignette(rng, &COMPLAINTS)
        ),
        findings,
        rules: vec![Fact::rule("workup rule", clause, Importance::Core)],
        link: link(pattern_because(p), choices[correct]),
        choices,
        correct,
        scene: AnyScene::Line(line),
    }
}

/// Plot frame shared by both charts: axes and light grid lines. Returns the plot box in
/// pixels (left, top, right, bottom).
fn frame(c: &mut Canvas) -> (f32, f32, f32, f32) {
    let (l, t, r, b) = (c.x(0.1), c.y(0.12), c.x(0.95), c.y(0.88));
    let lw = (c.w as f32 * 0.006).max(1.0);
    for k in 1..4 {
        let y = b - (b - t) * k as f32 / 4.0;
        c.line(l, y, r, y, lw, gray(222.0), 1.0);
    }
    c.line(l, t, l, b, lw * 1.5, gray(40.0), 1.0);
    c.line(l, b, r, b, lw * 1.5, gray(40.0), 1.0);
    (l, t, r, b)
}

pub(crate) fn render_bars(s: &Bars, w: u32, h: u32, rng: &mut ChaCha8Rng) -> Canvas {
    let mut c = Canvas::from_fn(w, h, |_, _| gray(250.0));
    let (l, t, r, b) = frame(&mut c);
    let slot = (r - l) / 4.0;
    for (i, &v) in s.values.iter().enumerate() {
        let x0 = l + slot * (i as f32 + 0.2);
        c.rect(x0, b - (b - t) * v, x0 + slot * 0.6, b, s.color);
    }
    c.noise(rng, 3.0, false);
    c
}

pub(crate) fn render_line(s: &Line, w: u32, h: u32, rng: &mut ChaCha8Rng) -> Canvas {
    let mut c = Canvas::from_fn(w, h, |_, _| gray(250.0));
    let (l, t, r, b) = frame(&mut c);
    let wf = w as f32;
    let y_lim = b - (b - t) * LIMIT;
    let dash = (r - l) / 24.0;
    for k in (0..24).step_by(2) {
        let x = l + dash * k as f32;
        c.line(
            x,
            y_lim,
            x + dash,
            y_lim,
            (wf * 0.008).max(1.0),
            gray(120.0),
            1.0,
        );
    }
    let pts: Vec<(f32, f32)> = s
        .values
        .iter()
        .enumerate()
        .map(|(i, &v)| (l + (r - l) * (0.1 + 0.2 * i as f32), b - (b - t) * v))
        .collect();
    c.polyline(&pts, (wf * 0.012).max(1.5), [30.0, 60.0, 150.0], 1.0);
    for &(x, y) in &pts {
        c.disc(x, y, wf * 0.018, [30.0, 60.0, 150.0], 1.0, 1.0);
    }
    c.noise(rng, 3.0, false);
    c
}
