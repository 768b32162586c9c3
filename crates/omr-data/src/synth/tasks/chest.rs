//! Chest-radiograph-like images and their five tasks (location, count, diagnosis, management,
//! workup).
//!
//! The film is a gray field: body, two dark lung ellipses with rib bands and faint markings, a
//! bright mediastinum and heart, film grain; findings are bright round opacities (nodule ≤ 3 cm,
//! mass > 3 cm at a 36 cm field width), a basal effusion with a curved upper edge, or a
//! pneumothorax (a black lateral rim behind a thin pleural line). Sides follow the radiological
//! convention: the patient's right lung is on the image left, and the trace states that rule.

use super::{
    link, number_word, spaced_point, vignette, Built, Fact, Importance, Scene as AnyScene,
};
use crate::synth::draw::{gray, Canvas};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// Width of the imaged field, to turn radii into centimetres.
const FIELD_CM: f32 = 36.0;
/// Lungs as (centre u, centre v, radius u, radius v); index 0 = patient right = image left.
const LUNGS: [(f32, f32, f32, f32); 2] = [(0.31, 0.52, 0.16, 0.33), (0.69, 0.52, 0.16, 0.33)];
const HEART: (f32, f32, f32, f32) = (0.53, 0.68, 0.11, 0.10);
const COMPLAINTS: [&str; 5] = [
    "has had a cough for six weeks",
    "has chest pain",
    "is short of breath",
    "comes for a routine check-up",
    "has lost weight",
];

#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Lesion {
    pub u: f32,
    pub v: f32,
    /// Radius as a fraction of the image width.
    pub r: f32,
}

pub(crate) struct Scene {
    lesions: Vec<Lesion>,
    /// Lung index (0 = patient right) with a pleural effusion.
    effusion: Option<usize>,
    pneumothorax: Option<usize>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Nodule,
    Mass,
    Metastases,
    Effusion,
    Pneumothorax,
}

fn side_name(lung: usize) -> &'static str {
    ["right", "left"][lung]
}

fn diameter_cm(r: f32) -> u32 {
    (2.0 * r * FIELD_CM).round() as u32
}

/// One round lesion in a lung (0/1) and zone (0 upper, 1 lower), sized as nodule or mass.
fn single_lesion(rng: &mut ChaCha8Rng, lung: usize, lower: bool, mass: bool) -> Lesion {
    let (cu, ..) = LUNGS[lung];
    let r = if mass {
        rng.random_range(0.056..0.083)
    } else {
        rng.random_range(0.017..0.030)
    };
    let v = if lower {
        rng.random_range(0.58..0.64)
    } else {
        rng.random_range(0.32..0.40)
    };
    // The left lower field is partly behind the heart: keep lesions lateral of it.
    let du = if lung == 1 && lower {
        rng.random_range(0.02..0.06)
    } else {
        rng.random_range(-0.04..0.04)
    };
    Lesion { u: cu + du, v, r }
}

/// `n` small nodules, `per_lung[i]` of them in lung i, spread through the fields.
fn scatter(rng: &mut ChaCha8Rng, per_lung: [usize; 2]) -> Vec<Lesion> {
    let mut pts = Vec::new();
    let mut out = Vec::new();
    for (lung, &n) in per_lung.iter().enumerate() {
        let (cu, ..) = LUNGS[lung];
        let (u0, u1) = if lung == 0 {
            (cu - 0.09, cu + 0.07)
        } else {
            (cu - 0.03, cu + 0.09)
        };
        for _ in 0..n {
            let p = spaced_point(rng, (u0, 0.28, u1, 0.70), &pts, 0.075);
            pts.push((p.0, p.1, 0.0));
            out.push(Lesion {
                u: p.0,
                v: p.1,
                r: rng.random_range(0.017..0.028),
            });
        }
    }
    out
}

/// Splits `n` nodules between the lungs, at least one on each side when `both`.
fn split_count(rng: &mut ChaCha8Rng, n: usize, both: bool) -> [usize; 2] {
    let lo = usize::from(both);
    let right = rng.random_range(lo..=n - lo);
    [right, n - right]
}

