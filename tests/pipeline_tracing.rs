//! The agent pipeline's tracing: one span per request
//! (`llm_resilience.request`) naming the target being tried and the attempt
//! being sent, the retry's
//! spans inside it (the attempts, and one per attempt with its number), and
//! never a prompt, a completion or a key.

use std::io::Write;
use std::sync::{Arc, Mutex};

use llm_resilience::classify::HttpError;
use llm_resilience::pipeline::AgentPipeline;
use tower::util::BoxCloneSyncService;
use tower::{service_fn, ServiceExt};

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

type Client = BoxCloneSyncService<String, String, HttpError>;

#[tokio::test(start_paused = true)]
async fn one_span_per_request_names_the_target_and_holds_the_attempts() {
    let buffer = Buffer::default();
    let writer = buffer.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    // The primary echoes the prompt and its key in its error message; the
    // backup answers with a completion. None of them may reach the logs.
    let primary: Client = BoxCloneSyncService::new(service_fn(|prompt: String| async move {
        Err::<String, _>(HttpError::new(503).with_message(format!("sk-SECRET-KEY echo: {prompt}")))
    }));
    let backup: Client = BoxCloneSyncService::new(service_fn(|_: String| async move {
        Ok::<_, HttpError>("COMPLETION-TEXT".to_owned())
    }));
    let agent = AgentPipeline::builder()
        .target("primary", primary)
        .fallback("backup", backup)
        .retry(|r| r.max_attempts(2).seed(1))
        .build()
        .unwrap();
    let reply = agent.oneshot("SECRET-PROMPT".to_owned()).await.unwrap();
    assert_eq!(reply, "COMPLETION-TEXT");

    let logs = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
    // The primary's two attempts, inside the request's span naming it.
    assert!(
        logs.lines().any(
            |l| l.contains("llm_resilience.request{target_name=\"primary\"")
                && l.contains("}:llm_resilience.retry")
                && l.contains("attempt{n=1")
        ),
        "{logs}"
    );
    // The request's own span carries the target and the attempt being sent
    // (from 1; the fmt subscriber appends a field recorded again): the
    // primary's first and second attempts ...
    assert!(
        logs.lines()
            .any(|l| l
                .contains("llm_resilience.request{target_name=\"primary\" attempt=1 attempt=2}")),
        "{logs}"
    );
    // ... and the backup's first, with the fallback's decisions inside the
    // span naming the target they are about: the primary given up, the
    // backup answering.
    assert!(
        logs.lines().any(
            |l| l.contains("llm_resilience.request{target_name=\"primary\"")
                && l.contains("moved_on")
        ),
        "{logs}"
    );
    assert!(
        logs.lines().any(|l| l.contains("llm_resilience.request{")
            && l.contains("target_name=\"backup\" attempt=1}:")
            && l.contains("answered")),
        "{logs}"
    );
    for secret in ["SECRET-PROMPT", "COMPLETION-TEXT", "sk-SECRET-KEY"] {
        assert!(!logs.contains(secret), "{secret} reached the logs: {logs}");
    }
}
