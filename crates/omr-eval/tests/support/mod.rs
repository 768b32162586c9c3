//! A real HTTP server on loopback that speaks just enough of the OpenAI chat-completions API
//! for the judge tests: one request per connection, each recorded (path, headers, body) and
//! answered by a script that sees the request and its 0-based number.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    /// Header names lower-cased.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).expect("the judge sends JSON")
    }
    /// The user message of a chat request.
    pub fn prompt(&self) -> String {
        self.json()["messages"][1]["content"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }
}

pub enum Action {
    /// A chat completion whose message content is this text.
    Answer(String),
    /// Any status with a raw body and extra headers.
    Status(u16, String, Vec<(String, String)>),
    /// Wait, then act.
    Delay(Duration, Box<Action>),
}

pub fn answer(text: &str) -> Action {
    Action::Answer(text.to_string())
}

pub struct Server {
    pub url: String,
    requests: Arc<Mutex<Vec<Recorded>>>,
}

impl Server {
    pub fn count(&self) -> usize {
        self.requests.lock().unwrap().len()
    }
    pub fn requests(&self) -> Vec<Recorded> {
        self.requests.lock().unwrap().clone()
    }
}

/// Starts a server on 127.0.0.1 (a free port); it lives until the test process ends.
pub fn serve(script: impl Fn(usize, &Recorded) -> Action + Send + Sync + 'static) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    let requests: Arc<Mutex<Vec<Recorded>>> = Arc::default();
    let script = Arc::new(script);
    let recorded = requests.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let (recorded, script) = (recorded.clone(), script.clone());
            std::thread::spawn(move || handle(stream, &recorded, &*script));
        }
    });
    Server { url, requests }
}

fn handle(
    stream: TcpStream,
    recorded: &Mutex<Vec<Recorded>>,
    script: &(dyn Fn(usize, &Recorded) -> Action + Send + Sync),
) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).unwrap_or(0) == 0 {
        return;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or_default().to_string();
    let path = parts.next().unwrap_or_default().to_string();
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
            break;
        }
        if let Some((k, v)) = h.trim_end().split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    let len: usize = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    reader.read_exact(&mut body).unwrap();
    let req = Recorded {
        method,
        path,
        headers,
        body: String::from_utf8(body).unwrap(),
    };
    let n = {
        let mut r = recorded.lock().unwrap();
        r.push(req.clone());
        r.len() - 1
    };
    let mut action = script(n, &req);
    let mut stream = stream;
    loop {
        match action {
            Action::Delay(d, then) => {
                std::thread::sleep(d);
                action = *then;
            }
            Action::Answer(text) => {
                let body = serde_json::json!({
                    "id": format!("chatcmpl-{n}"),
                    "object": "chat.completion",
                    "model": "judge",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 10, "completion_tokens": 1, "total_tokens": 11},
                })
                .to_string();
                respond(&mut stream, 200, &body, &[]);
                return;
            }
            Action::Status(code, body, extra) => {
                respond(&mut stream, code, &body, &extra);
                return;
            }
        }
    }
}

fn respond(stream: &mut TcpStream, code: u16, body: &str, extra: &[(String, String)]) {
    let mut head = format!(
        "HTTP/1.1 {code} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (k, v) in extra {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    // The client may have given up (timeout tests): a failed write is expected then.
    let _ = stream.write_all(head.as_bytes());
    let _ = stream.write_all(body.as_bytes());
    let _ = stream.flush();
}
