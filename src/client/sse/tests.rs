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

/// A stream of SSE lines (fields, comments, blank lines) with every kind of
/// line ending, plus raw noise, so most cases dispatch several events.
fn sse_bytes() -> impl Strategy<Value = Vec<u8>> {
    let ending = prop_oneof![Just(&b"\n"[..]), Just(&b"\r"[..]), Just(&b"\r\n"[..])];
    let field = prop_oneof![
        4 => Just(&b"data: "[..]),
        1 => Just(&b"data:"[..]),
        1 => Just(&b"data"[..]),
        1 => Just(&b"event: "[..]),
        1 => Just(&b"id: "[..]),
        1 => Just(&b"retry: "[..]),
        1 => Just(&b": "[..]),
        3 => Just(&b""[..]),
    ];
    let value = prop_oneof![
        3 => "[a-z0-9{}\":]{0,12}".prop_map(String::into_bytes),
        1 => proptest::collection::vec(any::<u8>(), 0..8),
    ];
    let line = (field, value, ending.clone()).prop_map(|(f, v, e)| {
        // An empty field name with a value is a plain line of that value.
        [f, &v[..], e].concat()
    });
    let piece = prop_oneof![
        8 => line,
        2 => ending.prop_map(<[u8]>::to_vec),
        1 => Just(b"\xEF\xBB\xBF".to_vec()),
        1 => proptest::collection::vec(any::<u8>(), 0..6),
    ];
    proptest::collection::vec(piece, 0..60).prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn cutting_the_stream_anywhere_changes_nothing(
        bytes in sse_bytes(),
        cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..20),
        cap in prop_oneof![1 => 1usize..64, 3 => Just(1usize << 20)],
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

/// The WHATWG algorithm written plainly over the whole input: split into
/// lines at `\r\n`, `\r` or `\n`, then interpret each line.
fn reference(bytes: &[u8]) -> Vec<SseEvent> {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    let mut lines = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\r' | b'\n' => {
                lines.push(&bytes[start..i]);
                if bytes[i] == b'\r' && bytes.get(i + 1) == Some(&b'\n') {
                    i += 1;
                }
                start = i + 1;
            }
            _ => {}
        }
        i += 1;
    }
    // A last line without an end is never complete.
    let (mut events, mut data, mut event, mut id) =
        (Vec::new(), None::<String>, String::new(), None);
    for line in lines {
        let text = String::from_utf8_lossy(line).into_owned();
        if text.is_empty() {
            if let Some(d) = data.take() {
                events.push(SseEvent {
                    event: std::mem::take(&mut event),
                    data: d,
                    id: id.clone(),
                });
            }
            event.clear();
            continue;
        }
        if text.starts_with(':') {
            continue;
        }
        let (name, value) = match text.split_once(':') {
            Some((n, v)) => (n.to_owned(), v.strip_prefix(' ').unwrap_or(v).to_owned()),
            None => (text.clone(), String::new()),
        };
        match name.as_str() {
            "event" => event = value,
            "data" => match &mut data {
                Some(d) => {
                    d.push('\n');
                    d.push_str(&value);
                }
                None => data = Some(value),
            },
            "id" if !value.contains('\0') => id = Some(value),
            _ => {}
        }
    }
    events
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Without hitting the cap, the decoder yields what the plain
    /// algorithm yields.
    #[test]
    fn decodes_as_the_reference(bytes in sse_bytes()) {
        let (events, err, _) = decode(&[&bytes], 1 << 20);
        prop_assert_eq!(err, None);
        prop_assert_eq!(events, reference(&bytes));
    }
}
