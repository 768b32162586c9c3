//! Fundus-photo-like images graded for diabetic retinopathy, and three tasks (grade,
//! management, one-year risk of proliferative disease).
//!
//! An orange retina on black with a yellow optic disc (left or right, by eye), a darker macula
//! and four vessel arcades; the grade decides the lesions: none; a few microaneurysms (mild);
//! blot haemorrhages in all four quadrants plus exudates (severe non-proliferative); a tangle
//! of new vessels on the disc (proliferative). This is a simplified 4-2-1 rule, stated as such
//! in the traces.

use super::{
    link, number_word, spaced_point, vignette, Built, Fact, Importance, Scene as AnyScene,
};
use crate::synth::draw::{mix, Canvas, Rgb};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

const COMPLAINTS: [&str; 4] = [
    "has type 2 diabetes",
    "has type 1 diabetes",
    "has had diabetes for ten years",
    "comes for diabetic eye screening",
];
const GRADES: [&str; 4] = [
    "no diabetic retinopathy",
    "mild non-proliferative retinopathy",
    "severe non-proliferative retinopathy",
    "proliferative retinopathy",
];

#[derive(Clone, Copy)]
enum Spot {
    Microaneurysm,
    Haemorrhage,
    Exudate,
}

pub(crate) struct Scene {
    /// Optic disc centre u (v is 0.5).
    disc_u: f32,
    /// Vessel arcades as quadratic Bézier control points (u, v).
    arcades: Vec<[(f32, f32); 3]>,
    spots: Vec<(f32, f32, f32, Spot)>,
    /// New vessels: short random walks starting on the disc.
    new_vessels: Vec<Vec<(f32, f32)>>,
}

/// Grade index 0..4 → scene, core finding and a supporting finding (disc side).
fn retina(rng: &mut ChaCha8Rng, grade: usize) -> (Scene, Fact, Fact) {
    let right_disc = rng.random_bool(0.5);
    let disc_u = if right_disc { 0.72 } else { 0.28 };
    let temporal = if right_disc { -1.0 } else { 1.0 };
    let j = |rng: &mut ChaCha8Rng| rng.random_range(-0.04..0.04);
    let arcades = vec![
        [
            (disc_u, 0.5),
            (0.5 + j(rng), 0.2 + j(rng)),
            (0.5 + temporal * 0.35, 0.3 + j(rng)),
        ],
        [
            (disc_u, 0.5),
            (0.5 + j(rng), 0.8 + j(rng)),
            (0.5 + temporal * 0.35, 0.7 + j(rng)),
        ],
        [
            (disc_u, 0.5),
            (disc_u - temporal * 0.15, 0.3 + j(rng)),
            (disc_u - temporal * 0.2, 0.15 + j(rng)),
        ],
        [
            (disc_u, 0.5),
            (disc_u - temporal * 0.15, 0.7 + j(rng)),
            (disc_u - temporal * 0.2, 0.85 + j(rng)),
        ],
    ];
    let mut taken = vec![(disc_u, 0.5, 0.08)];
    let mut spots = Vec::new();
    let mut add = |rng: &mut ChaCha8Rng,
                   spot: Spot,
                   region: (f32, f32, f32, f32),
                   r: f32,
                   spots: &mut Vec<_>| {
        let (u, v) = spaced_point(rng, region, &taken, 0.03);
        taken.push((u, v, r));
        spots.push((u, v, r, spot));
    };
    let mut new_vessels = Vec::new();
    let what = match grade {
        0 => "no microaneurysms or haemorrhages on the retina".to_string(),
        1 => {
            let n = rng.random_range(2..=5);
            for _ in 0..n {
                let r = rng.random_range(0.007..0.01);
                add(
                    rng,
                    Spot::Microaneurysm,
                    (0.2, 0.2, 0.8, 0.8),
                    r,
                    &mut spots,
                );
            }
            format!(
                "{} tiny red dots, microaneurysms, and no larger haemorrhages",
                number_word(n)
            )
        }
        2 => {
            for (u0, v0) in [(0.2, 0.2), (0.52, 0.2), (0.2, 0.52), (0.52, 0.52)] {
                for _ in 0..rng.random_range(5..8) {
                    let r = rng.random_range(0.014..0.024);
                    add(
                        rng,
                        Spot::Haemorrhage,
                        (u0, v0, u0 + 0.28, v0 + 0.28),
                        r,
                        &mut spots,
                    );
                }
            }
            for _ in 0..rng.random_range(3..6) {
                let r = rng.random_range(0.008..0.012);
                add(rng, Spot::Exudate, (0.25, 0.25, 0.75, 0.75), r, &mut spots);
            }
            "many blot haemorrhages in all four quadrants".to_string()
        }
        _ => {
            for _ in 0..rng.random_range(10..15) {
                let mut p = (
                    disc_u + rng.random_range(-0.05..0.05),
                    0.5 + rng.random_range(-0.05..0.05),
                );
                let mut walk = vec![p];
                for _ in 0..6 {
                    let a = rng.random_range(0.0..std::f32::consts::TAU);
                    p = (p.0 + a.cos() * 0.02, p.1 + a.sin() * 0.02);
                    walk.push(p);
                }
                new_vessels.push(walk);
            }
            for _ in 0..rng.random_range(3..6) {
                let r = rng.random_range(0.014..0.024);
                add(rng, Spot::Haemorrhage, (0.2, 0.2, 0.8, 0.8), r, &mut spots);
            }
            "a tangle of fine new vessels on the optic disc".to_string()
        }
    };
    let f = Fact::core(
        "retinal lesions",
        format!("The image shows {what}."),
        format!("the fundus shows {what}"),
    );
    let side = if right_disc { "right" } else { "left" };
    let s = Fact::supporting(
        "optic disc position",
        format!("The optic disc is on the image {side}."),
        format!("the optic disc is on the image {side}"),
    );
    (
        Scene {
            disc_u,
            arcades,
            spots,
            new_vessels,
        },
        f,
        s,
    )
}

