//! The streaming pipeline's memory is flat: after warm-up, processing audio
//! leaves the live heap exactly where it was. (tract allocates intermediate
//! tensors inside each run and frees them; kith's own buffers are allocated
//! at load.) Counts are printed for the benchmark notes.

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use kith_models::{CHUNK_SAMPLES, EmbeddingMode, SpeechFrontEnd, Vad, WakeHead, WakeWordPipeline};

struct Counting;

static LIVE: AtomicI64 = AtomicI64::new(0);
static CALLS: AtomicU64 = AtomicU64::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as i64, Ordering::Relaxed);
        CALLS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as i64, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

#[test]
fn processing_audio_does_not_grow_the_heap() {
    let dir = PathBuf::from(
        std::env::var_os("KITH_MODELS_DIR")
            .expect("KITH_MODELS_DIR (run the README's test command)"),
    );
    for mode in [EmbeddingMode::Streaming, EmbeddingMode::Windowed] {
        let heads: Vec<WakeHead> = ["alexa", "hey_jarvis", "hey_mycroft", "timer", "weather"]
            .iter()
            .map(|n| WakeHead::load(n, &dir.join(format!("{n}.onnx")), &[]).expect("head"))
            .collect();
        let front = SpeechFrontEnd::load(&dir, 34, mode).expect("front end");
        let vad = Vad::load(&dir.join("silero_vad_folded.onnx")).expect("vad");
        let mut pipeline = WakeWordPipeline::new(front, heads, 0.5, 2000)
            .expect("pipeline")
            .with_vad(vad, 0.5);
        let audio: Vec<i16> = (0..CHUNK_SAMPLES * 16)
            .map(|i| ((i as f32 * 0.05).sin() * 8000.0) as i16)
            .collect();
        let chunks: Vec<&[i16]> = audio.chunks_exact(CHUNK_SAMPLES).collect();
        for c in chunks.iter().cycle().take(64) {
            pipeline.process_chunk(c, |_| {}).expect("warm-up");
        }
        let live_before = LIVE.load(Ordering::Relaxed);
        let calls_before = CALLS.load(Ordering::Relaxed);
        let n = 500;
        for c in chunks.iter().cycle().take(n) {
            pipeline.process_chunk(c, |_| {}).expect("chunk");
        }
        let grown = LIVE.load(Ordering::Relaxed) - live_before;
        let per_chunk = (CALLS.load(Ordering::Relaxed) - calls_before) as f64 / n as f64;
        eprintln!(
            "{mode:?}: {per_chunk:.0} allocations per chunk inside tract; live heap change {grown} bytes"
        );
        assert!(
            grown.abs() < 4096,
            "{mode:?}: heap grew by {grown} bytes over {n} chunks"
        );
    }
}
