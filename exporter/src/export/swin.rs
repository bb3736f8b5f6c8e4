//! The ONNX graph of a trained Swin, node for node as the burn model computes it. Window
//! partition and merge are Reshape and Transpose, the cyclic shift is Slice and Concat, and the
//! relative position bias (with the shift mask, in shifted blocks) is one constant added to
//! the scores.

use super::onnx_graph::{Attr, Dim, GraphBuilder};
use super::vit::{Gelu, layer_norm, linear_node, merge_heads, patch_embedding, split_heads};
use super::{bias_of, values};
use crate::model::swin::{SwinBlock, shift_mask_values};
use crate::model::{SwinConfig, SwinTransformer};

pub(super) fn build_graph(
    config: &SwinConfig,
    model: &SwinTransformer,
    opset: i64,
) -> GraphBuilder {
    let (c, s, p) = (config.channels, config.image_size, config.patch_size);
    let mut g = GraphBuilder::with_image_input("swin", c, s);
    let gelu = Gelu::new(&mut g, opset);
    let patches = patch_embedding(&mut g, &model.patch_embedding, c, p);
    let mut x = layer_norm(
        &mut g,
        "embedding_norm",
        &patches,
        &model.embedding_norm,
        config.embed_dim,
    );
    for ((index, stage), shape) in model.stages.iter().enumerate().zip(config.stages()) {
        if let Some(merge) = &stage.merge {
            // [b, (2h)², C] → [b, h, 2, h, 2, C] → groups of (row, column) parity → [b, h², 4C].
            let (half, dim) = (shape.side as i64, shape.dim / 2);
            let name = format!("stages.{index}.merge");
            let grid = g.ints(
                &format!("{name}.grid_shape"),
                &[6],
                vec![0, half, 2, half, 2, dim as i64],
            );
            let grouped = g.ints(
                &format!("{name}.grouped_shape"),
                &[3],
                vec![0, half * half, 4 * dim as i64],
            );
            let grid = g.node("Reshape", &format!("{name}.grid"), &[&x, &grid], vec![]);
            let groups = g.node(
                "Transpose",
                &format!("{name}.groups"),
                &[&grid],
                vec![("perm", Attr::Ints(vec![0, 1, 3, 4, 2, 5]))],
            );
            let groups = g.node(
                "Reshape",
                &format!("{name}.grouped"),
                &[&groups, &grouped],
                vec![],
            );
            let normed = layer_norm(
                &mut g,
                &format!("{name}.norm"),
                &groups,
                &merge.norm,
                4 * dim,
            );
            let w = g.weight(
                &format!("{name}.reduction.weight"),
                &[4 * dim, 2 * dim],
                values(merge.reduction.weight.val()),
            );
            x = g.node(
                "MatMul",
                &format!("{name}.reduction"),
                &[&normed, &w],
                vec![],
            );
        }
        for (b, block) in stage.blocks.iter().enumerate() {
            let name = format!("stages.{index}.blocks.{b}");
            x = swin_block(&mut g, &name, &x, block, shape.dim, &gelu);
        }
    }
    let last = model.norm.gamma.dims()[0];
    let normed = layer_norm(&mut g, "norm", &x, &model.norm, last);
    let keep_dims = ("keepdims", Attr::Int(0));
    // ReduceMean takes its axes as an input from opset 18, as an attribute before.
    let pooled = if opset >= 18 {
        let axes = g.ints("const.token_axis", &[1], vec![1]);
        g.node("ReduceMean", "pool", &[&normed, &axes], vec![keep_dims])
    } else {
        let axes = ("axes", Attr::Ints(vec![1]));
        g.node("ReduceMean", "pool", &[&normed], vec![axes, keep_dims])
    };
    let classes = config.num_classes;
    let head_w = g.weight(
        "head.weight",
        &[last, classes],
        values(model.head.weight.val()),
    );
    let head_b = g.weight("head.bias", &[classes], bias_of(&model.head, classes));
    let projected = g.node("MatMul", "head.matmul", &[&pooled, &head_w], vec![]);
    g.node("Add", "logits", &[&projected, &head_b], vec![]);
    g.output("logits", &[Dim::Symbol("batch"), Dim::Fixed(classes)]);
    g
}

