//! `resolve_model` against a fake Hugging Face Hub on loopback (the dataset reader's tests use
//! the same trick): which files are fetched, that cached files are not fetched again, offline
//! mode from the cache, and gated-model messages.

use candle_core::{DType, Device, Tensor};
use omr_data::source::hub::HubEnv;
use omr_model::export::write_safetensors;
use omr_model::hub::resolve_model;
use omr_model::weights::Checkpoint;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};

const SHA: &str = "0123456789abcdef0123456789abcdef01234567";
const ID: &str = "org/tiny-vl";

/// Files served, and the full-body downloads counted per file.
type Served = Arc<Mutex<BTreeMap<String, usize>>>;

/// A fake Hub: `GET /api/models/<id>/revision/main` lists `files`, `GET /<id>/resolve/main/<f>`
/// serves them (honouring `Range`); with `status` ≠ 200 every request gets that status.
fn fake_hub(status: u16, files: BTreeMap<String, Vec<u8>>) -> (String, Served) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let endpoint = format!("http://{}", listener.local_addr().expect("addr"));
    let served: Served = Arc::default();
    let counter = served.clone();
    let siblings: Vec<_> = files
        .keys()
        .map(|f| serde_json::json!({ "rfilename": f }))
        .collect();
    let info = serde_json::json!({"sha": SHA, "siblings": siblings}).to_string();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().expect("clone"));
            let (mut request, mut line) = (String::new(), String::new());
            let mut range: (usize, Option<usize>) = (0, None);
            while reader.read_line(&mut line).map(|n| n > 0).unwrap_or(false) {
                if line == "\r\n" {
                    break;
                }
                if request.is_empty() {
                    request = line.clone();
                } else if let Some(v) = line.to_ascii_lowercase().strip_prefix("range: bytes=") {
                    let (a, b) = v.trim().split_once('-').unwrap_or(("0", ""));
                    range = (a.parse().unwrap_or(0), b.parse().ok());
                }
                line.clear();
            }
            let path = request.split(' ').nth(1).unwrap_or("").to_string();
            let prefix = format!("/{ID}/resolve/main/");
            let (code, headers, body) = if status != 200 {
                (
                    status,
                    String::new(),
                    b"{\"error\":\"Access restricted\"}".to_vec(),
                )
            } else if path.starts_with(&format!("/api/models/{ID}/revision/main")) {
                (
                    200,
                    "Content-Type: application/json\r\n".into(),
                    info.clone().into_bytes(),
                )
            } else if let Some(file) = path
                .strip_prefix(&prefix)
                .and_then(|f| files.get(f).map(|b| (f, b)))
            {
                let (name, data) = file;
                let start = range.0.min(data.len());
                let end = range.1.map_or(data.len(), |e| (e + 1).min(data.len()));
                if range.1.is_none() {
                    *counter.lock().unwrap().entry(name.to_string()).or_default() += 1;
                }
                let etag = name.replace(['/', '.'], "_");
                let headers = format!(
                    "ETag: \"{etag}\"\r\nX-Repo-Commit: {SHA}\r\nContent-Range: bytes {start}-{}/{}\r\n",
                    end.saturating_sub(1),
                    data.len()
                );
                (206, headers, data[start..end].to_vec())
            } else {
                (404, String::new(), Vec::new())
            };
            let head = format!(
                "HTTP/1.1 {code} X\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = stream
                .write_all(head.as_bytes())
                .and_then(|_| stream.write_all(&body));
        }
    });
    (endpoint, served)
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