/// A scene for one diagnostic kind, with its core finding and its supporting finding.
fn kind_scene(rng: &mut ChaCha8Rng, kind: Kind) -> (Scene, Fact, Fact) {
    let lung = rng.random_range(0..2usize);
    let (side, other) = (side_name(lung), side_name(1 - lung));
    let clear = |s: &str| {
        Fact::supporting(
            "opposite lung",
            format!("The {s} lung is clear."),
            format!("the {s} lung is clear"),
        )
    };
    let mut scene = Scene {
        lesions: Vec::new(),
        effusion: None,
        pneumothorax: None,
    };
    match kind {
        Kind::Nodule | Kind::Mass => {
            let lower = rng.random_bool(0.5);
            let l = single_lesion(rng, lung, lower, kind == Kind::Mass);
            scene.lesions.push(l);
            let what = format!(
                "a single round opacity about {} cm wide in the {side} {} zone",
                diameter_cm(l.r),
                zone(lower)
            );
            let f = Fact::core(
                "size and site of the opacity",
                format!("The image shows {what}."),
                format!("there is {what}"),
            );
            (scene, f, clear(other))
        }
        Kind::Metastases => {
            let n = rng.random_range(3..=5);
            let per_lung = split_count(rng, n, true);
            scene.lesions = scatter(rng, per_lung);
            let what = format!(
                "{} small round nodules spread through both lungs",
                number_word(n)
            );
            let f = Fact::core(
                "number and spread of nodules",
                format!("The image shows {what}."),
                format!("there are {what}"),
            );
            let s = Fact::supporting(
                "size of the nodules",
                "Each nodule is under 3 cm.".into(),
                "each nodule is under 3 cm".into(),
            );
            (scene, f, s)
        }
        Kind::Effusion => {
            scene.effusion = Some(lung);
            let what = format!("a dense opacity at the {side} lung base with a curved upper edge");
            let f = Fact::core(
                "basal opacity",
                format!("The image shows {what}."),
                format!("there is {what}"),
            );
            (scene, f, clear(other))
        }
        Kind::Pneumothorax => {
            scene.pneumothorax = Some(lung);
            let what = format!("a dark rim without lung markings along the outer {side} chest, behind a thin pleural line");
            let f = Fact::core(
                "lung edge",
                format!("The image shows {what}."),
                format!("there is {what}"),
            );
            (scene, f, clear(other))
        }
    }
}

fn zone(lower: bool) -> &'static str {
    if lower {
        "lower"
    } else {
        "upper"
    }
}

fn dx_rule(kind: Kind, importance: Importance) -> Fact {
    let clause = match kind {
        Kind::Nodule => "a single round lung lesion of 3 cm or less is a nodule",
        Kind::Mass => "a lung lesion larger than 3 cm is a mass, not a nodule",
        Kind::Metastases => "multiple round nodules in both lungs suggest metastases",
        Kind::Effusion => "a dense basal opacity with a curved upper edge is a pleural effusion",
        Kind::Pneumothorax => {
            "a dark rim without lung markings beyond a pleural line is a pneumothorax"
        }
    };
    Fact::rule("diagnostic rule", clause, importance)
}

fn dx_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Nodule => "solitary pulmonary nodule",
        Kind::Mass => "lung mass",
        Kind::Metastases => "pulmonary metastases",
        Kind::Effusion => "pleural effusion",
        Kind::Pneumothorax => "pneumothorax",
    }
}

pub(crate) fn location(rng: &mut ChaCha8Rng) -> Built {
    let choices = vec![
        "right upper zone",
        "right lower zone",
        "left upper zone",
        "left lower zone",
    ];
    let correct = rng.random_range(0..4usize);
    let (lung, lower) = (correct / 2, correct % 2 == 1);
    let stem = format!(
        "{} Where is the opacity on this frontal chest radiograph?",
        vignette(rng, &COMPLAINTS)
    );
    let mass = rng.random_bool(0.5);
    let l = single_lesion(rng, lung, lower, mass);
    let (img, img_other) = (["left", "right"][lung], ["right", "left"][lung]);
    let what = format!(
        "one round opacity in the {} half of the lung on the image {img}",
        zone(lower)
    );
    Built {
        stem,
        choices: choices.clone(),
        correct,
        findings: vec![
            Fact::core(
                "location of the opacity",
                format!("The image shows {what}."),
                format!("there is {what}"),
            ),
            Fact::supporting(
                "opposite lung",
                format!("The lung on the image {img_other} is clear."),
                format!("the lung on the image {img_other} is clear"),
            ),
        ],
        rules: vec![Fact::rule(
            "side convention on a frontal film",
            "on a frontal chest film the patient's right side appears on the image left",
            Importance::Core,
        )],
        link: link(
            &format!(
                "the opacity is on the image {img} and in the {} half",
                zone(lower)
            ),
            choices[correct],
        ),
        scene: AnyScene::Chest(Scene {
            lesions: vec![l],
            effusion: None,
            pneumothorax: None,
        }),
    }
}