fn dx_rule(grade: usize, importance: Importance) -> Fact {
    let clause = [
        "a diabetic fundus without microaneurysms or haemorrhages shows no retinopathy",
        "microaneurysms alone mean mild non-proliferative retinopathy",
        "haemorrhages in all four quadrants mean severe non-proliferative retinopathy",
        "new vessels on the disc mean proliferative retinopathy",
    ][grade];
    Fact::rule("grading rule", clause, importance)
}

fn because(grade: usize) -> &'static str {
    [
        "there are no retinal lesions",
        "there are only microaneurysms",
        "there are haemorrhages in all four quadrants",
        "there are new vessels on the disc",
    ][grade]
}

/// Shared body: grade drawn uniformly; `second` adds the task's own rule (core) after the
/// grading rule (then supporting).
fn grade_task(
    rng: &mut ChaCha8Rng,
    stem: &str,
    choices: Vec<&'static str>,
    second: Option<(&'static str, [&'static str; 4])>,
) -> Built {
    let correct = rng.random_range(0..4usize);
    let stem = format!("{} {stem}", vignette(rng, &COMPLAINTS));
    let (scene, finding, disc) = retina(rng, correct);
    let (findings, rules, why) = match second {
        None => (
            vec![finding, disc],
            vec![dx_rule(correct, Importance::Core)],
            because(correct).to_string(),
        ),
        Some((topic, clauses)) => (
            vec![finding],
            vec![
                dx_rule(correct, Importance::Supporting),
                Fact::rule(topic, clauses[correct], Importance::Core),
            ],
            format!("this is {}", GRADES[correct]),
        ),
    };
    Built {
        stem,
        correct,
        findings,
        rules,
        link: link(&why, choices[correct]),
        choices,
        scene: AnyScene::Fundus(scene),
    }
}

pub(crate) fn grade(rng: &mut ChaCha8Rng) -> Built {
    grade_task(
        rng,
        "What grade of diabetic retinopathy does this fundus photograph show?",
        GRADES.to_vec(),
        None,
    )
}

