//! H&E-histology-like images and their three tasks (dominant cell type, diagnosis, workup).
//!
//! A pink stroma with wavy fibres carries an infiltrate dominated (≈85 %) by one cell type,
//! each drawn with the one feature a pathologist names: lymphocytes (small, dark round
//! nucleus), neutrophils (pale cytoplasm, three-lobed nucleus), eosinophils (red cytoplasm,
//! two-lobed nucleus), or multinucleated giant cells with a ring of nuclei among elongated
//! epithelioid cells (a granuloma). The cell type maps to the process by a stated rule.

use super::{link, pick, spaced_point, vignette, Built, Fact, Importance, Scene as AnyScene};
use crate::synth::draw::{mix, Canvas, Rgb};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Cell {
    Lymphocyte,
    Neutrophil,
    Eosinophil,
    Giant,
    Epithelioid,
}

pub(crate) struct Scene {
    /// (u, v, orientation in radians, kind)
    cells: Vec<(f32, f32, f32, Cell)>,
}

const TYPES: [Cell; 4] = [
    Cell::Lymphocyte,
    Cell::Neutrophil,
    Cell::Eosinophil,
    Cell::Giant,
];
const COMPLAINTS: [&str; 4] = [
    "has a skin biopsy",
    "has a lung biopsy",
    "has a colon biopsy",
    "has a lymph node biopsy",
];
const NUCLEUS: Rgb = [95.0, 50.0, 145.0];

/// The drawn section plus its core finding (the dominant cells) and a supporting one
/// (density, or the number of giant cells).
fn section(rng: &mut ChaCha8Rng, t: Cell) -> (Scene, Fact, Fact) {
    let mut taken: Vec<(f32, f32, f32)> = Vec::new();
    let mut cells = Vec::new();
    let mut place =
        |rng: &mut ChaCha8Rng, kind: Cell, radius: f32, gap: f32, cells: &mut Vec<_>| {
            let (u, v) = spaced_point(rng, (0.05, 0.05, 0.95, 0.95), &taken, gap + radius);
            taken.push((u, v, radius));
            cells.push((u, v, rng.random_range(0.0..std::f32::consts::PI), kind));
        };
    let support = if t == Cell::Giant {
        let giants = rng.random_range(1..=2usize);
        for _ in 0..giants {
            place(rng, Cell::Giant, 0.12, 0.08, &mut cells);
        }
        for _ in 0..rng.random_range(14..22) {
            place(rng, Cell::Epithelioid, 0.03, 0.02, &mut cells);
        }
        for _ in 0..rng.random_range(4..8) {
            place(rng, Cell::Lymphocyte, 0.02, 0.02, &mut cells);
        }
        let s = if giants == 1 {
            "There is one giant cell"
        } else {
            "There are two giant cells"
        };
        Fact::supporting("number of giant cells", format!("{s}."), s.to_lowercase())
    } else {
        let dense = rng.random_bool(0.5);
        let n = if dense {
            rng.random_range(44..56)
        } else {
            rng.random_range(16..24)
        };
        for i in 0..n {
            // About one cell in seven is another small type, so "dominant" needs counting.
            let kind = if i % 7 == 6 {
                *pick(
                    rng,
                    &[&Cell::Lymphocyte, &Cell::Neutrophil, &Cell::Eosinophil],
                )
            } else {
                t
            };
            place(rng, kind, 0.03, 0.012, &mut cells);
        }
        let s = if dense {
            "The cells are densely packed"
        } else {
            "The cells are scattered"
        };
        Fact::supporting("cell density", format!("{s}."), s.to_lowercase())
    };
    let what = match t {
        Cell::Lymphocyte => {
            "mostly small round cells with a dark round nucleus and scant cytoplasm"
        }
        Cell::Neutrophil => "mostly cells with pale cytoplasm and a nucleus of three lobes",
        Cell::Eosinophil => {
            "mostly cells with bright red granular cytoplasm and a two-lobed nucleus"
        }
        _ => "large cells with many nuclei in a ring, among elongated pale cells",
    };
    let f = Fact::core(
        "dominant cells",
        format!("The image shows {what}."),
        format!("the section shows {what}"),
    );
    (Scene { cells }, f, support)
}

fn name(t: Cell) -> &'static str {
    match t {
        Cell::Lymphocyte => "lymphocytes",
        Cell::Neutrophil => "neutrophils",
        Cell::Eosinophil => "eosinophils",
        _ => "multinucleated giant cells",
    }
}

fn id_rule(t: Cell, importance: Importance) -> Fact {
    let clause = match t {
        Cell::Lymphocyte => {
            "lymphocytes are small round cells whose dark nucleus fills most of the cell"
        }
        Cell::Neutrophil => {
            "neutrophils have pale cytoplasm and a nucleus with three to five lobes"
        }
        Cell::Eosinophil => "eosinophils have bright red granules and a two-lobed nucleus",
        _ => "multinucleated giant cells have many nuclei, often arranged in a ring",
    };
    Fact::rule("cell identification", clause, importance)
}

fn dx(t: Cell) -> (&'static str, &'static str) {
    match t {
        Cell::Lymphocyte => ("chronic inflammation", "a lymphocyte-rich infiltrate means chronic inflammation"),
        Cell::Neutrophil => ("acute inflammation", "a neutrophil-rich infiltrate means acute inflammation"),
        Cell::Eosinophil => (
            "allergic or parasitic inflammation",
            "an eosinophil-rich infiltrate points to an allergic or parasitic cause",
        ),
        _ => ("granulomatous inflammation", "giant cells with epithelioid cells form granulomas, the mark of granulomatous inflammation"),
    }
}

