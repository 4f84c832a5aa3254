//! Assembling a streamed completion into the shape of a whole one: text
//! appended per choice, tool-call pieces joined into complete calls, usage
//! and ids kept.

use super::types::{
    ChatChunk, ChatResponse, Choice, Content, Message, Role, ToolCall, ToolCallDelta, Usage,
};

/// One choice being assembled.
#[derive(Default)]
struct ChoiceState {
    index: u32,
    role: Option<Role>,
    content: Option<String>,
    refusal: Option<String>,
    calls: Vec<CallState>,
    finish_reason: Option<String>,
}

#[derive(Default)]
struct CallState {
    index: u32,
    id: String,
    name: String,
    arguments: String,
}

/// The completion a stream has delivered so far.
#[derive(Default)]
pub(crate) struct Assembler {
    id: Option<String>,
    model: Option<String>,
    system_fingerprint: Option<String>,
    choices: Vec<ChoiceState>,
    usage: Option<Usage>,
}

fn keep(slot: &mut Option<String>, value: Option<&str>) {
    if let Some(v) = value {
        if slot.is_none() && !v.is_empty() {
            *slot = Some(v.to_owned());
        }
    }
}

fn append(slot: &mut Option<String>, piece: Option<&str>) {
    if let Some(p) = piece {
        slot.get_or_insert_with(String::new).push_str(p);
    }
}

impl ChoiceState {
    /// Applies one tool-call piece. A piece continues the latest call with
    /// its index, unless it carries an id different from that call's (some
    /// providers number every call 0 and tell them apart by id).
    fn call(&mut self, d: &ToolCallDelta) {
        let latest = self.calls.iter().rposition(|c| c.index == d.index);
        let starts_new = match latest {
            None => true,
            Some(i) => d.id.as_deref().is_some_and(|id| {
                !id.is_empty() && !self.calls[i].id.is_empty() && self.calls[i].id != id
            }),
        };
        let i = if starts_new {
            self.calls.push(CallState {
                index: d.index,
                ..CallState::default()
            });
            self.calls.len() - 1
        } else {
            latest.unwrap_or(0)
        };
        let call = &mut self.calls[i];
        if let Some(id) = &d.id {
            if call.id.is_empty() {
                call.id.push_str(id);
            }
        }
        if let Some(name) = &d.name {
            // Names come whole on the first piece; a few servers split them.
            call.name.push_str(name);
        }
        if let Some(a) = &d.arguments {
            call.arguments.push_str(a);
        }
    }

    fn to_choice(&self) -> Choice {
        let mut calls: Vec<&CallState> = self.calls.iter().collect();
        // Calls in index order; calls sharing an index keep arrival order.
        calls.sort_by_key(|c| c.index);
        let mut message = Message::assistant_tool_calls(
            calls
                .into_iter()
                .map(|c| ToolCall::function(&c.id, &c.name, &c.arguments))
                .collect(),
        );
        message.role = self.role.unwrap_or(Role::Assistant);
        message.content = self.content.clone().map(Content::Text);
        message.refusal = self.refusal.clone();
        Choice::new(self.index, message, self.finish_reason.clone())
    }
}

impl Assembler {
    /// Keeps the completion's ids the first time a chunk names them.
    pub(crate) fn ids(&mut self, id: Option<&str>, model: Option<&str>, fingerprint: Option<&str>) {
        keep(&mut self.id, id);
        keep(&mut self.model, model);
        keep(&mut self.system_fingerprint, fingerprint);
    }

    /// Adds a chunk's pieces.
    pub(crate) fn push(&mut self, chunk: &ChatChunk) {
        if let Some(u) = chunk.usage {
            self.usage = Some(u);
        }
        for d in &chunk.choices {
            let pos = match self.choices.iter().position(|c| c.index == d.index) {
                Some(p) => p,
                None => {
                    self.choices.push(ChoiceState {
                        index: d.index,
                        ..ChoiceState::default()
                    });
                    self.choices.len() - 1
                }
            };
            let c = &mut self.choices[pos];
            if c.role.is_none() {
                c.role = d.role;
            }
            append(&mut c.content, d.content.as_deref());
            append(&mut c.refusal, d.refusal.as_deref());
            for t in &d.tool_calls {
                c.call(t);
            }
            if d.finish_reason.is_some() {
                c.finish_reason.clone_from(&d.finish_reason);
            }
        }
    }

