//! A scriptable hostile HTTP/1.1 server on loopback for the `hostile_*`
//! tests: each connection runs a script that writes raw bytes (any status,
//! any framing, any timing) and counts what it managed to write.
#![allow(dead_code)]

use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;

/// What every test waits at most before calling it a hang (a failure
/// guard, never an assertion on duration).
pub const HANG: Duration = Duration::from_secs(30);

/// The server's address and counters.
#[derive(Clone)]
pub struct Server {
    /// `http://127.0.0.1:PORT/v1`
    pub url: String,
    /// Bytes the scripts wrote successfully, over all connections.
    pub written: Arc<AtomicU64>,
    /// Requests received.
    pub requests: Arc<AtomicUsize>,
}

impl Server {
    pub fn written(&self) -> u64 {
        self.written.load(Ordering::SeqCst)
    }
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

/// One accepted connection whose request was read.
pub struct Conn<S> {
    io: S,
    written: Arc<AtomicU64>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    /// Writes `bytes`; false once the client is gone.
    pub async fn write(&mut self, bytes: &[u8]) -> bool {
        if self.io.write_all(bytes).await.is_err() || self.io.flush().await.is_err() {
            return false;
        }
        self.written.fetch_add(bytes.len() as u64, Ordering::SeqCst);
        true
    }

    /// Writes a status line and headers (`\r\n`-terminated lines).
    pub async fn head(&mut self, status: &str, headers: &[&str]) -> bool {
        let mut h = format!("HTTP/1.1 {status}\r\n");
        for line in headers {
            h.push_str(line);
            h.push_str("\r\n");
        }
        h.push_str("\r\n");
        self.write(h.as_bytes()).await
    }

    /// A complete response with a `Content-Length` body.
    pub async fn respond(&mut self, status: &str, body: &str) -> bool {
        let len = format!("content-length: {}", body.len());
        self.head(status, &["content-type: application/json", &len])
            .await
            && self.write(body.as_bytes()).await
    }

    /// Writes `prefix`, then filler bytes `fill` up to `total` bytes in
    /// 64 KiB writes, stopping when the client goes away.
    pub async fn flood(&mut self, prefix: &[u8], fill: u8, total: u64) {
        if !self.write(prefix).await {
            return;
        }
        let block = vec![fill; 64 * 1024];
        let mut sent = prefix.len() as u64;
        while sent < total {
            let n = block.len().min((total - sent) as usize);
            if !self.write(&block[..n]).await {
                return;
            }
            sent += n as u64;
        }
    }

    /// Writes `bytes` one byte at a time, `every` apart, forever (cycling),
    /// until the client goes away.
    pub async fn drip(&mut self, bytes: &[u8], every: Duration) {
        for b in bytes.iter().cycle() {
            if !self.write(&[*b]).await {
                return;
            }
            tokio::time::sleep(every).await;
        }
    }

    /// Keeps the connection open, answering nothing, until the client
    /// closes it.
    pub async fn hold(&mut self) {
        let mut buf = [0u8; 1024];
        while matches!(self.io.read(&mut buf).await, Ok(n) if n > 0) {}
    }
}

/// Reads one request (headers and a `Content-Length` body).
pub async fn read_request<S: AsyncRead + Unpin>(io: &mut S) -> Option<Vec<u8>> {
    let mut buf = Vec::new();
    let mut tmp = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            while buf.len() < end + 4 + len {
                let n = io.read(&mut tmp).await.ok()?;
                if n == 0 {
                    return None;
                }
                buf.extend_from_slice(&tmp[..n]);
            }
            return Some(buf);
        }
        let n = io.read(&mut tmp).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&tmp[..n]);
    }
}

/// Serves every connection with `script` after reading its request.
pub async fn serve<F, Fut>(script: F) -> Server
where
    F: Fn(Conn<tokio::net::TcpStream>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = Server {
        url: format!("http://{addr}/v1"),
        written: Arc::default(),
        requests: Arc::default(),
    };
    let (written, requests) = (server.written.clone(), server.requests.clone());
    let script = Arc::new(script);
    tokio::spawn(async move {
        while let Ok((mut io, _)) = listener.accept().await {
            let (script, written, requests) = (script.clone(), written.clone(), requests.clone());
            tokio::spawn(async move {
                if read_request(&mut io).await.is_some() {
                    requests.fetch_add(1, Ordering::SeqCst);
                    script(Conn { io, written }).await;
                }
            });
        }
    });
    server
}

/// A chat chunk event carrying `text`.
pub fn chunk(text: &str) -> String {
    format!("data: {{\"choices\":[{{\"delta\":{{\"content\":\"{text}\"}}}}]}}\n\n")
}

/// Headers of a streamed 200 without a length (ends when the connection
/// closes).
pub const SSE_HEAD: &[&str] = &["content-type: text/event-stream", "connection: close"];

/// A complete non-streamed completion body.
pub fn completion(text: &str) -> String {
    format!(
        "{{\"id\":\"c1\",\"model\":\"m\",\"choices\":[{{\"message\":{{\"role\":\"assistant\",\"content\":\"{text}\"}},\"finish_reason\":\"stop\"}}]}}"
    )
}

/// Runs `fut`, failing the test if it hangs.
pub async fn no_hang<T>(fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(HANG, fut)
        .await
        .expect("the client hung (no answer within the guard)")
}
