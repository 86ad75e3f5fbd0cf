//! The wire format between nodes: the only module that knows how a message
//! between kith nodes looks in bytes.
//!
//! A frame is one byte of protocol version, then a postcard-encoded
//! [`Message`]. Frames are bounded ([`MAX_FRAME`], [`MAX_STATE_FRAME`]);
//! names and small lists are `heapless` types, so a decoded value can never
//! be larger than its type says. [`decode`] never panics and never trusts a
//! length it has not checked: it is fuzzed (`agent/fuzz`).
//!
//! Topics (MQTT), all under `kith/v1/nodes/<id>/`:
//! - `state`: the node's [`NodeState`], retained; the last will is an empty
//!   retained payload (the broker clears the state when the node dies).
//! - `jobs`: [`JobRequest`]s and cancellations for that node.
//! - `replies`: [`JobEvent`]s for jobs that node delegated.

use serde::{Deserialize, Serialize};

/// The protocol version this build speaks (the first byte of every frame).
pub const PROTOCOL: u8 = 1;

/// Largest frame of any kind: a job with 8 s of audio fits.
pub const MAX_FRAME: usize = 384 * 1024;

/// Largest state frame.
pub const MAX_STATE_FRAME: usize = 4 * 1024;

/// Most audio a job may carry: 8 s at 16 kHz.
pub const MAX_AUDIO_SAMPLES: usize = 8 * 16_000;

/// Topic prefix of every kith message.
pub const TOPIC_ROOT: &str = "kith/v1/nodes";

/// A node's id on the wire: `[a-z0-9-]`, at most 32 bytes.
pub type NodeId = heapless::String<32>;
/// A model's name on the wire.
pub type ModelName = heapless::String<48>;
/// A stop string on the wire.
pub type StopString = heapless::String<64>;

/// The models a state may list.
pub const MAX_MODELS: usize = 16;

/// Every message between nodes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Message {
    State(Box<NodeState>),
    Job(Box<JobRequest>),
    Cancel { from: NodeId, job: u64 },
    Event(JobEvent),
}

/// What a node publishes about itself (retained).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeState {
    pub node: NodeId,
    /// Random per process start: a restart with the same id is a new boot.
    pub boot: u64,
    /// Counts publications of this boot.
    pub seq: u64,
    /// The HTTP API's port.
    pub api_port: u16,
    pub models: heapless::Vec<ModelState, MAX_MODELS>,
    /// Memory available to new work, MiB.
    pub free_memory_mb: u32,
    /// The hottest thermal zone, milli-degrees Celsius.
    pub temperature_mc: Option<i32>,
    /// The board reports throttling (Raspberry Pi firmware).
    pub throttled: Option<bool>,
    /// The audio pipeline's real-time factor × 1e6, when it runs.
    pub audio_rtf_micro: Option<u32>,
    /// The node is shutting down: send it nothing new.
    pub draining: bool,
}

/// One installed model as a peer sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelState {
    pub name: ModelName,
    pub task: Task,
    /// Weights in memory now.
    pub loaded: bool,
    /// Jobs waiting, and whether one runs.
    pub queued: u16,
    pub busy: bool,
    /// Jobs that may wait.
    pub capacity: u16,
    /// Measured decode speed, tokens/s × 1000 (0: not measured yet).
    pub decode_milli_tps: u32,
    /// Moving average of a job's duration, ms (0: not measured yet).
    pub service_ms: u32,
    /// Size of the installed model file, MiB: which model is the bigger tier.
    pub size_mb: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Task {
    Text,
    Intent,
}

