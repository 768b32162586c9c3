//! What a run writes about itself: the fixed-format step line, the metrics.jsonl records, their
//! truncation on resume, and the TensorBoard event files, read back here by a TFRecord reader
//! of our own (with its own CRC masking) so the writer is not checked against itself.

use omr_train::metrics::{record, rss_mib, Metrics, MetricsError, StepStats, METRICS_FILE};
use omr_train::tensorboard::{Event, EventWriter, SESSION_START};
use prost::Message;
use std::fs;
use std::path::{Path, PathBuf};

fn stats(step: u64) -> StepStats {
    StepStats {
        step,
        total_steps: 300,
        epoch: 0.5,
        loss: 2.3456,
        lr: 1e-4,
        grad_norm: 1.234,
        tokens_per_s: 12345.0,
        samples_per_s: 12.3,
        step_time_s: 2.0,
        data_time_s: 0.06,
        mem_mib: 456.0,
        skipped: 0,
        bad_samples: 0,
        supervised_tokens: 900,
    }
}

/// Spelled as the TFRecord format describes it, not as the writer computes it.
#[allow(clippy::manual_rotate)]
fn mask(crc: u32) -> u32 {
    ((crc >> 15) | (crc << 17)).wrapping_add(0xa282_ead8)
}

/// Every record of a TFRecord file, both CRCs checked.
fn read_events(path: &Path) -> Vec<Event> {
    let bytes = fs::read(path).unwrap();
    let u32_at = |p: usize| u32::from_le_bytes(bytes[p..p + 4].try_into().unwrap());
    let mut events = Vec::new();
    let mut pos = 0;
    while pos < bytes.len() {
        let header = &bytes[pos..pos + 8];
        assert_eq!(u32_at(pos + 8), mask(crc32c::crc32c(header)), "length crc");
        let len = u64::from_le_bytes(header.try_into().unwrap()) as usize;
        let data = &bytes[pos + 12..pos + 12 + len];
        assert_eq!(
            u32_at(pos + 12 + len),
            mask(crc32c::crc32c(data)),
            "data crc"
        );
        events.push(Event::decode(data).unwrap());
        pos += 12 + len + 4;
    }
    assert_eq!(pos, bytes.len());
    events
}

fn event_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files
}

/// (tag, step, value) of every scalar.
fn scalars(events: &[Event]) -> Vec<(String, i64, f32)> {
    let mut out = Vec::new();
    for e in events {
        for v in e.summary.iter().flat_map(|s| &s.value) {
            out.push((v.tag.clone(), e.step, v.simple_value.unwrap()));
        }
    }
    out
}

#[test]
fn crc32c_is_castagnoli() {
    assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
}

/// The wire bytes, against the field numbers of TensorFlow's event.proto / summary.proto
/// (Event.step = 2, summary = 5, session_log = 7; Summary.value = 1; Value.tag = 1,
/// simple_value = 2; SessionLog.status = 1), which our own reader cannot check.
#[test]
fn event_bytes_match_tensorflow_field_numbers() {
    use omr_train::tensorboard::{SessionLog, Summary, SummaryValue};
    let start = Event {
        step: 4,
        session_log: Some(SessionLog {
            status: SESSION_START,
        }),
        ..Default::default()
    };
    assert_eq!(start.encode_to_vec(), [0x10, 4, 0x3a, 2, 0x08, 1]);
    let scalar = Event {
        step: 1,
        summary: Some(Summary {
            value: vec![SummaryValue {
                tag: "a".into(),
                simple_value: Some(0.0),
            }],
        }),
        ..Default::default()
    };
    let value = [0x0a, 1, b'a', 0x15, 0, 0, 0, 0];
    let mut expected = vec![0x10, 1, 0x2a, 10, 0x0a, 8];
    expected.extend(value);
    assert_eq!(scalar.encode_to_vec(), expected);
}

#[test]
fn tensorboard_file_reads_back() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = EventWriter::create(dir.path()).unwrap();
    w.add_scalar("train/loss", 2.5, 1, 1000.25).unwrap();
    w.add_scalar("train/skipped_steps", 0.0, 1, 1000.25)
        .unwrap();
    w.add_scalar("train/loss", f64::NAN, 2, 1001.0).unwrap();
    w.flush().unwrap();
    let name = w.path().file_name().unwrap().to_str().unwrap().to_string();
    assert!(name.starts_with("events.out.tfevents."), "{name}");
    assert!(
        name.ends_with(&format!(".{}.omr", std::process::id())),
        "{name}"
    );

    let events = read_events(w.path());
    assert_eq!(events.len(), 4);
    assert_eq!(events[0].file_version.as_deref(), Some("brain.Event:2"));
    assert!(events[0].wall_time > 1.6e9);
    assert_eq!((events[1].step, events[1].wall_time), (1, 1000.25));
    let s = scalars(&events);
    assert_eq!(s[0], ("train/loss".into(), 1, 2.5));
    // A zero is still written: `simple_value` is a oneof member.
    assert_eq!(s[1], ("train/skipped_steps".into(), 1, 0.0));
    assert!(s[2].2.is_nan());

    // A second writer in the same second and process gets its own file.
    let w2 = EventWriter::create(dir.path()).unwrap();
    assert_ne!(w2.path(), w.path());
    assert_eq!(event_files(dir.path()).len(), 2);
}

