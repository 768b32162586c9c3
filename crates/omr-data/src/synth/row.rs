//! One synthetic row, built in memory from `(split, index, seed)` alone.
//!
//! Every row owns its random streams, keyed by a SplitMix64 hash of the seed, the split and
//! the row index, so a row never depends on which rows were generated before it: generation
//! can run in any order or in parallel and still give the same bytes. Each row key drives two
//! ChaCha8 streams: stream 0 (the "latent" stream) picks the task, the answer class, the scene
//! geometry, the vignette and the option order; stream 1 (the "pixel" stream) only draws
//! texture, noise and the size jitter. The text therefore never depends on the image settings,
//! and [`synth_text`] can produce the text of a row without drawing it.

use super::rubric;
use super::tasks::{Fact, TASKS};
use super::write::{RawImage, RawRow};
use super::SynthError;
use crate::sample::{Content, ImageBytes, Mcq, Message, Origin, Role, Rubric, Sample};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeMap;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Split {
    Train,
    Test,
}

impl Split {
    pub fn as_str(&self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Test => "test",
        }
    }
}

/// How rows are drawn: image `size` (width, height) with each side drawn uniformly in
/// `size ± jitter` when `jitter > 0` (to exercise resizing downstream), and whether the options
/// are shuffled (the default, as in real MCQ sets) or kept in the task's class order (the CPU
/// demo: a model trained for minutes learns to see the finding long before it learns to look
/// its letter up among shuffled options).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RowSpec {
    pub size: (u32, u32),
    pub jitter: u32,
    pub shuffle_options: bool,
}

