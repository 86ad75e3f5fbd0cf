#!/usr/bin/env python3
"""Joins the networks of intent models trained on the same context into one
ensemble: every member reads the same inputs (`rows`, `windows`) and each head's
output is the mean of all members' probabilities, as `kith intent train
--members N` exports it. The thresholds are the first model's until
`kith intent calibrate` sets them again.

    merge_ensembles.py OUT_DIR MODEL_DIR MODEL_DIR...

OUT_DIR gets the first model's files with `intent.onnx` replaced and
`members` in `metrics.json` set to the new count. Needs the `onnx` package.
"""
import json
import shutil
import sys
from pathlib import Path

import onnx
from onnx import helper


def members_of(graph):
    """Each head's member outputs, from the graph's `Mean` nodes."""
    return {n.output[0]: list(n.input) for n in graph.node if n.op_type == "Mean"}


def rename(x, old, new):
    """`x` with its prefix from `old` replaced by the one beside it in `new`."""
    for o, n in zip(old, new):
        if x.startswith(o):
            return n + x[len(o):]
    return x


def renamed(graph, old, new):
    """The graph's nodes and initializers, `old` prefixes renamed `new`."""
    def name(x):
        return rename(x, old, new)

    nodes = []
    for node in graph.node:
        if node.op_type == "Mean":
            continue
        c = onnx.NodeProto()
        c.CopyFrom(node)
        c.input[:] = [name(x) for x in node.input]
        c.output[:] = [name(x) for x in node.output]
        c.name = name(node.name)
        nodes.append(c)
    inits = []
    for t in graph.initializer:
        c = onnx.TensorProto()
        c.CopyFrom(t)
        c.name = name(t.name)
        inits.append(c)
    return nodes, inits


def main(argv):
    if len(argv) < 3:
        sys.exit(__doc__)
    out, dirs = Path(argv[0]), [Path(a) for a in argv[1:]]
    models = [onnx.load(d / "intent.onnx") for d in dirs]
    docs = {m.doc_string for m in models}
    if len(docs) != 1:
        sys.exit(f"the models are of different contexts: {sorted(docs)}")
    heads = [o.name for o in models[0].graph.output]
    nodes, inits, means = [], [], {h: [] for h in heads}
    count = 0
    for d, m in zip(dirs, models):
        per_head = members_of(m.graph)
        if [o.name for o in m.graph.output] != heads or set(per_head) != set(heads):
            sys.exit(f"{d}: not an ensemble with the first model's heads")
        k = len(per_head[heads[0]])
        old = [f"m{i}." for i in range(k)]
        new = [f"m{count + i}." for i in range(k)]
        n, t = renamed(m.graph, old, new)
        nodes += n
        inits += t
        for h in heads:
            means[h] += [rename(x, old, new) for x in per_head[h]]
        count += k
    for h in heads:
        nodes.append(helper.make_node("Mean", means[h], [h]))
    first = models[0]
    graph = helper.make_graph(nodes, first.graph.name, list(first.graph.input),
                              list(first.graph.output), inits)
    model = helper.make_model(graph, opset_imports=list(first.opset_import),
                              producer_name=first.producer_name,
                              producer_version=first.producer_version,
                              doc_string=first.doc_string)
    model.ir_version = first.ir_version
    onnx.checker.check_model(model)
    if out.exists():
        sys.exit(f"{out} exists")
    shutil.copytree(dirs[0], out)
    onnx.save(model, out / "intent.onnx")
    metrics = json.loads((out / "metrics.json").read_text())
    metrics["members"] = count
    metrics["model_bytes"] = (out / "intent.onnx").stat().st_size
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(f"{out}: {count} networks, {metrics['model_bytes']} bytes")


if __name__ == "__main__":
    main(sys.argv[1:])