fn start(rng: &mut ChaCha8Rng, stem: &str) -> (usize, Cell, String) {
    let correct = rng.random_range(0..TYPES.len());
    (
        correct,
        TYPES[correct],
        format!("{} {stem}", vignette(rng, &COMPLAINTS)),
    )
}

pub(crate) fn cell_type(rng: &mut ChaCha8Rng) -> Built {
    let (correct, t, stem) = start(
        rng,
        "Which cell type predominates in this H&E-stained section?",
    );
    let (scene, finding, support) = section(rng, t);
    let choices: Vec<&'static str> = TYPES.iter().map(|&c| name(c)).collect();
    Built {
        stem,
        correct,
        findings: vec![finding, support],
        rules: vec![id_rule(t, Importance::Core)],
        link: link(
            &format!("the dominant cells have the features of {}", name(t)),
            choices[correct],
        ),
        choices,
        scene: AnyScene::Histo(scene),
    }
}

pub(crate) fn diagnosis(rng: &mut ChaCha8Rng) -> Built {
    let (correct, t, stem) = start(rng, "Which process does this biopsy show?");
    let (scene, finding, _) = section(rng, t);
    let choices: Vec<&'static str> = TYPES.iter().map(|&c| dx(c).0).collect();
    Built {
        stem,
        correct,
        findings: vec![finding],
        rules: vec![
            id_rule(t, Importance::Supporting),
            Fact::rule("diagnostic rule", dx(t).1, Importance::Core),
        ],
        link: link(
            &format!("the infiltrate is made of {}", name(t)),
            choices[correct],
        ),
        choices,
        scene: AnyScene::Histo(scene),
    }
}

pub(crate) fn workup(rng: &mut ChaCha8Rng) -> Built {
    let (correct, t, stem) = start(rng, "Which test should be done next on this biopsy?");
    let (scene, finding, _) = section(rng, t);
    let choices = vec![
        "viral PCR of the tissue",
        "bacterial culture of the tissue",
        "stool tests for parasites",
        "acid-fast stain for mycobacteria",
    ];
    let clause = match t {
        Cell::Lymphocyte => "chronic lymphocytic inflammation is tested for viruses by PCR",
        Cell::Neutrophil => "acute neutrophilic inflammation calls for bacterial culture",
        Cell::Eosinophil => "eosinophilic inflammation calls for stool tests for parasites",
        _ => "granulomas call for an acid-fast stain to exclude tuberculosis",
    };
    Built {
        stem,
        correct,
        findings: vec![finding],
        rules: vec![
            Fact::rule("diagnostic rule", dx(t).1, Importance::Supporting),
            Fact::rule("workup rule", clause, Importance::Core),
        ],
        link: link(&format!("this is {}", dx(t).0), choices[correct]),
        choices,
        scene: AnyScene::Histo(scene),
    }
}

pub(crate) fn render(s: &Scene, w: u32, h: u32, rng: &mut ChaCha8Rng) -> Canvas {
    let (a, b, p): (f32, f32, f32) = (
        rng.random_range(8.0..14.0),
        rng.random_range(20.0..40.0),
        rng.random_range(0.0..6.3),
    );
    let mut c = Canvas::from_fn(w, h, |u, v| {
        // Wavy collagen fibres: light streaks on the pink stroma.
        let fibre = ((v * b + (u * a).sin() * 1.5 + p).sin()).max(0.0).powi(4);
        mix([228.0, 170.0, 200.0], [245.0, 215.0, 230.0], fibre)
    });
    let wf = w as f32;
    for &(u, v, ang, kind) in &s.cells {
        let (x, y) = (c.x(u), c.y(v));
        let (dx, dy) = (ang.cos(), ang.sin());
        match kind {
            Cell::Lymphocyte => {
                let r = 0.016 * wf;
                c.disc(x, y, r * 1.3, [205.0, 150.0, 200.0], 0.6, 1.0);
                c.disc(x, y, r, [70.0, 35.0, 120.0], 0.95, 1.0);
            }
            Cell::Neutrophil => {
                let r = 0.028 * wf;
                c.disc(x, y, r, [215.0, 185.0, 228.0], 0.9, 1.0);
                for k in [-1.0f32, 0.0, 1.0] {
                    let t = ang + k * 1.3;
                    c.disc(
                        x + t.cos() * r * 0.45,
                        y + t.sin() * r * 0.45,
                        r * 0.3,
                        NUCLEUS,
                        0.95,
                        1.0,
                    );
                }
            }
            Cell::Eosinophil => {
                let r = 0.03 * wf;
                c.disc(x, y, r, [238.0, 100.0, 90.0], 0.95, 1.0);
                for k in [-1.0f32, 1.0] {
                    c.disc(
                        x + dx * r * 0.4 * k,
                        y + dy * r * 0.4 * k,
                        r * 0.33,
                        NUCLEUS,
                        0.95,
                        1.0,
                    );
                }
            }
            Cell::Giant => {
                let r = 0.11 * wf;
                c.disc(x, y, r, [240.0, 200.0, 225.0], 0.95, 2.0);
                let n = 14;
                for i in 0..n {
                    let t = ang + i as f32 * std::f32::consts::TAU / n as f32;
                    let (nx, ny) = (x + t.cos() * r * 0.75, y + t.sin() * r * 0.75);
                    c.ellipse(
                        nx,
                        ny,
                        r * 0.13,
                        r * 0.07,
                        t + std::f32::consts::FRAC_PI_2,
                        [110.0, 60.0, 150.0],
                        0.95,
                    );
                }
            }
            Cell::Epithelioid => {
                c.ellipse(
                    x,
                    y,
                    0.028 * wf,
                    0.011 * wf,
                    ang,
                    [165.0, 120.0, 185.0],
                    0.9,
                );
            }
        }
    }
    c.noise(rng, 10.0, false);
    c
}
