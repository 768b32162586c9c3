//! Chest-radiograph tasks (location, count, diagnosis, management, workup) and their text;
//! the film itself is drawn by `chest_film.rs`.
//!
//! Findings are bright round opacities (nodule ≤ 3 cm, mass > 3 cm), a basal effusion with a
//! curved upper edge, or a pneumothorax. Sides follow the radiological convention: the
//! patient's right lung is on the image left, and the location trace states that rule.

use super::chest_film::{diameter_cm, scatter, single_lesion, Scene};
use super::{link, number_word, vignette, Built, Fact, Importance, Scene as AnyScene};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

const COMPLAINTS: [&str; 5] = [
    "has had a cough for six weeks",
    "has chest pain",
    "is short of breath",
    "comes for a routine check-up",
    "has lost weight",
];

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
