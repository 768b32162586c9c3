//! `omr eval` end to end through the binary: two seeded tiny models on the synthetic test
//! split (whose shards carry the rubric columns), greedy and batched; the rules judge (files
//! written, accuracy per group, PKR on every item, pairwise by PKR, identical reruns); the
//! HTTP judge on a loopback OpenAI-style server through `--config` (a rerun is served from the
//! cache: zero requests); and bad input (missing model or data, a config typo) as exit code 2
//! with a message naming the culprit.

mod common;

#[path = "../crates/omr-eval/tests/support/mod.rs"]
mod server;

use common::{ok, omr, s, synth};
use serde_json::Value;
use std::path::Path;

fn read_json(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn lines(p: &Path) -> Vec<Value> {
    std::fs::read_to_string(p)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn eval_rules_http_and_bad_input() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("d");
    synth(&d, 8, 6, 0, 600);
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    for (m, seed) in [(&a, "1"), (&b, "2")] {
        ok(&[
            "model",
            "init",
            "--processor",
            s(&d.join("processor")),
            "--out",
            s(m),
            "--seed",
            seed,
        ]);
    }
    let base = |out: &Path| -> Vec<String> {
        [
            "eval",
            "--model",
            s(&a),
            "--data",
            s(&d),
            "--limit",
            "4",
            "--batch-size",
            "3",
            "--max-new-tokens",
            "6",
            "--out",
            s(out),
        ]
        .iter()
        .map(|x| x.to_string())
        .collect()
    };

    // Rules judge, with a second model for pairwise preference.
    let out = tmp.path().join("rules");
    let mut args = base(&out);
    args.extend(["--compare".into(), s(&b).into()]);
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let table = ok(&argv);
    assert!(
        table.contains("answer accuracy") && table.contains("trace (mean of P, K, R)"),
        "{table}"
    );
    assert!(table.contains("Pairwise"), "{table}");
    let r = read_json(&out.join("eval.json"));
    assert_eq!(r["items"], 4);
    assert_eq!(r["split"], "test");
    assert_eq!(r["judge"], "rules");
    assert_eq!(r["model"]["accuracy"]["overall"]["total"], 4);
    let fam: u64 = r["model"]["accuracy"]["by_group"]["task_family"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v["total"].as_u64().unwrap())
        .sum();
    assert_eq!(fam, 4, "every item has a task family");
    assert!(r["model"]["accuracy"]["by_group"]["modality"].is_object());
    assert_eq!(
        r["model"]["pkr"]["items"], 4,
        "every synthetic test item has a rubric"
    );
    let trace = r["model"]["pkr"]["trace"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&trace));
    assert_eq!(r["compare"]["accuracy"]["overall"]["total"], 4);
    let p = &r["pairwise"];
    assert_eq!(p["method"], "pkr");
    assert_eq!(
        p["compared"].as_u64().unwrap() + p["not_compared"].as_u64().unwrap(),
        4
    );
    assert_eq!(
        p["wins"].as_u64().unwrap() + p["ties"].as_u64().unwrap() + p["losses"].as_u64().unwrap(),
        p["compared"].as_u64().unwrap()
    );
    assert_eq!(
        std::fs::read_to_string(out.join("eval.md")).unwrap().trim(),
        table.trim()
    );
    let items = lines(&out.join("replies.jsonl"));
    assert_eq!(items.len(), 4);
    for it in &items {
        assert!(it["item"].as_str().unwrap().contains("test-"), "{it}");
        assert!(it["new_tokens"].as_u64().unwrap() <= 6);
        let units = it["pkr"]["perception"].as_array().unwrap().len()
            + it["pkr"]["knowledge"].as_array().unwrap().len()
            + it["pkr"]["rationale"].as_array().unwrap().len();
        assert!(units >= 2, "rubric units judged: {it}");
    }
    assert_eq!(lines(&out.join("replies-compare.jsonl")).len(), 4);

    // Greedy: a rerun (another batch size) gives the same replies.
    let out2 = tmp.path().join("rules2");
    let mut args = base(&out2);
    args[8] = "4".into();
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    ok(&argv);
    let replies = |p: &Path| {
        lines(p)
            .iter()
            .map(|v| v["reply"].clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        replies(&out.join("replies.jsonl")),
        replies(&out2.join("replies.jsonl"))
    );

    // The HTTP judge through --config: every presence answer 2, every correctness +1, so the
    // trace score is exactly 1 whatever the tiny model wrote.
    let srv = server::serve(|_, r| {
        server::answer(if r.prompt().contains("single digit only") {
            "2"
        } else {
            "1"
        })
    });
    let cfg = tmp.path().join("eval.toml");
    std::fs::write(
        &cfg,
        format!(
            "[judge]\nkind = \"http\"\nurl = \"{}\"\nmodel = \"judge-m\"\ncache_dir = \"{}\"\nretries = 0\n",
            srv.url,
            s(&tmp.path().join("cache"))
        ),
    )
    .unwrap();
    let run_http = |out: &Path| {
        let mut args = base(out);
        args.extend(["--config".into(), s(&cfg).into()]);
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        ok(&argv);
        read_json(&out.join("eval.json"))
    };
    let h = run_http(&tmp.path().join("http"));
    assert_eq!(h["model"]["pkr"]["trace"], 1.0);
    let sent = h["judge_requests"].as_u64().unwrap() as usize;
    assert!(sent > 0);
    assert_eq!(srv.count(), sent);
    let h2 = run_http(&tmp.path().join("http2"));
    assert_eq!(srv.count(), sent, "the rerun is answered from the cache");
    assert_eq!(
        (
            h2["judge_requests"].as_u64(),
            h2["judge_cache_hits"].as_u64()
        ),
        (Some(0), Some(sent as u64))
    );
    assert_eq!(h2["model"]["pkr"], h["model"]["pkr"]);

    // Bad input: exit 2, naming what to fix.
    let fails = |argv: &[&str], needle: &str| {
        let o = omr(argv);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{argv:?}: {err}");
        assert!(err.contains(needle), "{argv:?}: {needle:?} not in {err}");
    };
    let missing = tmp.path().join("missing");
    fails(
        &["eval", "--model", s(&missing), "--data", s(&d)],
        s(&missing),
    );
    fails(
        &["eval", "--model", s(&a), "--data", s(&missing)],
        s(&missing),
    );
    fails(
        &[
            "eval",
            "--model",
            s(&a),
            "--data",
            s(&d),
            "--split",
            "validation",
        ],
        "validation",
    );
    std::fs::write(
        &cfg,
        "[judge]\nkind = \"http\"\nurl = \"http://127.0.0.1:9\"\nmodle = \"x\"\n",
    )
    .unwrap();
    fails(
        &[
            "eval",
            "--model",
            s(&a),
            "--data",
            s(&d),
            "--config",
            s(&cfg),
        ],
        "modle",
    );
    fails(
        &["eval", "--model", s(&a), "--data", s(&d), "--judge", "gpt"],
        "gpt",
    );
}
