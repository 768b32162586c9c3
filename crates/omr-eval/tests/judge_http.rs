//! The HTTP judge against a real OpenAI-style server on loopback: what it sends (endpoint,
//! body, auth header), retries after 500/429, timeouts, the on-disk cache (a rerun sends zero
//! requests), strict parsing (an unparsable reply is an error naming the item and unit), and
//! judged pairwise preference.

mod support;

use omr_data::sample::{Rubric, RubricUnit};
use omr_eval::judge::http::{HttpJudge, JudgeConfig};
use omr_eval::judge::{judge_trace, Judge, JudgeError, PairRef, Preference, TraceRef};
use omr_eval::pairwise::{self, Method, Pair};
use omr_eval::pkr::{Axis, Correctness, Presence};
use std::time::{Duration, Instant};
use support::{answer, serve, Action};

fn unit(id: &str, claim: &str) -> RubricUnit {
    RubricUnit {
        unit_id: id.into(),
        topic: "t".into(),
        claim: claim.into(),
        source_quote: claim.into(),
        importance: "core".into(),
        presence_question: format!("Does the trace mention {id}?"),
        correctness_question: format!("Does the trace correctly state {id}?"),
    }
}

fn rubric() -> Rubric {
    Rubric {
        perception: vec![
            unit("P1", "A 5 cm opacity."),
            unit("P2", "The left lung is clear."),
        ],
        knowledge: vec![unit("K1", "Over 3 cm is a mass.")],
        rationale: vec![unit("R1", "So the answer is mass.")],
    }
}

const TRACE: TraceRef = TraceRef {
    item: "synth:test-00000-of-00001.parquet#7",
    question: "Which finding? A. nodule B. mass",
    trace: "<think>A 5 cm opacity. Rule: over 3 cm is a mass.</think><answer>B</answer>",
};

fn config(url: &str, cache: &std::path::Path) -> JudgeConfig {
    JudgeConfig {
        kind: "http".into(),
        url: Some(url.into()),
        model: Some("judge-m".into()),
        api_key: Some("sk-test".into()),
        timeout_s: 5.0,
        retries: 3,
        backoff_s: 0.01,
        max_backoff_s: 0.05,
        cache_dir: Some(cache.to_path_buf()),
        ..Default::default()
    }
}

fn no_env(_: &str) -> Option<String> {
    None
}

/// Presence: 2 for P1 and K1, 0 for P2, 1 for R1; correctness +1 for P1, −1 for K1, +1 for R1.
fn scripted(_: usize, r: &support::Recorded) -> Action {
    let p = r.prompt();
    let presence = p.contains("single digit only");
    let reply = match (
        presence,
        ["P1", "P2", "K1", "R1"]
            .iter()
            .find(|u| p.contains(&format!("mention {u}?")) || p.contains(&format!("state {u}?"))),
    ) {
        (true, Some(&"P1")) | (true, Some(&"K1")) => "2",
        (true, Some(&"P2")) => "0",
        (true, Some(&"R1")) => "1",
        (false, Some(&"K1")) => "-1",
        (false, Some(_)) => "+1",
        _ => "?",
    };
    answer(reply)
}

