//! Writes a trained [`Net`] as an ONNX model (opset 13) that tract runs.
//!
//! Input `embeddings` [1, T, 96]; outputs `head0..headN` [1, K] softmax
//! probabilities. The graph is the network's forward pass written with
//! standard operators: Sub/Mul (normalization), Transpose, Conv with
//! dilations, Relu, MatMul, Softmax, Gather, Add. An ensemble holds each
//! member's graph side by side, and `Mean` averages their probabilities.
//!
//! A network with a tuned front (`Net::front`) reads `rows` [1, R, 192]
//! and `windows` [1, T] instead (the cut front end's features) and starts
//! with its own copy of the embedding's top: Conv (1×3 and 3×1), LeakyRelu,
//! Max, MaxPool, then the embedding of silence wherever `windows` is 0.

use prost::Message;
use tract_onnx::pb::{
    AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto,
    TensorShapeProto, TypeProto, ValueInfoProto, attribute_proto::AttributeType,
    tensor_proto::DataType, tensor_shape_proto, type_proto,
};

use super::embedding_top::{self, Axis, KERNEL as TOP_KERNEL};
use super::net::{KERNEL, Net};

/// Name of the input.
pub const INPUT: &str = "embeddings";
/// Names of the inputs of a model with a tuned front.
pub const ROWS_INPUT: &str = "rows";
pub const WINDOWS_INPUT: &str = "windows";

fn tensor_f32(name: &str, dims: &[usize], data: &[f32]) -> TensorProto {
    TensorProto {
        name: name.to_string(),
        dims: dims.iter().map(|&d| d as i64).collect(),
        data_type: DataType::Float as i32,
        float_data: data.to_vec(),
        ..Default::default()
    }
}

fn tensor_i64(name: &str, dims: &[usize], data: &[i64]) -> TensorProto {
    TensorProto {
        name: name.to_string(),
        dims: dims.iter().map(|&d| d as i64).collect(),
        data_type: DataType::Int64 as i32,
        int64_data: data.to_vec(),
        ..Default::default()
    }
}

fn attr_ints(name: &str, v: &[i64]) -> AttributeProto {
    AttributeProto {
        name: name.to_string(),
        r#type: AttributeType::Ints as i32,
        ints: v.to_vec(),
        ..Default::default()
    }
}

fn attr_float(name: &str, v: f32) -> AttributeProto {
    AttributeProto {
        name: name.to_string(),
        r#type: AttributeType::Float as i32,
        f: v,
        ..Default::default()
    }
}

fn attr_int(name: &str, v: i64) -> AttributeProto {
    AttributeProto {
        name: name.to_string(),
        r#type: AttributeType::Int as i32,
        i: v,
        ..Default::default()
    }
}

fn node(op: &str, inputs: &[&str], output: &str, attrs: Vec<AttributeProto>) -> NodeProto {
    NodeProto {
        op_type: op.to_string(),
        name: output.to_string(),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.to_string()],
        attribute: attrs,
        ..Default::default()
    }
}

