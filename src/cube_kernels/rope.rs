//! Rotary position embedding of Q and K, straight from the fused QKV projection.

use burn::tensor::{Tensor as BurnTensor, backend::Backend};
use burn_cubecl::CubeRuntime;
use cubecl::{calculate_cube_count_elemwise, prelude::*};

use super::dispatch::{CubeOp, empty_like, from_cube, to_cube};
use super::reduce::{
    Strides2, Strides4, Strides5, offset2, offset4, offset5, scalars, strides2, strides4, strides5,
};

/// One unit per element of `qkv` `[batch * len, (heads + 2 * kv_heads) * dim]`: rotates Q and K
/// elements (`x ⊙ cos + rotate_half(x) ⊙ sin`, tables `[batch * len, dim]`) and writes every
/// element to its head-major place: in `q` `[batch, heads, len, dim]`, and in `k` and `v`
/// `[layers, batch, kv_heads, slots, dim]` at layer `layer`, slots `start..start + len` (a KV
/// cache's storage, or a one-layer tensor of `len` slots).
///
/// The buffers are `Array`s and their shapes and strides scalar arguments, since a launch binding
/// `Tensor`s costs the host ~10–11.5 µs on the H200 against ~5–6.3 µs for arrays and scalars
/// (CubeCL copies tensors' shapes and strides into a fresh device buffer per launch;
/// docs/benchmarks.md, session 17).
#[allow(clippy::too_many_arguments)]
#[cube(launch_unchecked)]
fn rotate_qkv_kernel<F: Float>(
    qkv: &Array<F>,
    cos: &Array<F>,
    sin: &Array<F>,
    q: &mut Array<F>,
    k: &mut Array<F>,
    v: &mut Array<F>,
    qkv_strides: &Strides2,
    cos_strides: &Strides2,
    sin_strides: &Strides2,
    q_strides: &Strides4,
    k_strides: &Strides5,
    v_strides: &Strides5,
    tokens: u32,
    width: u32,
    dim: u32,
    len: u32,
    heads: u32,
    kv_heads: u32,
    layer: u32,
    start: u32,
    #[define(F)] _dtype: StorageType,
) {
    let (len, heads, kv_heads) = (len as usize, heads as usize, kv_heads as usize);
    let (layer, start) = (layer as usize, start as usize);
    let dim = dim as usize;
    let half = dim / 2;
    let width = width as usize;
    if ABSOLUTE_POS >= (tokens as usize) * width {
        terminate!();
    }
    let token = ABSOLUTE_POS / width;
    let within = ABSOLUTE_POS % width;
    let head = within / dim;
    let d = within % dim;
    let batch = token / len;
    let t = token % len;
    if head < heads + kv_heads {
        let rotated = rotated_element(
            qkv,
            qkv_strides,
            cos,
            cos_strides,
            sin,
            sin_strides,
            token,
            head * dim,
            d,
            half,
        );
        if head < heads {
            q[offset4(q_strides, batch, head, t, d)] = F::cast_from(rotated);
        } else {
            let at = offset5(k_strides, layer, batch, head - heads, start + t, d);
            k[at] = F::cast_from(rotated);
        }
    } else {
        let at = offset5(
            v_strides,
            layer,
            batch,
            head - heads - kv_heads,
            start + t,
            d,
        );
        v[at] = qkv[offset2(qkv_strides, token, within)];
    }
}

/// Element `d` of the head whose first column in `qkv` is `column`, in token row `token`,
/// rotated: `x[d] · cos[d] + x[partner] · sin[d]`, the partner half a head away (the tables carry
/// rotate-half's sign in `sin`). In f32, not yet rounded to the element type.
///
/// The one place the rotation is written down ([`rotate_pair`]): the rotation kernel above and
/// the attention that rotates on the fly ([`super::attention`]) both use it, so a key computed in
/// either is the same value, bit for bit, whichever kernel a block went through.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(super) fn rotated_element<F: Float>(
    qkv: &Array<F>,
    qkv_strides: &Strides2,
    cos: &Array<F>,
    cos_strides: &Strides2,
    sin: &Array<F>,
    sin_strides: &Strides2,
    token: usize,
    column: usize,
    d: usize,
    half: usize,
) -> f32 {
    let partner = if d < half { d + half } else { d - half };
    let value = f32::cast_from(qkv[offset2(qkv_strides, token, column + d)]);
    let other = f32::cast_from(qkv[offset2(qkv_strides, token, column + partner)]);
    rotate_pair(
        value,
        other,
        f32::cast_from(cos[offset2(cos_strides, token, d)]),
        f32::cast_from(sin[offset2(sin_strides, token, d)]),
    )
}

/// The arithmetic of [`rotated_element`] on loaded values, for kernels that load many elements
/// before rotating them. The fused multiply-add is explicit: written as `value * cos + other *
/// sin`, the compiler contracted it differently in the rotation kernel and in the attention's
/// batched loads on CUDA, and the keys differed in their last bit (session 18); an explicit `fma`
/// rounds the same way wherever it is compiled.
#[cube]
pub(super) fn rotate_pair(value: f32, other: f32, cos: f32, sin: f32) -> f32 {
    fma(value, cos, other * sin)
}