/// One Swin block on `x` (`[batch, side², dim]`).
fn swin_block(
    g: &mut GraphBuilder,
    name: &str,
    x: &str,
    block: &SwinBlock,
    dim: usize,
    gelu: &Gelu,
) -> String {
    let attention = &block.attention;
    let (side, window, shift) = (block.side, attention.window, block.shift);
    let (heads, tokens) = (attention.heads, window * window);
    let n = (side / window) as i64;
    let (w, d) = (window as i64, dim as i64);
    let head_dim = dim / heads;
    let shape = |g: &mut GraphBuilder, what: &str, values: Vec<i64>| {
        g.ints(&format!("{name}.{what}_shape"), &[values.len()], values)
    };

    // Normalise and project to q, k and v on the whole grid (the projection acts on each token
    // alone), then cut into windows, after the cyclic shift in a shifted block.
    let h = layer_norm(
        g,
        &format!("{name}.attention_norm"),
        x,
        &block.attention_norm,
        dim,
    );
    let a = format!("{name}.attn");
    let qkv = linear_node(g, &format!("{a}.qkv"), &h, &attention.qkv, dim, 3 * dim);
    let grid_shape = shape(g, "grid", vec![0, side as i64, side as i64, 3 * d]);
    let grid = g.node(
        "Reshape",
        &format!("{name}.grid"),
        &[&qkv, &grid_shape],
        vec![],
    );
    let grid = roll(g, &format!("{name}.shift"), &grid, side, shift, false);
    let split_shape = shape(g, "windows_split", vec![0, n, w, n, w, 3 * d]);
    let split = g.node(
        "Reshape",
        &format!("{name}.windows_split"),
        &[&grid, &split_shape],
        vec![],
    );
    let ordered = g.node(
        "Transpose",
        &format!("{name}.windows_order"),
        &[&split],
        vec![("perm", Attr::Ints(vec![0, 1, 3, 2, 4, 5]))],
    );
    let windows_shape = shape(g, "windows", vec![-1, tokens as i64, 3 * d]);
    let qkv = g.node(
        "Reshape",
        &format!("{name}.windows"),
        &[&ordered, &windows_shape],
        vec![],
    );

    // Attention in each window.
    let qkv_split = g.ints(&format!("{a}.qkv_split"), &[3], vec![d; 3]);
    let heads_shape = shape(g, "attn.heads", vec![0, 0, heads as i64, head_dim as i64]);
    let [q, k, v] = split_heads(g, &a, &qkv, &qkv_split, &heads_shape);
    let scale = g.weight(
        &format!("{a}.scale"),
        &[],
        vec![1.0 / (head_dim as f32).sqrt()],
    );
    let q = g.node("Mul", &format!("{a}.q_scaled"), &[&q, &scale], vec![]);
    let scores = g.node("MatMul", &format!("{a}.scores"), &[&q, &k], vec![]);
    // The bias per head (and the mask per window), as one constant.
    let bias = values(attention.bias());
    let scores = if shift == 0 {
        let bias = g.weight(&format!("{a}.bias"), &[heads, tokens, tokens], bias);
        g.node("Add", &format!("{a}.biased"), &[&scores, &bias], vec![])
    } else {
        let windows = (side / window).pow(2);
        let mask = shift_mask_values(side, window, shift);
        let pair = tokens * tokens;
        let combined: Vec<f32> = (0..windows)
            .flat_map(|win| {
                let (bias, mask) = (&bias, &mask);
                (0..heads).flat_map(move |head| {
                    (0..pair).map(move |i| bias[head * pair + i] + mask[win * pair + i])
                })
            })
            .collect();
        let constant = g.weight(
            &format!("{a}.bias_and_mask"),
            &[windows, heads, tokens, tokens],
            combined,
        );
        let per_image = shape(
            g,
            "attn.per_image",
            vec![
                -1,
                windows as i64,
                heads as i64,
                tokens as i64,
                tokens as i64,
            ],
        );
        let flat = shape(
            g,
            "attn.flat",
            vec![-1, heads as i64, tokens as i64, tokens as i64],
        );
        let scores = g.node(
            "Reshape",
            &format!("{a}.scores_per_image"),
            &[&scores, &per_image],
            vec![],
        );
        let scores = g.node("Add", &format!("{a}.biased"), &[&scores, &constant], vec![]);
        g.node(
            "Reshape",
            &format!("{a}.biased_flat"),
            &[&scores, &flat],
            vec![],
        )
    };
    let weights = g.node(
        "Softmax",
        &format!("{a}.softmax"),
        &[&scores],
        vec![("axis", Attr::Int(-1))],
    );
    let context = g.node("MatMul", &format!("{a}.context"), &[&weights, &v], vec![]);
    let merge_shape = shape(g, "attn.merge", vec![0, 0, d]);
    let context = merge_heads(g, &a, &context, &merge_shape);
    // The context back into the grid (and the shift undone), projected, then the residual.
    let unsplit_shape = shape(g, "windows_unsplit", vec![-1, n, n, w, w, d]);
    let unsplit = g.node(
        "Reshape",
        &format!("{name}.windows_unsplit"),
        &[&context, &unsplit_shape],
        vec![],
    );
    let reordered = g.node(
        "Transpose",
        &format!("{name}.windows_reorder"),
        &[&unsplit],
        vec![("perm", Attr::Ints(vec![0, 1, 3, 2, 4, 5]))],
    );
    let merged_shape = shape(g, "merged", vec![-1, side as i64, side as i64, d]);
    let grid = g.node(
        "Reshape",
        &format!("{name}.merged"),
        &[&reordered, &merged_shape],
        vec![],
    );
    let grid = roll(g, &format!("{name}.unshift"), &grid, side, shift, true);
    let tokens_shape = shape(g, "tokens", vec![-1, (side * side) as i64, d]);
    let context = g.node(
        "Reshape",
        &format!("{name}.tokens"),
        &[&grid, &tokens_shape],
        vec![],
    );
    let attended = linear_node(
        g,
        &format!("{a}.output"),
        &context,
        &attention.output,
        dim,
        dim,
    );
    let x = g.node(
        "Add",
        &format!("{name}.attn.residual"),
        &[x, &attended],
        vec![],
    );

    // MLP.
    let hidden_dim = block.hidden.weight.dims()[1];
    let h = layer_norm(g, &format!("{name}.mlp_norm"), &x, &block.mlp_norm, dim);
    let hidden = linear_node(
        g,
        &format!("{name}.mlp.hidden"),
        &h,
        &block.hidden,
        dim,
        hidden_dim,
    );
    let activated = gelu.apply(g, &format!("{name}.mlp.gelu"), &hidden);
    let out = linear_node(
        g,
        &format!("{name}.mlp.output"),
        &activated,
        &block.output,
        hidden_dim,
        dim,
    );
    g.node("Add", &format!("{name}.mlp.residual"), &[&x, &out], vec![])
}

