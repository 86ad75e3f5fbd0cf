#!/usr/bin/env python3
"""Convert a Llama-architecture GGUF (Q4_1 / Q4_0 / Q8_0 / F32 tensors) into the
decoder-only ONNX layout that optimum and onnx-community publish:

  inputs  input_ids [b, s] int64, attention_mask [b, p+s] int64, position_ids [b, s] int64,
          past_key_values.N.key / .value [b, kv_heads, p, head_dim] float32
  outputs logits [b, s, vocab] float32, present.N.key / .value [b, kv_heads, p+s, head_dim]

plus tokenizer.json, tokenizer_config.json (with the chat template), config.json and
generation_config.json, so that any runtime that loads such an export loads this one.

Weights
- Every linear layer becomes a com.microsoft `MatMulNBits` (4 bits, block 32), the format
  tract runs on its Q4_0 kernels. A Q4_1 block is `d * q + m`; it is written exactly as
  `d * (q - 8)` (MatMulNBits without zero points) plus a per-block constant `m + 8 d`, which
  contributes `blocksum(x) @ offsets` (one small MatMul on the activations' sums over each
  32-wide block). Nothing is re-quantized: the ONNX model computes what llama.cpp computes.
  `--requantize` instead re-quantizes to symmetric 4 bits (smaller graph, lossy).
- Q and K rows are put back in Hugging Face's rotate-half order (llama.cpp permutes them).
- QKV and gate/up projections share their input and are fused into one MatMulNBits each.
- The token embedding (Q8_0 in SmolLM2) is tied to the LM head: the head keeps llama.cpp's
  8-bit blocks exactly (MatMulNBits, bits 8); the lookup uses a symmetric 4-bit copy
  (GatherBlockQuantized, which tract runs on its Q4_0 path).

The tokenizer is rebuilt from the GGUF vocabulary and merges, avoiding the three traps of
transformers' GGUF conversion: no extra BOS, EOS is `<|im_end|>`, digits are split one by one
(the `smollm` pre-tokenizer of llama.cpp).

Needs numpy, onnx and gguf. The output is byte-for-byte deterministic.
"""

import argparse
import hashlib
import json
import os
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

try:
    from gguf import GGUFReader, GGMLQuantizationType
    from gguf.quants import dequantize
except ImportError:  # pragma: no cover - reported to the user
    sys.exit("gguf_to_onnx: the Python package `gguf` is missing (pip install gguf)")

BLOCK = 32


def field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    if not f.data:
        return default
    if f.types[0].name == "STRING":
        return bytes(f.parts[f.data[0]]).decode("utf-8")
    if f.types[0].name == "ARRAY":
        if f.types[1].name == "STRING":
            return [bytes(f.parts[i]).decode("utf-8") for i in f.data]
        return [f.parts[i].tolist()[0] for i in f.data]
    v = f.parts[f.data[0]].tolist()
    return v[0] if isinstance(v, list) and len(v) == 1 else v