pub(crate) fn management(rng: &mut ChaCha8Rng) -> Built {
    let choices = vec![
        "yearly screening",
        "review in 6 months with tighter glucose control",
        "prompt referral to a retina specialist",
        "panretinal laser photocoagulation",
    ];
    let rules = [
        "diabetic patients without retinopathy need yearly screening",
        "mild non-proliferative retinopathy needs review in 6 months and tighter glucose control",
        "severe non-proliferative retinopathy needs prompt referral to a retina specialist",
        "proliferative retinopathy is treated with panretinal laser photocoagulation",
    ];
    grade_task(
        rng,
        "What is the best next step?",
        choices,
        Some(("management rule", rules)),
    )
}

pub(crate) fn risk(rng: &mut ChaCha8Rng) -> Built {
    let choices = vec![
        "under 1 percent",
        "about 5 percent",
        "about 50 percent",
        "already proliferative",
    ];
    let rules = [
        "without retinopathy the one-year risk of proliferative disease is under 1 percent",
        "mild non-proliferative retinopathy carries about a 5 percent one-year risk of proliferative disease",
        "severe non-proliferative retinopathy carries about a 50 percent one-year risk of proliferative disease",
        "once new vessels appear the disease is already proliferative",
    ];
    grade_task(
        rng,
        "What is the one-year risk of progression to proliferative retinopathy?",
        choices,
        Some(("risk rule", rules)),
    )
}

fn bezier(p: &[(f32, f32); 3], t: f32) -> (f32, f32) {
    let s = 1.0 - t;
    (
        s * s * p[0].0 + 2.0 * s * t * p[1].0 + t * t * p[2].0,
        s * s * p[0].1 + 2.0 * s * t * p[1].1 + t * t * p[2].1,
    )
}

pub(crate) fn render(s: &Scene, w: u32, h: u32, rng: &mut ChaCha8Rng) -> Canvas {
    let glow: f32 = rng.random_range(0.9..1.05);
    let disc_u = s.disc_u;
    let mut c = Canvas::from_fn(w, h, |u, v| {
        let d = ((u - 0.5).powi(2) + (v - 0.5).powi(2)).sqrt();
        if d > 0.47 {
            return [5.0, 5.0, 5.0];
        }
        let base: Rgb = [205.0 * glow, 95.0 * glow, 45.0];
        // Darker rim (vignetting) and a darker macula at the centre.
        let mut px = mix(base, [120.0, 40.0, 20.0], (d / 0.47).powi(3));
        px = mix(
            px,
            [140.0, 55.0, 25.0],
            (1.0 - d / 0.07).clamp(0.0, 1.0) * 0.6,
        );
        let dd = ((u - disc_u).powi(2) + (v - 0.5).powi(2)).sqrt();
        mix(
            px,
            [245.0, 215.0, 150.0],
            (1.0 - (dd - 0.06) / 0.01).clamp(0.0, 1.0),
        )
    });
    let wf = w as f32;
    for arc in &s.arcades {
        let pts: Vec<(f32, f32)> = (0..=16)
            .map(|i| bezier(arc, i as f32 / 16.0))
            .map(|(u, v)| (c.x(u), c.y(v)))
            .collect();
        c.polyline(&pts, (wf * 0.011).max(1.5), [150.0, 30.0, 20.0], 0.9);
    }
    for walk in &s.new_vessels {
        let pts: Vec<(f32, f32)> = walk.iter().map(|&(u, v)| (c.x(u), c.y(v))).collect();
        c.polyline(&pts, (wf * 0.004).max(1.0), [175.0, 25.0, 25.0], 0.95);
    }
    for &(u, v, r, spot) in &s.spots {
        let color: Rgb = match spot {
            Spot::Microaneurysm => [135.0, 15.0, 15.0],
            Spot::Haemorrhage => [105.0, 12.0, 12.0],
            Spot::Exudate => [245.0, 225.0, 120.0],
        };
        c.disc(c.x(u), c.y(v), r * wf, color, 0.95, 1.0);
    }
    c.noise(rng, 6.0, false);
    c
}
