//! Fused kernels of our own for the CubeCL backends (CUDA and WGPU).
//!
//! A 135M-parameter model on a GPU is bound by kernel launches, not by arithmetic: a decoding step
//! on the H100 costs ~18 ms for ~1,000 launches and well under a millisecond of memory traffic
//! (docs/benchmarks.md). Burn composes an RMSNorm from five element-wise and reduction kernels, a
//! softmax from five, a rotary embedding from four, SwiGLU from three. The kernels here do each of
//! those in one launch:
//!
//! - [`rms_norm`] and [`add_rms_norm`] (the residual add folded into the next norm),
//! - [`softmax_with_bias`] (the attention bias added inside the softmax),
//! - [`rotate_qkv`] (Q and K rotated and every head written in the layout attention reads),
//! - [`swiglu`],
//! - [`silu_sum`] (the draft head's `residual + silu(a + b + bias)`),
//! - [`top_k`] (each beam's best candidates) and `beam_advance` (the rest of a beam-search
//!   step: warp, selection and the new beams),
//! - [`attention`] (scores, softmax with the bias and the value product of grouped-query
//!   attention, written in the output projection's layout),
//! - [`argmax`] (greedy choices: a cube per row, where Burn's walks a row with one thread),
//! - `greedy_accept` (the longest accepted beam of a verified tree, its bonus token and the
//!   hidden state to draft from),
//! - [`matmul`] for a few rows (the projections of a decoding step or a verification tree), and
//!   [`fused_matmul`], the same product with the norm before it, a SwiGLU or a residual add after
//!   it folded in, and [`rotate_qkv_into_cache`], which writes K and V into the KV cache itself:
//!   with them a Llama layer is six launches (`src/models/llama/fold.rs`),
//! - `move_kv_slots` (a verified block's accepted keys and values moved after each row's
//!   committed prefix, every layer and row at once: `KvCache::commit`).
//! - `resolve_drafted` (an overlapped round's drafted tokens put into its upload),
//! - `draft_chain` (a whole one-beam draft — every step's products and picks — in one launch,
//!   on CUDA only: its cubes meet at grid-wide barriers).
//!
//! Each function returns `None` when it does not apply — a backend other than CUDA or WGPU without
//! fusion (e.g. the CPU, or `Autodiff<_>`, which must record every op for training), a float type
//! other than f32/f16/bf16, or the kernels switched off — and the caller then runs its Burn ops.
//! Setting `REDRAFTER_CUBE_KERNELS=off` switches them off for a whole process, which is how the
//! benchmarks compare both paths in one binary.
//!
//! Every kernel reads its inputs in the model's float type and computes in f32 (as HF Transformers
//! does for the norm). Kernels address every tensor through its strides: CubeCL's allocator pads
//! rows to an alignment, so `row * width` would read and write the wrong elements on CUDA (not on
//! WGPU, which is why `tests/cube_kernels.rs` also runs on CUDA: see its header). A row's result
//! does not depend on how many rows are processed with it, so a token's hidden state is the same
//! in a one-token decoding step and in a verification tree. With [`attention`] and [`matmul`]
//! that holds for the whole Llama forward, bit for bit: greedy speculative decoding on a GPU emits
//! exactly plain greedy decoding's tokens (tests/cube_kernels.rs checks it on a random model).

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};

#[cfg(any(feature = "cuda", feature = "wgpu"))]
mod accept;
#[cfg(any(feature = "cuda", feature = "wgpu"))]
mod argmax;
#[cfg(any(feature = "cuda", feature = "wgpu"))]
mod attention;
#[cfg(any(feature = "cuda", feature = "wgpu"))]
mod beam;
#[cfg(any(feature = "cuda", feature = "wgpu"))]
mod dispatch;
#[cfg(any(feature = "cuda", feature = "wgpu"))]
mod draft_chain;
#[cfg(any(feature = "cuda", feature = "wgpu"))]
mod drafted_tokens;
#[cfg(any(feature = "cuda", feature = "wgpu"))]
mod kv_move;
#[cfg(any(feature = "cuda", feature = "wgpu"))]
mod matmul;
#[cfg(any(feature = "cuda", feature = "wgpu"))]
mod norm;
#[cfg(any(feature = "cuda", feature = "wgpu"))]
mod reduce;
#[cfg(any(feature = "cuda", feature = "wgpu"))]
mod rope;
#[cfg(any(feature = "cuda", feature = "wgpu"))]
mod silu;
#[cfg(any(feature = "cuda", feature = "wgpu"))]
mod softmax;
#[cfg(any(feature = "cuda", feature = "wgpu"))]
mod swiglu;
#[cfg(any(feature = "cuda", feature = "wgpu"))]
mod top_k;

/// Where the host hands its queued GPU work over early ([`flush_queue`]): after an overlapped
/// round's draft (on by default), and every this many layers of a forward (off by default).
///
/// Measured on an H200 (docs/benchmarks.md, session 35): the flush after the draft makes
/// ReDrafter 3 % faster and leaves plain decoding alone; a flush after every layer makes plain
/// decoding 3–6 % faster and ReDrafter 2–3 %, every third layer slows both by 3–4 %.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueFlush {
    /// After an overlapped round queues its draft (`DraftTiming::Overlapped`), so that the
    /// device drafts while the host packs the tree.
    pub after_draft: bool,
    /// Every this many transformer layers of a forward (0: never).
    pub every_layers: usize,
}

impl QueueFlush {
    /// No early hand-over anywhere.
    pub const NONE: Self = Self {
        after_draft: false,
        every_layers: 0,
    };
    /// The default: after an overlapped round's draft only.
    pub const DEFAULT: Self = Self {
        after_draft: true,
        every_layers: 0,
    };
}

impl Default for QueueFlush {
    fn default() -> Self {
        Self::DEFAULT
    }
}

