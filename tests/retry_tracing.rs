//! The retry layer's spans and events, and what they never contain.

use std::io::Write;
use std::sync::{Arc, Mutex};

use llm_resilience::classify::HttpError;
use llm_resilience::retry::RetryLayer;
use tower::{service_fn, Layer, ServiceExt};

#[derive(Clone, Default)]
struct Buffer(Arc<Mutex<Vec<u8>>>);

impl Write for Buffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(start_paused = true)]
async fn spans_per_call_and_attempt_name_the_decisions_and_never_the_prompt() {
    let buffer = Buffer::default();
    let writer = buffer.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let calls = Arc::new(Mutex::new(0));
    let count = calls.clone();
    let inner = service_fn(move |prompt: String| {
        let count = count.clone();
        async move {
            let mut n = count.lock().unwrap();
            *n += 1;
            if *n == 1 {
                Err(HttpError::new(503).with_message(format!("echo: {prompt}")))
            } else {
                Ok(prompt.len())
            }
        }
    });
    let svc = RetryLayer::builder().seed(1).build().unwrap().layer(inner);
    svc.oneshot("SECRET-PROMPT".to_string()).await.unwrap();

    let logs = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
    assert!(logs.contains("llm_resilience.retry"), "{logs}");
    assert!(
        logs.contains("attempt{n=1 reason=\"unavailable\"}"),
        "{logs}"
    );
    assert!(logs.contains("retrying"), "{logs}");
    assert!(logs.contains("delay_ms="), "{logs}");
    assert!(
        !logs.contains("SECRET-PROMPT"),
        "a prompt reached the logs: {logs}"
    );
}
