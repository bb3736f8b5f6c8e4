//! The ONNX graph of a trained ViT, node for node as the burn model computes it: patch
//! embedding as a Conv, the encoder blocks, LayerNorm and the head on the CLS token.

use super::onnx_graph::{Attr, Dim, GraphBuilder};
use super::{bias_of, values};
use crate::model::{LAYER_NORM_EPSILON, ViTConfig, VisionTransformer};
use burn::nn::{LayerNorm, Linear};

pub(super) fn build_graph(
    v: &ViTConfig,
    model: &VisionTransformer,
    opset: i64,
    with_attention: bool,
) -> GraphBuilder {
    let (d, p, c, s, heads) = (v.dim, v.patch_size, v.channels, v.image_size, v.heads);
    let head_dim = v.head_dim();
    let mut g = GraphBuilder::with_image_input("vit", c, s);

    // Shared constants.
    let split_heads_shape = g.ints(
        "const.heads_shape",
        &[4],
        vec![0, 0, heads as i64, head_dim as i64],
    );
    let merge_heads_shape = g.ints("const.merge_shape", &[3], vec![0, 0, d as i64]);
    let qkv_split = g.ints("const.qkv_split", &[3], vec![d as i64; 3]);
    let cls_tail = g.ints("const.cls_tail_shape", &[2], vec![1, d as i64]);
    let scale = g.weight(
        "const.attention_scale",
        &[],
        vec![1.0 / (head_dim as f32).sqrt()],
    );
    // ReduceMean's axes, an input from opset 18 (an attribute before): only when used.
    let head_axis =
        (with_attention && opset >= 18).then(|| g.ints("const.head_axis", &[1], vec![1]));
    let mut attention_maps = Vec::new();
    let gelu = Gelu::new(&mut g, opset);

    let patches = patch_embedding(&mut g, &model.patch_embedding, c, p);

    // CLS token expanded to the batch, prepended; position embedding added.
    let batch = g.node(
        "Shape",
        "batch_size",
        &["pixel_values"],
        vec![("start", Attr::Int(0)), ("end", Attr::Int(1))],
    );
    let cls_shape = g.node(
        "Concat",
        "cls_token.shape",
        &[&batch, &cls_tail],
        vec![("axis", Attr::Int(0))],
    );
    let cls = g.weight("cls_token", &[1, 1, d], values(model.cls_token.val()));
    let cls = g.node("Expand", "cls_token.expand", &[&cls, &cls_shape], vec![]);
    let mut tokens = vec![cls];
    if let Some(token) = &model.distillation_token {
        let token = g.weight("distillation_token", &[1, 1, d], values(token.val()));
        let name = "distillation_token.expand";
        tokens.push(g.node("Expand", name, &[&token, &cls_shape], vec![]));
    }
    tokens.push(patches);
    let tokens: Vec<&str> = tokens.iter().map(String::as_str).collect();
    let tokens = g.node("Concat", "tokens", &tokens, vec![("axis", Attr::Int(1))]);
    let position = g.weight(
        "position_embedding",
        &[1, v.tokens(), d],
        values(model.position_embedding.val()),
    );
    let mut x = g.node(
        "Add",
        "position_embedding.add",
        &[&tokens, &position],
        vec![],
    );

    for (i, block) in model.blocks.iter().enumerate() {
        let b = format!("blocks.{i}");
        // Attention.
        let h = layer_norm(
            &mut g,
            &format!("{b}.attention_norm"),
            &x,
            &block.attention_norm,
            d,
        );
        let qkv = linear_node(
            &mut g,
            &format!("{b}.attn.qkv"),
            &h,
            &block.attention.qkv,
            d,
            3 * d,
        );
        let [q, k, vv] = split_heads(
            &mut g,
            &format!("{b}.attn"),
            &qkv,
            &qkv_split,
            &split_heads_shape,
        );
        let scores = g.node("MatMul", &format!("{b}.attn.scores"), &[&q, &k], vec![]);
        let scores = g.node(
            "Mul",
            &format!("{b}.attn.scaled_scores"),
            &[&scores, &scale],
            vec![],
        );
        let weights = g.node(
            "Softmax",
            &format!("{b}.attn.softmax"),
            &[&scores],
            vec![("axis", Attr::Int(-1))],
        );
        if with_attention {
            let name = format!("attention.{i}");
            let keep_dims = ("keepdims", Attr::Int(0));
            // ReduceMean takes its axes as an input from opset 18, as an attribute before.
            let mean = if opset >= 18 {
                g.node(
                    "ReduceMean",
                    &name,
                    &[&weights, head_axis.as_deref().expect("made for opset 18")],
                    vec![keep_dims],
                )
            } else {
                let axes = ("axes", Attr::Ints(vec![1]));
                g.node("ReduceMean", &name, &[&weights], vec![axes, keep_dims])
            };
            attention_maps.push(mean);
        }
        let context = g.node(
            "MatMul",
            &format!("{b}.attn.context"),
            &[&weights, &vv],
            vec![],
        );
        let context = merge_heads(&mut g, &format!("{b}.attn"), &context, &merge_heads_shape);
        let attended = linear_node(
            &mut g,
            &format!("{b}.attn.output"),
            &context,
            &block.attention.output,
            d,
            d,
        );
        x = g.node(
            "Add",
            &format!("{b}.attn.residual"),
            &[&x, &attended],
            vec![],
        );
        // MLP.
        let h = layer_norm(&mut g, &format!("{b}.mlp_norm"), &x, &block.mlp_norm, d);
        let hidden = linear_node(
            &mut g,
            &format!("{b}.mlp.hidden"),
            &h,
            &block.mlp.hidden,
            d,
            v.mlp_dim,
        );
        let activated = gelu.apply(&mut g, &format!("{b}.mlp.gelu"), &hidden);
        let out = linear_node(
            &mut g,
            &format!("{b}.mlp.output"),
            &activated,
            &block.mlp.output,
            v.mlp_dim,
            d,
        );
        x = g.node("Add", &format!("{b}.mlp.residual"), &[&x, &out], vec![]);
    }

    let classes = v.num_classes;
    let (head_input, head_w, head_b) = match &model.distillation_head {
        None => {
            let cls_index = g.ints("const.cls_index", &[], vec![0]);
            let cls = g.node(
                "Gather",
                "cls",
                &[&x, &cls_index],
                vec![("axis", Attr::Int(1))],
            );
            let normed = layer_norm(&mut g, "norm", &cls, &model.norm, d);
            let weights = values(model.head.weight.val());
            (normed, weights, bias_of(&model.head, classes))
        }
        // DeiT at inference: the mean of the two heads, as one product of the two normalised
        // tokens side by side with both heads' weights stacked and halved.
        Some(distillation_head) => {
            let indices = g.ints("const.cls_distillation_index", &[2], vec![0, 1]);
            let both = g.node(
                "Gather",
                "cls_and_distillation",
                &[&x, &indices],
                vec![("axis", Attr::Int(1))],
            );
            let normed = layer_norm(&mut g, "norm", &both, &model.norm, d);
            let side_by_side = g.ints("const.two_tokens_shape", &[2], vec![0, 2 * d as i64]);
            let flat = g.node("Reshape", "norm.flatten", &[&normed, &side_by_side], vec![]);
            let halve = |values: Vec<f32>| values.into_iter().map(|v| 0.5 * v);
            let weights = halve(values(model.head.weight.val()))
                .chain(halve(values(distillation_head.weight.val())))
                .collect();
            let bias = bias_of(&model.head, classes)
                .iter()
                .zip(bias_of(distillation_head, classes))
                .map(|(a, b)| 0.5 * (a + b))
                .collect();
            (flat, weights, bias)
        }
    };
    let heads = model.distillation_head.as_ref().map_or(1, |_| 2);
    let head_w = g.weight("head.weight", &[heads * d, classes], head_w);
    let head_b = g.weight("head.bias", &[classes], head_b);
    let projected = g.node("MatMul", "head.matmul", &[&head_input, &head_w], vec![]);
    g.node("Add", "logits", &[&projected, &head_b], vec![]);
    g.output("logits", &[Dim::Symbol("batch"), Dim::Fixed(v.num_classes)]);
    let tokens = v.tokens();
    for map in &attention_maps {
        let shape = [Dim::Symbol("batch"), Dim::Fixed(tokens), Dim::Fixed(tokens)];
        g.output(map, &shape);
    }
    g
}

