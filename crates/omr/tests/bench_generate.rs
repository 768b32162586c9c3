//! `omr bench generate` as a user runs it: the rollout timed as prefill and decoding, the JSON
//! report, GRPO's groups, the transformers reference (a stand-in "python": CI has no torch) and
//! the exit codes of bad flags.

mod common;

use common::{omr, read_json, text};

/// `omr bench generate` on the tiny model: one generation call timed as prefill and decoding,
/// with the device sampler and the host one, the decoding pass alone (and the host's time
/// issuing it), the JSON report's fields, the plan of the call's memory; a bad flag exits 2.
#[test]
fn bench_generate_reports_prefill_decoding_and_the_plan() {
    let dir = tempfile::tempdir().unwrap();
    for sampler in ["device", "host"] {
        let json = dir.path().join(format!("{sampler}.json"));
        let o = omr(&[
            "bench",
            "generate",
            "--rows",
            "4",
            "--prompt",
            "96",
            "--image-px",
            "56",
            "--new",
            "24",
            "--sampler",
            sampler,
            "--json",
            json.to_str().unwrap(),
        ]);
        let t = text(&o);
        assert_eq!(o.status.code(), Some(0), "{t}");
        assert!(
            t.contains("ms/step") && t.contains(&format!("sampler on the {sampler}")),
            "{t}"
        );
        let v = read_json(&json);
        for k in [
            "prefill_ms",
            "decode_ms_per_step",
            "new_tokens_per_s",
            "plan_growth_mib",
            "pass_ms_per_step",
            "pass_enqueue_ms_per_step",
        ] {
            let x = v[k].as_f64().unwrap_or(f64::NAN);
            assert!(x.is_finite() && x > 0.0, "{k}: {v}");
        }
        // The host's share of a pass is part of the pass.
        let (issue, whole) = (
            v["pass_enqueue_ms_per_step"].as_f64().unwrap(),
            v["pass_ms_per_step"].as_f64().unwrap(),
        );
        assert!(issue <= whole, "{v}");
        assert!(t.contains("decoding pass alone"), "{t}");
    }
    let o = omr(&["bench", "generate", "--sampler", "gpu"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    // GRPO's groups: 4 rows from 2 prompts, each prefilled once; a group must divide the rows.
    let o = omr(&[
        "bench",
        "generate",
        "--rows",
        "4",
        "--group",
        "2",
        "--prompt",
        "64",
        "--image-px",
        "56",
        "--new",
        "16",
        "--repeats",
        "3",
    ]);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(0), "{t}");
    assert!(
        t.contains("groups of 2: 2 prompts, each prefilled once"),
        "{t}"
    );
    let o = omr(&["bench", "generate", "--rows", "4", "--group", "3"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
}

/// `omr bench generate --python`: the reference script runs with the prompts, the config and
/// the rollout's shape, and its report comes back as a ratio and in the JSON (a stand-in
/// "python" here: CI has no torch; `scripts/bench/generate.py` itself was run by hand, see the
/// README); a failing reference exits 2 with its stderr.
#[cfg(unix)]
#[test]
fn bench_generate_runs_the_reference() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let args_file = dir.path().join("args.txt");
    let fake = dir.path().join("python");
    std::fs::write(
        &fake,
        format!(
            "#!/bin/sh\necho \"$@\" > {}\necho '{{\"torch\": \"t\", \"transformers\": \"x\", \"dtype\": \"float32\", \"attention\": \"eager\", \"prefill_ms\": 10.0, \"decode_ms_per_step\": 4.0, \"new_tokens_per_s\": 100.0}}'\n",
            args_file.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let json = dir.path().join("g.json");
    let o = omr(&[
        "bench",
        "generate",
        "--rows",
        "2",
        "--prompt",
        "64",
        "--image-px",
        "56",
        "--new",
        "16",
        "--repeats",
        "3",
        "--json",
        json.to_str().unwrap(),
        "--python",
        fake.to_str().unwrap(),
    ]);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(0), "{t}");
    assert!(
        t.contains("transformers generate (torch t, transformers x"),
        "{t}"
    );
    assert!(t.contains("ours / transformers:"), "{t}");
    let args = std::fs::read_to_string(&args_file).unwrap();
    for want in [
        "generate.py",
        "--new 16",
        "--device cpu",
        "prompts.safetensors",
        "tiny.json",
    ] {
        assert!(args.contains(want), "{want} not in {args}");
    }
    let v = read_json(&json);
    assert_eq!(v["reference"]["decode_ms_per_step"], 4.0);

    std::fs::write(
        &fake,
        "#!/bin/sh\necho 'no module named torch' >&2\nexit 1\n",
    )
    .unwrap();
    let o = omr(&[
        "bench",
        "generate",
        "--rows",
        "1",
        "--prompt",
        "32",
        "--image-px",
        "0",
        "--new",
        "16",
        "--repeats",
        "3",
        "--python",
        fake.to_str().unwrap(),
    ]);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(2), "{t}");
    assert!(t.contains("no module named torch"), "{t}");
}