fn value_info(name: &str, dims: &[usize]) -> ValueInfoProto {
    ValueInfoProto {
        name: name.to_string(),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: DataType::Float as i32,
                shape: Some(TensorShapeProto {
                    dim: dims
                        .iter()
                        .map(|&d| tensor_shape_proto::Dimension {
                            value: Some(tensor_shape_proto::dimension::Value::DimValue(d as i64)),
                            ..Default::default()
                        })
                        .collect(),
                }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The ONNX bytes of `net`.
pub fn to_onnx(net: &Net, doc: &str) -> Vec<u8> {
    to_onnx_ensemble(std::slice::from_ref(net), doc)
}

/// The ONNX bytes of an ensemble: every member reads the same input and
/// each output is the mean of the members' probabilities (ONNX `Mean`).
/// One member gives the plain network's graph. The members must share a
/// shape; `nets` must not be empty.
pub fn to_onnx_ensemble(nets: &[Net], doc: &str) -> Vec<u8> {
    let Some(first) = nets.first() else {
        return Vec::new();
    };
    let t = first.shape.frames;
    let d = first.shape.dim;
    let mut nodes = Vec::new();
    let mut init = Vec::new();
    let mut member_outputs = Vec::new();
    for (m, net) in nets.iter().enumerate() {
        let prefix = if nets.len() == 1 {
            String::new()
        } else {
            format!("m{m}.")
        };
        member_outputs.push(member(net, &prefix, &mut nodes, &mut init));
    }
    let mut outputs = Vec::new();
    for (h, &k) in first.shape.heads.iter().enumerate() {
        let out = format!("head{h}");
        if nets.len() > 1 {
            let inputs: Vec<&str> = member_outputs.iter().map(|o| o[h].as_str()).collect();
            nodes.push(node("Mean", &inputs, &out, vec![]));
        }
        outputs.push(value_info(&out, &[1, k]));
    }
    let model = ModelProto {
        ir_version: 8,
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: 13,
        }],
        producer_name: "kith".to_string(),
        producer_version: env!("CARGO_PKG_VERSION").to_string(),
        doc_string: doc.to_string(),
        graph: Some(GraphProto {
            name: "intent".to_string(),
            node: nodes,
            initializer: init,
            input: if let Some(front) = &first.front {
                let depth = front.top.depth;
                vec![
                    value_info(ROWS_INPUT, &[1, depth.rows_for(t), depth.row()]),
                    value_info(WINDOWS_INPUT, &[1, t]),
                ]
            } else {
                vec![value_info(INPUT, &[1, t, d])]
            },
            output: outputs,
            ..Default::default()
        }),
        ..Default::default()
    };
    model.encode_to_vec()
}

/// Adds one network's forward pass to the graph, its names after `prefix`;
/// returns the names of its heads' probabilities.
fn member(
    net: &Net,
    prefix: &str,
    nodes: &mut Vec<NodeProto>,
    init: &mut Vec<TensorProto>,
) -> Vec<String> {
    let c = net.shape.channels;
    let n = |name: &str| format!("{prefix}{name}");
    let embeddings = match net.front {
        Some(_) => tuned_front(net, prefix, nodes, init),
        None => INPUT.to_string(),
    };
    init.push(tensor_f32(&n("mean"), &[net.shape.dim], &net.mean));
    init.push(tensor_f32(&n("inv_std"), &[net.shape.dim], &net.inv_std));
    nodes.push(node(
        "Sub",
        &[&embeddings, &n("mean")],
        &n("centered"),
        vec![],
    ));
    nodes.push(node(
        "Mul",
        &[&n("centered"), &n("inv_std")],
        &n("normalized"),
        vec![],
    ));
    nodes.push(node(
        "Transpose",
        &[&n("normalized")],
        &n("x0"),
        vec![attr_ints("perm", &[0, 2, 1])],
    ));
    let mut x = n("x0");
    for (li, conv) in net.convs.iter().enumerate() {
        // Our layout [KERNEL * c_in, c_out] → ONNX [c_out, c_in, KERNEL].
        let mut w = vec![0.0; conv.c_out * conv.c_in * KERNEL];
        for j in 0..KERNEL {
            for ci in 0..conv.c_in {
                for o in 0..conv.c_out {
                    w[(o * conv.c_in + ci) * KERNEL + j] =
                        conv.w[(j * conv.c_in + ci) * conv.c_out + o];
                }
            }
        }
        let (wn, bn) = (n(&format!("conv{li}.w")), n(&format!("conv{li}.b")));
        init.push(tensor_f32(&wn, &[conv.c_out, conv.c_in, KERNEL], &w));
        init.push(tensor_f32(&bn, &[conv.c_out], &conv.b));
        let dil = conv.dilation as i64;
        let z = n(&format!("conv{li}"));
        nodes.push(node(
            "Conv",
            &[&x, &wn, &bn],
            &z,
            vec![
                attr_ints("kernel_shape", &[KERNEL as i64]),
                attr_ints("dilations", &[dil]),
                attr_ints("pads", &[dil, dil]),
                attr_ints("strides", &[1]),
            ],
        ));
        let y = n(&format!("relu{li}"));
        nodes.push(node("Relu", &[&z], &y, vec![]));
        x = y;
    }
    // H^T [1, T, C]; every query at once: E = H^T Q [1, T, NH].
    nodes.push(node(
        "Transpose",
        &[&x],
        &n("ht"),
        vec![attr_ints("perm", &[0, 2, 1])],
    ));
    let nh = net.heads.len();
    let mut q = vec![0.0; c * nh];
    for (h, head) in net.heads.iter().enumerate() {
        for ci in 0..c {
            q[ci * nh + h] = head.q[ci];
        }
    }
    init.push(tensor_f32(&n("queries"), &[c, nh], &q));
    nodes.push(node(
        "MatMul",
        &[&n("ht"), &n("queries")],
        &n("scores"),
        vec![],
    ));
    nodes.push(node(
        "Softmax",
        &[&n("scores")],
        &n("attention"),
        vec![attr_int("axis", 1)],
    ));
    nodes.push(node(
        "Transpose",
        &[&n("attention")],
        &n("attention_t"),
        vec![attr_ints("perm", &[0, 2, 1])],
    ));
    nodes.push(node(
        "MatMul",
        &[&n("attention_t"), &n("ht")],
        &n("pooled"),
        vec![],
    ));
    let mut outputs = Vec::new();
    for (h, (head, &k)) in net.heads.iter().zip(&net.shape.heads).enumerate() {
        let ix = n(&format!("head{h}.ix"));
        init.push(tensor_i64(&ix, &[], &[h as i64]));
        let p = n(&format!("head{h}.pooled"));
        nodes.push(node(
            "Gather",
            &[&n("pooled"), &ix],
            &p,
            vec![attr_int("axis", 1)],
        ));
        let (wn, bn) = (n(&format!("head{h}.w")), n(&format!("head{h}.b")));
        init.push(tensor_f32(&wn, &[c, k], &head.w));
        init.push(tensor_f32(&bn, &[k], &head.b));
        let mm = n(&format!("head{h}.mm"));
        nodes.push(node("MatMul", &[&p, &wn], &mm, vec![]));
        let logits = n(&format!("head{h}.logits"));
        nodes.push(node("Add", &[&mm, &bn], &logits, vec![]));
        let out = n(&format!("head{h}"));
        nodes.push(node("Softmax", &[&logits], &out, vec![attr_int("axis", 1)]));
        outputs.push(out);
    }
    outputs
}

/// Adds a network's tuned front (the embedding's top over `rows`, silence
/// where `windows` is 0); returns the name of its embeddings [1, T, 96].
fn tuned_front(
    net: &Net,
    prefix: &str,
    nodes: &mut Vec<NodeProto>,
    init: &mut Vec<TensorProto>,
) -> String {
    let n = |name: &str| format!("{prefix}{name}");
    let Some(front) = &net.front else {
        return INPUT.to_string();
    };
    let t = net.shape.frames;
    let depth = front.top.depth;
    let rows = depth.rows_for(t);
    let ch = embedding_top::CHANNELS;
    // [1, R, bands * channels] → [1, R, bands, channels] → NCHW [1, channels, R, bands].
    init.push(tensor_i64(
        &n("top.rows_shape"),
        &[4],
        &[
            1,
            rows as i64,
            depth.bands() as i64,
            depth.channels() as i64,
        ],
    ));
    nodes.push(node(
        "Reshape",
        &[ROWS_INPUT, &n("top.rows_shape")],
        &n("top.rows4"),
        vec![],
    ));
    nodes.push(node(
        "Transpose",
        &[&n("top.rows4")],
        &n("top.x"),
        vec![attr_ints("perm", &[0, 3, 1, 2])],
    ));
    init.push(tensor_f32(&n("top.floor"), &[1], &[front.top.floor]));
    let mut x = n("top.x");
    let last = front.top.convs.len() - 1;
    for (li, conv) in front.top.convs.iter().enumerate() {
        if let (_, _, Some(p)) = embedding_top::layer_shape(depth, depth.first_layer() + li) {
            let pooled = n(&format!("top.pool{li}"));
            let window = [p.time as i64, p.bands as i64];
            nodes.push(node(
                "MaxPool",
                &[&x],
                &pooled,
                vec![
                    attr_ints("kernel_shape", &window),
                    attr_ints("strides", &window),
                ],
            ));
            x = pooled;
        }
        // Our layout [TOP_KERNEL * cin, 96] (row j * cin + i) → ONNX [o, i, kh, kw].
        let cin = conv.cin;
        let mut w = vec![0.0; ch * cin * TOP_KERNEL];
        for o in 0..ch {
            for i in 0..cin {
                for j in 0..TOP_KERNEL {
                    w[(o * cin + i) * TOP_KERNEL + j] = conv.w[(j * cin + i) * ch + o];
                }
            }
        }
        let (kernel, pads): ([i64; 2], [i64; 4]) = match conv.axis {
            Axis::Bands => ([1, TOP_KERNEL as i64], [0, 1, 0, 1]),
            Axis::Time => ([TOP_KERNEL as i64, 1], [0, 0, 0, 0]),
        };
        let wn = n(&format!("top.conv{li}.w"));
        init.push(tensor_f32(
            &wn,
            &[ch, cin, kernel[0] as usize, kernel[1] as usize],
            &w,
        ));
        let mut inputs = vec![x.clone(), wn];
        if !conv.b.is_empty() {
            let bn = n(&format!("top.conv{li}.b"));
            init.push(tensor_f32(&bn, &[ch], &conv.b));
            inputs.push(bn);
        }
        let z = n(&format!("top.conv{li}"));
        let refs: Vec<&str> = inputs.iter().map(String::as_str).collect();
        nodes.push(node(
            "Conv",
            &refs,
            &z,
            vec![
                attr_ints("kernel_shape", &kernel),
                attr_ints("pads", &pads),
                attr_ints("strides", &[1, 1]),
            ],
        ));
        x = z;
        if li < last {
            let leaky = n(&format!("top.leaky{li}"));
            nodes.push(node(
                "LeakyRelu",
                &[&x],
                &leaky,
                vec![attr_float("alpha", 0.2)],
            ));
            let act = n(&format!("top.act{li}"));
            nodes.push(node("Max", &[&leaky, &n("top.floor")], &act, vec![]));
            x = act;
        }
    }
    // [1, 96, T, 1] → [1, 96, T] → [1, T, 96].
    init.push(tensor_i64(
        &n("top.e_shape"),
        &[3],
        &[1, ch as i64, t as i64],
    ));
    nodes.push(node(
        "Reshape",
        &[&x, &n("top.e_shape")],
        &n("top.e3"),
        vec![],
    ));
    nodes.push(node(
        "Transpose",
        &[&n("top.e3")],
        &n("top.e"),
        vec![attr_ints("perm", &[0, 2, 1])],
    ));
    // e · m + silence · (1 − m), m = windows as [1, T, 1].
    init.push(tensor_i64(&n("top.m_shape"), &[3], &[1, t as i64, 1]));
    nodes.push(node(
        "Reshape",
        &[WINDOWS_INPUT, &n("top.m_shape")],
        &n("top.m"),
        vec![],
    ));
    init.push(tensor_f32(&n("top.one"), &[1], &[1.0]));
    init.push(tensor_f32(&n("top.silence"), &[ch], &front.silence));
    nodes.push(node(
        "Sub",
        &[&n("top.one"), &n("top.m")],
        &n("top.not_m"),
        vec![],
    ));
    nodes.push(node(
        "Mul",
        &[&n("top.e"), &n("top.m")],
        &n("top.real"),
        vec![],
    ));
    nodes.push(node(
        "Mul",
        &[&n("top.silence"), &n("top.not_m")],
        &n("top.quiet"),
        vec![],
    ));
    let out = n("top.embeddings");
    nodes.push(node(
        "Add",
        &[&n("top.real"), &n("top.quiet")],
        &out,
        vec![],
    ));
    out
}