/// A sharded tiny model repo plus files the resolver must leave alone.
fn repo_files() -> BTreeMap<String, Vec<u8>> {
    let staging = tempfile::tempdir().unwrap();
    let dev = Device::Cpu;
    let tensors = vec![
        (
            "model.embed_tokens.weight".to_string(),
            Tensor::ones((8, 4), DType::F32, &dev).unwrap(),
        ),
        (
            "model.norm.weight".to_string(),
            Tensor::zeros(4, DType::F32, &dev).unwrap(),
        ),
    ];
    let out = staging.path().join("m");
    write_safetensors(&out, &tensors, 50, DType::BF16).unwrap();
    let mut files = BTreeMap::new();
    for entry in std::fs::read_dir(&out).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        files.insert(name, std::fs::read(entry.path()).unwrap());
    }
    assert_eq!(
        files.len(),
        3,
        "two shards and an index: {:?}",
        files.keys()
    );
    for (name, text) in [
        ("config.json", r#"{"model_type": "qwen2_vl"}"#),
        (
            "generation_config.json",
            r#"{"eos_token_id": [151645, 151643]}"#,
        ),
        ("tokenizer.json", "{}"),
        ("chat_template.jinja", "{{ messages }}"),
        ("README.md", "# tiny"),
        (".gitattributes", "*.safetensors filter=lfs"),
        ("pytorch_model.bin", "not fetched"),
        ("onnx/model.onnx", "not fetched"),
    ] {
        files.insert(name.to_string(), text.as_bytes().to_vec());
    }
    files
}

#[test]
fn model_downloads_what_training_needs_once_then_works_offline() {
    if proxied() {
        eprintln!("skipped: a proxy is set and ureq would send localhost requests through it");
        return;
    }
    let (endpoint, served) = fake_hub(200, repo_files());
    let home = tempfile::tempdir().unwrap();
    let env = HubEnv {
        hf_home: Some(home.path().to_path_buf()),
        endpoint: Some(endpoint),
        token: Some("hf_test".into()),
        ..HubEnv::default()
    };
    let dir = resolve_model(ID, None, &env).expect("online resolve");
    assert_eq!(
        dir,
        home.path()
            .join("hub/models--org--tiny-vl/snapshots")
            .join(SHA)
    );
    let fetched: Vec<String> = served.lock().unwrap().keys().cloned().collect();
    assert_eq!(
        fetched,
        [
            "chat_template.jinja",
            "config.json",
            "generation_config.json",
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
            "model.safetensors.index.json",
            "tokenizer.json"
        ]
    );
    let ck = Checkpoint::load(&dir, DType::F32, &Device::Cpu).expect("load from the cache");
    assert_eq!(ck.names().count(), 2);
    let refs = home.path().join("hub/models--org--tiny-vl/refs/main");
    assert_eq!(std::fs::read_to_string(refs).unwrap().trim(), SHA);

    assert_eq!(resolve_model(ID, None, &env).expect("second resolve"), dir);
    assert!(
        served.lock().unwrap().values().all(|&n| n == 1),
        "cached files are not downloaded again: {:?}",
        served.lock().unwrap()
    );

    let offline = HubEnv {
        offline: true,
        endpoint: None,
        ..env.clone()
    };
    assert_eq!(resolve_model(ID, None, &offline).expect("offline"), dir);
    assert_eq!(
        resolve_model(ID, Some(SHA), &offline).expect("commit as revision"),
        dir
    );
    let e = resolve_model(ID, Some("v2"), &offline)
        .unwrap_err()
        .to_string();
    assert!(e.contains("revision `v2`"), "{e}");

    // A shard lost from the cache is named, offline.
    std::fs::remove_file(dir.join("model-00002-of-00002.safetensors")).unwrap();
    let e = resolve_model(ID, None, &offline).unwrap_err().to_string();
    assert!(
        e.contains("model-00002-of-00002.safetensors") && e.contains("HF_HUB_OFFLINE"),
        "{e}"
    );
}

#[test]
fn gated_model_explains_terms_and_token() {
    if proxied() {
        eprintln!("skipped: a proxy is set and ureq would send localhost requests through it");
        return;
    }
    let home = tempfile::tempdir().unwrap();
    for status in [401u16, 403, 404] {
        let (endpoint, _) = fake_hub(status, BTreeMap::new());
        let env = HubEnv {
            hf_home: Some(home.path().to_path_buf()),
            endpoint: Some(endpoint),
            ..HubEnv::default()
        };
        let msg = resolve_model(ID, None, &env).unwrap_err().to_string();
        assert!(
            msg.contains(&format!("HTTP {status}")) && msg.contains(&format!("model {ID}")),
            "{msg}"
        );
        assert!(msg.contains("https://huggingface.co/org/tiny-vl "), "{msg}");
        assert!(
            msg.contains("HF_TOKEN is not set") && !msg.contains("dataset"),
            "{msg}"
        );
        if status != 404 {
            assert!(msg.contains("accept the model terms"), "{msg}");
        }
    }
}
