//! Moving tensors between code generic over the backend and the CubeCL runtimes' own tensors.

use std::any::{Any, TypeId};

use burn::tensor::{DType, Shape, Tensor, TensorPrimitive, backend::Backend};
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{CubeRuntime, kernel::into_contiguous, ops::numeric::empty_device_dtype};
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
    match runtime_of::<B>()? {
        #[cfg(feature = "cuda")]
        Runtime::Cuda => op.launch::<cubecl::cuda::CudaRuntime>(),
        #[cfg(feature = "wgpu")]
        Runtime::Wgpu => op.launch::<cubecl::wgpu::WgpuRuntime>(),
    }
}

/// The runtime tensor behind `tensor`, in a row-major layout (sharing its buffer when it already
/// is one); `None` if `B`'s tensors are not `R`'s or the float type is not f32/f16/bf16.
pub(super) fn to_cube<R: CubeRuntime, B: Backend, const D: usize>(
    tensor: &Tensor<B, D>,
) -> Option<CubeTensor<R>> {
    to_cube_strided(tensor).map(into_contiguous)
}

/// The runtime tensor behind `tensor` as it lies, strides and all (a view into a larger buffer
/// stays one); `None` as for [`to_cube`]. Only for kernels that index every input through its
/// strides.
pub(super) fn to_cube_strided<R: CubeRuntime, B: Backend, const D: usize>(
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

/// An uninitialised tensor of `like`'s device and float type, laid out by CubeCL's allocator
/// (which may pad rows: kernels index through the strides).
pub(super) fn empty_like<R: CubeRuntime, const D: usize>(
    like: &CubeTensor<R>,
    dims: [usize; D],
) -> CubeTensor<R> {
    empty_device_dtype(
        like.client.clone(),
        like.device.clone(),
        Shape::new(dims),
        like.dtype,
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
