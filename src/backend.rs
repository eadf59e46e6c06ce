//! Backend selection: type aliases for the compiled-in backends and a runtime choice.

use crate::error::{Error, Result};

/// The default CPU backend: `flex` when enabled (fastest on our reference machine), else ndarray.
#[cfg(feature = "flex")]
pub type Cpu = burn::backend::Flex;
/// The default CPU backend: `flex` when enabled (fastest on our reference machine), else ndarray.
#[cfg(all(not(feature = "flex"), feature = "ndarray"))]
pub type Cpu = burn::backend::NdArray;

/// NVIDIA GPUs through CUDA (kernels compiled at run time with NVRTC).
#[cfg(feature = "cuda")]
pub type Cuda = burn::backend::Cuda;

/// Vulkan / Metal / DX12 GPUs (and Mesa's software Vulkan) through WGPU.
#[cfg(feature = "wgpu")]
pub type Wgpu = burn::backend::Wgpu;

/// A backend chosen at run time (e.g. from a command-line flag).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    Cpu,
    Cuda,
    Wgpu,
}

impl BackendKind {
    /// Fails with a message naming the cargo feature when the backend was not compiled in.
    pub fn ensure_compiled(self) -> Result<Self> {
        let compiled = match self {
            BackendKind::Cpu => cfg!(any(feature = "flex", feature = "ndarray")),
            BackendKind::Cuda => cfg!(feature = "cuda"),
            BackendKind::Wgpu => cfg!(feature = "wgpu"),
        };
        if compiled {
            Ok(self)
        } else {
            let feature = match self {
                BackendKind::Cpu => "flex",
                BackendKind::Cuda => "cuda",
                BackendKind::Wgpu => "wgpu",
            };
            Err(Error::Backend(format!(
                "the {self:?} backend is not compiled in: rebuild with `--features {feature}`"
            )))
        }
    }
}

impl std::str::FromStr for BackendKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "cpu" => Ok(BackendKind::Cpu),
            "cuda" => Ok(BackendKind::Cuda),
            "wgpu" | "vulkan" => Ok(BackendKind::Wgpu),
            other => Err(Error::Backend(format!(
                "unknown backend `{other}` (expected cpu, cuda or wgpu)"
            ))),
        }
    }
}

/// The default WGPU device, checked to be usable.
///
/// Burn initialises the adapter lazily and panics when none exists; this probes it once and turns
/// that into an error that says what to install.
#[cfg(feature = "wgpu")]
pub fn wgpu_device() -> Result<burn::backend::wgpu::WgpuDevice> {
    let device = burn::backend::wgpu::WgpuDevice::default();
    let probe = device.clone();
    let usable = std::panic::catch_unwind(move || {
        burn::tensor::Tensor::<Wgpu, 1>::ones([1], &probe).into_data()
    });
    match usable {
        Ok(_) => Ok(device),
        Err(_) => Err(Error::Backend(
            "the wgpu backend found no usable adapter: install a Vulkan driver and loader \
             (on Debian: `apt-get install libvulkan1 mesa-vulkan-drivers` for a software one)"
                .into(),
        )),
    }
}

/// Parses a float type name as used on the command line: `f32`, `f16` or `bf16`.
pub fn parse_float_dtype(name: &str) -> Result<burn::tensor::DType> {
    use burn::tensor::DType;
    match name.to_ascii_lowercase().as_str() {
        "f32" => Ok(DType::F32),
        "f16" => Ok(DType::F16),
        "bf16" => Ok(DType::BF16),
        other => Err(Error::InvalidSettings(format!(
            "unknown float type `{other}` (expected f32, f16 or bf16)"
        ))),
    }
}