static FLUSH_AFTER_DRAFT: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(QueueFlush::DEFAULT.after_draft);
static FLUSH_EVERY_LAYERS: std::sync::atomic::AtomicUsize =
    std::sync::atomic::AtomicUsize::new(QueueFlush::DEFAULT.every_layers);

/// Sets where the host hands queued work over early, for the whole process
/// ([`QueueFlush::default`] until set).
pub fn set_queue_flush(flush: QueueFlush) {
    use std::sync::atomic::Ordering::Relaxed;
    FLUSH_AFTER_DRAFT.store(flush.after_draft, Relaxed);
    FLUSH_EVERY_LAYERS.store(flush.every_layers, Relaxed);
}

/// The process's [`QueueFlush`] setting.
pub fn queue_flush() -> QueueFlush {
    use std::sync::atomic::Ordering::Relaxed;
    QueueFlush {
        after_draft: FLUSH_AFTER_DRAFT.load(Relaxed),
        every_layers: FLUSH_EVERY_LAYERS.load(Relaxed),
    }
}

/// Hands the work queued for `device` to CubeCL's runner thread now, without waiting for it: the
/// runner starts on queued launches only in batches of 32 tasks, or when the host waits for the
/// device. Does nothing on other backends.
pub fn flush_queue<B: Backend>(device: &B::Device) {
    #[cfg(any(feature = "cuda", feature = "wgpu"))]
    dispatch::flush_queue::<B>(device);
    #[cfg(not(any(feature = "cuda", feature = "wgpu")))]
    let _ = device;
}

/// The environment variable that switches the kernels off (`off`, `0` or `false`).
pub const SWITCH_VARIABLE: &str = "REDRAFTER_CUBE_KERNELS";

/// The environment variable that switches off only [`matmul`] and [`attention`] (`off`, `0` or
/// `false`), leaving CubeCL's matmul and Burn's attention ops with the other fused kernels: how
/// the benchmarks measure what exactness costs or saves.
pub const EXACT_SWITCH_VARIABLE: &str = "REDRAFTER_EXACT_KERNELS";

/// Whether the kernels are switched on for this process (they are unless [`SWITCH_VARIABLE`]
/// says otherwise). Read once.
pub fn switched_on() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| variable_allows(SWITCH_VARIABLE))
}

/// Whether [`matmul`] and [`attention`] are switched on (they are unless [`SWITCH_VARIABLE`] or
/// [`EXACT_SWITCH_VARIABLE`] says otherwise). Read once.
pub fn exact_switched_on() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| switched_on() && variable_allows(EXACT_SWITCH_VARIABLE))
}

/// False where `variable` is set to `off`, `0` or `false` (logged), true otherwise.
pub(crate) fn variable_allows(variable: &str) -> bool {
    let on = std::env::var(variable)
        .map(|value| !matches!(value.to_ascii_lowercase().as_str(), "off" | "0" | "false"))
        .unwrap_or(true);
    if !on {
        tracing::info!("fused CubeCL kernels switched off by {variable}");
    }
    on
}

/// Whether tensors of `B` run through these kernels.
pub fn applies<B: Backend>() -> bool {
    #[cfg(any(feature = "cuda", feature = "wgpu"))]
    {
        switched_on() && dispatch::runtime_of::<B>().is_some()
    }
    #[cfg(not(any(feature = "cuda", feature = "wgpu")))]
    {
        false
    }
}

/// `tensor[ranges]` with its last `E` dimensions (each leading range covering one index), sharing
/// `tensor`'s buffer on the CubeCL backends, where Burn's `slice` and `squeeze_dim` would copy
/// (they copy unless both cut-off ends are aligned, and whenever a strided tensor loses a
/// dimension); `None` elsewhere, or where the view would start off the allocator's alignment.
/// Not a kernel: applies even with the kernels switched off.
pub(crate) fn view<B: Backend, const D: usize, const E: usize>(
    tensor: &Tensor<B, D>,
    ranges: [std::ops::Range<usize>; D],
) -> Option<Tensor<B, E>> {
    #[cfg(any(feature = "cuda", feature = "wgpu"))]
    {
        dispatch::view(tensor, ranges)
    }
    #[cfg(not(any(feature = "cuda", feature = "wgpu")))]
    {
        let _ = (tensor, ranges);
        None
    }
}

/// [`view`] of an integer tensor.
pub(crate) fn view_int<B: Backend, const D: usize, const E: usize>(
    tensor: &Tensor<B, D, Int>,
    ranges: [std::ops::Range<usize>; D],
) -> Option<Tensor<B, E, Int>> {
    #[cfg(any(feature = "cuda", feature = "wgpu"))]
    {
        dispatch::view_int(tensor, ranges)
    }
    #[cfg(not(any(feature = "cuda", feature = "wgpu")))]
    {
        let _ = (tensor, ranges);
        None
    }
}

/// `x / sqrt(mean(x²) + eps)` over the last dimension.
///
/// # Shapes
/// `[..., width]` to `[..., width]`
pub fn rms_norm<B: Backend, const D: usize>(x: &Tensor<B, D>, eps: f64) -> Option<Tensor<B, D>> {
    #[cfg(any(feature = "cuda", feature = "wgpu"))]
    {
        dispatch::run(norm::RmsNorm {
            input: x,
            delta: None,
            eps,
        })
        .map(|(_, normalized)| normalized)
    }
    #[cfg(not(any(feature = "cuda", feature = "wgpu")))]
    {
        let _ = (x, eps);
        None
    }
}