/// A request delegated to a peer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRequest {
    /// Unique per sender.
    pub id: u64,
    /// The sender: replies go to its `replies` topic.
    pub from: NodeId,
    pub model: ModelName,
    pub work: Work,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Work {
    Chat {
        messages: Vec<ChatTurn>,
        options: Options,
    },
    Completion {
        prompt: String,
        options: Options,
    },
    /// 16 kHz mono samples of one utterance.
    Audio {
        samples: Vec<i16>,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatTurn {
    pub role: heapless::String<16>,
    pub content: String,
}

/// Generation options, as the caller's API resolved them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Options {
    pub max_tokens: u32,
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: u32,
    pub repetition_penalty: f32,
    pub seed: u64,
    pub stop: heapless::Vec<StopString, 4>,
}

impl Options {
    /// The ranges the HTTP API enforces, enforced again on what a peer sends.
    pub fn check(&self) -> Result<(), WireError> {
        let ok = self.temperature.is_finite()
            && (0.0..=2.0).contains(&self.temperature)
            && self.top_p > 0.0
            && self.top_p <= 1.0
            && self.repetition_penalty.is_finite()
            && self.repetition_penalty > 0.0
            && self.max_tokens > 0;
        if ok {
            Ok(())
        } else {
            Err(WireError::Malformed(format!(
                "generation options out of range (temperature {}, top_p {}, repetition_penalty {}, max_tokens {})",
                self.temperature, self.top_p, self.repetition_penalty, self.max_tokens
            )))
        }
    }
}

/// One event of a delegated job, in order: `Accepted`, `Started`, `Text`…,
/// `Done`; or `Failed` at any point.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobEvent {
    pub job: u64,
    /// The node that runs the job.
    pub node: NodeId,
    /// 0, 1, 2… per job: a gap means a lost event.
    pub seq: u32,
    pub kind: EventKind,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum EventKind {
    /// Queued on the peer.
    Accepted,
    Started {
        prompt_tokens: u32,
    },
    Text(String),
    Done {
        finish: Finish,
        completion_tokens: u32,
    },
    Failed {
        code: FailCode,
        message: String,
    },
    /// A speech-to-intent answer (the API's JSON object).
    Intent {
        json: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Finish {
    Stop,
    Length,
    ContextFull,
}

/// Why a peer could not run (or finish) a job. The first four may be
/// retried elsewhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FailCode {
    Busy,
    NotFound,
    ShuttingDown,
    Unavailable,
    BadRequest,
    ContextLength,
    Model,
}

impl FailCode {
    /// Another node may well succeed.
    pub fn retryable(self) -> bool {
        matches!(
            self,
            FailCode::Busy | FailCode::NotFound | FailCode::ShuttingDown | FailCode::Unavailable
        )
    }
}

/// Why bytes are not a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("empty frame")]
    Empty,
    #[error("frame of {len} bytes is larger than the limit of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("protocol version {0}; this node speaks version {PROTOCOL}")]
    Version(u8),
    #[error("malformed frame: {0}")]
    Malformed(String),
    #[error("{0} trailing bytes after the message")]
    Trailing(usize),
    #[error("a state frame must hold a state")]
    NotAState,
    #[error("the audio holds {0} samples; at most {MAX_AUDIO_SAMPLES} travel")]
    TooMuchAudio(usize),
}

/// Encodes a message into a frame; errors when it would exceed its limit.
pub fn encode(message: &Message) -> Result<Vec<u8>, WireError> {
    if let Message::Job(job) = message
        && let Work::Audio { samples } = &job.work
        && samples.len() > MAX_AUDIO_SAMPLES
    {
        return Err(WireError::TooMuchAudio(samples.len()));
    }
    let mut frame = vec![PROTOCOL];
    let frame = postcard::to_extend(message, std::mem::take(&mut frame))
        .map_err(|e| WireError::Malformed(e.to_string()))?;
    let max = limit(message);
    if frame.len() > max {
        return Err(WireError::TooLarge {
            len: frame.len(),
            max,
        });
    }
    Ok(frame)
}

fn limit(message: &Message) -> usize {
    match message {
        Message::State(_) => MAX_STATE_FRAME,
        _ => MAX_FRAME,
    }
}

/// Decodes a frame. Never panics; every limit is checked.
pub fn decode(frame: &[u8]) -> Result<Message, WireError> {
    let (&version, body) = frame.split_first().ok_or(WireError::Empty)?;
    if frame.len() > MAX_FRAME {
        return Err(WireError::TooLarge {
            len: frame.len(),
            max: MAX_FRAME,
        });
    }
    if version != PROTOCOL {
        return Err(WireError::Version(version));
    }
    let (message, rest) = postcard::take_from_bytes::<Message>(body)
        .map_err(|e| WireError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(WireError::Trailing(rest.len()));
    }
    if frame.len() > limit(&message) {
        return Err(WireError::TooLarge {
            len: frame.len(),
            max: limit(&message),
        });
    }
    if let Message::Job(job) = &message {
        match &job.work {
            Work::Audio { samples } if samples.len() > MAX_AUDIO_SAMPLES => {
                return Err(WireError::TooMuchAudio(samples.len()));
            }
            Work::Chat { options, .. } | Work::Completion { options, .. } => options.check()?,
            Work::Audio { .. } => {}
        }
    }
    Ok(message)
}

/// Decodes a frame read from a `state` topic.
pub fn decode_state(frame: &[u8]) -> Result<NodeState, WireError> {
    if frame.len() > MAX_STATE_FRAME {
        return Err(WireError::TooLarge {
            len: frame.len(),
            max: MAX_STATE_FRAME,
        });
    }
    match decode(frame)? {
        Message::State(s) => Ok(*s),
        _ => Err(WireError::NotAState),
    }
}

/// `kith/v1/nodes/<id>/<leaf>`.
pub fn topic(node: &str, leaf: &str) -> String {
    format!("{TOPIC_ROOT}/{node}/{leaf}")
}

/// The node id and leaf of a kith topic.
pub fn parse_topic(topic: &str) -> Option<(&str, &str)> {
    let rest = topic.strip_prefix(TOPIC_ROOT)?.strip_prefix('/')?;
    let (node, leaf) = rest.split_once('/')?;
    (!node.is_empty() && !leaf.contains('/')).then_some((node, leaf))
}

/// A bounded string, or an error naming what did not fit.
pub fn bounded<const N: usize>(what: &str, s: &str) -> Result<heapless::String<N>, String> {
    heapless::String::try_from(s).map_err(|_| format!("{what} {s:?} is longer than {N} bytes"))
}

/// A node id made of `name`: lower case, `[a-z0-9-]`, at most 32 bytes.
pub fn node_id(name: &str) -> NodeId {
    let mut id = NodeId::new();
    for c in name.chars() {
        let c = c.to_ascii_lowercase();
        let c = if c.is_ascii_alphanumeric() { c } else { '-' };
        if id.push(c).is_err() {
            break;
        }
    }
    if id.is_empty() {
        let _ = id.push_str("kith");
    }
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> NodeState {
        let mut models = heapless::Vec::new();
        let _ = models.push(ModelState {
            name: bounded("model", "smollm2-135m").unwrap(),
            task: Task::Text,
            loaded: true,
            queued: 1,
            busy: true,
            capacity: 4,
            decode_milli_tps: 24_900,
            service_ms: 900,
            size_mb: 130,
        });
        NodeState {
            node: node_id("jetson-1"),
            boot: 7,
            seq: 3,
            api_port: 8710,
            models,
            free_memory_mb: 6000,
            temperature_mc: Some(51_000),
            throttled: Some(false),
            audio_rtf_micro: None,
            draining: false,
        }
    }

    #[test]
    fn every_message_round_trips() {
        let messages = [
            Message::State(Box::new(state())),
            Message::Job(Box::new(JobRequest {
                id: 9,
                from: node_id("pi"),
                model: bounded("model", "smollm2-135m").unwrap(),
                work: Work::Chat {
                    messages: vec![ChatTurn {
                        role: bounded("role", "user").unwrap(),
                        content: "hi ☃".into(),
                    }],
                    options: Options {
                        max_tokens: 8,
                        temperature: 0.2,
                        top_p: 0.9,
                        top_k: 0,
                        repetition_penalty: 1.0,
                        seed: 1,
                        stop: heapless::Vec::new(),
                    },
                },
            })),
            Message::Job(Box::new(JobRequest {
                id: 10,
                from: node_id("pi"),
                model: bounded("model", "intent").unwrap(),
                work: Work::Audio {
                    samples: vec![-3; 16_000],
                },
            })),
            Message::Cancel {
                from: node_id("pi"),
                job: 9,
            },
            Message::Event(JobEvent {
                job: 9,
                node: node_id("jetson"),
                seq: 2,
                kind: EventKind::Text("Paris".into()),
            }),
        ];
        for m in messages {
            let frame = encode(&m).unwrap();
            assert_eq!(frame[0], PROTOCOL);
            assert_eq!(decode(&frame).unwrap(), m);
        }
    }

    #[test]
    fn a_state_stays_far_below_its_limit() {
        let frame = encode(&Message::State(Box::new(state()))).unwrap();
        assert!(frame.len() < 256, "{} bytes", frame.len());
        assert_eq!(decode_state(&frame).unwrap(), state());
    }

    #[test]
    fn bad_frames_are_errors_not_panics() {
        let good = encode(&Message::State(Box::new(state()))).unwrap();
        assert_eq!(decode(&[]), Err(WireError::Empty));
        assert_eq!(decode(&[2, 0, 0]), Err(WireError::Version(2)));
        for cut in 1..good.len() {
            assert!(decode(&good[..cut]).is_err(), "truncated at {cut}");
        }
        let mut long = good.clone();
        long.push(0);
        assert_eq!(decode(&long), Err(WireError::Trailing(1)));
        let huge = vec![PROTOCOL; MAX_FRAME + 1];
        assert!(matches!(decode(&huge), Err(WireError::TooLarge { .. })));
        // A length prefix claiming a gigantic string is refused, not allocated.
        let lying = [PROTOCOL, 3, 0, 0xff, 0xff, 0xff, 0xff, 0x0f];
        assert!(matches!(decode(&lying), Err(WireError::Malformed(_))));
        assert!(matches!(
            decode(
                &encode(&Message::Cancel {
                    from: node_id("a"),
                    job: 1
                })
                .unwrap()
            )
            .map(|m| matches!(m, Message::Cancel { .. })),
            Ok(true)
        ));
        assert_eq!(
            decode_state(
                &encode(&Message::Cancel {
                    from: node_id("a"),
                    job: 1
                })
                .unwrap()
            ),
            Err(WireError::NotAState)
        );
    }

    #[test]
    fn names_longer_than_their_bound_do_not_decode() {
        // A state whose node id is 40 bytes: encode by hand with a plain String.
        #[derive(Serialize)]
        enum Fake {
            State { node: String },
        }
        let mut frame = vec![PROTOCOL];
        frame.extend(
            postcard::to_stdvec(&Fake::State {
                node: "x".repeat(40),
            })
            .unwrap(),
        );
        assert!(matches!(decode(&frame), Err(WireError::Malformed(_))));
    }

    #[test]
    fn options_a_peer_could_not_send_through_the_api_are_refused() {
        let job = |temperature: f32| {
            Message::Job(Box::new(JobRequest {
                id: 1,
                from: node_id("a"),
                model: bounded("model", "m").unwrap(),
                work: Work::Completion {
                    prompt: "x".into(),
                    options: Options {
                        max_tokens: 4,
                        temperature,
                        top_p: 0.9,
                        top_k: 0,
                        repetition_penalty: 1.0,
                        seed: 0,
                        stop: heapless::Vec::new(),
                    },
                },
            }))
        };
        let mut frame = vec![PROTOCOL];
        frame.extend(postcard::to_stdvec(&job(f32::NAN)).unwrap());
        assert!(matches!(decode(&frame), Err(WireError::Malformed(_))));
        assert!(decode(&encode(&job(0.7)).unwrap()).is_ok());
    }

    #[test]
    fn too_much_audio_is_refused_both_ways() {
        let job = Message::Job(Box::new(JobRequest {
            id: 1,
            from: node_id("a"),
            model: bounded("model", "m").unwrap(),
            work: Work::Audio {
                samples: vec![0; MAX_AUDIO_SAMPLES + 1],
            },
        }));
        assert_eq!(
            encode(&job),
            Err(WireError::TooMuchAudio(MAX_AUDIO_SAMPLES + 1))
        );
    }

    #[test]
    fn topics_and_ids() {
        assert_eq!(topic("pi-5", "state"), "kith/v1/nodes/pi-5/state");
        assert_eq!(
            parse_topic("kith/v1/nodes/pi-5/jobs"),
            Some(("pi-5", "jobs"))
        );
        assert_eq!(parse_topic("kith/v1/nodes//jobs"), None);
        assert_eq!(parse_topic("kith/v1/nodes/a/b/c"), None);
        assert_eq!(parse_topic("other/a/b"), None);
        assert_eq!(node_id("Kitchen Pi.local").as_str(), "kitchen-pi-local");
        assert_eq!(node_id(&"a".repeat(50)).len(), 32);
        assert_eq!(node_id("").as_str(), "kith");
    }
}
