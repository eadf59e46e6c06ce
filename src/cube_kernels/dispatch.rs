//! Moving tensors between code generic over the backend and the CubeCL runtimes' own tensors.

use std::any::{Any, TypeId};

use burn::tensor::{DType, Shape, Tensor, TensorPrimitive, backend::Backend};
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{CubeRuntime, ops::numeric::empty_device_contiguous_dtype};
use cubecl::prelude::CubeCount;

/// The CubeCL runtimes this crate launches kernels on.
pub(super) enum Runtime {
    #[cfg(feature = "cuda")]
    Cuda,
    #[cfg(feature = "wgpu")]
    Wgpu,
}

/// The runtime whose tensors are `B`'s float tensors. `None` for every other backend, including
/// `Fusion<_>` and `Autodiff<_>` wrappers of a CubeCL backend.
pub(super) fn runtime_of<B: Backend>() -> Option<Runtime> {
    let primitive = TypeId::of::<B::FloatTensorPrimitive>();
    #[cfg(feature = "cuda")]
    if primitive == TypeId::of::<CubeTensor<cubecl::cuda::CudaRuntime>>() {
        return Some(Runtime::Cuda);
    }
    #[cfg(feature = "wgpu")]
    if primitive == TypeId::of::<CubeTensor<cubecl::wgpu::WgpuRuntime>>() {
        return Some(Runtime::Wgpu);
    }
    None
}

/// Whether `B`'s float tensors are CUDA's (kernels that rely on CUDA's scheduling, such as a grid
/// barrier, launch nowhere else).
pub(super) fn is_cuda<B: Backend>() -> bool {
    #[cfg(feature = "cuda")]
    {
        matches!(runtime_of::<B>(), Some(Runtime::Cuda))
    }
    #[cfg(not(feature = "cuda"))]
    {
        // WGPU's runtime is the only other one: never CUDA.
        let _ = runtime_of::<B>();
        false
    }
}

/// A fused operation, written once for every CubeCL runtime.
pub(super) trait CubeOp<B: Backend> {
    type Output;

    /// Launches the kernel; `None` if an input does not qualify (dtype, empty shape).
    fn launch<R: CubeRuntime>(self) -> Option<Self::Output>;
}

/// Runs `op` on `B`'s runtime, or returns `None` when `B` has none of ours or the kernels are
/// switched off.
pub(super) fn run<B: Backend, Op: CubeOp<B>>(op: Op) -> Option<Op::Output> {
    if !super::switched_on() {
        return None;
    }
    on_runtime(op)
}

/// Runs `op` on `B`'s runtime whether or not the kernels are switched on (for what launches no
/// kernel); `None` when `B` has none of ours.
fn on_runtime<B: Backend, Op: CubeOp<B>>(op: Op) -> Option<Op::Output> {
    match runtime_of::<B>()? {
        #[cfg(feature = "cuda")]
        Runtime::Cuda => op.launch::<cubecl::cuda::CudaRuntime>(),
        #[cfg(feature = "wgpu")]
        Runtime::Wgpu => op.launch::<cubecl::wgpu::WgpuRuntime>(),
    }
}

/// The runtime tensor behind `tensor` as it lies, strides and all (a view into a larger buffer
/// stays one); `None` if `B`'s tensors are not `R`'s or the float type is not f32/f16/bf16.
///
/// Never copies: every kernel here indexes its inputs through their strides. Making inputs
/// contiguous first (Burn's `into_contiguous`) cost a copy kernel per input on CUDA, where the
/// allocator pads rows to 512 bytes and a padded `[1, 576]` row no longer counts as contiguous:
/// ~20 copies per layer, two thirds of a decoding step's launches (docs/benchmarks.md, session 11).
pub(super) fn to_cube<R: CubeRuntime, B: Backend, const D: usize>(
    tensor: &Tensor<B, D>,
) -> Option<CubeTensor<R>> {
    let TensorPrimitive::Float(primitive) = tensor.clone().into_primitive() else {
        return None;
    };
    let boxed: Box<dyn Any> = Box::new(primitive);
    let cube = *boxed.downcast::<CubeTensor<R>>().ok()?;
    matches!(cube.dtype, DType::F32 | DType::F16 | DType::BF16).then_some(cube)
}

