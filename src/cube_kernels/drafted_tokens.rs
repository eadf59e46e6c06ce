//! The drafted tokens of an overlapped round put into its upload, on the device.
//!
//! With overlapped drafting (`DraftTiming::Overlapped`) the host packs a round's tree while the
//! device is still drafting its beams, so the round's upload holds stand-ins (`-1 - i` for
//! element `i` of the drafted beams) where drafted tokens go. One launch replaces them; Burn's
//! ops took four (a comparison, an index, a gather and a masked write), each a task for the
//! host.

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use burn_cubecl::CubeRuntime;
use cubecl::{calculate_cube_count_elemwise, prelude::*};

use super::dispatch::{CubeOp, empty_int_like, from_cube_int, to_cube_int};
use super::reduce::{Strides3, offset3, scalars, strides3};

/// One unit per value of `values` `[len]`: a non-negative value is copied, a stand-in `-1 - i`
/// becomes element `i` of `drafted` `[live, beam_count, length]` (row-major numbering, read
/// through its strides).
#[cube(launch_unchecked)]
fn resolve_drafted_kernel<I: Int>(
    values: &Array<I>,
    drafted: &Array<I>,
    output: &mut Array<I>,
    drafted_strides: &Strides3,
    len: u32,
    beam_count: u32,
    length: u32,
    #[define(I)] _dtype: StorageType,
) {
    if ABSOLUTE_POS >= len as usize {
        terminate!();
    }
    let value = i32::cast_from(values[ABSOLUTE_POS]);
    if value < 0 {
        let index = usize::cast_from(-1 - value);
        let (beam_count, length) = (beam_count as usize, length as usize);
        let rest = index / length;
        output[ABSOLUTE_POS] = drafted[offset3(
            drafted_strides,
            rest / beam_count,
            rest % beam_count,
            index % length,
        )];
    } else {
        output[ABSOLUTE_POS] = values[ABSOLUTE_POS];
    }
}

/// `values` with its stand-ins replaced by the drafted tokens they stand for.
pub(super) struct ResolveDrafted<'a, B: Backend> {
    /// Shape `[len]`.
    pub values: &'a Tensor<B, 1, burn::tensor::Int>,
    /// Shape `[live, M, C]`.
    pub drafted: &'a Tensor<B, 3, burn::tensor::Int>,
}

impl<B: Backend> CubeOp<B> for ResolveDrafted<'_, B> {
    type Output = Tensor<B, 1, burn::tensor::Int>;

    fn launch<R: CubeRuntime>(self) -> Option<Self::Output> {
        let [len] = self.values.dims();
        let [live, beam_count, length] = self.drafted.dims();
        if len == 0 || live == 0 || beam_count == 0 || length == 0 {
            return None;
        }
        let values = to_cube_int::<R, B, 1>(self.values)?;
        let drafted = to_cube_int::<R, B, 3>(self.drafted)?;
        // Tokens and stand-ins are read as i32: Burn's integer tensors here are i32 or i64.
        let dtype = values.dtype;
        if drafted.dtype != dtype
            || !matches!(dtype, burn::tensor::DType::I32 | burn::tensor::DType::I64)
        {
            return None;
        }
        let output = empty_int_like(&values, [len], dtype);
        let drafted_strides = strides3(&drafted)?;
        let [len_arg, beam_count, length] = scalars(&[len, beam_count, length])?;
        let client = values.client.clone();
        let cube_dim = CubeDim::new(&client, len);
        let cube_count = calculate_cube_count_elemwise(&client, len, cube_dim);
        // Arrays bound at the tensors' offsets: `values` is a fresh contiguous upload, `drafted`
        // is read through its strides, `output` is new and row-major.
        unsafe {
            resolve_drafted_kernel::launch_unchecked::<R>(
                &client,
                cube_count,
                cube_dim,
                values.into_array_arg(),
                drafted.into_array_arg(),
                output.clone().into_array_arg(),
                drafted_strides,
                len_arg,
                beam_count,
                length,
                dtype.into(),
            )
        };
        from_cube_int::<R, B, 1>(output)
    }
}