/// The residual add and the following norm in one kernel: returns `(x + delta, rms_norm(x +
/// delta))`, the sum rounded to the model's float type before it is normalised (as two separate
/// ops would).
///
/// # Shapes
/// `x`, `delta`: `[..., width]`; both results `[..., width]`
pub fn add_rms_norm<B: Backend, const D: usize>(
    x: &Tensor<B, D>,
    delta: &Tensor<B, D>,
    eps: f64,
) -> Option<(Tensor<B, D>, Tensor<B, D>)> {
    #[cfg(any(feature = "cuda", feature = "wgpu"))]
    {
        dispatch::run(norm::RmsNorm {
            input: x,
            delta: Some(delta),
            eps,
        })
    }
    #[cfg(not(any(feature = "cuda", feature = "wgpu")))]
    {
        let _ = (x, delta, eps);
        None
    }
}

/// Softmax over the last dimension of attention scores, after adding a bias shared by the heads.
///
/// # Shapes
/// - `scores`: `[batch, heads, len, slots]`, or any `[batch, a, b, slots]` whose `a · b` rows of a
///   batch entry are heads of `len` positions each (e.g. GQA's `[batch, kv_heads, groups · len,
///   slots]`): row `r` of a batch entry takes bias row `r % len`
/// - `bias`: `[batch, 1, len, slots]`, or `None`
/// - returns the shape of `scores`
pub fn softmax_with_bias<B: Backend>(
    scores: &Tensor<B, 4>,
    bias: Option<&Tensor<B, 4>>,
) -> Option<Tensor<B, 4>> {
    #[cfg(any(feature = "cuda", feature = "wgpu"))]
    {
        dispatch::run(softmax::SoftmaxWithBias { scores, bias })
    }
    #[cfg(not(any(feature = "cuda", feature = "wgpu")))]
    {
        let _ = (scores, bias);
        None
    }
}

/// Splits a fused QKV projection into heads and rotates Q and K (rotate-half RoPE with tables as
/// in `RopeAngles`: `cos` over the whole head, `sin` with the sign of the
/// first half folded in).
///
/// # Shapes
/// - `qkv`: `[batch, len, (heads + 2 * kv_heads) * head_dim]`, ordered Q | K | V
/// - `cos`, `sin`: `[batch, 1, len, head_dim]`
/// - returns Q `[batch, heads, len, head_dim]`, K and V `[batch, kv_heads, len, head_dim]`, each
///   in row-major order (Q reshapes to grouped heads without a copy)
pub fn rotate_qkv<B: Backend>(
    qkv: &Tensor<B, 3>,
    cos: &Tensor<B, 4>,
    sin: &Tensor<B, 4>,
    heads: usize,
    kv_heads: usize,
) -> Option<(Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>)> {
    #[cfg(any(feature = "cuda", feature = "wgpu"))]
    {
        let (q, kv) = dispatch::run(rope::RotateQkv {
            qkv,
            cos,
            sin,
            heads,
            kv_heads,
            cache: None,
        })?;
        let (k, v) = kv?;
        Some((q, k, v))
    }
    #[cfg(not(any(feature = "cuda", feature = "wgpu")))]
    {
        let _ = (qkv, cos, sin, heads, kv_heads);
        None
    }
}

/// [`rotate_qkv`] that writes K and V into slots `start..start + len` of layer `layer` of a KV
/// cache's storage, in place, instead of new tensors (the cache's own append would be two more
/// launches); returns Q. `None` where [`folds_switched_on`] is false, the shapes disagree or the
/// block does not fit — then nothing was written.
///
/// # Shapes
/// - `qkv`: `[batch, len, (heads + 2 * kv_heads) * head_dim]`, ordered Q | K | V
/// - `cos`, `sin`: `[batch, 1, len, head_dim]`
/// - `keys`, `values`: `[layers, batch, kv_heads, slots, head_dim]`
/// - returns Q `[batch, heads, len, head_dim]`
#[allow(clippy::too_many_arguments)]
pub fn rotate_qkv_into_cache<B: Backend>(
    qkv: &Tensor<B, 3>,
    cos: &Tensor<B, 4>,
    sin: &Tensor<B, 4>,
    heads: usize,
    kv_heads: usize,
    keys: &Tensor<B, 5>,
    values: &Tensor<B, 5>,
    layer: usize,
    start: usize,
) -> Option<Tensor<B, 4>> {
    #[cfg(any(feature = "cuda", feature = "wgpu"))]
    {
        if !folds_switched_on() {
            return None;
        }
        let cache = rope::CacheBlock {
            keys,
            values,
            layer,
            start,
        };
        dispatch::run(rope::RotateQkv {
            qkv,
            cos,
            sin,
            heads,
            kv_heads,
            cache: Some(cache),
        })
        .map(|(q, _)| q)
    }
    #[cfg(not(any(feature = "cuda", feature = "wgpu")))]
    {
        let _ = (qkv, cos, sin, heads, kv_heads, keys, values, layer, start);
        None
    }
}

/// A Llama layer's QKV product `norm(x) · weight` with [`rotate_qkv_into_cache`] folded into its
/// epilogue, one launch: the queries and keys rotated as the rotation kernel would (the product
/// rounded to the element type first, then [`rope`]'s rotation), K and V written into slots
/// `start..start + len` of layer `layer` of a KV cache's storage; returns Q. Bit for bit the two
/// launches' result, so a verification tree still agrees with decoding. `None` where
/// [`rotary_product_switched_on`] is false, [`fused_matmul`] would decline, the shapes disagree
/// or the block does not fit — then nothing was written.
///
/// # Shapes
/// - `x`: `[batch · len, in]`, `weight`: `[in, (heads + 2 * kv_heads) * head_dim]` ordered
///   Q | K | V
/// - `cos`, `sin`: `[batch, 1, len, head_dim]`
/// - `keys`, `values`: `[layers, batch, kv_heads, slots, head_dim]`
/// - returns Q `[batch, heads, len, head_dim]`
#[allow(clippy::too_many_arguments)]
pub fn rotary_product_into_cache<B: Backend>(
    x: &Tensor<B, 2>,
    weight: &Tensor<B, 2>,
    rms_norm_eps: Option<f64>,
    cos: &Tensor<B, 4>,
    sin: &Tensor<B, 4>,
    heads: usize,
    kv_heads: usize,
    keys: &Tensor<B, 5>,
    values: &Tensor<B, 5>,
    layer: usize,
    start: usize,
) -> Option<Tensor<B, 4>> {
    #[cfg(any(feature = "cuda", feature = "wgpu"))]
    {
        if !rotary_product_switched_on() {
            return None;
        }
        dispatch::run(matmul::RotaryProduct {
            x,
            weight,
            rms_norm_eps,
            rotation: matmul::Rotation {
                cos,
                sin,
                heads,
                kv_heads,
                cache: rope::CacheBlock {
                    keys,
                    values,
                    layer,
                    start,
                },
            },
        })
    }
    #[cfg(not(any(feature = "cuda", feature = "wgpu")))]
    {
        let _ = (
            x,
            weight,
            rms_norm_eps,
            cos,
            sin,
            heads,
            kv_heads,
            keys,
            values,
            layer,
            start,
        );
        None
    }
}

