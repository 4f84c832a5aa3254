use super::*;
use proptest::prelude::*;

/// Decodes `chunks` in order, draining after each push; the events and the
/// error, if any, plus the most bytes the decoder held at once.
fn decode(chunks: &[&[u8]], cap: usize) -> (Vec<SseEvent>, Option<SseError>, usize) {
    let mut d = SseDecoder::new(cap);
    let mut events = Vec::new();
    let mut peak = 0;
    for c in chunks {
        d.push(Bytes::copy_from_slice(c));
        loop {
            match d.next_event() {
                Ok(Some(e)) => events.push(e),
                Ok(None) => break,
                Err(e) => return (events, Some(e), peak.max(d.held())),
            }
            peak = peak.max(d.held());
        }
        peak = peak.max(d.held());
    }
    (events, None, peak)
}

fn ev(event: &str, data: &str, id: Option<&str>) -> SseEvent {
    SseEvent {
        event: event.into(),
        data: data.into(),
        id: id.map(Into::into),
    }
}

#[test]
fn every_line_ending_separates_events() {
    let input = b"data: a\n\ndata: b\r\n\r\ndata: c\r\rdata: d\n\r\ndata: e\r\n\ndata: f\n\r";
    let (events, err, _) = decode(&[input], 1024);
    assert_eq!(err, None);
    let data: Vec<_> = events.iter().map(|e| e.data.as_str()).collect();
    assert_eq!(data, ["a", "b", "c", "d", "e", "f"]);
}

#[test]
fn fields_comments_and_multi_line_data() {
    let input = b"\xEF\xBB\xBF: keep-alive\nevent: delta\nid: 7\nretry: 1500\ndata: one\ndata\ndata:two\nunknown: x\n\n";
    let mut d = SseDecoder::new(1024);
    d.push(Bytes::from_static(input));
    assert_eq!(
        d.next_event().unwrap(),
        Some(ev("delta", "one\n\ntwo", Some("7")))
    );
    assert_eq!(d.retry(), Some(Duration::from_millis(1500)));
    assert!(d.take_progress());
    assert_eq!(d.next_event().unwrap(), None);
    assert!(!d.take_progress());
}

#[test]
fn a_blank_line_without_data_dispatches_nothing_and_resets_the_type() {
    let (events, _, _) = decode(&[b"event: x\n\ndata: y\n\n"], 1024);
    assert_eq!(events, [ev("", "y", None)]);
}

#[test]
fn an_event_over_the_cap_fails_before_it_is_held() {
    let big = vec![b'x'; 10_000];
    let (events, err, peak) = decode(&[b"data: ok\n\ndata: ", &big, b"\n\n"], 4096);
    assert_eq!(events, [ev("", "ok", None)]);
    assert_eq!(err, Some(SseError::EventTooLarge { limit: 4096 }));
    assert!(peak <= 4096, "{peak}");
    // Data lines add up too.
    let line = [b"data: ".as_slice(), &[b'y'; 1000], b"\n"].concat();
    let many: Vec<&[u8]> = std::iter::repeat_n(line.as_slice(), 10).collect();
    let (_, err, peak) = decode(&many, 4096);
    assert!(err.is_some());
    assert!(peak <= 4096, "{peak}");
}

#[test]
fn one_long_line_in_one_byte_chunks_is_linear() {
    // 4 MiB in 64-byte chunks: quadratic rescanning would take minutes.
    let line = vec![b'z'; 4 << 20];
    let mut d = SseDecoder::new(8 << 20);
    d.push(Bytes::from_static(b"data: "));
    for c in line.chunks(64) {
        d.push(Bytes::copy_from_slice(c));
        assert_eq!(d.next_event().unwrap(), None);
    }
    d.push(Bytes::from_static(b"\n\n"));
    assert_eq!(d.next_event().unwrap().unwrap().data.len(), 4 << 20);
}

/// A stream made of SSE-looking pieces, so the events are not all empty.
fn sse_bytes() -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![
        Just(b"data: ".to_vec()),
        Just(b"data:".to_vec()),
        Just(b"event: e".to_vec()),
        Just(b"id: 1".to_vec()),
        Just(b"retry: 20".to_vec()),
        Just(b": c".to_vec()),
        Just(b"\n".to_vec()),
        Just(b"\r".to_vec()),
        Just(b"\r\n".to_vec()),
        Just(b"\xEF\xBB\xBF".to_vec()),
        proptest::collection::vec(any::<u8>(), 0..12),
        "[a-z{}\":]{0,12}".prop_map(String::into_bytes),
    ];
    proptest::collection::vec(piece, 0..60).prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn cutting_the_stream_anywhere_changes_nothing(
        bytes in sse_bytes(),
        cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..20),
        cap in prop_oneof![1usize..64, Just(1usize << 20)],
    ) {
        let mut at: Vec<usize> = cuts.iter().map(|i| i.index(bytes.len() + 1)).collect();
        at.sort_unstable();
        let mut chunks = Vec::new();
        let mut prev = 0;
        for a in at {
            chunks.push(&bytes[prev..a]);
            prev = a;
        }
        chunks.push(&bytes[prev..]);
        let whole = decode(&[&bytes], cap);
        let cut = decode(&chunks, cap);
        prop_assert_eq!(&cut.0, &whole.0);
        prop_assert_eq!(cut.1, whole.1);
        prop_assert!(cut.2 <= cap && whole.2 <= cap, "held {} / {} over {}", cut.2, whole.2, cap);
    }
}