#[test]
fn step_line_has_fixed_format() {
    assert_eq!(
        stats(12).line(),
        "step  12/300 | loss  2.3456 | lr 1.00e-04 | gnorm  1.234 | tok/s  12345 | \
         samples/s   12.3 | mem    456 MiB | data   3% | skipped 0 | bad 0"
    );
    let s = StepStats {
        loss: f64::NAN,
        lr: 3e-5,
        step_time_s: 0.0,
        skipped: 2,
        bad_samples: 7,
        ..stats(300)
    };
    assert_eq!(
        s.line(),
        "step 300/300 | loss     NaN | lr 3.00e-05 | gnorm  1.234 | tok/s  12345 | \
         samples/s   12.3 | mem    456 MiB | data   0% | skipped 2 | bad 7"
    );
}

#[test]
fn jsonl_record_has_stable_names_and_nulls_for_non_finite() {
    assert_eq!(
        record(12, 1.5, stats(12).fields()),
        "{\"step\":12,\"wall_time\":1.5,\"train/loss\":2.3456,\"train/lr\":0.0001,\
         \"train/grad_norm\":1.234,\"train/epoch\":0.5,\"train/skipped_steps\":0,\
         \"train/supervised_tokens\":900,\"data/bad_samples\":0,\"time/step_s\":2.0,\
         \"time/data_s\":0.06,\"throughput/tokens_per_s\":12345.0,\
         \"throughput/samples_per_s\":12.3,\"memory/rss_mib\":456.0}\n"
    );
    let nan = StepStats {
        loss: f64::NAN,
        grad_norm: f64::INFINITY,
        ..stats(3)
    };
    let line = record(3, 1.5, nan.fields());
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert!(v["train/loss"].is_null() && v["train/grad_norm"].is_null());
    assert_eq!(v["train/lr"], 1e-4);
}

#[test]
fn metrics_write_jsonl_and_tensorboard_alike() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = Metrics::open(dir.path(), None, false, 300).unwrap();
    m.log_step(&stats(12)).unwrap();
    let eval = [
        ("loss".to_string(), 1.25),
        ("eval/accuracy".to_string(), 0.5),
    ];
    m.log_scalars(12, "eval", &eval).unwrap();
    m.finish();

    let text = fs::read_to_string(dir.path().join(METRICS_FILE)).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2);
    assert!(lines[0].starts_with("{\"step\":12,\"wall_time\":"));
    let train: serde_json::Map<String, serde_json::Value> = serde_json::from_str(lines[0]).unwrap();
    let eval: serde_json::Value = serde_json::from_str(lines[1]).unwrap();
    assert_eq!(eval["step"], 12);
    assert_eq!(
        (&eval["eval/loss"], &eval["eval/accuracy"]),
        (&1.25.into(), &0.5.into())
    );

    let files = event_files(&dir.path().join("tb"));
    assert_eq!(files.len(), 1);
    let tb = scalars(&read_events(&files[0]));
    let names: Vec<&str> = tb.iter().map(|(t, _, _)| t.as_str()).collect();
    let keys: Vec<&str> = train.keys().map(String::as_str).collect();
    let mut expected: Vec<&str> = keys
        .iter()
        .copied()
        .filter(|k| *k != "step" && *k != "wall_time")
        .collect();
    expected.extend(["eval/loss", "eval/accuracy"]);
    let (mut names_sorted, mut expected_sorted) = (names.clone(), expected.clone());
    names_sorted.sort();
    expected_sorted.sort();
    assert_eq!(names_sorted, expected_sorted);
    for (tag, step, value) in &tb {
        assert_eq!(*step, 12);
        let json = if tag.starts_with("eval/") {
            &eval[tag.as_str()]
        } else {
            &train[tag.as_str()]
        };
        assert_eq!(*value, json.as_f64().unwrap() as f32, "{tag}");
    }
}