/// `silu(gate) * up` from a fused gate/up projection.
///
/// # Shapes
/// `[rows, 2 * inter]` (gate | up) to `[rows, inter]`
pub fn swiglu<B: Backend>(gate_up: &Tensor<B, 2>) -> Option<Tensor<B, 2>> {
    #[cfg(any(feature = "cuda", feature = "wgpu"))]
    {
        dispatch::run(swiglu::SwiGlu { gate_up })
    }
    #[cfg(not(any(feature = "cuda", feature = "wgpu")))]
    {
        let _ = gate_up;
        None
    }
}

/// `residual + silu(a + b + bias)` in one launch, each of `b`, `bias` and `residual` optional:
/// the draft head's RNN update (`silu(W·e + U·s + b)`) and residual blocks (`x + silu(L·x + b)`).
/// Computed in f32, rounded once (Burn's ops round after each step): for drafting, where no
/// result has to match another bit for bit.
///
/// # Shapes
/// `a`, `b`, `residual`: `[..., width]`; `bias`: `[width]`; returns `[..., width]`
pub fn silu_sum<B: Backend, const D: usize>(
    a: &Tensor<B, D>,
    b: Option<&Tensor<B, D>>,
    bias: Option<&Tensor<B, 1>>,
    residual: Option<&Tensor<B, D>>,
) -> Option<Tensor<B, D>> {
    #[cfg(any(feature = "cuda", feature = "wgpu"))]
    {
        dispatch::run(silu::SiluSum {
            a,
            b,
            bias,
            residual,
        })
    }
    #[cfg(not(any(feature = "cuda", feature = "wgpu")))]
    {
        let _ = (a, b, bias, residual);
        None
    }
}

/// The `k` largest entries of each row, sorted descending, and their columns; exact ties go to
/// the lower column (as `crate::drafter::top_k`'s rank selection breaks them). One launch.
///
/// # Shapes
/// `values`: `[rows, width]` to (`[rows, k]`, `[rows, k]`), `1 ≤ k ≤ width`
pub fn top_k<B: Backend>(
    values: &Tensor<B, 2>,
    k: usize,
) -> Option<(Tensor<B, 2>, Tensor<B, 2, burn::tensor::Int>)> {
    #[cfg(any(feature = "cuda", feature = "wgpu"))]
    {
        dispatch::run(top_k::TopK { values, k })
    }
    #[cfg(not(any(feature = "cuda", feature = "wgpu")))]
    {
        let _ = (values, k);
        None
    }
}

/// One beam-search step's inputs for [`beam_advance`]: `B` batch entries with `P` parents each
/// (`P = 1` at the first step).
// Read only by the kernels, which need the `cuda` or `wgpu` feature.
#[cfg_attr(not(any(feature = "cuda", feature = "wgpu")), allow(dead_code))]
pub(crate) struct BeamStep<'a, B: Backend> {
    /// Each parent's best logits, descending. Shape `[B·P, K]`. Without `columns`: each
    /// parent's whole row of logits, in column order.
    pub sorted: &'a Tensor<B, 2>,
    /// Their columns (draft-vocabulary indices when `draft_ids` is set). Shape `[B·P, K]`.
    /// `None` picks each row's best entry from `sorted` itself (ties to the lower column, as
    /// [`top_k`] with `k = 1`): one launch instead of two, for one beam whose log-probabilities
    /// nobody reads (`M`, `P`, `kept` and `per_beam` all 1; declined otherwise).
    pub columns: Option<&'a Tensor<B, 2, burn::tensor::Int>>,
    /// Token id of each draft-vocabulary index. Shape `[Vd]`.
    pub draft_ids: Option<&'a Tensor<B, 1, burn::tensor::Int>>,
    /// The parents' running scores (`None`: zeros). Shape `[B, P]`.
    pub scores: Option<&'a Tensor<B, 2>>,
    /// The parents' tokens so far. Shape `[B·P, t]`.
    pub beams: &'a Tensor<B, 2, burn::tensor::Int>,
    /// The parents' per-token log-probabilities (`None` when `t = 1`). Shape `[B·P, t − 1]`.
    pub history: Option<&'a Tensor<B, 2>>,
    /// Beams kept, `M`.
    pub width: usize,
    /// Logits the warp keeps per parent (the rest weigh nothing in the normaliser).
    pub kept: usize,
    /// Candidates per parent that may enter the selection.
    pub per_beam: usize,
    /// A table with a row per column (`[Vd, H]`, or `[V, H]` without a draft vocabulary), whose
    /// rows of the new beams' columns come back as [`BeamAdvance::inputs`]: the next draft
    /// step's RNN input gathered in this launch instead of a gather and a product of its own.
    pub input_table: Option<&'a Tensor<B, 2>>,
}

