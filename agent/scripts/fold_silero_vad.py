#!/usr/bin/env python3
"""Fold silero VAD's `If` nodes away so tract can load the model.

silero_vad.onnx (as shipped in openWakeWord 0.4.0) picks its sub-network with
nested `If` nodes whose branches have outputs of different rank; tract converts
`If` before it folds constants and fails. Every condition depends only on the
sample rate and the input shapes, so for a fixed rate (16 kHz) and frame length
(640 samples) each one has a single value. This script:

1. replaces the `sr` input with a constant and fixes the input shapes;
2. asks onnxruntime for the value of each top-level `If` condition on a sample
   input, inlines the chosen branch (its nodes and initializers; its outputs
   renamed to the `If` outputs through `Identity`), and repeats until no `If`
   is left;
3. drops unused initializers, checks the model, and verifies that the folded
   model equals the original on onnxruntime over several frames with the LSTM
   state carried (fails if the difference exceeds 1e-5).

Usage: fold_silero_vad.py SOURCE.onnx DEST.onnx
Needs: numpy, onnx, onnxruntime. Writes DEST atomically (DEST.part, then rename).
"""

import os
import sys

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper, TensorProto

SAMPLE_RATE = 16000
FRAME = 640
STATE_SHAPE = [2, 1, 64]


def session(model):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def sample_feed(rng):
    return {
        "input": rng.uniform(-0.5, 0.5, (1, FRAME)).astype(np.float32),
        "h": np.zeros(STATE_SHAPE, np.float32),
        "c": np.zeros(STATE_SHAPE, np.float32),
    }


def fix_interface(model):
    g = model.graph
    inputs = [i for i in g.input if i.name != "sr"]
    if len(inputs) == len(g.input):
        raise SystemExit("no `sr` input: is this silero_vad.onnx?")
    del g.input[:]
    for name, shape in (("input", [1, FRAME]), ("h", STATE_SHAPE), ("c", STATE_SHAPE)):
        match = [i for i in inputs if i.name == name]
        if not match:
            raise SystemExit(f"input `{name}` missing: is this silero_vad.onnx?")
        g.input.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, shape))
    g.initializer.append(numpy_helper.from_array(np.array(SAMPLE_RATE, dtype=np.int64), "sr"))
    for out, shape in zip(g.output, ([1, 1], STATE_SHAPE, STATE_SHAPE)):
        out.type.tensor_type.ClearField("shape")
        for d in shape:
            out.type.tensor_type.shape.dim.add().dim_value = d


def condition_values(model, if_nodes):
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for node in if_nodes:
        probe.graph.output.append(helper.make_tensor_value_info(node.input[0], TensorProto.BOOL, None))
    names = [n.input[0] for n in if_nodes]
    values = session(probe).run(names, sample_feed(np.random.default_rng(0)))
    return [bool(np.asarray(v).reshape(-1)[0]) for v in values]


def inline(graph, node, take_then):
    branch = next(a.g for a in node.attribute if a.name == ("then_branch" if take_then else "else_branch"))
    taken = set()
    for n in graph.node:
        taken.update(n.output)
    taken.update(i.name for i in graph.initializer)
    for n in branch.node:
        clash = [o for o in n.output if o in taken]
        if clash:
            raise SystemExit(f"name clash while inlining {node.name}: {clash}")
    new_nodes = list(branch.node)
    for src, dst in zip(branch.output, node.output):
        new_nodes.append(helper.make_node("Identity", [src.name], [dst], name=f"{dst}__folded"))
    position = list(graph.node).index(node)
    nodes = list(graph.node)
    nodes[position:position + 1] = new_nodes
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(branch.initializer)


def drop_unused_initializers(graph):
    used = set()

    def collect(g):
        for n in g.node:
            used.update(n.input)
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    collect(a.g)
                for sub in a.graphs:
                    collect(sub)

    collect(graph)
    used.update(o.name for o in graph.output)
    keep = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)


def fold(model):
    fix_interface(model)
    for _ in range(64):
        ifs = [n for n in model.graph.node if n.op_type == "If"]
        if not ifs:
            break
        for node, value in zip(ifs, condition_values(model, ifs)):
            inline(model.graph, node, value)
    else:
        raise SystemExit("still `If` nodes after 64 rounds")
    drop_unused_initializers(model.graph)
    onnx.checker.check_model(model)
    return model


def verify(original, folded, steps=8):
    ref, new = session(original), session(folded)
    rng = np.random.default_rng(1)
    feed = sample_feed(rng)
    h_ref = h_new = feed["h"]
    c_ref = c_new = feed["c"]
    worst = 0.0
    for _ in range(steps):
        x = rng.uniform(-0.5, 0.5, (1, FRAME)).astype(np.float32)
        o1, h_ref, c_ref = ref.run(None, {"input": x, "sr": np.array(SAMPLE_RATE, np.int64), "h": h_ref, "c": c_ref})
        o2, h_new, c_new = new.run(None, {"input": x, "h": h_new, "c": c_new})
        worst = max(worst, float(np.abs(o1 - o2).max()), float(np.abs(h_ref - h_new).max()))
    if worst > 1e-5:
        raise SystemExit(f"folded VAD differs from the original by {worst:.2e}")
    return worst


def main():
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    src, dst = sys.argv[1], sys.argv[2]
    original = onnx.load(src)
    folded = fold(onnx.load(src))
    worst = verify(original, folded)
    part = dst + ".part"
    with open(part, "wb") as f:
        f.write(folded.SerializeToString())
    os.replace(part, dst)
    print(f"folded {len(original.graph.node)} -> {len(folded.graph.node)} top-level nodes, "
          f"max diff vs original {worst:.2e}")


if __name__ == "__main__":
    main()
