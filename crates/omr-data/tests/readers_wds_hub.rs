//! Readers end to end, continued: WebDataset tars (grouping, orphans, truncation), `open()`
//! spec and format errors, and Hub resolution from the cache (offline) and from a fake Hub
//! server on localhost (online). Parquet and JSONL are in `readers.rs`.

#[path = "readers_fixtures/mod.rs"]
mod fixtures;

use fixtures::check::*;
use fixtures::*;
use omr_data::source::hub::{self, HubEnv};
use omr_data::source::{self, Source, SourceError, SourceSpec};
use omr_data::{Content, Message, Reason, Role};
use serde_json::json;
use std::path::Path;
use std::sync::atomic::Ordering;

// ---------------------------------------------------------------- WebDataset

fn member(name: &str, data: Vec<u8>) -> (String, Vec<u8>) {
    (name.to_string(), data)
}

fn omr_json(answer: &str) -> Vec<u8> {
    line(
        json!({"question": Q, "reasoning": trace("B"), "answer": answer, "task_family": "Diagnosis",
                "knowledge": [{"unit_id": "k1", "claim": "Pneumothorax shows no lung markings"}]}),
    )
}

#[test]
fn webdataset_groups_orphans_blocks_and_truncation() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("wds");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let mut m = vec![
        member("000.jpg", jpeg(0)),
        member("000.json", omr_json("B")),
        member(
            "001.json",
            llava(json!("ignored.jpg"), turns("<image>\nWhat?", "A.")),
        ),
        member("001.png", png(1)),
        member("002.jpg", jpeg(2)),
        member(
            "002.json",
            line(
                json!({"messages": [{"role": "user", "content": "<image> ?"},
                                                   {"role": "assistant", "content": "ok"}]}),
            ),
        ),
        member("003.jpg", jpeg(3)),
        member("004.json", omr_json("B")),
        member("005.jpg", jpeg(5)),
        member("005.json", omr_json("Z")),
        member("006.jpg", jpeg(6)),
        member("006.json", b"not json".to_vec()),
        member("007.a.jpg", jpeg(7)),
        member("007.b.jpg", jpeg(8)),
        member("007.json", llava(json!(null), turns("<image>", "x"))),
    ];
    for k in 8..70 {
        m.push(member(&format!("{k:03}.txt"), b"caption".to_vec()));
        m.push(member(&format!("{k:03}.jpg"), jpeg(k as u8)));
        m.push(member(&format!("{k:03}.json"), omr_json("B")));
    }
    write_tar(&dir.join("train-000000.tar"), &m);
    write_tar(
        &dir.join("test-000000.tar"),
        &[member("a.jpg", jpeg(1)), member("a.json", omr_json("B"))],
    );

    let src = source::open(&SourceSpec::local(&dir, "train")).expect("opens");
    assert_eq!(src.shards(), ["train-000000.tar"]);
    assert_eq!(blocks(src.as_ref()), [(0, 0, 64), (0, 64, 6)]);
    let rows = read_all(src.as_ref());
    assert_eq!(
        failures(&rows),
        [
            (3, "orphan_member"),
            (4, "orphan_member"),
            (5, "answer_not_an_option"),
            (6, "malformed_json"),
            (7, "image_count_mismatch"),
        ]
    );
    assert_eq!(err(&rows, 3), &Reason::OrphanMember("003.jpg".into()));
    assert_eq!(err(&rows, 4), &Reason::OrphanMember("004.json".into()));
    let s = ok(&rows, 0);
    assert_eq!(
        (s.images[0].bytes.clone(), s.images[0].path.as_deref()),
        (jpeg(0), Some("000.jpg"))
    );
    assert_eq!(s.mcq.as_ref().map(|m| m.answer.as_str()), Some("B"));
    assert_eq!(s.messages[1], Message::text(Role::Assistant, trace("B")));
    assert_eq!(
        s.meta.get("task_family").map(String::as_str),
        Some("Diagnosis")
    );
    assert_eq!(
        s.rubric.as_ref().map(|r| r.knowledge[0].unit_id.as_str()),
        Some("k1")
    );
    assert_eq!(
        ok(&rows, 1).images[0].bytes,
        png(1),
        "tar members, not JSON paths, are the images"
    );
    assert_eq!(
        ok(&rows, 2).messages[0].content,
        [Content::Image, text("?")]
    );
    assert_eq!(ok(&rows, 69).images[0].bytes, jpeg(69));
    assert_eq!(
        source::open(&SourceSpec::local(&dir, "test"))
            .expect("test")
            .len(),
        1
    );

    let whole = std::fs::read(dir.join("train-000000.tar")).expect("read");
    let cut = tmp.path().join("cut.tar");
    std::fs::write(&cut, &whole[..whole.len() / 2 + 100]).expect("write");
    let e = open_err(&SourceSpec::local(&cut, "train"));
    assert!(
        e.to_string().contains("cut.tar") && e.to_string().contains("truncated"),
        "{e}"
    );
}