/// q `[b, h, t, s]`, kᵀ `[b, h, s, t]` and v `[b, h, t, s]` from a `[b, t, 3·d]` QKV product,
/// in the layout the runtime's attention fusion recognises. `a` names the block's attention.
pub(super) fn split_heads(
    g: &mut GraphBuilder,
    a: &str,
    qkv: &str,
    qkv_split: &str,
    heads_shape: &str,
) -> [String; 3] {
    let flat = ["q", "k", "v"].map(|which| format!("{a}.{which}_flat"));
    let outputs: Vec<&str> = flat.iter().map(String::as_str).collect();
    g.node_multi(
        "Split",
        &format!("{a}.split"),
        &[qkv, qkv_split],
        &outputs,
        vec![("axis", Attr::Int(2))],
    );
    let mut heads_of = |which: &str, flat: &str, perm: Vec<i64>| {
        let r = g.node(
            "Reshape",
            &format!("{a}.{which}_heads"),
            &[flat, heads_shape],
            vec![],
        );
        g.node(
            "Transpose",
            &format!("{a}.{which}"),
            &[&r],
            vec![("perm", Attr::Ints(perm))],
        )
    };
    [
        heads_of("q", &flat[0], vec![0, 2, 1, 3]),
        heads_of("k_t", &flat[1], vec![0, 2, 3, 1]),
        heads_of("v", &flat[2], vec![0, 2, 1, 3]),
    ]
}

