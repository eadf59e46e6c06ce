//! Rotary position embedding of Q and K, straight from the fused QKV projection.

use burn::tensor::{Tensor as BurnTensor, backend::Backend};
use burn_cubecl::CubeRuntime;
use cubecl::{calculate_cube_count_elemwise, prelude::*};

use super::dispatch::{CubeOp, empty_like, from_cube, to_cube};
use super::reduce::{at, at4};

/// One unit per element of `qkv` `[batch * len, (heads + 2 * kv_heads) * dim]`: rotates Q and K
/// elements (`x ⊙ cos + rotate_half(x) ⊙ sin`, tables `[batch * len, dim]`) and writes every
/// element to its head-major place: in `q` `[batch, heads, len, dim]`, and in `k` and `v`
/// `[layers, batch, kv_heads, slots, dim]` at layer `layer`, slots `start..start + len` (a KV
/// cache's storage, or a one-layer tensor of `len` slots).
#[allow(clippy::too_many_arguments)]
#[cube(launch_unchecked)]
fn rotate_qkv_kernel<F: Float>(
    qkv: &Tensor<F>,
    cos: &Tensor<F>,
    sin: &Tensor<F>,
    q: &mut Tensor<F>,
    k: &mut Tensor<F>,
    v: &mut Tensor<F>,
    len: u32,
    heads: u32,
    kv_heads: u32,
    layer: u32,
    start: u32,
    #[define(F)] _dtype: StorageType,
) {
    let (len, heads, kv_heads) = (len as usize, heads as usize, kv_heads as usize);
    let (layer, start) = (layer as usize, start as usize);
    let dim = cos.shape(1);
    let half = dim / 2;
    let width = qkv.shape(1);
    if ABSOLUTE_POS >= qkv.shape(0) * width {
        terminate!();
    }
    let token = ABSOLUTE_POS / width;
    let within = ABSOLUTE_POS % width;
    let head = within / dim;
    let d = within % dim;
    let batch = token / len;
    let t = token % len;
    let value = f32::cast_from(qkv[at(qkv, token, within)]);

    if head < heads + kv_heads {
        let partner = if d < half {
            within + half
        } else {
            within - half
        };
        let rotated = value * f32::cast_from(cos[at(cos, token, d)])
            + f32::cast_from(qkv[at(qkv, token, partner)]) * f32::cast_from(sin[at(sin, token, d)]);
        if head < heads {
            q[at4(q, batch, head, t, d)] = F::cast_from(rotated);
        } else {
            k[at5(k, layer, batch, head - heads, start + t, d)] = F::cast_from(rotated);
        }
    } else {
        v[at5(v, layer, batch, head - heads - kv_heads, start + t, d)] = F::cast_from(value);
    }
}

/// The position of element `(a, b, c, d, e)` of a 5-D tensor in its buffer, through its strides.
#[cube]
fn at5<E: CubePrimitive>(
    tensor: &Tensor<E>,
    a: usize,
    b: usize,
    c: usize,
    d: usize,
    e: usize,
) -> usize {
    a * tensor.stride(0)
        + b * tensor.stride(1)
        + c * tensor.stride(2)
        + d * tensor.stride(3)
        + e * tensor.stride(4)
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
        if let Some(cache) = &self.cache {
            let [layers, cache_batch, cache_heads, slots, cache_dim] = cache.keys.dims();
            if cache.values.dims() != cache.keys.dims()
                || cache.layer >= layers
                || cache_batch != batch
                || cache_heads != kv_heads
                || cache_dim != dim
                || cache.start + len > slots
            {
                return None;
            }
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
        unsafe {
            rotate_qkv_kernel::launch_unchecked::<R>(
                &client,
                cube_count,
                cube_dim,
                qkv.into_tensor_arg(),
                cos.into_tensor_arg(),
                sin.into_tensor_arg(),
                q.clone().into_tensor_arg(),
                k.clone().into_tensor_arg(),
                v.clone().into_tensor_arg(),
                len as u32,
                heads as u32,
                kv_heads as u32,
                layer as u32,
                start as u32,
                dtype.into(),
            )
        };
        let q = from_cube::<R, B, 4>(q)?;
        if self.cache.is_some() {
            return Some((q, None));
        }
        let k = from_cube::<R, B, 5>(k)?.reshape([batch, kv_heads, len, dim]);
        let v = from_cube::<R, B, 5>(v)?.reshape([batch, kv_heads, len, dim]);
        Some((q, Some((k, v))))
    }
}