// ---------------------------------------------------------------- open()

#[test]
fn open_rejects_bad_specs_and_missing_data() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut both = SourceSpec::local(tmp.path(), "train");
    both.hub = Some("org/name".into());
    assert!(matches!(open_err(&both), SourceError::BadSpec(_)));
    let mut neither = SourceSpec::local(tmp.path(), "train");
    neither.path = None;
    assert!(matches!(open_err(&neither), SourceError::BadSpec(_)));

    let missing = tmp.path().join("nope");
    let e = open_err(&SourceSpec::local(&missing, "train"));
    assert!(
        matches!(e, SourceError::Io { ref path, .. } if path.contains("nope")),
        "{e}"
    );

    let dir = tmp.path().join("omr");
    omr_dataset(&dir);
    let e = open_err(&SourceSpec::local(&dir, "validation"));
    assert!(
        matches!(e, SourceError::NoFiles { ref split, .. } if split == "validation"),
        "{e}"
    );

    let notes = tmp.path().join("notes");
    std::fs::create_dir_all(&notes).expect("mkdir");
    std::fs::write(notes.join("readme.txt"), "hi").expect("write");
    assert!(matches!(
        open_err(&SourceSpec::local(&notes, "train")),
        SourceError::UnknownFormat(_)
    ));
    assert!(matches!(
        open_err(&SourceSpec::local(notes.join("readme.txt"), "train")),
        SourceError::UnknownFormat(_)
    ));
}

// ---------------------------------------------------------------- Hub

const SHA: &str = "0123456789abcdef0123456789abcdef01234567";
const TRAIN: &str = "data/train-00000-of-00001.parquet";

/// A cache laid out as huggingface_hub leaves it: the snapshot file is a relative symlink
/// into `blobs/`.
fn fake_cache(hf_home: &Path) {
    let repo = hf_home.join("hub/datasets--org--omr");
    std::fs::create_dir_all(repo.join("blobs")).expect("mkdir");
    write_omr_parquet(
        &repo.join("blobs/abc123"),
        &[OmrRow::good(1), OmrRow::good(2), OmrRow::good(3)],
        2,
    );
    std::fs::create_dir_all(repo.join("snapshots").join(SHA).join("data")).expect("mkdir");
    std::os::unix::fs::symlink(
        "../../../blobs/abc123",
        repo.join("snapshots").join(SHA).join(TRAIN),
    )
    .expect("symlink");
    std::fs::create_dir_all(repo.join("refs")).expect("mkdir");
    std::fs::write(repo.join("refs/main"), SHA).expect("write");
}

fn hub_spec(revision: Option<&str>) -> SourceSpec {
    let mut spec = SourceSpec::local("unused", "train");
    spec.path = None;
    spec.hub = Some("org/omr".into());
    spec.revision = revision.map(str::to_string);
    spec
}

