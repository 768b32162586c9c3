//! The chest film: geometry (lungs, heart, zones, the 36 cm field) and drawing.
//!
//! A gray field: body, two dark lung ellipses with rib bands and faint markings, a bright
//! mediastinum and heart, film grain; findings are bright round opacities, a basal effusion
//! with a curved upper edge (meniscus), or a pneumothorax (a black lateral rim without markings
//! behind a thin pleural line). Lung 0 is the patient's right, drawn on the image left.

use super::spaced_point;
use crate::synth::draw::{gray, Canvas};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// Width of the imaged field, to turn radii into centimetres.
const FIELD_CM: f32 = 36.0;
/// Lungs as (centre u, centre v, radius u, radius v); index 0 = patient right = image left.
const LUNGS: [(f32, f32, f32, f32); 2] = [(0.31, 0.52, 0.16, 0.33), (0.69, 0.52, 0.16, 0.33)];
const HEART: (f32, f32, f32, f32) = (0.53, 0.68, 0.11, 0.10);

#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Lesion {
    pub u: f32,
    pub v: f32,
    /// Radius as a fraction of the image width.
    pub r: f32,
}

pub(crate) struct Scene {
    pub lesions: Vec<Lesion>,
    /// Lung index (0 = patient right) with a pleural effusion.
    pub effusion: Option<usize>,
    pub pneumothorax: Option<usize>,
}

pub(crate) fn diameter_cm(r: f32) -> u32 {
    (2.0 * r * FIELD_CM).round() as u32
}

/// One round lesion in a lung (0/1) and zone (0 upper, 1 lower), sized as nodule or mass.
pub(crate) fn single_lesion(rng: &mut ChaCha8Rng, lung: usize, lower: bool, mass: bool) -> Lesion {
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
pub(crate) fn scatter(rng: &mut ChaCha8Rng, per_lung: [usize; 2]) -> Vec<Lesion> {
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