/// The cyclic shift of a `[batch, side, side, C]` grid by `shift` along both sides, as
/// [`crate::model::swin::roll`]: Slice and Concat per axis.
fn roll(
    g: &mut GraphBuilder,
    name: &str,
    grid: &str,
    side: usize,
    shift: usize,
    back: bool,
) -> String {
    if shift == 0 {
        return grid.to_string();
    }
    let split = (if back { side - shift } else { shift }) as i64;
    let mut rolled = grid.to_string();
    for axis in [1i64, 2] {
        let n = |what: &str| format!("{name}.axis{axis}.{what}");
        let axes = g.ints(&n("axes"), &[1], vec![axis]);
        let (zero, cut, end) = (
            g.ints(&n("zero"), &[1], vec![0]),
            g.ints(&n("cut"), &[1], vec![split]),
            g.ints(&n("end"), &[1], vec![side as i64]),
        );
        let tail = g.node("Slice", &n("tail"), &[&rolled, &cut, &end, &axes], vec![]);
        let head = g.node("Slice", &n("head"), &[&rolled, &zero, &cut, &axes], vec![]);
        rolled = g.node(
            "Concat",
            &n("rolled"),
            &[&tail, &head],
            vec![("axis", Attr::Int(axis))],
        );
    }
    rolled
}
