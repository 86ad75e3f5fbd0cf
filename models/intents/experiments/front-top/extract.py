#!/usr/bin/env python3
"""Front-end rows of clips written out by `kith intent train` (see README.md).

For every clip: the mel frames kith's streaming front end makes (chunk by
chunk, as `SpeechFrontEnd` does: the mel model clips each chunk on its own),
then the speech-embedding model cut after an inner layer, run once over the
whole stream. Writes, per clip, the rows of the last 64 windows (right
aligned), the 64 embeddings the trainer would have made, and how many of
those are real windows (the rest are the embedding of silence).

    extract.py MODELS_DIR DUMP_DIR NAME OUT_DIR [--cut 16|14|12|10] [--reference CACHE.f32]
"""
import argparse

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

CHUNK, CONTEXT, BINS, WINDOW, FIRST = 1280, 480, 32, 76, 5
FRAMES, TAIL = 64, 3


def cut_model(path, cut):
    """The embedding model from its first convolution (input [1, 1, T, 34]:
    mel rows with the model's own freq padding) to two outputs: the rows
    after conv2d_16's activation (cut 16, two bands), conv2d_14's pooling
    (cut 14, two bands), conv2d_12's activation (cut 12, four bands) or
    conv2d_10's pooling (cut 10, four bands of 72 channels), and
    conv2d_19 (the embedding, one per window of 76 frames)."""
    m = onnx.load(path)
    nodes = list(m.graph.node)
    conv = [k for k, n in enumerate(nodes)
            if n.op_type == 'Conv' and f'conv2d_{cut}/' in n.input[1]][0]
    at = conv + (3 if cut in (10, 14) else 2)
    assert nodes[at].op_type == ('MaxPool' if cut in (10, 14) else 'Max')
    final = [n.output[0] for n in nodes
             if n.op_type == 'Conv' and 'conv2d_19' in n.input[1]][0]
    start = nodes[1].output[0]  # after the model's Pad and Reshape
    g = helper.make_graph(
        nodes[2:-1], 'cut',
        [helper.make_tensor_value_info(start, TensorProto.FLOAT, [1, 1, 'T', BINS + 2])],
        [helper.make_tensor_value_info(nodes[at].output[0], TensorProto.FLOAT, None),
         helper.make_tensor_value_info(final, TensorProto.FLOAT, None)],
        initializer=list(m.graph.initializer))
    cm = helper.make_model(g, opset_imports=m.opset_import)
    cm.ir_version = m.ir_version
    return cm.SerializeToString(), start


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('models'); ap.add_argument('dump'); ap.add_argument('name'); ap.add_argument('out')
    ap.add_argument('--cut', type=int, choices=[10, 12, 14, 16], default=14)
    ap.add_argument('--reference', help="the trainer's cache entry for these clips (.f32): "
                    'checks that the embeddings made here are the ones it trained on')
    a = ap.parse_args()
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    model, start = cut_model(f'{a.models}/embedding_model.onnx', a.cut)
    emb = ort.InferenceSession(model, so, providers=['CPUExecutionProvider'])
    mel = ort.InferenceSession(f'{a.models}/melspectrogram.onnx', so, providers=['CPUExecutionProvider'])
    mel_in = mel.get_inputs()[0].name

    def mel_frames(audio):  # one chunk at a time: the model clips per input
        return mel.run(None, {mel_in: audio[None].astype(np.float32)})[0].reshape(-1, BINS) / 10.0 + 2.0

    def stream(frames):
        x = np.pad(frames, ((0, 0), (1, 1)))[None, None].astype(np.float32)
        rows, e = emb.run(None, {start: x})
        return rows[0].transpose(1, 0, 2), e[0, :, :, 0].T  # [R, channels, bands], [K, 96]

    silence = mel_frames(np.zeros(CHUNK + CONTEXT, np.float32))[0]
    _, sil_e = stream(np.tile(silence, (WINDOW, 1)))
    extra = {16: 6, 14: 8, 12: 10, 10: 12}[a.cut]  # rows of a window beyond its 2 own
    bands = 4 if a.cut <= 12 else 2
    channels = 72 if a.cut == 10 else 96
    audio = np.fromfile(f'{a.dump}/{a.name}.i16', dtype='<i2')
    idx = [line.rstrip('\n').split('\t') for line in open(f'{a.dump}/{a.name}.idx')]
    n_rows = 2 * FRAMES + extra
    R = np.zeros((len(idx), n_rows, channels, bands), np.float16)
    E = np.zeros((len(idx), FRAMES, 96), np.float32)
    count = np.zeros(len(idx), np.int32)
    for i, (off, ln, *_) in enumerate(idx):
        clip = audio[int(off):int(off) + int(ln)].astype(np.float32)
        n = -(-len(clip) // CHUNK)
        padded = np.zeros((n + TAIL) * CHUNK, np.float32)
        padded[:len(clip)] = clip
        frames = [mel_frames(padded[:CHUNK])] + [
            mel_frames(padded[CHUNK * c - CONTEXT:CHUNK * (c + 1)]) for c in range(1, n + TAIL)]
        # The stream starts with openWakeWord's first window of ones.
        frames = np.concatenate([np.ones((WINDOW - FIRST, BINS), np.float32)] + frames)
        rows, e = stream(frames)
        # Streaming emits a chunk's embedding one chunk late: the last
        # window is not in the trainer's features.
        rows, e = rows[:-2], e[:-1]
        k = e.shape[0]
        assert rows.shape[0] == 2 * k + extra, (rows.shape, e.shape)
        take = min(k, FRAMES)
        R[i, n_rows - (2 * take + extra):] = rows[rows.shape[0] - (2 * take + extra):]
        E[i, FRAMES - take:] = e[k - take:]
        E[i, :FRAMES - take] = sil_e[0]
        count[i] = take
        if i % 2000 == 0:
            print(a.name, i, len(idx), flush=True)
    if a.reference:
        ref = np.fromfile(a.reference, '<f4').reshape(len(idx), FRAMES, 96)
        print(f'largest difference from the trainer\'s features: {np.abs(ref - E).max():.2e}')
    np.save(f'{a.out}/{a.name}.rows{a.cut}.npy', R)
    np.save(f'{a.out}/{a.name}.emb.npy', E)
    np.save(f'{a.out}/{a.name}.count.npy', count)
    np.save(f'{a.out}/sil_e.npy', sil_e)


if __name__ == '__main__':
    main()