/// What [`beam_advance`] returns.
pub(crate) struct BeamAdvance<B: Backend> {
    /// The new beams' scores, best first. Shape `[B, M]`.
    pub scores: Tensor<B, 2>,
    /// Each new beam's tokens: its parent's, then the new token. Shape `[B·M, t + 1]`.
    pub beams: Tensor<B, 2, burn::tensor::Int>,
    /// Each new beam's per-token log-probabilities. Shape `[B·M, t]`.
    pub history: Tensor<B, 2>,
    /// The row of each new beam's parent among the step's `B·P` rows. Shape `[B·M]`.
    pub parents: Tensor<B, 1, burn::tensor::Int>,
    /// Each new beam's new token. Shape `[B·M]`.
    pub last: Tensor<B, 1, burn::tensor::Int>,
    /// With [`BeamStep::input_table`]: each new beam's row of it. Shape `[B·M, H]`.
    pub inputs: Option<Tensor<B, 2>>,
}

/// The most candidates (`P · per_beam`) and the widest beam [`beam_advance`] takes.
pub(crate) const BEAM_MAX_CANDIDATES: usize = 4096;
/// See [`BEAM_MAX_CANDIDATES`].
pub(crate) const BEAM_MAX_WIDTH: usize = 256;

/// The rest of a beam-search step after [`top_k`], in one launch: warp each parent's best logits
/// (minus the row maximum, normalised over the `kept` best), add the parents' scores, keep the
/// best `M` candidates (ties to the lower candidate, `parent · per_beam + rank`), map draft
/// indices to token ids and build the new beams from their parents'. `None` where it does not
/// apply (see [`BEAM_MAX_CANDIDATES`]).
pub(crate) fn beam_advance<B: Backend>(step: BeamStep<'_, B>) -> Option<BeamAdvance<B>> {
    #[cfg(any(feature = "cuda", feature = "wgpu"))]
    {
        dispatch::run(step)
    }
    #[cfg(not(any(feature = "cuda", feature = "wgpu")))]
    {
        let _ = step;
        None
    }
}

/// The environment variable that switches off [`draft_chain`] (`off`, `0` or `false`): one-beam
/// drafts then launch each step's products and selection apart, as before session 33 — how the
/// benchmarks measure what the single launch saves.
pub const DRAFT_CHAIN_SWITCH_VARIABLE: &str = "REDRAFTER_DRAFT_CHAIN";

/// Whether one-beam drafts run in one launch where they can (they do on CUDA unless
/// [`DRAFT_CHAIN_SWITCH_VARIABLE`] says otherwise, and only where [`fused_matmul`] is switched
/// on, whose sums the launch reproduces). Read once.
pub fn draft_chain_switched_on() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| folds_switched_on() && variable_allows(DRAFT_CHAIN_SWITCH_VARIABLE))
}

/// Whether [`draft_chain`] launches on `B` (its CUDA backend, switched on): where it does not,
/// one-beam drafts launch step by step.
pub fn draft_chain_applies<B: Backend>() -> bool {
    #[cfg(any(feature = "cuda", feature = "wgpu"))]
    {
        draft_chain_switched_on() && dispatch::is_cuda::<B>()
    }
    #[cfg(not(any(feature = "cuda", feature = "wgpu")))]
    {
        false
    }
}

/// A one-beam draft for [`draft_chain`]: the recurrent head with an RNN (`W` without a bias),
/// its residual blocks, its exit projection merged with a draft vocabulary's table, and that
/// vocabulary's RNN input table.
// Read only by the kernels, which need the `cuda` or `wgpu` feature.
#[cfg_attr(not(any(feature = "cuda", feature = "wgpu")), allow(dead_code))]
pub(crate) struct DraftChain<'a, B: Backend> {
    /// The hidden state each row drafts from. Shape `[B, H]`.
    pub context: &'a Tensor<B, 2>,
    /// Each row's first token (the target's). Shape `[B]`.
    pub first: &'a Tensor<B, 1, Int>,
    /// The target's input embedding. Shape `[V, H]`.
    pub embedding: &'a Tensor<B, 2>,
    /// The RNN's input projection `W` (no bias). Shape `[H, H]`, `[in, out]`.
    pub rnn_w: &'a Tensor<B, 2>,
    /// The RNN's state projection `U`. Shape `[H, H]`.
    pub rnn_u: &'a Tensor<B, 2>,
    /// `U`'s bias `b_U`. Shape `[H]`.
    pub rnn_bias: Option<&'a Tensor<B, 1>>,
    /// Each residual block's weight `[2H, 2H]` and bias `[2H]`, in order.
    pub blocks: Vec<(&'a Tensor<B, 2>, Option<&'a Tensor<B, 1>>)>,
    /// The exit projection times the draft vocabulary's table. Shape `[2H, N]`.
    pub exit: &'a Tensor<B, 2>,
    /// Each draft-vocabulary token's RNN input `e·W` (+ `b_W`). Shape `[N, H]`.
    pub input_table: &'a Tensor<B, 2>,
    /// Each draft-vocabulary index's token id. Shape `[N]`.
    pub draft_ids: &'a Tensor<B, 1, Int>,
    /// The beam length `C` (the first token and `C − 1` drafted ones).
    pub length: usize,
}

/// What [`draft_chain`] returns: one beam per row.
pub(crate) struct DraftChainOutput<B: Backend> {
    /// Each row's beam, the first token then the drafted ones. Shape `[B, C]`.
    pub tokens: Tensor<B, 2, Int>,
    /// The drafted tokens' log-probabilities as one-beam selection warps them (zeros for finite
    /// logits). Shape `[B, C − 1]`.
    pub token_log_probs: Tensor<B, 2>,
    /// Each beam's score, their sum. Shape `[B]`.
    pub scores: Tensor<B, 1>,
}