#[test]
fn request_shape_scores_and_a_rerun_from_the_cache_sends_nothing() {
    let server = serve(scripted);
    let cache = tempfile::tempdir().unwrap();
    let judge = HttpJudge::new(&config(&server.url, cache.path()), &no_env).unwrap();
    let j = judge_trace(&judge, &TRACE, &rubric()).unwrap();

    // 4 presence questions + correctness for the 3 units with p ≥ 1 (not P2).
    assert_eq!(server.count(), 7);
    assert_eq!(judge.stats().requests, 7);
    let verdicts: Vec<(u8, Option<i8>)> = j
        .perception
        .iter()
        .chain(&j.knowledge)
        .chain(&j.rationale)
        .map(|v| (v.presence.value(), v.correctness.map(Correctness::value)))
        .collect();
    assert_eq!(
        verdicts,
        [(2, Some(1)), (0, None), (2, Some(-1)), (1, Some(1))]
    );
    // P: presence .5, correctness 1 → .5; K: 1 × 0 = 0; R: .5 × 1 = .5; trace (.5+0+.5)/3.
    assert_eq!(j.score.perception.unwrap().score, 0.5);
    assert_eq!(j.score.knowledge.unwrap().score, 0.0);
    assert_eq!(j.score.rationale.unwrap().score, 0.5);
    assert_eq!(j.score.trace, Some(1.0 / 3.0));

    let first = &server.requests()[0];
    assert_eq!(
        (first.method.as_str(), first.path.as_str()),
        ("POST", "/v1/chat/completions")
    );
    assert_eq!(first.header("authorization"), Some("Bearer sk-test"));
    assert_eq!(first.header("content-type"), Some("application/json"));
    let body = first.json();
    assert_eq!(body["model"], "judge-m");
    assert_eq!(body["temperature"], 0);
    assert_eq!(body["max_tokens"], 16);
    assert_eq!(body["messages"][0]["role"], "system");
    assert_eq!(body["messages"][1]["role"], "user");
    let prompt = first.prompt();
    for part in [
        TRACE.question,
        TRACE.trace,
        "Does the trace mention P1?",
        "A 5 cm opacity.",
        "perception axis",
    ] {
        assert!(
            prompt.contains(part),
            "{part:?} not in the prompt:\n{prompt}"
        );
    }

    // A new judge on the same cache: the same answers, zero requests.
    let again = HttpJudge::new(&config(&server.url, cache.path()), &no_env).unwrap();
    let j2 = judge_trace(&again, &TRACE, &rubric()).unwrap();
    assert_eq!(j2, j);
    assert_eq!(server.count(), 7, "a rerun must not ask the server");
    assert_eq!((again.stats().requests, again.stats().cache_hits), (0, 7));

    // Another judge model does not read the first one's answers.
    let mut other = config(&server.url, cache.path());
    other.model = Some("judge-2".into());
    let third = HttpJudge::new(&other, &no_env).unwrap();
    third
        .presence(&TRACE, Axis::Perception, &rubric().perception[0])
        .unwrap();
    assert_eq!(server.count(), 8);
}

#[test]
fn retries_after_500_and_429_then_gives_up_with_the_status() {
    let server = serve(|n, _| match n {
        0 => Action::Status(500, "{\"error\":\"overloaded\"}".into(), vec![]),
        1 => Action::Status(
            429,
            "{\"error\":\"slow down\"}".into(),
            vec![("Retry-After".into(), "0".into())],
        ),
        _ => answer("1"),
    });
    let cache = tempfile::tempdir().unwrap();
    let judge = HttpJudge::new(&config(&server.url, cache.path()), &no_env).unwrap();
    let p = judge
        .presence(&TRACE, Axis::Perception, &rubric().perception[0])
        .unwrap();
    assert_eq!(p, Presence::Partial);
    assert_eq!(server.count(), 3);

    let always = serve(|_, _| Action::Status(503, "busy".into(), vec![]));
    let fresh = tempfile::tempdir().unwrap(); // the first answer is cached in `cache`
    let mut cfg = config(&always.url, fresh.path());
    cfg.retries = 2;
    let judge = HttpJudge::new(&cfg, &no_env).unwrap();
    let err = judge
        .presence(&TRACE, Axis::Perception, &rubric().perception[0])
        .unwrap_err();
    assert!(matches!(err, JudgeError::Http { status: 503, .. }), "{err}");
    assert_eq!(always.count(), 3, "1 attempt + 2 retries");
}

#[test]
fn client_errors_are_not_retried() {
    let server = serve(|_, _| Action::Status(401, "{\"error\":\"bad key\"}".into(), vec![]));
    let cache = tempfile::tempdir().unwrap();
    let judge = HttpJudge::new(&config(&server.url, cache.path()), &no_env).unwrap();
    let err = judge
        .presence(&TRACE, Axis::Perception, &rubric().perception[0])
        .unwrap_err()
        .to_string();
    assert_eq!(server.count(), 1);
    assert!(
        err.contains("401") && err.contains("OMR_JUDGE_API_KEY") && err.contains("bad key"),
        "{err}"
    );
}

#[test]
fn a_slow_server_times_out_and_the_retry_succeeds() {
    let server = serve(|n, _| {
        if n == 0 {
            Action::Delay(Duration::from_secs(6), Box::new(answer("2")))
        } else {
            answer("2")
        }
    });
    let cache = tempfile::tempdir().unwrap();
    let mut cfg = config(&server.url, cache.path());
    cfg.timeout_s = 1.0;
    let t = Instant::now();
    let judge = HttpJudge::new(&cfg, &no_env).unwrap();
    let p = judge
        .presence(&TRACE, Axis::Perception, &rubric().perception[0])
        .unwrap();
    assert_eq!(p, Presence::Full);
    assert_eq!(server.count(), 2);
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());

    // Without retries the timeout is the error.
    let slow = serve(|_, _| Action::Delay(Duration::from_secs(6), Box::new(answer("2"))));
    let mut cfg = config(&slow.url, cache.path());
    cfg.timeout_s = 1.0;
    cfg.retries = 0;
    let judge = HttpJudge::new(&cfg, &no_env).unwrap();
    let err = judge
        .presence(&TRACE, Axis::Perception, &rubric().perception[1])
        .unwrap_err();
    assert!(
        matches!(err, JudgeError::Transport { attempts: 1, .. }),
        "{err}"
    );
    assert!(err.to_string().contains(&slow.url), "{err}");
}