impl Default for RowSpec {
    fn default() -> Self {
        RowSpec {
            size: (224, 224),
            jitter: 0,
            shuffle_options: true,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SynthImage {
    pub jpeg: Vec<u8>,
    /// File name stored in the HF `Image` struct, e.g. `synth_train_000123.jpg`.
    pub path: String,
    pub width: u32,
    pub height: u32,
}

/// A generated row: exactly what the parquet files hold, plus the parsed options.
#[derive(Clone, Debug, PartialEq)]
pub struct SynthRow {
    pub split: Split,
    pub index: u64,
    /// `None` only from [`synth_text`].
    pub image: Option<SynthImage>,
    /// Vignette and stem, then one option per line (`A. …` or, in a quarter of rows, `A) …`).
    pub question: String,
    /// `(letter, text)` in the order they appear in `question`.
    pub options: Vec<(String, String)>,
    pub answer: String,
    /// `<think>…</think><answer>X</answer>`.
    pub reasoning: String,
    /// Filled on the test split, empty lists on train (as in OpenMedReason).
    pub rubric: Rubric,
    pub task_family: String,
    pub task: String,
    pub modality: String,
}

/// SplitMix64 finaliser: a fixed, platform-independent 64-bit mix (std's hashers make no
/// stability promise across Rust versions).
fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The row's ChaCha8 key: 32 bytes from chained SplitMix64 over (seed, split, index).
fn row_rng(split: Split, index: u64, seed: u64) -> ChaCha8Rng {
    // The split name's bytes, so train and test rows of one index get unrelated streams.
    let tag = split
        .as_str()
        .bytes()
        .fold(0u64, |t, b| t << 8 | u64::from(b));
    let mut h = splitmix(splitmix(splitmix(seed) ^ tag) ^ index);
    let mut key = [0u8; 32];
    for chunk in key.chunks_exact_mut(8) {
        h = splitmix(h);
        chunk.copy_from_slice(&h.to_le_bytes());
    }
    ChaCha8Rng::from_seed(key)
}

/// Text of a row without its image (cheap: no drawing, no JPEG). Same text as [`synth_row`].
pub fn synth_text(split: Split, index: u64, seed: u64) -> SynthRow {
    plan(split, index, seed, true).0
}

/// A full row at the default image size (224×224).
pub fn synth_row(split: Split, index: u64, seed: u64) -> Result<SynthRow, SynthError> {
    synth_row_with(split, index, seed, &RowSpec::default())
}

pub fn synth_row_with(
    split: Split,
    index: u64,
    seed: u64,
    spec: &RowSpec,
) -> Result<SynthRow, SynthError> {
    let (mut row, scene) = plan(split, index, seed, spec.shuffle_options);
    let mut pixels = row_rng(split, index, seed);
    pixels.set_stream(1);
    let side = |rng: &mut ChaCha8Rng, s: u32| {
        if spec.jitter == 0 {
            s
        } else {
            rng.random_range(s.saturating_sub(spec.jitter).max(1)..=s + spec.jitter)
        }
    };
    let (w, h) = (
        side(&mut pixels, spec.size.0),
        side(&mut pixels, spec.size.1),
    );
    let jpeg = scene
        .render(w, h, &mut pixels)
        .encode_jpeg(scene.grayscale())
        .map_err(|e| SynthError::Image(format!("{} row {index}: {e}", split.as_str())))?;
    row.image = Some(SynthImage {
        jpeg,
        path: format!("synth_{}_{index:06}.jpg", split.as_str()),
        width: w,
        height: h,
    });
    Ok(row)
}

/// Draws the task, its item and the option order; returns the row (no image) and its scene.
fn plan(split: Split, index: u64, seed: u64, shuffle: bool) -> (SynthRow, super::tasks::Scene) {
    let mut rng = row_rng(split, index, seed);
    let def = &TASKS[rng.random_range(0..TASKS.len())];
    let built = (def.build)(&mut rng);
    let mut order: Vec<usize> = (0..built.choices.len()).collect();
    if shuffle {
        order.shuffle(&mut rng);
    }
    let sep = if rng.random_bool(0.25) { ")" } else { "." };
    let options: Vec<(String, String)> = order
        .iter()
        .enumerate()
        .map(|(i, &c)| (letter(i), built.choices[c].to_string()))
        .collect();
    let pos = order.iter().position(|&c| c == built.correct).unwrap_or(0);
    let answer = letter(pos);
    let mut question = built.stem.clone();
    for (l, text) in &options {
        question.push_str(&format!("\n{l}{sep} {text}"));
    }
    let link = Fact {
        sentence: built.link.sentence.replace("{L}", &answer),
        claim: built.link.claim.replace("{L}", &answer),
        ..built.link.clone()
    };
    let reasoning = rubric::trace(&built.findings, &built.rules, &link, &answer);
    let rubric = match split {
        Split::Test => rubric::rubric(&built.findings, &built.rules, &link),
        Split::Train => Rubric::default(),
    };
    let row = SynthRow {
        split,
        index,
        image: None,
        question,
        options,
        answer,
        reasoning,
        rubric,
        task_family: def.family.as_str().to_string(),
        task: def.name.to_string(),
        modality: def.modality.as_str().to_string(),
    };
    (row, built.scene)
}

/// "A", "B", … (the catalogue has at most five options).
fn letter(i: usize) -> String {
    char::from(b'A' + i as u8).to_string()
}

impl SynthRow {
    /// The row as the writer takes it; every field present (the image is null only for rows
    /// from [`synth_text`]).
    pub fn into_raw(self) -> RawRow {
        RawRow {
            image: self.image.map(|i| RawImage {
                bytes: Some(i.jpeg),
                path: Some(i.path),
            }),
            question: Some(self.question),
            reasoning: Some(self.reasoning),
            answer: Some(self.answer),
            perception: Some(self.rubric.perception),
            knowledge: Some(self.rubric.knowledge),
            rationale: Some(self.rubric.rationale),
            task_family: Some(self.task_family),
            task: Some(self.task),
            modality: Some(self.modality),
        }
    }

    pub fn to_raw(&self) -> RawRow {
        self.clone().into_raw()
    }

    /// The row as the shared [`Sample`] a reader of the parquet files would produce: a user
    /// turn `[image, question]` and an assistant turn with the reference trace; `mcq.question`
    /// is the full question text (options included), `meta` holds the three tags.
    pub fn to_sample(&self, source: &str, shard: &str, row: u64) -> Sample {
        let images = self
            .image
            .iter()
            .map(|i| ImageBytes {
                bytes: i.jpeg.clone(),
                path: Some(i.path.clone()),
            })
            .collect::<Vec<_>>();
        let mut user = Vec::new();
        if !images.is_empty() {
            user.push(Content::Image);
        }
        user.push(Content::Text {
            text: self.question.clone(),
        });
        let has_rubric = !(self.rubric.perception.is_empty()
            && self.rubric.knowledge.is_empty()
            && self.rubric.rationale.is_empty());
        Sample {
            origin: Origin {
                source: source.to_string(),
                shard: shard.to_string(),
                row,
            },
            images,
            messages: vec![
                Message {
                    role: Role::User,
                    content: user,
                },
                Message::text(Role::Assistant, self.reasoning.clone()),
            ],
            mcq: Some(Mcq {
                question: self.question.clone(),
                options: self.options.clone(),
                answer: self.answer.clone(),
            }),
            reasoning: Some(self.reasoning.clone()),
            rubric: has_rubric.then(|| self.rubric.clone()),
            meta: BTreeMap::from([
                ("task_family".to_string(), self.task_family.clone()),
                ("task".to_string(), self.task.clone()),
                ("modality".to_string(), self.modality.clone()),
            ]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_depend_only_on_their_key() {
        let a = synth_text(Split::Train, 17, 5);
        let _ = synth_text(Split::Train, 3, 5);
        assert_eq!(a, synth_text(Split::Train, 17, 5));
        assert_ne!(a.question, synth_text(Split::Test, 17, 5).question);
        assert_ne!(a.question, synth_text(Split::Train, 17, 6).question);
    }

    #[test]
    fn text_does_not_depend_on_image_size() {
        let small = synth_row_with(
            Split::Test,
            4,
            9,
            &RowSpec {
                size: (96, 80),
                jitter: 0,
                shuffle_options: true,
            },
        )
        .expect("row");
        let big = synth_row_with(
            Split::Test,
            4,
            9,
            &RowSpec {
                size: (300, 260),
                jitter: 20,
                shuffle_options: true,
            },
        )
        .expect("row");
        assert_eq!(
            (small.question, small.reasoning),
            (big.question.clone(), big.reasoning.clone())
        );
        let img = big.image.expect("image");
        assert!((280..=320).contains(&img.width) && (240..=280).contains(&img.height));
    }

    #[test]
    fn sample_view_keeps_the_fields() {
        let r = synth_row(Split::Test, 0, 1).expect("row");
        let s = r.to_sample("synth", "data/test-00000-of-00001.parquet", 0);
        assert_eq!(s.images.len(), 1);
        assert_eq!(s.messages[0].image_count(), 1);
        assert_eq!(
            s.mcq.as_ref().map(|m| m.answer.as_str()),
            Some(r.answer.as_str())
        );
        assert!(s.rubric.is_some());
        assert_eq!(s.meta["task"], r.task);
    }
}