pub(crate) fn count(rng: &mut ChaCha8Rng) -> Built {
    let choices = vec![
        "one nodule",
        "two nodules",
        "three nodules",
        "four nodules",
        "five nodules",
    ];
    let correct = rng.random_range(0..5usize);
    let n = correct + 1;
    let stem = format!(
        "{} How many nodules are seen on this chest radiograph?",
        vignette(rng, &COMPLAINTS)
    );
    let per_lung = split_count(rng, n, false);
    let lesions = scatter(rng, per_lung);
    let what = format!(
        "{} separate round {}",
        number_word(n),
        if n == 1 { "nodule" } else { "nodules" }
    );
    let split = format!(
        "the right lung has {} and the left lung has {}",
        number_word(per_lung[0]),
        number_word(per_lung[1])
    );
    Built {
        stem,
        choices: choices.clone(),
        correct,
        findings: vec![
            Fact::core(
                "number of nodules",
                format!("The image shows {what}."),
                format!("there are {what}"),
            ),
            Fact::supporting(
                "side of the nodules",
                format!("The image shows that {split}."),
                split,
            ),
        ],
        rules: vec![Fact::rule(
            "counting rule",
            "each separate round opacity counts as one nodule",
            Importance::Core,
        )],
        link: link(
            &format!("counting the opacities gives {}", number_word(n)),
            choices[correct],
        ),
        scene: AnyScene::Chest(Scene {
            lesions,
            effusion: None,
            pneumothorax: None,
        }),
    }
}

/// Shared body of the knowledge-linked tasks: draw a kind uniformly from `kinds`, describe it,
/// and state the diagnostic rule; `extra` maps the kind to a second rule and the answer text.
fn kind_task(
    rng: &mut ChaCha8Rng,
    stem: &str,
    kinds: &[Kind],
    choices: Vec<&'static str>,
    second_rule: Option<fn(Kind) -> Fact>,
) -> Built {
    let correct = rng.random_range(0..kinds.len());
    let kind = kinds[correct];
    let stem = format!("{} {stem}", vignette(rng, &COMPLAINTS));
    let (scene, finding, support) = kind_scene(rng, kind);
    let (findings, rules, because) = match second_rule {
        None => (
            vec![finding, support],
            vec![dx_rule(kind, Importance::Core)],
            dx_because(kind),
        ),
        Some(rule) => (
            vec![finding],
            vec![dx_rule(kind, Importance::Supporting), rule(kind)],
            format!("this is a {}", dx_name(kind)),
        ),
    };
    Built {
        stem,
        correct,
        findings,
        rules,
        link: link(&because, choices[correct]),
        choices,
        scene: AnyScene::Chest(scene),
    }
}

fn dx_because(kind: Kind) -> String {
    match kind {
        Kind::Nodule => "the lesion is single and not larger than 3 cm",
        Kind::Mass => "the lesion is larger than 3 cm",
        Kind::Metastases => "there are several nodules in both lungs",
        Kind::Effusion => "the basal opacity has a curved upper edge",
        Kind::Pneumothorax => "the dark rim lies beyond a pleural line",
    }
    .to_string()
}

pub(crate) fn diagnosis(rng: &mut ChaCha8Rng) -> Built {
    let kinds = [
        Kind::Nodule,
        Kind::Mass,
        Kind::Metastases,
        Kind::Effusion,
        Kind::Pneumothorax,
    ];
    let choices = kinds.iter().map(|&k| dx_name(k)).collect();
    kind_task(
        rng,
        "Which diagnosis best fits the chest radiograph?",
        &kinds,
        choices,
        None,
    )
}

pub(crate) fn management(rng: &mut ChaCha8Rng) -> Built {
    let kinds = [Kind::Nodule, Kind::Mass, Kind::Effusion, Kind::Pneumothorax];
    let choices = vec![
        "follow-up CT in 6 to 12 months",
        "CT-guided biopsy",
        "diagnostic thoracentesis",
        "chest tube insertion",
    ];
    fn rule(k: Kind) -> Fact {
        let clause = match k {
            Kind::Nodule => "a small solitary nodule is followed with CT to check for growth",
            Kind::Mass => "a lung mass needs a tissue diagnosis by biopsy",
            Kind::Effusion => "a new pleural effusion needs fluid sampling by thoracentesis",
            _ => "a large pneumothorax is drained with a chest tube",
        };
        Fact::rule("management rule", clause, Importance::Core)
    }
    kind_task(
        rng,
        "What is the best next step in management?",
        &kinds,
        choices,
        Some(rule),
    )
}