#[test]
fn an_unparsable_reply_is_an_error_naming_the_item_and_is_not_cached() {
    let server = serve(|_, _| answer("The trace clearly mentions it, so 2."));
    let cache = tempfile::tempdir().unwrap();
    let judge = HttpJudge::new(&config(&server.url, cache.path()), &no_env).unwrap();
    let err = judge_trace(&judge, &TRACE, &rubric()).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, JudgeError::Unparsable { .. }), "{msg}");
    assert!(
        msg.contains(TRACE.item)
            && msg.contains("P1")
            && msg.contains("presence")
            && msg.contains("clearly mentions"),
        "{msg}"
    );
    let _ = judge.presence(&TRACE, Axis::Perception, &rubric().perception[0]);
    assert_eq!(server.count(), 2, "an unparsable reply must not be cached");

    // A reply that is not a chat completion at all.
    let broken = serve(|_, _| Action::Status(200, "{\"object\":\"list\"}".into(), vec![]));
    let judge = HttpJudge::new(&config(&broken.url, cache.path()), &no_env).unwrap();
    let err = judge
        .presence(&TRACE, Axis::Perception, &rubric().perception[0])
        .unwrap_err();
    assert!(matches!(err, JudgeError::BadResponse { .. }), "{err}");
}

#[test]
fn no_key_sends_no_authorization_and_the_env_supplies_url_and_model() {
    let server = serve(|_, _| answer("0"));
    let cache = tempfile::tempdir().unwrap();
    let url = server.url.clone();
    let env = move |k: &str| match k {
        "OMR_JUDGE_URL" => Some(url.clone()),
        "OMR_JUDGE_MODEL" => Some("env-model".to_string()),
        _ => None,
    };
    let cfg = JudgeConfig {
        cache_dir: Some(cache.path().to_path_buf()),
        ..Default::default()
    };
    let judge = HttpJudge::new(&cfg, &env).unwrap();
    let p = judge
        .presence(&TRACE, Axis::Knowledge, &rubric().knowledge[0])
        .unwrap();
    assert_eq!(p, Presence::Absent);
    let r = &server.requests()[0];
    assert_eq!(r.header("authorization"), None);
    assert_eq!(r.json()["model"], "env-model");
}

#[test]
fn pairwise_is_asked_in_both_orders() {
    // The judge prefers whichever trace says "good", wherever it stands.
    let server = serve(|_, r| {
        let p = r.prompt();
        let a = p.find("Trace A:").unwrap();
        let b = p.find("Trace B:").unwrap();
        let good = p.find("good").unwrap_or(usize::MAX);
        answer(if p.contains("both-bad") {
            if a < b {
                "A"
            } else {
                "B"
            } // always the first: position bias only
        } else if good > a && good < b {
            "A"
        } else {
            "B"
        })
    });
    let cache = tempfile::tempdir().unwrap();
    let judge = HttpJudge::new(&config(&server.url, cache.path()), &no_env).unwrap();
    let pair = |item: &'static str, a: &'static str, b: &'static str| Pair {
        refs: PairRef {
            item,
            question: item,
            reference: Some("ref"),
            a,
            b,
        },
        pkr_a: None,
        pkr_b: None,
    };
    let pairs = [
        pair("1", "good trace", "weak trace"),
        pair("2", "weak trace", "good trace"),
        pair("3", "both-bad x", "both-bad y"),
    ];
    let (r, prefs) = pairwise::compare(&judge, "sft", "base", &pairs).unwrap();
    assert_eq!(
        prefs,
        [
            Some(Preference::A),
            Some(Preference::B),
            Some(Preference::Tie)
        ]
    );
    assert_eq!(
        (r.method, r.wins, r.ties, r.losses),
        (Method::Judge, 1, 1, 1)
    );
    assert_eq!(r.preference_rate, 0.5);
    assert_eq!(server.count(), 6);
    assert!(server.requests()[0]
        .prompt()
        .contains("Reference reasoning"));
}
