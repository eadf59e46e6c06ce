//! SwiGLU activation of a fused gate/up projection.

use burn::tensor::{Tensor as BurnTensor, backend::Backend};
use burn_cubecl::CubeRuntime;
use cubecl::{calculate_cube_count_elemwise, prelude::*};

use super::dispatch::{CubeOp, empty_like, from_cube, to_cube};
use super::reduce::at;

/// `output[r, c] = silu(gate_up[r, c]) * gate_up[r, inter + c]` for `output` `[rows, inter]`.
#[cube(launch_unchecked)]
fn swiglu_kernel<F: Float>(
    gate_up: &Tensor<F>,
    output: &mut Tensor<F>,
    #[define(F)] _dtype: StorageType,
) {
    if ABSOLUTE_POS >= output.len() {
        terminate!();
    }
    let inter = output.shape(1);
    let row = ABSOLUTE_POS / inter;
    let column = ABSOLUTE_POS % inter;
    let gate = f32::cast_from(gate_up[at(gate_up, row, column)]);
    let up = f32::cast_from(gate_up[at(gate_up, row, inter + column)]);
    output[at(output, row, column)] = F::cast_from(gate / (f32::new(1.0) + (-gate).exp()) * up);
}

/// The operation behind [`super::swiglu`].
pub(super) struct SwiGlu<'a, B: Backend> {
    pub gate_up: &'a BurnTensor<B, 2>,
}

impl<B: Backend> CubeOp<B> for SwiGlu<'_, B> {
    type Output = BurnTensor<B, 2>;

    fn launch<R: CubeRuntime>(self) -> Option<Self::Output> {
        let [rows, width] = self.gate_up.dims();
        if rows == 0 || width == 0 || width % 2 != 0 {
            return None;
        }
        let gate_up = to_cube::<R, B, 2>(self.gate_up)?;
        let output = empty_like(&gate_up, [rows, width / 2]);
        let client = gate_up.client.clone();
        let units = rows * width / 2;
        let cube_dim = CubeDim::new(&client, units);
        let cube_count = calculate_cube_count_elemwise(&client, units, cube_dim);
        let dtype = gate_up.dtype;
        unsafe {
            swiglu_kernel::launch_unchecked::<R>(
                &client,
                cube_count,
                cube_dim,
                gate_up.into_tensor_arg(),
                output.clone().into_tensor_arg(),
                dtype.into(),
            )
        };
        from_cube::<R, B, 2>(output)
    }
}
