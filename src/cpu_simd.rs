//! The vector instruction sets the CPU kernels are compiled for, and which one this CPU runs.
//!
//! [`crate::panel_matmul`], [`crate::skinny_matmul`] and the CPU attention each ship an AVX-512,
//! an AVX2 + FMA and a portable variant of their loops; [`Simd::detect`] picks the widest the CPU
//! has. The panel product and the attention compute the same bits in every variant; the skinny
//! kernel's lane count sets its summation order, so one machine always takes the same variant.

/// An instruction set the kernels have a variant for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Simd {
    /// AVX-512F (with AVX2 and FMA): 32 vector registers of 16 lanes.
    #[cfg(target_arch = "x86_64")]
    Avx512,
    /// AVX2, FMA and F16C (every CPU with the first two has the third): 16 vector registers of
    /// 8 lanes.
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// Plain Rust, vectorised as the compiler sees fit.
    Portable,
}

impl Simd {
    /// The widest variant this CPU runs.
    pub(crate) fn detect() -> Self {
        *Self::available().last().unwrap_or(&Self::Portable)
    }

    /// Every variant this CPU runs, narrowest first (tests compare them all).
    pub(crate) fn available() -> Vec<Self> {
        let mut all = vec![Self::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
                && std::arch::is_x86_feature_detected!("f16c")
            {
                all.push(Self::Avx2);
                if std::arch::is_x86_feature_detected!("avx512f") {
                    all.push(Self::Avx512);
                }
            }
        }
        all
    }
}
