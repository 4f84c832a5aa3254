use super::*;
use crate::anthropic::AnthropicErrorKind;
use futures::StreamExt;
use serde_json::json;

fn limits() -> Limits {
    Limits {
        idle_timeout: None,
        max_bytes: 1 << 20,
        max_event_bytes: 1 << 16,
    }
}

fn stream_of(parts: Vec<String>, limits: Limits) -> MessageStream {
    let body = futures::stream::iter(parts.into_iter().map(|p| Ok(Bytes::from(p))));
    MessageStream::new(Box::pin(body), limits, RateLimitHeaders::default(), None)
}

fn ev(name: &str, data: serde_json::Value) -> String {
    format!("event: {name}\ndata: {data}\n\n")
}

fn start() -> String {
    ev(
        "message_start",
        json!({"type": "message_start", "message": {
            "id": "msg_1", "type": "message", "role": "assistant", "model": "m",
            "content": [], "stop_reason": null, "stop_sequence": null,
            "usage": {"input_tokens": 10, "output_tokens": 1, "cache_read_input_tokens": 4}}}),
    )
}

fn text_block(index: usize, parts: &[&str]) -> Vec<String> {
    let mut out = vec![ev(
        "content_block_start",
        json!({"type": "content_block_start", "index": index, "content_block": {"type": "text", "text": ""}}),
    )];
    for p in parts {
        out.push(ev(
            "content_block_delta",
            json!({"type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": p}}),
        ));
    }
    out.push(ev(
        "content_block_stop",
        json!({"type": "content_block_stop", "index": index}),
    ));
    out
}

fn tool_block(index: usize, fragments: &[&str], stop: bool) -> Vec<String> {
    let mut out = vec![ev(
        "content_block_start",
        json!({"type": "content_block_start", "index": index, "content_block":
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}}}),
    )];
    for f in fragments {
        out.push(ev(
            "content_block_delta",
            json!({"type": "content_block_delta", "index": index, "delta": {"type": "input_json_delta", "partial_json": f}}),
        ));
    }
    if stop {
        out.push(ev(
            "content_block_stop",
            json!({"type": "content_block_stop", "index": index}),
        ));
    }
    out
}

fn end(reason: &str) -> Vec<String> {
    vec![
        ev(
            "message_delta",
            json!({"type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": null}, "usage": {"output_tokens": 15}}),
        ),
        ev("message_stop", json!({"type": "message_stop"})),
    ]
}

#[tokio::test]
async fn a_full_stream_assembles_text_and_tool_calls() {
    let mut parts = vec![start(), ev("ping", json!({"type": "ping"}))];
    parts.extend(text_block(0, &["Let me ", "check."]));
    parts.extend(tool_block(1, &["{\"ci", "ty\": \"Pa", "ris\"}"], true));
    parts.extend(end("tool_use"));
    // Split into one-byte reads: framing must not depend on read sizes.
    let bytes: String = parts.concat();
    let drip: Vec<String> = bytes.chars().map(String::from).collect();
    let m = stream_of(drip, limits()).collect_message().await.unwrap();
    assert_eq!(m.id, "msg_1");
    assert_eq!(m.text(), "Let me check.");
    let calls: Vec<_> = m.tool_uses().collect();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].1, "get_weather");
    assert_eq!(calls[0].2, &json!({"city": "Paris"}));
    assert_eq!(m.stop_reason.as_deref(), Some("tool_use"));
    assert!(m.wants_tools());
    assert_eq!(m.usage.input_tokens, 10);
    assert_eq!(m.usage.output_tokens, 15);
    assert_eq!(m.usage.cache_read_input_tokens, Some(4));
}

#[tokio::test]
async fn a_server_tool_block_gets_its_streamed_input_and_unknown_deltas_pass() {
    let mut parts = vec![start()];
    parts.push(ev(
        "content_block_start",
        json!({"type": "content_block_start", "index": 0, "content_block":
            {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search", "input": {}}}),
    ));
    for f in ["{\"query\": ", "\"rust\"}"] {
        parts.push(ev(
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "input_json_delta", "partial_json": f}}),
        ));
    }
    parts.push(ev(
        "content_block_stop",
        json!({"type": "content_block_stop", "index": 0}),
    ));
    parts.extend(text_block(1, &["found"]));
    parts.insert(
        parts.len() - 1,
        ev(
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 1, "delta": {"type": "citations_delta", "citation": {}}}),
        ),
    );
    parts.extend(end("end_turn"));
    let m = stream_of(parts, limits()).collect_message().await.unwrap();
    assert_eq!(m.content[0].kind(), "server_tool_use");
    let ContentBlock::Other(v) = &m.content[0] else {
        panic!("{m:?}")
    };
    assert_eq!(v["input"], json!({"query": "rust"}));
    assert_eq!(m.text(), "found");
}

