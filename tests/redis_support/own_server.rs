//! A `redis-server` of a test's own, on a free loopback port, started and
//! stopped at will (no persistence): for the fleet rate limiter's fallback
//! and recovery tests and the shared breaker's restart test. From `PATH` or
//! `LLM_RESILIENCE_REDIS_SERVER`.
#![allow(dead_code, unreachable_pub)]

use std::net::TcpListener;
use std::process::{Child, Stdio};
use std::time::Duration;

/// A `redis-server` of the test's own on a free port, started and stopped
/// at will.
pub struct OwnServer {
    child: Option<Child>,
    bin: String,
    port: u16,
    dir: std::path::PathBuf,
}

impl OwnServer {
    pub fn binary() -> Option<String> {
        let bin =
            std::env::var("LLM_RESILIENCE_REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
        match std::process::Command::new(&bin).arg("--version").output() {
            Ok(o) if o.status.success() => Some(bin),
            _ if std::env::var("CI").is_ok_and(|v| v == "true") => {
                panic!("CI=true but `{bin}` cannot run: the Redis restart tests must run in CI")
            }
            _ => {
                eprintln!("skipping: no `{bin}` to start (set LLM_RESILIENCE_REDIS_SERVER)");
                None
            }
        }
    }

    /// A free port, nothing listening on it yet.
    pub fn new(bin: String) -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = std::env::temp_dir().join(format!("llmrl-redis-{:016x}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).unwrap();
        Self {
            child: None,
            bin,
            port,
            dir,
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub async fn start(&mut self) {
        let child = std::process::Command::new(&self.bin)
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--dir"])
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        for _ in 0..200 {
            if let Ok(c) = redis::Client::open(self.url()) {
                if let Ok(mut conn) = c.get_multiplexed_async_connection().await {
                    let pong: Result<String, _> = redis::cmd("PING").query_async(&mut conn).await;
                    if pong.is_ok() {
                        return;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("redis-server on port {} did not come up", self.port);
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for OwnServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