pub(crate) fn workup(rng: &mut ChaCha8Rng) -> Built {
    let kinds = [Kind::Nodule, Kind::Mass, Kind::Metastases, Kind::Effusion];
    let choices = vec![
        "comparison with prior chest images",
        "contrast CT of the chest",
        "search for a primary tumour",
        "pleural fluid analysis",
    ];
    fn rule(k: Kind) -> Fact {
        let clause = match k {
            Kind::Nodule => "a small nodule is first compared with prior images to check stability",
            Kind::Mass => "a lung mass is staged with contrast CT of the chest",
            Kind::Metastases => "lung metastases call for a search for the primary tumour",
            _ => "an unexplained effusion is worked up with pleural fluid analysis",
        };
        Fact::rule("workup rule", clause, Importance::Core)
    }
    kind_task(
        rng,
        "Which investigation should come next?",
        &kinds,
        choices,
        Some(rule),
    )
}

/// Normalized lateral position in a lung: 0 at its centre, 1 at its outer edge, negative
/// towards the mediastinum.
fn lateral(lung: usize, u: f32) -> f32 {
    let (cu, _, ru, _) = LUNGS[lung];
    if lung == 0 {
        (cu - u) / ru
    } else {
        (u - cu) / ru
    }
}

fn in_ellipse((cu, cv, ru, rv): (f32, f32, f32, f32), u: f32, v: f32) -> bool {
    ((u - cu) / ru).powi(2) + ((v - cv) / rv).powi(2) <= 1.0
}

pub(crate) fn render(s: &Scene, w: u32, h: u32, rng: &mut ChaCha8Rng) -> Canvas {
    let phase: f32 = rng.random_range(0.0..std::f32::consts::TAU);
    let tex: [(f32, f32, f32); 3] = std::array::from_fn(|_| {
        (
            rng.random_range(20.0..45.0),
            rng.random_range(20.0..45.0),
            rng.random_range(0.0..6.3),
        )
    });
    // Pleural line half-width: about one pixel whatever the image size.
    let line = 0.8 / w as f32;
    let mut c = Canvas::from_fn(w, h, |u, v| {
        if ((u - 0.5) / 0.47).powi(2) + ((v - 0.55) / 0.52).powi(2) > 1.0 {
            return gray(25.0);
        }
        if in_ellipse(HEART, u, v) {
            return gray(160.0);
        }
        for (lung, &geom) in LUNGS.iter().enumerate() {
            if !in_ellipse(geom, u, v) {
                continue;
            }
            let lat = lateral(lung, u);
            if s.pneumothorax == Some(lung) && lat > 0.45 {
                return gray(if lat < 0.45 + line / geom.2 * 2.0 {
                    150.0
                } else {
                    18.0
                });
            }
            if s.effusion == Some(lung) && v > 0.63 - 0.07 * lat.clamp(-1.0, 1.0) {
                return gray(175.0);
            }
            let rib = ((v * 34.0 + 6.0 * (u - 0.5).abs() + phase).sin())
                .max(0.0)
                .powi(6)
                * 24.0;
            let marks: f32 = tex
                .iter()
                .map(|&(a, b, p)| (a * u + b * v + p).sin())
                .sum::<f32>()
                * 4.0;
            return gray(58.0 + rib + marks);
        }
        if (u - 0.5).abs() < 0.055 {
            return gray(170.0);
        }
        gray(118.0)
    });
    for l in &s.lesions {
        let r = l.r * w as f32;
        c.disc(c.x(l.u), c.y(l.v), r, gray(215.0), 0.85, 1.0 + r * 0.25);
    }
    c.noise(rng, 12.0, true);
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn sizes_fall_on_the_right_side_of_the_3_cm_rule() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for _ in 0..200 {
            assert!(diameter_cm(single_lesion(&mut rng, 0, false, false).r) <= 2);
            assert!(diameter_cm(single_lesion(&mut rng, 1, true, true).r) >= 4);
        }
    }

    #[test]
    fn lesion_is_bright_in_the_rendered_film() {
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let l = single_lesion(&mut rng, 0, true, true);
        let scene = Scene {
            lesions: vec![l],
            effusion: None,
            pneumothorax: None,
        };
        let c = render(&scene, 224, 224, &mut rng);
        let at = |u: f32, v: f32| c.get((u * 224.0) as u32, (v * 224.0) as u32)[0];
        assert!(
            at(l.u, l.v) > at(LUNGS[1].0, l.v) + 60.0,
            "lesion should stand out from the clear lung"
        );
    }
}