/// A one-beam draft of `C − 1` steps in one launch on CUDA: each step's RNN update, residual
/// blocks and merged exit product, and the pick of each row's best logit (ties to the lower
/// column) — the beams, log-probabilities and scores that the launch-per-product path computes,
/// bit for bit, in one launch instead of `5 (C − 1) + 1`. `None` where it does not apply: not
/// CUDA, switched off ([`DRAFT_CHAIN_SWITCH_VARIABLE`]), more than four rows or residual
/// blocks, mixed float or integer types, weights not stored row by row, or a device that does
/// not report its multiprocessors.
pub(crate) fn draft_chain<B: Backend>(chain: DraftChain<'_, B>) -> Option<DraftChainOutput<B>> {
    #[cfg(any(feature = "cuda", feature = "wgpu"))]
    {
        if !draft_chain_switched_on() {
            return None;
        }
        dispatch::run(chain)
    }
    #[cfg(not(any(feature = "cuda", feature = "wgpu")))]
    {
        let _ = chain;
        None
    }
}

/// The column of each row's largest entry (the first on ties), over the last dimension of a 2-D
/// or 3-D tensor, flattened: `[rows, V]` or `[a, b, V]` to `[rows]` / `[a · b]` (row-major). One
/// launch with a cube per row.
pub fn argmax<B: Backend, const D: usize>(
    values: &Tensor<B, D>,
) -> Option<Tensor<B, 1, burn::tensor::Int>> {
    #[cfg(any(feature = "cuda", feature = "wgpu"))]
    {
        dispatch::run(argmax::Argmax { values })
    }
    #[cfg(not(any(feature = "cuda", feature = "wgpu")))]
    {
        let _ = values;
        None
    }
}

/// `values` `[len]` with every stand-in `-1 - i` replaced by element `i` of `drafted`
/// `[live, M, C]` (row-major numbering), other values kept: an overlapped round's upload made
/// whole (`DraftTiming::Overlapped`). One launch; `None` where the kernels do not apply.
pub fn resolve_drafted<B: Backend>(
    values: &Tensor<B, 1, Int>,
    drafted: &Tensor<B, 3, Int>,
) -> Option<Tensor<B, 1, Int>> {
    #[cfg(any(feature = "cuda", feature = "wgpu"))]
    {
        dispatch::run(drafted_tokens::ResolveDrafted { values, drafted })
    }
    #[cfg(not(any(feature = "cuda", feature = "wgpu")))]
    {
        let _ = (values, drafted);
        None
    }
}

/// A verified tree's inputs for [`greedy_accept`].
// Read only by the kernels, which need the `cuda` or `wgpu` feature.
#[cfg_attr(not(any(feature = "cuda", feature = "wgpu")), allow(dead_code))]
pub(crate) struct GreedyAcceptance<'a, B: Backend> {
    /// The target's token at each tree node (argmax, or a sample for exact sampling). Shape
    /// `[live, L]`.
    pub choices: &'a Tensor<B, 2, burn::tensor::Int>,
    /// The tree node of each beam position. Shape `[live, M·C]`.
    pub unpacker: &'a Tensor<B, 2, burn::tensor::Int>,
    /// The round's beams (token 0 verified, the rest drafted). Shape `[live, M, C]`.
    pub beams: &'a Tensor<B, 3, burn::tensor::Int>,
    /// The target's hidden state at each node. Shape `[live, L, H]`.
    pub hidden: &'a Tensor<B, 3>,
}

/// Greedy (and exact-sampling) acceptance in one launch: per row, the beam with the longest run
/// of drafted tokens equal to the target's choices (the lower beam on ties), as
/// `[best beam, accepted]` `[live, 2]`; the target's choice after the run (the bonus token,
/// `[live]`); and the hidden state at the run's last node (`[live, H]`).
#[allow(clippy::type_complexity)]
pub(crate) fn greedy_accept<B: Backend>(
    inputs: GreedyAcceptance<'_, B>,
) -> Option<(
    Tensor<B, 2, burn::tensor::Int>,
    Tensor<B, 1, burn::tensor::Int>,
    Tensor<B, 2>,
)> {
    #[cfg(any(feature = "cuda", feature = "wgpu"))]
    {
        dispatch::run(inputs)
    }
    #[cfg(not(any(feature = "cuda", feature = "wgpu")))]
    {
        let _ = inputs;
        None
    }
}

/// One row's move for [`move_kv_slots`]: its slots `sources` go to slots `dest..dest + n`, in
/// order.
pub(crate) struct SlotMove {
    /// The batch row.
    pub row: usize,
    /// The first destination slot.
    pub dest: usize,
    /// The slots to move, strictly increasing, none before `dest`.
    pub sources: Vec<usize>,
}

/// What [`move_kv_slots`] moves.
// Read only by the kernels, which need the `cuda` or `wgpu` feature.
#[cfg_attr(not(any(feature = "cuda", feature = "wgpu")), allow(dead_code))]
pub(crate) struct SlotMoves<'a, B: Backend> {
    /// The cache's key storage. Shape `[layers, batch, kv_heads, slots, head_dim]`.
    pub keys: &'a Tensor<B, 5>,
    /// The cache's value storage, shaped as `keys`.
    pub values: &'a Tensor<B, 5>,
    /// One per row that moves, rows increasing.
    pub moves: &'a [SlotMove],
}

/// Moves each listed row's slots of every layer, keys and values, in place in the cache's
/// storage: one upload (the moves) and one launch for the whole batch, where Burn's ops took an
/// upload, two gathers and two region writes per row. Each row's slots are moved in order, so
/// sources may overlap destinations as long as the sources are strictly increasing and none
/// comes before the row's `dest` (a commit's accepted path: `dest + i ≤ source_i`). `None`
/// where it does not apply or the moves break those rules (rows not increasing, slots out of
/// range, no moves) — then nothing was written.
///
/// # Shapes
/// `keys`, `values`: `[layers, batch, kv_heads, slots, head_dim]`
pub(crate) fn move_kv_slots<B: Backend>(moves: SlotMoves<'_, B>) -> Option<()> {
    #[cfg(any(feature = "cuda", feature = "wgpu"))]
    {
        dispatch::run(moves)
    }
    #[cfg(not(any(feature = "cuda", feature = "wgpu")))]
    {
        let _ = moves;
        None
    }
}