#[tokio::test]
async fn events_reach_the_caller_in_order_and_hide_text_in_debug() {
    let mut parts = vec![start()];
    parts.extend(text_block(0, &["secret"]));
    parts.extend(end("end_turn"));
    let s = stream_of(parts, limits()).prime().await.unwrap();
    let events: Vec<StreamEvent> = s.map(Result::unwrap).collect().await;
    let kinds: Vec<String> = events
        .iter()
        .map(|e| {
            format!("{e:?}")
                .split([' ', '{'])
                .next()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "MessageStart",
            "BlockStart",
            "TextDelta",
            "BlockStop",
            "MessageDelta"
        ]
    );
    assert!(!format!("{events:?}").contains("secret"));
}

#[tokio::test]
async fn an_error_event_after_output_keeps_the_partial_message() {
    let mut parts = vec![start()];
    parts.extend(text_block(0, &["part one"]));
    parts.extend(tool_block(1, &["{\"city\": \"Pa"], false));
    parts.push(ev(
        "error",
        json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
    ));
    let mut s = stream_of(parts, limits()).prime().await.unwrap();
    let mut err = None;
    while let Some(item) = s.next().await {
        if let Err(e) = item {
            err = Some(e);
        }
    }
    let err = err.unwrap();
    assert_eq!(err.kind(), AnthropicErrorKind::StreamError);
    assert_eq!(err.status_code(), Some(529));
    assert!(err.is_mid_stream());
    assert_eq!(err.partial_text(), "part one");
    let partial = err.partial().unwrap();
    assert_eq!(partial.stop_reason, None);
    // The unfinished tool call keeps the JSON text that arrived.
    assert_eq!(
        partial.tool_uses().next().unwrap().2,
        &json!("{\"city\": \"Pa")
    );
    assert!(s.next().await.is_none());
}

#[tokio::test]
async fn an_error_before_any_output_fails_the_call_itself() {
    let parts = vec![
        start(),
        ev(
            "error",
            json!({"type": "error", "error": {"type": "overloaded_error", "message": "x"}}),
        ),
    ];
    let err = stream_of(parts, limits()).prime().await.unwrap_err();
    assert_eq!(err.kind(), AnthropicErrorKind::StreamError);
    assert!(!err.is_mid_stream());
}

#[tokio::test]
async fn a_stream_without_message_stop_is_an_error() {
    let mut parts = vec![start()];
    parts.extend(text_block(0, &["a"]));
    let err = stream_of(parts, limits())
        .collect_message()
        .await
        .unwrap_err();
    assert_eq!(err.kind(), AnthropicErrorKind::StreamInterrupted);
    assert_eq!(err.partial_text(), "a");
}

#[tokio::test]
async fn protocol_violations_and_bad_json_are_errors_not_panics() {
    for bad in [
        // A delta for a block that never started.
        ev(
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 5, "delta": {"type": "text_delta", "text": "x"}}),
        ),
        // A block opening out of order.
        ev(
            "content_block_start",
            json!({"type": "content_block_start", "index": 3, "content_block": {"type": "text", "text": ""}}),
        ),
        // Not JSON.
        "event: content_block_delta\ndata: {nope\n\n".to_owned(),
    ] {
        let err = stream_of(vec![start(), bad], limits())
            .collect_message()
            .await
            .unwrap_err();
        assert!(
            matches!(
                err.kind(),
                AnthropicErrorKind::StreamInterrupted | AnthropicErrorKind::Decode
            ),
            "{err:?}"
        );
    }
    // A tool call whose input is not JSON once complete.
    let mut parts = vec![start()];
    parts.extend(tool_block(0, &["{\"a\":"], true));
    let err = stream_of(parts, limits())
        .collect_message()
        .await
        .unwrap_err();
    assert_eq!(err.kind(), AnthropicErrorKind::Decode);
}