#[test]
fn hub_offline_reads_the_cache() {
    let tmp = tempfile::tempdir().expect("tempdir");
    fake_cache(tmp.path());
    let env = HubEnv {
        hf_home: Some(tmp.path().to_path_buf()),
        offline: true,
        ..HubEnv::default()
    };
    let src = hub::open(&hub_spec(None), &env).expect("offline cache resolves");
    assert_eq!(src.shards(), [TRAIN]);
    assert_eq!(blocks(&src), [(0, 0, 2), (0, 2, 1)]);
    let rows = read_all(&src);
    assert_eq!(failures(&rows), []);
    assert_eq!(ok(&rows, 2).origin.shard, TRAIN);
    assert_eq!(ok(&rows, 0).origin.source, "org/omr:train");
    assert_eq!(
        hub::open(&hub_spec(Some(SHA)), &env)
            .expect("commit as revision")
            .len(),
        3
    );

    let e = hub::open(&hub_spec(Some("v2")), &env)
        .err()
        .expect("unknown revision");
    assert!(e.to_string().contains("revision `v2`"), "{e}");
    let mut test = hub_spec(None);
    test.split = "test".into();
    assert!(matches!(
        hub::open(&test, &env).err(),
        Some(SourceError::NoFiles { .. })
    ));

    let empty = tempfile::tempdir().expect("tempdir");
    let env = HubEnv {
        hf_home: Some(empty.path().to_path_buf()),
        offline: true,
        ..HubEnv::default()
    };
    let e = hub::open(&hub_spec(None), &env).err().expect("empty cache");
    assert!(matches!(e, SourceError::Hub(_)));
    assert!(
        e.to_string().contains("HF_HUB_OFFLINE")
            && e.to_string().contains("not in the local cache"),
        "{e}"
    );
}

fn proxied() -> bool {
    [
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
    ]
    .iter()
    .any(|k| std::env::var_os(k).is_some())
}

#[test]
fn hub_online_downloads_once_then_serves_the_cache() {
    if proxied() {
        eprintln!("skipped: a proxy is set and ureq would send localhost requests through it");
        return;
    }
    let mut file = Vec::new();
    let staging = tempfile::tempdir().expect("tempdir");
    write_omr_parquet(
        &staging.path().join("x.parquet"),
        &[OmrRow::good(5), OmrRow::good(6)],
        10,
    );
    file.extend(std::fs::read(staging.path().join("x.parquet")).expect("read"));
    let info = json!({"sha": SHA, "siblings": [{"rfilename": ".gitattributes"}, {"rfilename": "README.md"},
        {"rfilename": TRAIN}, {"rfilename": "data/test-00000-of-00001.parquet"}]});
    let (endpoint, downloads) = fake_hub(200, info.to_string(), file, SHA.into());
    let home = tempfile::tempdir().expect("tempdir");
    let env = HubEnv {
        hf_home: Some(home.path().to_path_buf()),
        endpoint: Some(endpoint),
        token: Some("hf_test".into()),
        ..HubEnv::default()
    };
    let src = hub::open(&hub_spec(None), &env).expect("online open");
    assert_eq!(src.shards(), [TRAIN]);
    assert_eq!(read_all(&src).iter().filter(|r| r.is_ok()).count(), 2);
    assert_eq!(downloads.load(Ordering::SeqCst), 1);
    hub::open(&hub_spec(None), &env).expect("second open");
    assert_eq!(
        downloads.load(Ordering::SeqCst),
        1,
        "cached file is not downloaded again"
    );
    let offline = HubEnv {
        offline: true,
        endpoint: None,
        ..env
    };
    assert_eq!(
        hub::open(&hub_spec(None), &offline)
            .expect("offline after download")
            .len(),
        2
    );
}

#[test]
fn hub_gated_dataset_explains_terms_and_token() {
    if proxied() {
        eprintln!("skipped: a proxy is set and ureq would send localhost requests through it");
        return;
    }
    let home = tempfile::tempdir().expect("tempdir");
    for status in [401u16, 403] {
        let (endpoint, _) = fake_hub(status, String::new(), Vec::new(), SHA.into());
        let env = HubEnv {
            hf_home: Some(home.path().to_path_buf()),
            endpoint: Some(endpoint),
            ..HubEnv::default()
        };
        let e = hub::open(&hub_spec(None), &env).err().expect("denied");
        let msg = e.to_string();
        assert!(matches!(e, SourceError::Hub(_)), "{msg}");
        assert!(
            msg.contains(&format!("HTTP {status}")) && msg.contains("accept the dataset terms"),
            "{msg}"
        );
        assert!(msg.contains("HF_TOKEN is not set"), "{msg}");
    }
}