/// The most rows [`matmul`] takes. Its weight is read once per 8 rows, so beyond a few hundred
/// rows (a long prompt) CubeCL's tiled matmul is much faster; verification trees up to this size
/// stay bit-exact against decoding.
pub const MATMUL_MAX_ROWS: usize = 256;

/// `x · weight` for up to [`MATMUL_MAX_ROWS`] rows, each output summed in an order that depends
/// neither on the number of rows nor on the row's place among them (f32 accumulation).
///
/// # Shapes
/// `x`: `[rows, in]`, `weight`: `[in, out]` to `[rows, out]`
pub fn matmul<B: Backend>(x: &Tensor<B, 2>, weight: &Tensor<B, 2>) -> Option<Tensor<B, 2>> {
    #[cfg(any(feature = "cuda", feature = "wgpu"))]
    {
        if !exact_switched_on() {
            return None;
        }
        dispatch::run(matmul::RowMatmul {
            x,
            weight,
            folds: ProductFolds::default(),
        })
    }
    #[cfg(not(any(feature = "cuda", feature = "wgpu")))]
    {
        let _ = (x, weight);
        None
    }
}

/// The environment variable that switches off only the folds of [`fused_matmul`] and
/// [`rotate_qkv_into_cache`] in the Llama layer (`off`, `0` or `false`): the layer then runs
/// session 15's eleven kernels instead of six — how the benchmarks measure what the folds save.
pub const FOLD_SWITCH_VARIABLE: &str = "REDRAFTER_FOLDED_LAYERS";

/// Whether the Llama layer folds its norms, SwiGLU and residual adds into its products and writes
/// its keys and values straight into the cache (it does where [`matmul`] is switched on, unless
/// [`FOLD_SWITCH_VARIABLE`] says otherwise). Read once.
pub fn folds_switched_on() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| exact_switched_on() && variable_allows(FOLD_SWITCH_VARIABLE))
}

/// The environment variable that switches off only [`rotary_attention_into_cache`] (`off`, `0`
/// or `false`): the layer then rotates Q and K in a launch of its own before the attention, as
/// in session 17 — how the benchmarks measure what folding the rotation saves.
pub const ROTARY_SWITCH_VARIABLE: &str = "REDRAFTER_ROTARY_ATTENTION";

/// Whether the Llama layer's attention rotates its block's queries and keys itself (it does where
/// [`folds_switched_on`], unless [`ROTARY_SWITCH_VARIABLE`] says otherwise). Read once.
pub fn rotary_attention_switched_on() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| folds_switched_on() && variable_allows(ROTARY_SWITCH_VARIABLE))
}

/// The environment variable that switches off only [`rotary_product_into_cache`] (`off`, `0` or
/// `false`): blocks too long for [`rotary_attention_into_cache`] then rotate in a launch of their
/// own, as in session 22 — how the benchmarks measure what folding the rotation into the product
/// saves.
pub const ROTARY_PRODUCT_SWITCH_VARIABLE: &str = "REDRAFTER_ROTARY_PRODUCT";

/// Whether the Llama layer rotates the queries and keys of blocks too long for
/// [`rotary_attention_into_cache`] in its QKV product (it does where [`folds_switched_on`],
/// unless [`ROTARY_PRODUCT_SWITCH_VARIABLE`] says otherwise). Read once.
pub fn rotary_product_switched_on() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| folds_switched_on() && variable_allows(ROTARY_PRODUCT_SWITCH_VARIABLE))
}

/// Whether [`rotary_attention_into_cache`] would take a block of `len` tokens of head dimension
/// `head_dim` by its size (it is switched on and the block's keys fit its shared memory); longer
/// blocks rotate in [`rotary_product_into_cache`] or a launch of their own.
pub fn rotary_attention_takes(len: usize, head_dim: usize) -> bool {
    #[cfg(any(feature = "cuda", feature = "wgpu"))]
    {
        rotary_attention_switched_on() && attention::rotary_block_fits(len, head_dim)
    }
    #[cfg(not(any(feature = "cuda", feature = "wgpu")))]
    {
        let _ = (len, head_dim);
        false
    }
}

/// What [`fused_matmul`] folds around a product.
#[derive(Debug)]
pub struct ProductFolds<'a, B: Backend> {
    /// Normalise each input row first with this epsilon: RMSNorm without a weight (fold the
    /// norm's weight into the projection's rows).
    pub rms_norm_eps: Option<f64>,
    /// `silu(gate) · up` of a gate | up product: the output has half the weight's columns.
    pub swiglu: bool,
    /// Added to the product before the activation, `[rows, output columns]`.
    pub addend: Option<&'a Tensor<B, 2>>,
    /// Added to every row of the product before the activation, `[output columns]`.
    pub bias: Option<&'a Tensor<B, 1>>,
    /// SiLU of the product (after `addend` and `bias`); not with `swiglu`.
    pub silu: bool,
    /// Added to the output last, `[rows, output columns]`.
    pub residual: Option<&'a Tensor<B, 2>>,
    /// Written before the product: the output is `[prefix | product]`, `[rows, 2 · output
    /// columns]` (`prefix` is `[rows, output columns]`) — a concatenation without a launch of
    /// its own.
    pub prefix: Option<&'a Tensor<B, 2>>,
    /// The product's inputs are `x`'s columns from this one on (as many as the weight has rows):
    /// the second half of a `[prefix | product]` output, read without a copy (the norm, if
    /// folded, is over these inputs). 0: all of `x`.
    pub input_offset: usize,
}