#[test]
fn progress_bar_mode_writes_the_same_records() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = Metrics::open(dir.path(), None, true, 300).unwrap();
    m.log_step(&stats(1)).unwrap();
    m.log_scalars(1, "eval", &[("loss".into(), 1.0)]).unwrap();
    m.finish();
    m.finish();
    let text = fs::read_to_string(dir.path().join(METRICS_FILE)).unwrap();
    assert_eq!(text.lines().count(), 2);
}

#[test]
fn resume_keeps_records_up_to_the_checkpoint_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(METRICS_FILE);
    let mut m = Metrics::open(dir.path(), None, false, 6).unwrap();
    for step in 1..=5 {
        m.log_step(&StepStats {
            loss: 1.0 / step as f64,
            ..stats(step)
        })
        .unwrap();
        if step % 2 == 0 {
            m.log_scalars(step, "eval", &[("loss".into(), 0.5)])
                .unwrap();
        }
    }
    m.finish();
    drop(m);
    let before = fs::read_to_string(&path).unwrap();
    let steps_of = |text: &str| -> Vec<u64> {
        text.lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                    .as_u64()
                    .unwrap()
            })
            .collect()
    };
    assert_eq!(steps_of(&before), [1, 2, 2, 3, 4, 4, 5]);
    // A crash in the middle of a write leaves a torn last line; resuming drops it.
    fs::write(&path, format!("{before}{{\"step\":6,\"train/lo")).unwrap();

    let mut m = Metrics::open(dir.path(), Some(3), false, 6).unwrap();
    let after = fs::read_to_string(&path).unwrap();
    let kept: String = before.split_inclusive('\n').take(4).collect();
    assert_eq!(after, kept);
    m.log_step(&stats(4)).unwrap();
    m.finish();
    assert_eq!(
        steps_of(&fs::read_to_string(&path).unwrap()),
        [1, 2, 2, 3, 4]
    );

    // A new event file, opened with a session start at k + 1.
    let files = event_files(&dir.path().join("tb"));
    assert_eq!(files.len(), 2);
    let events = read_events(&files[1]);
    let start = events[1].session_log.as_ref().unwrap();
    assert_eq!((start.status, events[1].step), (SESSION_START, 4));
    assert_eq!(scalars(&events)[0], ("train/loss".into(), 4, 2.3456));
}

#[test]
fn resume_names_a_malformed_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(METRICS_FILE);
    fs::write(&path, "{\"step\":1}\nnot json\n{\"step\":2}\n").unwrap();
    let err = Metrics::open(dir.path(), Some(2), false, 6).err().unwrap();
    assert!(
        matches!(err, MetricsError::Malformed { line: 2, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("metrics.jsonl:2:"), "{err}");
    // Nothing was rewritten.
    assert_eq!(
        fs::read_to_string(&path).unwrap(),
        "{\"step\":1}\nnot json\n{\"step\":2}\n"
    );
}

#[test]
fn rss_is_measured_on_linux() {
    let rss = rss_mib();
    if cfg!(target_os = "linux") {
        assert!(rss > 1.0 && rss < 1e6, "{rss}");
    } else {
        assert_eq!(rss, 0.0);
    }
}

/// A run stopped after step 5 and resumed from its checkpoint at step 3, with different losses
/// after the resume, for `scripts/fixtures/check_tensorboard.py` (OMR_TB_OUT=DIR keeps it).
/// TensorBoard should show steps 1–3 of the first run and 4–5 of the second.
#[test]
fn tensorboard_sample() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = std::env::var_os("OMR_TB_OUT").map_or(tmp.path().to_path_buf(), PathBuf::from);
    let _ = fs::remove_dir_all(&dir);
    let mut m = Metrics::open(&dir, None, false, 5).unwrap();
    for step in 1..=5 {
        m.log_step(&StepStats {
            loss: 10.0 + step as f64,
            ..stats(step)
        })
        .unwrap();
    }
    m.log_scalars(
        4,
        "eval",
        &[("loss".into(), 9.0), ("accuracy".into(), 0.25)],
    )
    .unwrap();
    m.finish();
    drop(m);
    let mut m = Metrics::open(&dir, Some(3), false, 5).unwrap();
    for step in 4..=5 {
        m.log_step(&StepStats {
            loss: 20.0 + step as f64,
            ..stats(step)
        })
        .unwrap();
    }
    m.log_scalars(4, "eval", &[("loss".into(), 8.0), ("accuracy".into(), 0.5)])
        .unwrap();
    m.finish();
    let losses: Vec<f64> = fs::read_to_string(dir.join(METRICS_FILE))
        .unwrap()
        .lines()
        .filter_map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["train/loss"].as_f64()
        })
        .collect();
    assert_eq!(losses, [11.0, 12.0, 13.0, 24.0, 25.0]);
}