    /// The usage reported so far.
    pub(crate) fn usage(&self) -> Option<Usage> {
        self.usage
    }

    /// The completion so far, in the shape of a whole one (choices in index
    /// order).
    pub(crate) fn response(&self) -> ChatResponse {
        let mut choices: Vec<Choice> = self.choices.iter().map(ChoiceState::to_choice).collect();
        choices.sort_by_key(|c| c.index);
        let mut r = ChatResponse::new(
            self.id.clone().unwrap_or_default(),
            self.model.clone().unwrap_or_default(),
            choices,
        );
        r.system_fingerprint.clone_from(&self.system_fingerprint);
        r.usage = self.usage;
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::types::ChoiceDelta;

    fn piece(index: u32, id: Option<&str>, name: Option<&str>, args: Option<&str>) -> ChatChunk {
        let d = ChoiceDelta {
            tool_calls: vec![ToolCallDelta::new(
                index,
                id.map(str::to_owned),
                name.map(str::to_owned),
                args.map(str::to_owned),
            )],
            ..ChoiceDelta::default()
        };
        ChatChunk {
            choices: vec![d],
            usage: None,
        }
    }

    #[test]
    fn joins_pieces_by_index_and_by_id() {
        let mut a = Assembler::default();
        a.push(&piece(0, Some("c1"), Some("get_weather"), Some("")));
        a.push(&piece(1, Some("c2"), Some("get_time"), Some("{\"tz\"")));
        a.push(&piece(0, None, None, Some("{\"city\":")));
        a.push(&piece(0, None, None, Some("\"Paris\"}")));
        a.push(&piece(1, None, None, Some(":\"CET\"}")));
        // A provider that numbers every call 0: a new id is a new call.
        a.push(&piece(0, Some("c3"), Some("noop"), Some("{}")));
        let r = a.response();
        let calls = r.tool_calls();
        assert_eq!(calls.len(), 3);
        assert_eq!(calls[0].id, "c1");
        assert_eq!(calls[0].function.arguments, "{\"city\":\"Paris\"}");
        assert_eq!(calls[1].id, "c3");
        assert_eq!(calls[2].function.name, "get_time");
        assert_eq!(calls[2].function.arguments, "{\"tz\":\"CET\"}");
        assert_eq!(r.content(), "");
    }

    /// The property: whatever the cuts of the arguments and however the
    /// pieces of different calls and choices interleave, decoding the
    /// stream's chunks and assembling them gives the response the same
    /// server would send whole.
    mod streamed_equals_whole {
        use proptest::prelude::*;
        use serde_json::json;

        use super::super::Assembler;
        use crate::client::types::decode_chunk;
        use crate::client::ChatResponse;

        #[derive(Debug, Clone)]
        struct Call {
            id: String,
            name: String,
            args: String,
            cuts: Vec<usize>,
        }

        fn call() -> impl Strategy<Value = Call> {
            (
                "[a-z0-9_]{1,12}",
                "[a-z_]{1,16}",
                // Arguments with quotes, escapes and non-ASCII text.
                "[ -~é😀\n]{0,60}",
                proptest::collection::vec(0usize..80, 0..6),
            )
                .prop_map(|(id, name, args, cuts)| Call {
                    id: format!("call_{id}"),
                    name,
                    args,
                    cuts,
                })
        }

        /// `args` cut at the given char positions.
        fn fragments(args: &str, cuts: &[usize]) -> Vec<String> {
            let chars: Vec<char> = args.chars().collect();
            let mut at: Vec<usize> = cuts.iter().map(|c| c % (chars.len() + 1)).collect();
            at.sort_unstable();
            at.dedup();
            let mut out = Vec::new();
            let mut from = 0;
            for c in at.into_iter().chain([chars.len()]) {
                out.push(chars[from..c].iter().collect());
                from = c;
            }
            out
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]
            #[test]
            fn for_random_tool_call_deltas(
                choices in proptest::collection::vec(
                    (proptest::collection::vec(call(), 0..4), proptest::option::of("[ -~]{0,20}")),
                    1..3,
                ),
                order in proptest::collection::vec(any::<u8>(), 0..64),
                usage in proptest::option::of((0u32..10_000, 0u32..10_000, proptest::option::of(0u32..100))),
            ) {
                // The whole response.
                let whole_choices: Vec<_> = choices
                    .iter()
                    .enumerate()
                    .map(|(i, (calls, text))| {
                        let mut message = json!({"role": "assistant", "content": text});
                        if !calls.is_empty() {
                            message["tool_calls"] = calls
                                .iter()
                                .map(|c| json!({"id": c.id, "type": "function",
                                    "function": {"name": c.name, "arguments": c.args}}))
                                .collect();
                        }
                        let finish = if calls.is_empty() { "stop" } else { "tool_calls" };
                        json!({"index": i, "message": message, "finish_reason": finish})
                    })
                    .collect();
                let usage_json = usage.map(|(p, c, cached)| json!({
                    "prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
                    "prompt_tokens_details": cached.map(|k| json!({"cached_tokens": k})),
                }));
                let whole = json!({"id": "chatcmpl-1", "model": "m", "system_fingerprint": "fp",
                    "choices": whole_choices, "usage": usage_json});
                let body = bytes::Bytes::from(whole.to_string());
                let whole: ChatResponse = crate::client::error::decode_completion(&reqwest::header::HeaderMap::new(), &body).unwrap();

                // The stream: per choice a queue of deltas, in order.
                let mut queues: Vec<std::collections::VecDeque<serde_json::Value>> = choices
                    .iter()
                    .enumerate()
                    .map(|(i, (calls, text))| {
                        let mut q = std::collections::VecDeque::new();
                        q.push_back(json!({"index": i, "delta": {"role": "assistant"}}));
                        if let Some(t) = text {
                            for f in fragments(t, &[t.len() / 2]) {
                                q.push_back(json!({"index": i, "delta": {"content": f}}));
                            }
                        }
                        for (k, c) in calls.iter().enumerate() {
                            q.push_back(json!({"index": i, "delta": {"tool_calls": [{"index": k,
                                "id": c.id, "type": "function",
                                "function": {"name": c.name, "arguments": ""}}]}}));
                            for f in fragments(&c.args, &c.cuts) {
                                q.push_back(json!({"index": i, "delta": {"tool_calls": [{"index": k,
                                    "function": {"arguments": f}}]}}));
                            }
                        }
                        let finish = if calls.is_empty() { "stop" } else { "tool_calls" };
                        q.push_back(json!({"index": i, "delta": {}, "finish_reason": finish}));
                        q
                    })
                    .collect();
                let mut events = Vec::new();
                let mut pick = order.iter().copied().cycle();
                while queues.iter().any(|q| !q.is_empty()) {
                    let live: Vec<usize> = (0..queues.len()).filter(|i| !queues[*i].is_empty()).collect();
                    let i = live[usize::from(pick.next().unwrap_or(0)) % live.len()];
                    let d = queues[i].pop_front().unwrap();
                    events.push(json!({"id": "chatcmpl-1", "model": "m", "system_fingerprint": "fp",
                        "choices": [d]}));
                }
                if let Some(u) = usage_json_of(&whole) {
                    events.push(json!({"id": "chatcmpl-1", "model": "m", "choices": [], "usage": u}));
                }
                let mut a = Assembler::default();
                for e in &events {
                    let data = e.to_string();
                    let (wire, chunk) = decode_chunk(data.as_bytes()).unwrap();
                    a.ids(wire.id.as_deref(), wire.model.as_deref(), wire.system_fingerprint.as_deref());
                    a.push(&chunk);
                }
                prop_assert_eq!(a.response(), whole);
            }
        }

        fn usage_json_of(r: &ChatResponse) -> Option<serde_json::Value> {
            r.usage.map(|u| serde_json::to_value(u).unwrap())
        }
    }
}