impl<B: Backend> Clone for ProductFolds<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<B: Backend> Copy for ProductFolds<'_, B> {}

impl<B: Backend> Default for ProductFolds<'_, B> {
    fn default() -> Self {
        Self {
            rms_norm_eps: None,
            swiglu: false,
            addend: None,
            bias: None,
            silu: false,
            residual: None,
            prefix: None,
            input_offset: 0,
        }
    }
}

/// [`matmul`] with a layer's neighbouring operations folded in, one launch:
/// `residual + act(norm(x) · weight + addend + bias)`, `act` a SwiGLU, a SiLU or none, each part
/// optional ([`ProductFolds`]): a Llama layer's products, and the draft head's
/// (`x + silu(x·W + b)` blocks, the RNN's `silu(s·U + e·W + b)`). Every output is
/// still summed in an order that depends neither on the number of rows nor on the row's place
/// among them, the norm's sum of squares included. `None` where [`folds_switched_on`] is false or
/// [`matmul`] would decline.
///
/// # Shapes
/// - `x`: `[rows, in]`, `weight`: `[in, out]`
/// - `addend`, `residual`: `[rows, out]`, or `[rows, out / 2]` with `swiglu`; `bias`: likewise
///   `[out]` or `[out / 2]`
/// - returns `[rows, out]`, or `[rows, out / 2]` with `swiglu`
pub fn fused_matmul<B: Backend>(
    x: &Tensor<B, 2>,
    weight: &Tensor<B, 2>,
    folds: ProductFolds<'_, B>,
) -> Option<Tensor<B, 2>> {
    #[cfg(any(feature = "cuda", feature = "wgpu"))]
    {
        if !folds_switched_on() {
            return None;
        }
        dispatch::run(matmul::RowMatmul { x, weight, folds })
    }
    #[cfg(not(any(feature = "cuda", feature = "wgpu")))]
    {
        let _ = (x, weight, folds);
        None
    }
}

/// Grouped-query attention with an additive bias: query head `h` reads KV head
/// `h / (heads / kv_heads)`; the 1/√dim scale is expected to be folded into the queries. Every
/// sum runs in a fixed order (the value sums split among groups of units by a slot's rank among
/// the slots of non-zero weight), a masked slot (bias [`crate::kv_cache::MASKED`]) having weight
/// exactly zero and no rank, so a tree row's output equals its output decoded alone. Declines
/// head dimensions above 128.
///
/// # Shapes
/// - `queries`: `[batch, heads, len, dim]`
/// - `keys`, `values`: `[batch, kv_heads, slots, dim]` (a strided view of the cache is read in
///   place)
/// - `bias`: `[batch, 1, len, slots]`, or `None` (every slot visible)
/// - returns `[batch · len, heads · dim]`
pub fn attention<B: Backend>(
    queries: &Tensor<B, 4>,
    keys: &Tensor<B, 4>,
    values: &Tensor<B, 4>,
    bias: Option<&Tensor<B, 4>>,
) -> Option<Tensor<B, 2>> {
    #[cfg(any(feature = "cuda", feature = "wgpu"))]
    {
        if !exact_switched_on() {
            return None;
        }
        dispatch::run(attention::Attention {
            queries,
            keys,
            values,
            bias,
        })
    }
    #[cfg(not(any(feature = "cuda", feature = "wgpu")))]
    {
        let _ = (queries, keys, values, bias);
        None
    }
}

/// [`rotate_qkv_into_cache`] and [`attention`] in one launch: the block's queries and keys are
/// rotated inside the attention kernel, straight from the QKV product, its keys and values
/// written into slots `start..start + len` of layer `layer` of the cache's storage, and the
/// block attends to slots `0..start + len` — the cache's earlier slots from the storage, its own
/// from `qkv`. Bit for bit the two kernels' result (a key is rotated by the same function and
/// rounded to the element type before it is scored, as it would be stored), so a verification
/// tree still agrees with decoding whichever path each of its blocks took. `None` where
/// [`rotary_attention_switched_on`] is false, the shapes disagree, the block does not fit in the
/// storage, or its `len · head_dim` keys exceed 512 (8 tokens of a head dimension of 64: longer
/// blocks are faster in the two kernels) — then nothing was written.
///
/// # Shapes
/// - `qkv`: `[batch, len, (heads + 2 * kv_heads) * head_dim]`, ordered Q | K | V
/// - `cos`, `sin`: `[batch, 1, len, head_dim]`
/// - `keys`, `values`: `[layers, batch, kv_heads, slots, head_dim]`
/// - `bias`: `[batch, 1, len, start + len]`, or `None` (every slot visible)
/// - returns `[batch · len, heads · head_dim]`
#[allow(clippy::too_many_arguments)]
pub fn rotary_attention_into_cache<B: Backend>(
    qkv: &Tensor<B, 3>,
    cos: &Tensor<B, 4>,
    sin: &Tensor<B, 4>,
    heads: usize,
    kv_heads: usize,
    keys: &Tensor<B, 5>,
    values: &Tensor<B, 5>,
    layer: usize,
    start: usize,
    bias: Option<&Tensor<B, 4>>,
) -> Option<Tensor<B, 2>> {
    #[cfg(any(feature = "cuda", feature = "wgpu"))]
    {
        if !rotary_attention_switched_on() {
            return None;
        }
        dispatch::run(attention::RotaryAttention {
            qkv,
            cos,
            sin,
            heads,
            kv_heads,
            keys,
            values,
            layer,
            start,
            bias,
        })
    }
    #[cfg(not(any(feature = "cuda", feature = "wgpu")))]
    {
        let _ = (
            qkv, cos, sin, heads, kv_heads, keys, values, layer, start, bias,
        );
        None
    }
}
