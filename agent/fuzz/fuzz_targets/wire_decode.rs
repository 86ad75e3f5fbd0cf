//! Decoding a frame from the network never panics, and whatever decodes
//! re-encodes to a frame that decodes to the same message.
#![no_main]

#[path = "../../src/mesh/wire.rs"]
#[allow(dead_code)]
mod wire;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = wire::decode_state(data);
    if let Ok(message) = wire::decode(data) {
        let frame = wire::encode(&message).expect("a decoded message encodes");
        assert_eq!(wire::decode(&frame).expect("re-decodes"), message);
    }
});