/// The operation behind [`super::rotate_qkv`] (`cache: None`) and
/// [`super::rotate_qkv_into_cache`].
pub(super) struct RotateQkv<'a, B: Backend> {
    pub qkv: &'a BurnTensor<B, 3>,
    pub cos: &'a BurnTensor<B, 4>,
    pub sin: &'a BurnTensor<B, 4>,
    pub heads: usize,
    pub kv_heads: usize,
    pub cache: Option<CacheBlock<'a, B>>,
}

/// Where [`RotateQkv`] writes K and V instead of new tensors: slots `start..start + len` of layer
/// `layer` of a cache's storage `[layers, batch, kv_heads, slots, dim]`, in place.
pub(super) struct CacheBlock<'a, B: Backend> {
    pub keys: &'a BurnTensor<B, 5>,
    pub values: &'a BurnTensor<B, 5>,
    pub layer: usize,
    pub start: usize,
}

impl<B: Backend> CacheBlock<'_, B> {
    /// Whether a block of `len` tokens of `batch` entries, `kv_heads` heads of dimension `dim`,
    /// fits the storage at `layer` and `start`, and the keys and values agree in shape.
    pub(super) fn fits(&self, batch: usize, kv_heads: usize, dim: usize, len: usize) -> bool {
        let [layers, cache_batch, cache_heads, slots, cache_dim] = self.keys.dims();
        self.values.dims() == self.keys.dims()
            && self.layer < layers
            && cache_batch == batch
            && cache_heads == kv_heads
            && cache_dim == dim
            && self.start + len <= slots
    }
}

/// Q, and K and V (new tensors, or `None` when written into a cache).
type Heads<B> = (
    BurnTensor<B, 4>,
    Option<(BurnTensor<B, 4>, BurnTensor<B, 4>)>,
);

impl<B: Backend> CubeOp<B> for RotateQkv<'_, B> {
    type Output = Heads<B>;

    fn launch<R: CubeRuntime>(self) -> Option<Self::Output> {
        let [batch, len, width] = self.qkv.dims();
        let [_, _, _, dim] = self.cos.dims();
        let (heads, kv_heads) = (self.heads, self.kv_heads);
        let tokens = batch * len;
        if tokens == 0
            || dim == 0
            || dim % 2 != 0
            || width != (heads + 2 * kv_heads) * dim
            || self.cos.dims() != [batch, 1, len, dim]
            || self.sin.dims() != [batch, 1, len, dim]
        {
            return None;
        }
        if self
            .cache
            .as_ref()
            .is_some_and(|cache| !cache.fits(batch, kv_heads, dim, len))
        {
            return None;
        }
        let qkv = to_cube::<R, B, 2>(&self.qkv.clone().reshape([tokens, width]))?;
        let cos = to_cube::<R, B, 2>(&self.cos.clone().reshape([tokens, dim]))?;
        let sin = to_cube::<R, B, 2>(&self.sin.clone().reshape([tokens, dim]))?;
        if cos.dtype != qkv.dtype || sin.dtype != qkv.dtype {
            return None;
        }
        let q = empty_like(&qkv, [batch, heads, len, dim]);
        let (k, v, layer, start) = match &self.cache {
            Some(cache) => {
                let k = to_cube::<R, B, 5>(cache.keys)?;
                let v = to_cube::<R, B, 5>(cache.values)?;
                if k.dtype != qkv.dtype || v.dtype != qkv.dtype {
                    return None;
                }
                (k, v, cache.layer, cache.start)
            }
            None => (
                empty_like(&qkv, [1, batch, kv_heads, len, dim]),
                empty_like(&qkv, [1, batch, kv_heads, len, dim]),
                0,
                0,
            ),
        };
        let client = qkv.client.clone();
        let units = tokens * width;
        let cube_dim = CubeDim::new(&client, units);
        let cube_count = calculate_cube_count_elemwise(&client, units, cube_dim);
        let dtype = qkv.dtype;
        // The scalars shadow the shapes only in this block: K and V are reshaped below.
        {
            let (qkv_strides, cos_strides, sin_strides) =
                (strides2(&qkv)?, strides2(&cos)?, strides2(&sin)?);
            let (q_strides, k_strides, v_strides) = (strides4(&q)?, strides5(&k)?, strides5(&v)?);
            let [tokens, width, dim, len, heads, kv_heads, layer, start] =
                scalars(&[tokens, width, dim, len, heads, kv_heads, layer, start])?;
            // Arrays bound at the tensors' offsets, read through the strides above.
            unsafe {
                rotate_qkv_kernel::launch_unchecked::<R>(
                    &client,
                    cube_count,
                    cube_dim,
                    qkv.into_array_arg(),
                    cos.into_array_arg(),
                    sin.into_array_arg(),
                    q.clone().into_array_arg(),
                    k.clone().into_array_arg(),
                    v.clone().into_array_arg(),
                    qkv_strides,
                    cos_strides,
                    sin_strides,
                    q_strides,
                    k_strides,
                    v_strides,
                    tokens,
                    width,
                    dim,
                    len,
                    heads,
                    kv_heads,
                    layer,
                    start,
                    dtype.into(),
                )
            };
        }
        let q = from_cube::<R, B, 4>(q)?;
        if self.cache.is_some() {
            return Some((q, None));
        }
        let k = from_cube::<R, B, 5>(k)?.reshape([batch, kv_heads, len, dim]);
        let v = from_cube::<R, B, 5>(v)?.reshape([batch, kv_heads, len, dim]);
        Some((q, Some((k, v))))
    }
}