/// The heads' context `[b, h, t, s]` back into tokens `[b, t, h·s]`.
pub(super) fn merge_heads(
    g: &mut GraphBuilder,
    a: &str,
    context: &str,
    merge_shape: &str,
) -> String {
    let context = g.node(
        "Transpose",
        &format!("{a}.context_tokens"),
        &[context],
        vec![("perm", Attr::Ints(vec![0, 2, 1, 3]))],
    );
    g.node(
        "Reshape",
        &format!("{a}.merge_heads"),
        &[&context, merge_shape],
        vec![],
    )
}

pub(super) fn linear_node(
    g: &mut GraphBuilder,
    name: &str,
    input: &str,
    linear: &Linear,
    d_in: usize,
    d_out: usize,
) -> String {
    let w = g.weight(
        &format!("{name}.weight"),
        &[d_in, d_out],
        values(linear.weight.val()),
    );
    let b = g.weight(&format!("{name}.bias"), &[d_out], bias_of(linear, d_out));
    let product = g.node("MatMul", &format!("{name}.matmul"), &[input, &w], vec![]);
    g.node("Add", name, &[&product, &b], vec![])
}

pub(super) fn layer_norm(
    g: &mut GraphBuilder,
    name: &str,
    input: &str,
    norm: &LayerNorm,
    d: usize,
) -> String {
    let gamma = g.weight(&format!("{name}.weight"), &[d], values(norm.gamma.val()));
    let beta = g.weight(
        &format!("{name}.bias"),
        &[d],
        norm.beta
            .as_ref()
            .map_or_else(|| vec![0.0; d], |b| values(b.val())),
    );
    g.node(
        "LayerNormalization",
        name,
        &[input, &gamma, &beta],
        vec![
            ("axis", Attr::Int(-1)),
            ("epsilon", Attr::Float(LAYER_NORM_EPSILON as f32)),
        ],
    )
}

/// The patch embedding, `[batch, tokens, d]`: the Linear over (p1 p2 c) patches is a Conv with
/// kernel = stride = p, then Reshape and Transpose to tokens.
pub(super) fn patch_embedding(
    g: &mut GraphBuilder,
    embedding: &Linear,
    c: usize,
    p: usize,
) -> String {
    let d = embedding.weight.dims()[1];
    let flatten = g.ints("const.flatten_shape", &[3], vec![0, d as i64, -1]);
    let linear = values(embedding.weight.val());
    let mut conv = vec![0.0; d * c * p * p];
    for out in 0..d {
        for ch in 0..c {
            for p1 in 0..p {
                for p2 in 0..p {
                    conv[((out * c + ch) * p + p1) * p + p2] =
                        linear[((p1 * p + p2) * c + ch) * d + out];
                }
            }
        }
    }
    let conv_w = g.weight("patch_embedding.weight", &[d, c, p, p], conv);
    let conv_b = g.weight("patch_embedding.bias", &[d], bias_of(embedding, d));
    let patches = g.node(
        "Conv",
        "patch_embedding",
        &["pixel_values", &conv_w, &conv_b],
        vec![
            ("kernel_shape", Attr::Ints(vec![p as i64; 2])),
            ("strides", Attr::Ints(vec![p as i64; 2])),
        ],
    );
    let patches = g.node(
        "Reshape",
        "patch_embedding.flatten",
        &[&patches, &flatten],
        vec![],
    );
    g.node(
        "Transpose",
        "patch_embedding.tokens",
        &[&patches],
        vec![("perm", Attr::Ints(vec![0, 2, 1]))],
    )
}

/// Exact GELU: the Gelu op from opset 20, `x · 0.5 · (1 + erf(x / √2))` before it, in the order
/// torch.onnx writes it (fusers match it); its constants are made once per graph.
pub(super) enum Gelu {
    Op,
    Erf {
        sqrt2: String,
        one: String,
        half: String,
    },
}

impl Gelu {
    pub(super) fn new(g: &mut GraphBuilder, opset: i64) -> Gelu {
        if opset >= 20 {
            return Gelu::Op;
        }
        Gelu::Erf {
            sqrt2: g.weight("const.sqrt2", &[], vec![std::f32::consts::SQRT_2]),
            one: g.weight("const.one", &[], vec![1.0]),
            half: g.weight("const.half", &[], vec![0.5]),
        }
    }

    pub(super) fn apply(&self, g: &mut GraphBuilder, name: &str, input: &str) -> String {
        let Gelu::Erf { sqrt2, one, half } = self else {
            return g.node("Gelu", name, &[input], vec![]);
        };
        let n = |part: &str| format!("{name}.{part}");
        let scaled = g.node("Div", &n("div"), &[input, sqrt2], vec![]);
        let erf = g.node("Erf", &n("erf"), &[&scaled], vec![]);
        let plus_one = g.node("Add", &n("add"), &[&erf, one], vec![]);
        let gated = g.node("Mul", &n("mul"), &[input, &plus_one], vec![]);
        g.node("Mul", name, &[&gated, half], vec![])
    }
}