class Q4:
    """A weight [n, k] as symmetric 4-bit codes (zero 8) plus an optional per-block offset."""

    def __init__(self, codes, scales, offsets):
        self.codes = codes  # uint8 [n, k] in 0..15
        self.scales = scales  # float32 [n, k/32]
        self.offsets = offsets  # float32 [n, k/32] or None

    @property
    def n(self):
        return self.codes.shape[0]

    @property
    def k(self):
        return self.codes.shape[1]

    def packed(self):
        n, k = self.codes.shape
        c = self.codes.reshape(n, k // BLOCK, BLOCK // 2, 2)
        return (c[..., 0] | (c[..., 1] << 4)).astype(np.uint8)  # [n, blocks, 16]

    def dense(self):
        n, k = self.codes.shape
        w = (self.codes.astype(np.float32) - 8.0).reshape(n, k // BLOCK, BLOCK)
        w = w * self.scales[..., None]
        if self.offsets is not None:
            w = w + self.offsets[..., None]
        return w.reshape(n, k)

    @staticmethod
    def concat(parts):
        offs = [p.offsets for p in parts]
        if any(o is not None for o in offs):
            offs = [o if o is not None else np.zeros_like(p.scales) for o, p in zip(offs, parts)]
            off = np.concatenate(offs, axis=0)
        else:
            off = None
        return Q4(
            np.concatenate([p.codes for p in parts], axis=0),
            np.concatenate([p.scales for p in parts], axis=0),
            off,
        )

    def permute_rows(self, order):
        off = self.offsets[order] if self.offsets is not None else None
        return Q4(self.codes[order], self.scales[order], off)


def quantize_symmetric(w):
    """Symmetric 4-bit, block 32, zero 8: the MatMulNBits default that maps to tract's Q4_0."""
    n, k = w.shape
    b = w.reshape(n, k // BLOCK, BLOCK).astype(np.float32)
    # As llama.cpp's Q4_0: the value of largest magnitude maps to -8.
    idx = np.abs(b).argmax(axis=-1)
    mx = np.take_along_axis(b, idx[..., None], axis=-1)[..., 0]
    d = mx / -8.0
    # The scale as stored (f16 in tract's packer) is the one used for the codes.
    d = d.astype(np.float16).astype(np.float32)
    inv = np.divide(1.0, d, out=np.zeros_like(d), where=d != 0)
    q = np.clip(np.floor(b * inv[..., None] + 8.5), 0, 15).astype(np.uint8)
    return Q4(q.reshape(n, k), d, None)


def quantize_asymmetric(w):
    """Q4_1-style 4 bits, block 32: w ~ d * q + min, written as d * (q - 8) + offset."""
    n, k = w.shape
    b = w.reshape(n, k // BLOCK, BLOCK).astype(np.float32)
    lo = b.min(axis=-1).astype(np.float16).astype(np.float32)
    hi = b.max(axis=-1)
    d = ((hi - lo) / 15.0).astype(np.float16).astype(np.float32)
    inv = np.divide(1.0, d, out=np.zeros_like(d), where=d != 0)
    q = np.clip(np.floor((b - lo[..., None]) * inv[..., None] + 0.5), 0, 15).astype(np.uint8)
    return Q4(q.reshape(n, k), d, lo + 8.0 * d)


def q4_1_exact(raw, n, k):
    """GGUF Q4_1 blocks (f16 d, f16 m, 16 bytes: x[j] low nibble, x[j+16] high nibble)."""
    blocks = raw.reshape(n, k // BLOCK, 20)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    qs = blocks[..., 4:20]
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.uint8)  # [n, blocks, 32]
    # d * q + m == d * (q - 8) + (m + 8 d)
    return Q4(codes.reshape(n, k), d, m + 8.0 * d)


def q4_0_exact(raw, n, k):
    blocks = raw.reshape(n, k // BLOCK, 18)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    qs = blocks[..., 2:18]
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.uint8)
    return Q4(codes.reshape(n, k), d, None)


class Q8:
    """A weight [n, k] as symmetric 8-bit codes (stored + 128 as uint8) with one scale per block."""

    def __init__(self, codes, scales):
        self.codes = codes  # int8 [n, k]
        self.scales = scales  # float32 [n, k/32]

    @property
    def n(self):
        return self.codes.shape[0]

    @property
    def k(self):
        return self.codes.shape[1]

    def packed(self):
        n, k = self.codes.shape
        return (self.codes.astype(np.int16) + 128).astype(np.uint8).reshape(n, k // BLOCK, BLOCK)

    def dense(self):
        n, k = self.codes.shape
        w = self.codes.astype(np.float32).reshape(n, k // BLOCK, BLOCK) * self.scales[..., None]
        return w.reshape(n, k)


def q8_0_exact(raw, n, k):
    """GGUF Q8_0 blocks: f16 d, then 32 int8 codes."""
    blocks = raw.reshape(n, k // BLOCK, 34)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    codes = blocks[..., 2:34].copy().view(np.int8)
    return Q8(codes.reshape(n, k), d)


def quantize_q8(w):
    n, k = w.shape
    b = w.reshape(n, k // BLOCK, BLOCK).astype(np.float32)
    d = (np.abs(b).max(axis=-1) / 127.0).astype(np.float16).astype(np.float32)
    inv = np.divide(1.0, d, out=np.zeros_like(d), where=d != 0)
    q = np.clip(np.round(b * inv[..., None]), -127, 127).astype(np.int8)
    return Q8(q.reshape(n, k), d)


class Weights:
    def __init__(self, reader, requantize):
        self.t = {t.name: t for t in reader.tensors}
        self.requantize = requantize

    def dense(self, name):
        t = self.t[name]
        return dequantize(t.data, t.tensor_type).reshape([int(x) for x in reversed(t.shape)]).astype(np.float32)

    def q8(self, name):
        t = self.t[name]
        k, n = int(t.shape[0]), int(t.shape[1])
        if t.tensor_type == GGMLQuantizationType.Q8_0:
            return q8_0_exact(np.asarray(t.data).reshape(n, -1), n, k)
        return quantize_q8(self.dense(name))

    def q4(self, name):
        t = self.t[name]
        k, n = int(t.shape[0]), int(t.shape[1])
        if k % BLOCK:
            raise SystemExit(f"gguf_to_onnx: {name}: inner size {k} is not a multiple of {BLOCK}")
        raw = np.asarray(t.data).reshape(n, -1)
        if not self.requantize and t.tensor_type == GGMLQuantizationType.Q4_1:
            return q4_1_exact(raw, n, k)
        if t.tensor_type == GGMLQuantizationType.Q4_0:
            return q4_0_exact(raw, n, k)
        return quantize_symmetric(self.dense(name))


def unpermute(n_head, head_dim):
    """Row order that undoes llama.cpp's Q/K permutation (back to rotate-half)."""
    idx = np.arange(n_head * head_dim).reshape(n_head, head_dim // 2, 2)
    return idx.swapaxes(1, 2).reshape(-1)


class Graph:
    def __init__(self):
        self.nodes = []
        self.inits = []
        self.count = 0
        self.consts = {}
        self.dense = False

    def name(self, base):
        self.count += 1
        return f"{base}_{self.count}"

    def init(self, name, array):
        self.inits.append(numpy_helper.from_array(np.array(array, order="C"), name))
        return name

    def const(self, value, dtype=np.int64):
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self.consts:
            self.consts[key] = self.init(f"const_{len(self.consts)}", arr)
        return self.consts[key]

    def op(self, op_type, inputs, n_out=1, name=None, domain=None, out=None, **attrs):
        name = name or self.name(op_type.lower())
        outs = [f"{name}_out{i}" if n_out > 1 else f"{name}_out" for i in range(n_out)]
        if out is not None:
            outs = [out]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=name, domain=domain, **attrs))
        return outs if n_out > 1 else outs[0]

    def linear(self, x, w, prefix, sums=None, out=None):
        """x @ w^T for a Q4 weight; returns (y, block sums of x used for offsets).
        `out` names the result tensor."""
        if self.dense:
            wt = self.init(f"{prefix}.weight", np.ascontiguousarray(w.dense().T))
            return self.op("MatMul", [x, wt], name=f"{prefix}/MatMul", out=out), sums
        has_offsets = w.offsets is not None and np.any(w.offsets)
        blob = self.init(f"{prefix}.qweight", w.packed())
        scales = self.init(f"{prefix}.scales", w.scales.reshape(-1).astype(np.float32))
        y = self.op(
            "MatMulNBits",
            [x, blob, scales],
            name=f"{prefix}/MatMulNBits",
            domain="com.microsoft",
            K=w.k,
            N=w.n,
            bits=4,
            block_size=BLOCK,
            out=None if has_offsets else out,
        )
        if not has_offsets:
            return y, sums
        if sums is None:
            blocked = self.op("Reshape", [x, self.const([0, 0, w.k // BLOCK, BLOCK])], name=f"{prefix}/blocks")
            sums = self.op("ReduceSum", [blocked, self.const([-1])], name=f"{prefix}/block_sums", keepdims=0)
        offsets = self.init(f"{prefix}.offsets", np.ascontiguousarray(w.offsets.T.astype(np.float32)))
        corr = self.op("MatMul", [sums, offsets], name=f"{prefix}/offsets")
        return self.op("Add", [y, corr], name=f"{prefix}/add_offsets", out=out), sums

    def rms_norm(self, x, weight, eps, prefix):
        w = self.init(f"{prefix}.weight", weight.astype(np.float32))
        sq = self.op("Pow", [x, self.const(2.0, np.float32)], name=f"{prefix}/Pow")
        mean = self.op("ReduceMean", [sq], name=f"{prefix}/ReduceMean", axes=[-1], keepdims=1)
        add = self.op("Add", [mean, self.const(eps, np.float32)], name=f"{prefix}/Add")
        sqrt = self.op("Sqrt", [add], name=f"{prefix}/Sqrt")
        rec = self.op("Reciprocal", [sqrt], name=f"{prefix}/Reciprocal")
        mul = self.op("Mul", [x, rec], name=f"{prefix}/Mul")
        return self.op("Mul", [w, mul], name=f"{prefix}/Mul_1")


def rotate(g, x, cos, sin, half, prefix):
    x1 = g.op("Slice", [x, g.const([0]), g.const([half]), g.const([-1])], name=f"{prefix}/Slice")
    x2 = g.op("Slice", [x, g.const([half]), g.const([2 * half]), g.const([-1])], name=f"{prefix}/Slice_1")
    neg = g.op("Neg", [x2], name=f"{prefix}/Neg")
    rot = g.op("Concat", [neg, x1], name=f"{prefix}/Concat", axis=-1)
    a = g.op("Mul", [x, cos], name=f"{prefix}/Mul")
    b = g.op("Mul", [rot, sin], name=f"{prefix}/Mul_1")
    return g.op("Add", [a, b], name=f"{prefix}/Add")


def embed(g, emb, vocab, hidden):
    """Token lookup in the 4-bit table, dequantizing only the selected rows."""
    table = g.init("model.embed_tokens.qweight", emb.packed().reshape(vocab, hidden // 2))
    table_scales = g.init("model.embed_tokens.scales", emb.scales.astype(np.float32))
    return g.op(
        "GatherBlockQuantized",
        [table, "input_ids", table_scales],
        name="/model/embed_tokens/GatherBlockQuantized",
        domain="com.microsoft",
        bits=4,
        block_size=BLOCK,
        gather_axis=0,
        quantize_axis=1,
    )


def build_model(reader, requantize, dense=False):
    arch = field(reader, "general.architecture")
    if arch != "llama":
        raise SystemExit(f"gguf_to_onnx: architecture `{arch}` is not supported (only llama)")
    n_layer = field(reader, "llama.block_count")
    hidden = field(reader, "llama.embedding_length")
    n_head = field(reader, "llama.attention.head_count")
    n_kv = field(reader, "llama.attention.head_count_kv", n_head)
    eps = float(field(reader, "llama.attention.layer_norm_rms_epsilon"))
    theta = float(field(reader, "llama.rope.freq_base", 10000.0))
    head_dim = hidden // n_head
    rep = n_head // n_kv
    W = Weights(reader, requantize)
    vocab = int(W.t["token_embd.weight"].shape[1])

    g = Graph()
    g.dense = dense
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"]),
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
    ]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", "sequence_length", vocab])]
    for i in range(n_layer):
        for kv in ("key", "value"):
            inputs.append(
                helper.make_tensor_value_info(
                    f"past_key_values.{i}.{kv}", TensorProto.FLOAT, ["batch_size", n_kv, "past_sequence_length", head_dim]
                )
            )
            outputs.append(
                helper.make_tensor_value_info(
                    f"present.{i}.{kv}", TensorProto.FLOAT, ["batch_size", n_kv, "total_sequence_length", head_dim]
                )
            )

    # Embedding: symmetric 4 bits for the lookup (GatherBlockQuantized).
    # LM head: 8 bits, block 32 (exactly llama.cpp's Q8_0 when the GGUF has
    # it): the head decides every token, and 4 bits there cost a 135M model
    # 4 of 64 teacher-forced top-1 matches with the float model.
    emb = quantize_symmetric(W.dense("token_embd.weight"))
    head = W.q8("output.weight" if "output.weight" in W.t else "token_embd.weight")
    if dense:
        table_f = W.dense("token_embd.weight")
        head_f = W.dense("output.weight") if "output.weight" in W.t else table_f
        x = g.op("Gather", [g.init("model.embed_tokens.weight", table_f), "input_ids"], name="/model/embed_tokens/Gather", axis=0)
    else:
        x = embed(g, emb, vocab, hidden)

    # Rotary tables from position_ids, shared by all layers: [b, 1, s, head_dim].
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    pos = g.op("Cast", ["position_ids"], name="/model/rotary/Cast", to=TensorProto.FLOAT)
    pos = g.op("Unsqueeze", [pos, g.const([-1])], name="/model/rotary/Unsqueeze")
    freqs = g.op("Mul", [pos, g.const(inv_freq.astype(np.float32), np.float32)], name="/model/rotary/Mul")
    embp = g.op("Concat", [freqs, freqs], name="/model/rotary/Concat", axis=-1)
    cos = g.op("Cos", [embp], name="/model/rotary/Cos")
    sin = g.op("Sin", [embp], name="/model/rotary/Sin")
    cos = g.op("Unsqueeze", [cos, g.const([1])], name="/model/rotary/Unsqueeze_cos")
    sin = g.op("Unsqueeze", [sin, g.const([1])], name="/model/rotary/Unsqueeze_sin")

    # Attention bias [b, 1, 1, s, t]: causal over absolute positions and the padding mask.
    total = g.op("Shape", ["attention_mask"], name="/model/mask/Shape", start=1, end=2)
    seq = g.op("Shape", ["input_ids"], name="/model/mask/Shape_1", start=1, end=2)
    past = g.op("Sub", [total, seq], name="/model/mask/Sub")
    total_s = g.op("Squeeze", [total, g.const([0])], name="/model/mask/Squeeze")
    past_s = g.op("Squeeze", [past, g.const([0])], name="/model/mask/Squeeze_1")
    k_idx = g.op("Range", [g.const(0), total_s, g.const(1)], name="/model/mask/Range")
    q_idx = g.op("Range", [past_s, total_s, g.const(1)], name="/model/mask/Range_1")
    q_idx = g.op("Unsqueeze", [q_idx, g.const([1])], name="/model/mask/Unsqueeze")
    causal = g.op("LessOrEqual", [k_idx, q_idx], name="/model/mask/LessOrEqual")  # [s, t]
    keep = g.op("Cast", ["attention_mask"], name="/model/mask/Cast", to=TensorProto.BOOL)
    keep = g.op("Unsqueeze", [keep, g.const([1, 2, 3])], name="/model/mask/Unsqueeze_1")  # [b,1,1,1,t]
    allowed = g.op("And", [causal, keep], name="/model/mask/And")
    bias = g.op(
        "Where",
        [allowed, g.const(0.0, np.float32), g.const(np.finfo(np.float32).min, np.float32)],
        name="/model/mask/Where",
    )

    q_order = unpermute(n_head, head_dim)
    k_order = unpermute(n_kv, head_dim)
    scale = 1.0 / np.sqrt(head_dim)
    half = head_dim // 2
    for i in range(n_layer):
        p = f"/model/layers.{i}"
        blk = f"blk.{i}"
        h = g.rms_norm(x, W.dense(f"{blk}.attn_norm.weight"), eps, f"{p}/input_layernorm")
        wq = W.q4(f"{blk}.attn_q.weight").permute_rows(q_order)
        wk = W.q4(f"{blk}.attn_k.weight").permute_rows(k_order)
        wv = W.q4(f"{blk}.attn_v.weight")
        qkv, _ = g.linear(h, Q4.concat([wq, wk, wv]), f"{p}/self_attn/qkv_proj")
        q, k, v = g.op(
            "Split",
            [qkv, g.const([n_head * head_dim, n_kv * head_dim, n_kv * head_dim])],
            n_out=3,
            name=f"{p}/self_attn/Split",
            axis=-1,
        )
        q = g.op("Reshape", [q, g.const([0, 0, n_head, head_dim])], name=f"{p}/self_attn/Reshape_q")
        q = g.op("Transpose", [q], name=f"{p}/self_attn/Transpose_q", perm=[0, 2, 1, 3])
        k = g.op("Reshape", [k, g.const([0, 0, n_kv, head_dim])], name=f"{p}/self_attn/Reshape_k")
        k = g.op("Transpose", [k], name=f"{p}/self_attn/Transpose_k", perm=[0, 2, 1, 3])
        v = g.op("Reshape", [v, g.const([0, 0, n_kv, head_dim])], name=f"{p}/self_attn/Reshape_v")
        v = g.op("Transpose", [v], name=f"{p}/self_attn/Transpose_v", perm=[0, 2, 1, 3])
        q = rotate(g, q, cos, sin, half, f"{p}/self_attn/rope_q")
        k = rotate(g, k, cos, sin, half, f"{p}/self_attn/rope_k")
        g.nodes.append(
            helper.make_node(
                "Concat", [f"past_key_values.{i}.key", k], [f"present.{i}.key"], name=f"{p}/self_attn/Concat_k", axis=2
            )
        )
        g.nodes.append(
            helper.make_node(
                "Concat", [f"past_key_values.{i}.value", v], [f"present.{i}.value"], name=f"{p}/self_attn/Concat_v", axis=2
            )
        )
        # Grouped-query attention without copying K/V: queries as [b, kv, rep, s, d].
        qg = g.op("Reshape", [q, g.const([0, n_kv, rep, -1, head_dim])], name=f"{p}/self_attn/Reshape_qg")
        kt = g.op("Transpose", [f"present.{i}.key"], name=f"{p}/self_attn/Transpose_kt", perm=[0, 1, 3, 2])
        kt = g.op("Unsqueeze", [kt, g.const([2])], name=f"{p}/self_attn/Unsqueeze_k")
        vv = g.op("Unsqueeze", [f"present.{i}.value", g.const([2])], name=f"{p}/self_attn/Unsqueeze_v")
        qg = g.op("Mul", [qg, g.const(scale, np.float32)], name=f"{p}/self_attn/Mul_scale")
        scores = g.op("MatMul", [qg, kt], name=f"{p}/self_attn/MatMul")
        scores = g.op("Add", [scores, bias], name=f"{p}/self_attn/Add_mask")
        probs = g.op("Softmax", [scores], name=f"{p}/self_attn/Softmax", axis=-1)
        ctx = g.op("MatMul", [probs, vv], name=f"{p}/self_attn/MatMul_1")
        ctx = g.op("Reshape", [ctx, g.const([0, n_head, -1, head_dim])], name=f"{p}/self_attn/Reshape_ctx")
        ctx = g.op("Transpose", [ctx], name=f"{p}/self_attn/Transpose_ctx", perm=[0, 2, 1, 3])
        ctx = g.op("Reshape", [ctx, g.const([0, 0, n_head * head_dim])], name=f"{p}/self_attn/Reshape_out")
        o, _ = g.linear(ctx, W.q4(f"{blk}.attn_output.weight"), f"{p}/self_attn/o_proj")
        x = g.op("Add", [x, o], name=f"{p}/Add")

        h = g.rms_norm(x, W.dense(f"{blk}.ffn_norm.weight"), eps, f"{p}/post_attention_layernorm")
        gate_up = Q4.concat([W.q4(f"{blk}.ffn_gate.weight"), W.q4(f"{blk}.ffn_up.weight")])
        ffn = gate_up.n // 2
        gu, _ = g.linear(h, gate_up, f"{p}/mlp/gate_up_proj")
        gate, up = g.op("Split", [gu, g.const([ffn, ffn])], n_out=2, name=f"{p}/mlp/Split", axis=-1)
        sig = g.op("Sigmoid", [gate], name=f"{p}/mlp/act_fn/Sigmoid")
        act = g.op("Mul", [gate, sig], name=f"{p}/mlp/act_fn/Mul")
        hm = g.op("Mul", [act, up], name=f"{p}/mlp/Mul")
        d, _ = g.linear(hm, W.q4(f"{blk}.ffn_down.weight"), f"{p}/mlp/down_proj")
        x = g.op("Add", [x, d], name=f"{p}/Add_1")
        print(f"gguf_to_onnx: layer {i + 1}/{n_layer}", file=sys.stderr, flush=True)

    x = g.rms_norm(x, W.dense("output_norm.weight"), eps, "/model/norm")
    if dense:
        ht = g.init("lm_head.weight", np.ascontiguousarray(head_f.T))
        g.op("MatMul", [x, ht], name="/lm_head/MatMul", out="logits")
    else:
        g.op(
            "MatMulNBits",
            [x, g.init("lm_head.qweight", head.packed()), g.init("lm_head.scales", head.scales.reshape(-1).astype(np.float32))],
            name="/lm_head/MatMulNBits",
            domain="com.microsoft",
            out="logits",
            K=hidden,
            N=vocab,
            bits=8,
            block_size=BLOCK,
        )

    graph = helper.make_graph(g.nodes, "kith-llama", inputs, outputs, g.inits)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
        producer_name="kith gguf_to_onnx",
        producer_version="1",
    )
    model.ir_version = 8
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(W.t["blk.0.ffn_up.weight"].shape[1]),
        "num_hidden_layers": n_layer,
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "rms_norm_eps": eps,
        "rope_theta": theta,
        "max_position_embeddings": field(reader, "llama.context_length", 2048),
        "vocab_size": vocab,
        "tie_word_embeddings": "output.weight" not in W.t,
        "torch_dtype": "float32",
    }
    return model, config


def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def build_tokenizer(reader):
    model = field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise SystemExit(f"gguf_to_onnx: tokenizer model `{model}` is not supported (only byte-level BPE)")
    pre = field(reader, "tokenizer.ggml.pre", "default")
    tokens = field(reader, "tokenizer.ggml.tokens")
    types = field(reader, "tokenizer.ggml.token_type")
    merges = field(reader, "tokenizer.ggml.merges")
    vocab = {t: i for i, t in enumerate(tokens)}
    added = [
        {
            "id": i,
            "content": t,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for i, (t, ty) in enumerate(zip(tokens, types))
        if ty in (3, 4)  # CONTROL, USER_DEFINED
    ]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    if pre in ("smollm", "starcoder", "refact", "qwen2"):
        pre_tok = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, byte_level]}
    elif pre in ("default", "gpt-2", "gpt2"):
        pre_tok = byte_level
    else:
        raise SystemExit(f"gguf_to_onnx: pre-tokenizer `{pre}` is not supported")
    tok = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": pre_tok,
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": merges,
        },
    }
    template = field(reader, "tokenizer.chat_template")
    by_id = {i: t for i, t in enumerate(tokens)}
    # The GGUF's bos/eos ids point at <|im_start|>; a chat model ends its turn with <|im_end|>.
    eos = "<|im_end|>" if "<|im_end|>" in vocab else by_id[field(reader, "tokenizer.ggml.eos_token_id")]
    bos = by_id.get(field(reader, "tokenizer.ggml.bos_token_id", -1))
    unk = "<|endoftext|>" if "<|endoftext|>" in vocab else None
    cfg = {
        "add_bos_token": False,
        "add_eos_token": False,
        "bos_token": bos,
        "eos_token": eos,
        "pad_token": eos,
        "unk_token": unk,
        "chat_template": template,
        "clean_up_tokenization_spaces": False,
        "model_max_length": field(reader, "llama.context_length", 2048),
        "tokenizer_class": "GPT2Tokenizer",
    }
    gen = {"bos_token_id": vocab.get(bos), "eos_token_id": [vocab[eos]], "pad_token_id": vocab[eos]}
    return tok, cfg, gen


def write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=1, sort_keys=False)
        f.write("\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("gguf")
    ap.add_argument("out_dir")
    ap.add_argument("--requantize", action="store_true", help="re-quantize Q4_1 to symmetric 4 bits (lossy)")
    ap.add_argument("--dense", action="store_true", help="float32 weights dequantized from the GGUF (a reference, ~4x larger)")
    args = ap.parse_args()

    reader = GGUFReader(args.gguf)
    model, config = build_model(reader, args.requantize, args.dense)
    tok, tok_cfg, gen = build_tokenizer(reader)
    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, "model.onnx")
    onnx.save_model(model, path + ".part")
    os.replace(path + ".part", path)
    write_json(os.path.join(args.out_dir, "config.json"), config)
    write_json(os.path.join(args.out_dir, "tokenizer.json"), tok)
    write_json(os.path.join(args.out_dir, "tokenizer_config.json"), tok_cfg)
    write_json(os.path.join(args.out_dir, "generation_config.json"), gen)
    h = hashlib.sha256(open(path, "rb").read()).hexdigest()
    print(f"gguf_to_onnx: wrote {path} ({os.path.getsize(path) / 1e6:.1f} MB, sha256 {h})", file=sys.stderr)


if __name__ == "__main__":
    main()