/// `tensor` as a `Tensor<B, D>`; `None` if `B`'s tensors are not `R`'s.
pub(super) fn from_cube<R: CubeRuntime, B: Backend, const D: usize>(
    tensor: CubeTensor<R>,
) -> Option<Tensor<B, D>> {
    let boxed: Box<dyn Any> = Box::new(tensor);
    let primitive = *boxed.downcast::<B::FloatTensorPrimitive>().ok()?;
    Some(Tensor::from_primitive(TensorPrimitive::Float(primitive)))
}

/// An uninitialised row-major tensor (no row padding) of `like`'s device and float type: kernels
/// that take their outputs as `Array`s index them as `row * width + column`, and a contiguous
/// result reshapes and feeds Burn's own kernels without a copy, which a padded one does not.
pub(super) fn empty_like<R: CubeRuntime, const D: usize>(
    like: &CubeTensor<R>,
    dims: [usize; D],
) -> CubeTensor<R> {
    empty_device_contiguous_dtype(
        like.client.clone(),
        like.device.clone(),
        Shape::new(dims),
        like.dtype,
    )
}

/// An uninitialised row-major integer tensor of type `dtype` on `like`'s device.
pub(super) fn empty_int_like<R: CubeRuntime, const D: usize>(
    like: &CubeTensor<R>,
    dims: [usize; D],
    dtype: DType,
) -> CubeTensor<R> {
    empty_device_contiguous_dtype(
        like.client.clone(),
        like.device.clone(),
        Shape::new(dims),
        dtype,
    )
}

/// The most cubes a grid may have along one axis on every runtime (WGPU's limit).
const MAX_CUBES_PER_AXIS: usize = 65_535;

/// A grid of at least `rows` cubes, one per row; kernels take `CUBE_POS` (the cube's number
/// across the grid) as their row and skip numbers past the last row.
pub(super) fn row_grid(rows: usize) -> CubeCount {
    let x = rows.clamp(1, MAX_CUBES_PER_AXIS);
    let y = rows.div_ceil(MAX_CUBES_PER_AXIS).max(1);
    CubeCount::Static(x as u32, y as u32, 1)
}

/// `tensor[ranges]` as a view sharing `tensor`'s buffer, keeping its last `E` dimensions (each
/// leading range must cover a single index); `None` if `B` has none of our runtimes, the ranges
/// do not fit, or the view would not start on the allocator's alignment.
///
/// Burn's `slice` copies unless the bytes cut off at *both* ends are multiples of the memory
/// alignment (512 bytes on CUDA), and dropping a leading dimension of a strided tensor
/// (`squeeze_dim`) copies again; for the KV cache's visible slots `0..end` of one layer, every
/// layer of a decoding step copied its cache. A view only needs an aligned start (the cache pads
/// its storage so that it has one).
pub(crate) fn view<B: Backend, const D: usize, const E: usize>(
    tensor: &Tensor<B, D>,
    ranges: [std::ops::Range<usize>; D],
) -> Option<Tensor<B, E>> {
    on_runtime(View { tensor, ranges })
}

/// The operation behind [`view`] (no kernel: it only builds the view's metadata).
struct View<'a, B: Backend, const D: usize, const E: usize> {
    tensor: &'a Tensor<B, D>,
    ranges: [std::ops::Range<usize>; D],
}

impl<B: Backend, const D: usize, const E: usize> CubeOp<B> for View<'_, B, D, E> {
    type Output = Tensor<B, E>;

    fn launch<R: CubeRuntime>(self) -> Option<Self::Output> {
        let cube = to_cube::<R, B, D>(self.tensor)?;
        from_cube::<R, B, E>(view_of::<R, D, E>(&cube, &self.ranges)?)
    }
}

/// [`view`] of an integer tensor.
pub(crate) fn view_int<B: Backend, const D: usize, const E: usize>(
    tensor: &Tensor<B, D, burn::tensor::Int>,
    ranges: [std::ops::Range<usize>; D],
) -> Option<Tensor<B, E, burn::tensor::Int>> {
    on_runtime(IntView { tensor, ranges })
}

/// The operation behind [`view_int`].
struct IntView<'a, B: Backend, const D: usize, const E: usize> {
    tensor: &'a Tensor<B, D, burn::tensor::Int>,
    ranges: [std::ops::Range<usize>; D],
}

