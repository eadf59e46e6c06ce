//! The draft head's activations in one kernel: `residual + silu(a + b + bias)`.
//!
//! Burn composes SiLU from seven launches (`x · sigmoid(x)` as negate, exp, add, reciprocal and
//! multiplies); with the bias adds and the residual add, a draft step's RNN update and two
//! residual blocks cost 27 launches of element-wise work. Here each is one.

use burn::tensor::{Tensor as BurnTensor, backend::Backend};
use burn_cubecl::{CubeRuntime, tensor::CubeTensor};
use cubecl::{calculate_cube_count_elemwise, prelude::*};

use super::dispatch::{CubeOp, empty_like, from_cube, to_cube};
use super::reduce::at;

/// `output[r, c] = residual[r, c] + silu(a[r, c] + b[r, c] + bias[0, c])`, each optional term
/// read only when its flag is set; computed in f32.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn silu_sum_kernel<F: Float>(
    a: &Tensor<F>,
    b: &Tensor<F>,
    bias: &Tensor<F>,
    residual: &Tensor<F>,
    output: &mut Tensor<F>,
    #[comptime] with_b: bool,
    #[comptime] with_bias: bool,
    #[comptime] with_residual: bool,
    #[define(F)] _dtype: StorageType,
) {
    if ABSOLUTE_POS >= output.len() {
        terminate!();
    }
    let width = output.shape(1);
    let row = ABSOLUTE_POS / width;
    let column = ABSOLUTE_POS % width;
    let mut x = f32::cast_from(a[at(a, row, column)]);
    if with_b {
        x += f32::cast_from(b[at(b, row, column)]);
    }
    if with_bias {
        x += f32::cast_from(bias[at(bias, 0, column)]);
    }
    let mut y = x / (f32::new(1.0) + (-x).exp());
    if with_residual {
        y += f32::cast_from(residual[at(residual, row, column)]);
    }
    output[at(output, row, column)] = F::cast_from(y);
}

/// The operation behind [`super::silu_sum`].
pub(super) struct SiluSum<'a, B: Backend, const D: usize> {
    pub a: &'a BurnTensor<B, D>,
    pub b: Option<&'a BurnTensor<B, D>>,
    pub bias: Option<&'a BurnTensor<B, 1>>,
    pub residual: Option<&'a BurnTensor<B, D>>,
}

impl<B: Backend, const D: usize> CubeOp<B> for SiluSum<'_, B, D> {
    type Output = BurnTensor<B, D>;

    fn launch<R: CubeRuntime>(self) -> Option<Self::Output> {
        let dims = self.a.dims();
        let width = dims[D - 1];
        let rows = dims[..D - 1].iter().product::<usize>();
        if rows == 0
            || width == 0
            || self.b.is_some_and(|b| b.dims() != dims)
            || self.residual.is_some_and(|r| r.dims() != dims)
            || self.bias.is_some_and(|bias| bias.dims() != [width])
        {
            return None;
        }
        let flat = |t: &BurnTensor<B, D>| to_cube::<R, B, 2>(&t.clone().reshape([rows, width]));
        let a = flat(self.a)?;
        let b = match self.b {
            Some(b) => Some(flat(b)?),
            None => None,
        };
        let residual = match self.residual {
            Some(residual) => Some(flat(residual)?),
            None => None,
        };
        let bias = match self.bias {
            Some(bias) => Some(to_cube::<R, B, 2>(&bias.clone().reshape([1, width]))?),
            None => None,
        };
        if [&b, &bias, &residual]
            .into_iter()
            .flatten()
            .any(|term| term.dtype != a.dtype)
        {
            return None;
        }
        let output = empty_like(&a, [rows, width]);
        let client = a.client.clone();
        let units = rows * width;
        let cube_dim = CubeDim::new(&client, units);
        let cube_count = calculate_cube_count_elemwise(&client, units, cube_dim);
        let dtype = a.dtype;
        // Absent terms are not read: any tensor of the right type stands in for them.
        let (with_b, with_bias, with_residual) = (b.is_some(), bias.is_some(), residual.is_some());
        let or_a = |term: Option<CubeTensor<R>>| term.unwrap_or_else(|| a.clone());
        unsafe {
            silu_sum_kernel::launch_unchecked::<R>(
                &client,
                cube_count,
                cube_dim,
                a.clone().into_tensor_arg(),
                or_a(b).into_tensor_arg(),
                or_a(bias).into_tensor_arg(),
                or_a(residual).into_tensor_arg(),
                output.clone().into_tensor_arg(),
                with_b,
                with_bias,
                with_residual,
                dtype.into(),
            )
        };
        from_cube::<R, B, 2>(output).map(|out| out.reshape(dims))
    }
}
