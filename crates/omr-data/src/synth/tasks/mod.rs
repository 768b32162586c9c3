//! The task catalogue: 18 multiple-choice tasks over five modalities and the five OpenMedReason
//! task families, each a function from a random stream to a [`Built`] item.
//!
//! Design rule that keeps the set honest: every task has a fixed list of k answer classes
//! (`choices`), the class is drawn uniformly and rendered into the image, and the options are
//! always the full class list (shuffled later in `row.rs`). The question text (vignette +
//! stem) is drawn independently of the class, so text alone is at chance (1/k) and the image
//! is required. Knowledge-linked tasks (Diagnosis, Management, Risk, Workup) add a stated rule
//! that maps the visual finding to the answer, which is what the trace and the rubric check.

use super::draw::Canvas;
use rand::{Rng, RngCore};
use rand_chacha::ChaCha8Rng;

pub(crate) mod chart;
pub(crate) mod chest;
pub(crate) mod chest_film;
pub(crate) mod fundus;
pub(crate) mod histo;
pub(crate) mod skin;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    Perception,
    Diagnosis,
    Management,
    Risk,
    Workup,
}

impl Family {
    pub fn as_str(&self) -> &'static str {
        match self {
            Family::Perception => "Perception",
            Family::Diagnosis => "Diagnosis",
            Family::Management => "Management",
            Family::Risk => "Risk",
            Family::Workup => "Workup",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Modality {
    XRay,
    Histology,
    Chart,
    Dermatology,
    Fundus,
}

impl Modality {
    pub fn as_str(&self) -> &'static str {
        match self {
            Modality::XRay => "x-ray",
            Modality::Histology => "histology",
            Modality::Chart => "chart",
            Modality::Dermatology => "dermatology",
            Modality::Fundus => "fundus",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Importance {
    Core,
    Supporting,
}

/// One statement of the reference trace and the rubric unit that checks it.
/// `sentence` appears verbatim in the trace (it becomes `source_quote`); `claim` is the same
/// content as a lowercase clause ("the opacity lies in the right lower zone") for the
/// rubric's claim and correctness question; `topic` names what the statement is about.
#[derive(Clone, Debug)]
pub(crate) struct Fact {
    pub topic: &'static str,
    pub sentence: String,
    pub claim: String,
    pub importance: Importance,
}

impl Fact {
    pub fn core(topic: &'static str, sentence: String, claim: String) -> Fact {
        Fact {
            topic,
            sentence,
            claim,
            importance: Importance::Core,
        }
    }
    pub fn supporting(topic: &'static str, sentence: String, claim: String) -> Fact {
        Fact {
            topic,
            sentence,
            claim,
            importance: Importance::Supporting,
        }
    }
    /// A rule stated as "Rule: …": the clause is both the claim and the quoted text.
    pub fn rule(topic: &'static str, clause: &str, importance: Importance) -> Fact {
        Fact {
            topic,
            sentence: format!("Rule: {clause}."),
            claim: clause.to_string(),
            importance,
        }
    }
}

/// What a task builder returns. `link` may contain `{L}`, replaced by the correct letter
/// once the options are shuffled.
pub(crate) struct Built {
    pub stem: String,
    pub choices: Vec<&'static str>,
    pub correct: usize,
    pub findings: Vec<Fact>,
    pub rules: Vec<Fact>,
    pub link: Fact,
    pub scene: Scene,
}

/// Everything needed to draw the image; positions live here (drawn from the latent stream) so
/// the text never depends on the pixel stream.
pub(crate) enum Scene {
    Chest(chest_film::Scene),
    Histo(histo::Scene),
    Bars(chart::Bars),
    Line(chart::Line),
    Skin(skin::Scene),
    Fundus(fundus::Scene),
}

impl Scene {
    /// Draws the scene at `w`×`h`; `rng` is the row's pixel stream (noise, texture phases).
    pub fn render(&self, w: u32, h: u32, rng: &mut ChaCha8Rng) -> Canvas {
        match self {
            Scene::Chest(s) => chest_film::render(s, w, h, rng),
            Scene::Histo(s) => histo::render(s, w, h, rng),
            Scene::Bars(s) => chart::render_bars(s, w, h, rng),
            Scene::Line(s) => chart::render_line(s, w, h, rng),
            Scene::Skin(s) => skin::render(s, w, h, rng),
            Scene::Fundus(s) => fundus::render(s, w, h, rng),
        }
    }

    /// Radiographs are stored as one-channel JPEGs.
    pub fn grayscale(&self) -> bool {
        matches!(self, Scene::Chest(_))
    }
}

pub(crate) struct TaskDef {
    pub name: &'static str,
    pub family: Family,
    pub modality: Modality,
    pub build: fn(&mut ChaCha8Rng) -> Built,
}

const fn task(
    name: &'static str,
    family: Family,
    modality: Modality,
    build: fn(&mut ChaCha8Rng) -> Built,
) -> TaskDef {
    TaskDef {
        name,
        family,
        modality,
        build,
    }
}

use Family::*;
use Modality::*;

/// Every task, drawn uniformly per row.
pub(crate) static TASKS: [TaskDef; 18] = [
    task("chest_location", Perception, XRay, chest::location),
    task("chest_count", Perception, XRay, chest::count),
    task("chest_diagnosis", Diagnosis, XRay, chest::diagnosis),
    task("chest_management", Management, XRay, chest::management),
    task("chest_workup", Workup, XRay, chest::workup),
    task("histo_cell_type", Perception, Histology, histo::cell_type),
    task("histo_diagnosis", Diagnosis, Histology, histo::diagnosis),
    task("histo_workup", Workup, Histology, histo::workup),
    task("chart_highest_bar", Perception, Chart, chart::highest_bar),
    task("chart_trend", Perception, Chart, chart::trend),
    task("chart_risk", Risk, Chart, chart::risk),
    task("chart_workup", Workup, Chart, chart::workup),
    task("skin_diagnosis", Diagnosis, Dermatology, skin::diagnosis),
    task("skin_management", Management, Dermatology, skin::management),
    task("skin_risk", Risk, Dermatology, skin::risk),
    task("fundus_grade", Diagnosis, Fundus, fundus::grade),
    task("fundus_management", Management, Fundus, fundus::management),
    task("fundus_risk", Risk, Fundus, fundus::risk),
];

/// `(task, family, modality)` of every task, in catalogue order.
pub fn catalogue() -> Vec<(&'static str, &'static str, &'static str)> {
    TASKS
        .iter()
        .map(|t| (t.name, t.family.as_str(), t.modality.as_str()))
        .collect()
}

/// "A 54-year-old woman has chest pain." — age, sex and complaint drawn independently of the
/// answer class, so the vignette carries no signal.
pub(crate) fn vignette(rng: &mut ChaCha8Rng, complaints: &[&str]) -> String {
    let age = rng.random_range(25..=80);
    let sex = if rng.random_bool(0.5) { "man" } else { "woman" };
    format!("A {age}-year-old {sex} {}.", pick(rng, complaints))
}

/// The rationale statement that closes every trace: "{Because}, so the answer is {answer},
/// option {L}." (`{L}` is filled in after shuffling).
pub(crate) fn link(because: &str, answer: &str) -> Fact {
    let mut cap = because.to_string();
    if let Some(first) = cap.get(0..1) {
        cap.replace_range(0..1, &first.to_uppercase());
    }
    Fact::core(
        "link from finding to answer",
        format!("{cap}, so the answer is {answer}, option {{L}}."),
        format!("{because}, so the answer is {answer}"),
    )
}

pub(crate) fn pick<'a, T: ?Sized>(rng: &mut impl RngCore, xs: &[&'a T]) -> &'a T {
    xs[rng.random_range(0..xs.len())]
}

/// "first", "second", … for positions counted from 0.
pub(crate) fn ordinal(i: usize) -> &'static str {
    ["first", "second", "third", "fourth", "fifth"][i.min(4)]
}

/// "one", "two", … for small counts.
pub(crate) fn number_word(n: usize) -> &'static str {
    ["zero", "one", "two", "three", "four", "five", "six"][n.min(6)]
}

/// Uniform point in a normalized box at least `gap` away from the edge of every taken disc
/// `(u, v, radius)` (best of a few tries: the scenes are sparse, so a clash after 32 tries is
/// rare and harmless).
pub(crate) fn spaced_point(
    rng: &mut ChaCha8Rng,
    (u0, v0, u1, v1): (f32, f32, f32, f32),
    taken: &[(f32, f32, f32)],
    gap: f32,
) -> (f32, f32) {
    let mut p = (u0, v0);
    for _ in 0..32 {
        p = (rng.random_range(u0..u1), rng.random_range(v0..v1));
        if taken
            .iter()
            .all(|q| ((p.0 - q.0).powi(2) + (p.1 - q.1).powi(2)).sqrt() >= q.2 + gap)
        {
            break;
        }
    }
    p
}