impl<B: Backend, const D: usize, const E: usize> CubeOp<B> for IntView<'_, B, D, E> {
    type Output = Tensor<B, E, burn::tensor::Int>;

    fn launch<R: CubeRuntime>(self) -> Option<Self::Output> {
        let cube = to_cube_int::<R, B, D>(self.tensor)?;
        from_cube_int::<R, B, E>(view_of::<R, D, E>(&cube, &self.ranges)?)
    }
}

/// `cube[ranges]` keeping its last `E` dimensions, sharing its buffer: the metadata of a view
/// (see [`view`]); `None` where the ranges do not fit or the start is off the alignment.
fn view_of<R: CubeRuntime, const D: usize, const E: usize>(
    cube: &CubeTensor<R>,
    ranges: &[std::ops::Range<usize>; D],
) -> Option<CubeTensor<R>> {
    let dims = cube.meta.shape().clone();
    let dropped = D.checked_sub(E)?;
    if dims.num_dims() != D
        || ranges
            .iter()
            .zip(dims.iter())
            .any(|(range, &dim)| range.start > range.end || range.end > dim)
        || ranges[..dropped].iter().any(|range| range.len() != 1)
    {
        return None;
    }
    let strides = cube.meta.strides().clone();
    let start: usize = ranges
        .iter()
        .zip(strides.iter())
        .map(|(range, stride)| range.start * stride)
        .sum();
    let offset = (start * cube.dtype.size()) as u64;
    if !offset.is_multiple_of(cube.client.properties().memory.alignment) {
        return None;
    }
    let shape = Shape::new::<E>(std::array::from_fn(|i| ranges[dropped + i].len()));
    let kept_strides: Vec<usize> = strides.iter().skip(dropped).copied().collect();
    Some(CubeTensor::new(
        cube.client.clone(),
        cube.handle.clone().offset_start(offset),
        cubecl::zspace::metadata::Metadata::new(shape, kept_strides),
        cube.device.clone(),
        cube.dtype,
    ))
}

/// The runtime tensor behind an integer tensor, as it lies (see [`to_cube`]); `None` if `B`'s
/// integer tensors are not `R`'s.
pub(super) fn to_cube_int<R: CubeRuntime, B: Backend, const D: usize>(
    tensor: &Tensor<B, D, burn::tensor::Int>,
) -> Option<CubeTensor<R>> {
    let boxed: Box<dyn Any> = Box::new(tensor.clone().into_primitive());
    boxed.downcast::<CubeTensor<R>>().ok().map(|cube| *cube)
}

/// `tensor` as an integer `Tensor<B, D, Int>`; `None` if `B`'s integer tensors are not `R`'s.
pub(super) fn from_cube_int<R: CubeRuntime, B: Backend, const D: usize>(
    tensor: CubeTensor<R>,
) -> Option<Tensor<B, D, burn::tensor::Int>> {
    let boxed: Box<dyn Any> = Box::new(tensor);
    let primitive = *boxed.downcast::<B::IntTensorPrimitive>().ok()?;
    Some(Tensor::from_primitive(primitive))
}

/// Hands the tasks queued for `device` to CubeCL's runner thread now, without waiting for them.
///
/// The runner takes tasks (a launch, an allocation) from the host in batches of 32 and starts on
/// a batch only once it is full, or when something waits on the device. Nothing queued reaches
/// the card before then.
pub(super) fn flush_queue<B: Backend>(device: &B::Device) {
    match runtime_of::<B>() {
        #[cfg(feature = "cuda")]
        Some(Runtime::Cuda) => flush_queue_on::<cubecl::cuda::CudaRuntime, B>(device),
        #[cfg(feature = "wgpu")]
        Some(Runtime::Wgpu) => flush_queue_on::<cubecl::wgpu::WgpuRuntime, B>(device),
        None => {}
    }
}

fn flush_queue_on<R: CubeRuntime, B: Backend>(device: &B::Device) {
    let device: &dyn Any = device;
    if let Some(device) = device.downcast_ref::<R::Device>() {
        let id = cubecl::device::Device::to_id(device);
        // The handle of the runner the device's client already talks to (one per device).
        cubecl::device_handle::DeviceHandle::<R::Server>::new(id).flush_queue();
    }
}