#[tokio::test]
async fn oversized_events_and_streams_are_refused() {
    let mut small = limits();
    small.max_event_bytes = 64;
    let err = stream_of(vec![start()], small).prime().await.unwrap_err();
    assert_eq!(err.kind(), AnthropicErrorKind::TooLarge);
    let mut small = limits();
    small.max_bytes = 300;
    let mut parts = vec![start()];
    parts.extend(text_block(0, &["aaaaaaaaaaaaaaaaaaaaaaaa"; 8]));
    let err = stream_of(parts, small).collect_message().await.unwrap_err();
    assert_eq!(err.kind(), AnthropicErrorKind::TooLarge);
}

#[tokio::test(start_paused = true)]
async fn the_idle_timeout_counts_events_not_bytes() {
    let mut parts = vec![start()];
    parts.extend(text_block(0, &["a"]).into_iter().take(2));
    let head = futures::stream::iter(parts.into_iter().map(|p| Ok(Bytes::from(p))));
    // Then one byte every second, never completing an event.
    let drip = futures::stream::unfold((), |()| async {
        tokio::time::sleep(Duration::from_secs(1)).await;
        Some((Ok(Bytes::from_static(b":")), ()))
    });
    let mut l = limits();
    l.idle_timeout = Some(Duration::from_secs(5));
    let s = MessageStream::new(
        Box::pin(head.chain(drip)),
        l,
        RateLimitHeaders::default(),
        None,
    );
    let started = Instant::now();
    let err = s.collect_message().await.unwrap_err();
    assert_eq!(started.elapsed(), Duration::from_secs(5));
    assert_eq!(err.kind(), AnthropicErrorKind::StreamInterrupted);
    assert!(err.is_mid_stream());
    assert_eq!(err.partial_text(), "a");
}

mod props {
    use super::*;
    use proptest::prelude::*;

    fn run<T>(f: impl Future<Output = T>) -> T {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    fn split_at_cuts(text: &str, cuts: &[usize]) -> Vec<String> {
        let mut cuts: Vec<usize> = cuts
            .iter()
            .map(|c| c % (text.len() + 1))
            .filter(|c| text.is_char_boundary(*c))
            .collect();
        cuts.sort_unstable();
        cuts.dedup();
        let mut out = Vec::new();
        let mut at = 0;
        for c in cuts {
            out.push(text[at..c].to_owned());
            at = c;
        }
        out.push(text[at..].to_owned());
        out
    }

    proptest! {
        /// For random text deltas, random tool inputs cut into random JSON
        /// fragments, and random read boundaries, the collected stream
        /// equals the non-streamed message with the same content.
        #[test]
        fn the_streamed_assembly_equals_the_plain_message(
            texts in proptest::collection::vec("[a-zé \"\\\\]{0,12}", 1..5),
            input in proptest::collection::btree_map("[a-z]{1,6}", prop_oneof![
                "[a-zA-Z0-9 \"é]{0,10}".prop_map(Value::from),
                any::<i32>().prop_map(Value::from),
                any::<bool>().prop_map(Value::from),
            ], 0..4),
            json_cuts in proptest::collection::vec(any::<usize>(), 0..6),
            read_cuts in proptest::collection::vec(any::<usize>(), 0..12),
            with_tool in any::<bool>(),
        ) {
            let input = Value::Object(input.into_iter().collect());
            let text: String = texts.concat();
            let mut content = vec![json!({"type": "text", "text": text})];
            let mut parts = vec![start()];
            let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
            parts.extend(text_block(0, &refs));
            if with_tool {
                content.push(json!({"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": input}));
                let fragments = split_at_cuts(&input.to_string(), &json_cuts);
                let refs: Vec<&str> = fragments.iter().map(String::as_str).collect();
                parts.extend(tool_block(1, &refs, true));
            }
            let reason = if with_tool { "tool_use" } else { "end_turn" };
            parts.extend(end(reason));
            let bytes = parts.concat();
            let reads = split_at_cuts(&bytes, &read_cuts);
            let streamed = run(stream_of(reads, limits()).collect_message()).unwrap();

            let plain: WireMessage = serde_json::from_value(json!({
                "id": "msg_1", "type": "message", "role": "assistant", "model": "m",
                "content": content, "stop_reason": reason, "stop_sequence": null,
                "usage": {"input_tokens": 10, "output_tokens": 15, "cache_read_input_tokens": 4},
            })).unwrap();
            let plain = plain.into_response(RateLimitHeaders::default(), None);
            prop_assert_eq!(streamed, plain);
        }
    }
}
