//! [`MaxPool2d`]: non-overlapping max pooling.

use super::{batch_of, check_matrix, Layer, Shape};
use crate::error::{Result, RuntimeError};
use crate::tensor::Matrix;
use crate::weights::WeightGradMode;

/// Max pooling over `k × k` windows with stride `k` (PyTorch's `max_pool2d(x, k)`: the
/// output is `⌊H/k⌋ × ⌊W/k⌋`; ties go to the first maximum in row-major window order).
#[derive(Debug)]
pub struct MaxPool2d {
    name: String,
    input: Shape,
    output: Shape,
    k: usize,
    dims: Option<(usize, usize)>,
    argmax: Vec<u8>,
    /// `taps[o·k² + w]`: the input row of window position `w` of output row `o`.
    taps: Vec<u32>,
}

impl MaxPool2d {
    /// Pooling with window and stride `k` on samples of `input`.
    pub fn new(name: &str, input: Shape, k: usize) -> Result<Self> {
        if k == 0 || k * k > 256 || input.height < k || input.width < k {
            return Err(RuntimeError::Shape(format!(
                "layer {name}: cannot max-pool a {input} input with window {k}"
            )));
        }
        let output = Shape::image(input.channels, input.height / k, input.width / k);
        let mut taps = Vec::with_capacity(output.features() * k * k);
        for c in 0..output.channels {
            for oh in 0..output.height {
                for ow in 0..output.width {
                    for ki in 0..k {
                        for kj in 0..k {
                            let row = (c * input.height + oh * k + ki) * input.width + ow * k + kj;
                            taps.push(row as u32);
                        }
                    }
                }
            }
        }
        Ok(MaxPool2d {
            name: name.to_string(),
            input,
            output,
            k,
            dims: None,
            argmax: Vec::new(),
            taps,
        })
    }
}

impl Layer for MaxPool2d {
    fn name(&self) -> &str {
        &self.name
    }

    fn input_shape(&self) -> Shape {
        self.input
    }

    fn output_shape(&self) -> Shape {
        self.output
    }

    fn set_batch(&mut self, batch: usize, ld: usize) -> Result<()> {
        self.dims = Some((batch, ld));
        self.argmax = vec![0; self.output.features() * ld];
        Ok(())
    }

    fn forward(&mut self, x: &Matrix, y: &mut Matrix) -> Result<()> {
        let (batch, ld) = batch_of(&self.name, self.dims)?;
        check_matrix(&self.name, "input", x, self.input.features(), batch, ld)?;
        check_matrix(&self.name, "output", y, self.output.features(), batch, ld)?;
        let kk = self.k * self.k;
        for o in 0..self.output.features() {
            let taps = &self.taps[o * kk..(o + 1) * kk];
            let yr = &mut y.as_mut_slice()[o * ld..(o + 1) * ld];
            let ar = &mut self.argmax[o * ld..(o + 1) * ld];
            yr[..batch].copy_from_slice(&x.row(taps[0] as usize)[..batch]);
            ar[..batch].fill(0);
            for (w, &tap) in taps.iter().enumerate().skip(1) {
                let xr = &x.row(tap as usize)[..batch];
                for ((out, arg), &v) in yr[..batch].iter_mut().zip(ar[..batch].iter_mut()).zip(xr) {
                    if v > *out {
                        *out = v;
                        *arg = w as u8;
                    }
                }
            }
            yr[batch..].fill(0.0);
        }
        Ok(())
    }

    fn backward(
        &mut self,
        _x: &Matrix,
        _y: &Matrix,
        dy: &mut Matrix,
        dx: Option<&mut Matrix>,
        _mode: WeightGradMode,
    ) -> Result<()> {
        let (batch, ld) = batch_of(&self.name, self.dims)?;
        check_matrix(
            &self.name,
            "output gradient",
            dy,
            self.output.features(),
            batch,
            ld,
        )?;
        let Some(dx) = dx else { return Ok(()) };
        check_matrix(
            &self.name,
            "input gradient",
            dx,
            self.input.features(),
            batch,
            ld,
        )?;
        dx.fill_zero();
        let dxs = dx.as_mut_slice();
        let kk = self.k * self.k;
        for o in 0..self.output.features() {
            let taps = &self.taps[o * kk..(o + 1) * kk];
            let dyr = &dy.row(o)[..batch];
            let ar = &self.argmax[o * ld..o * ld + batch];
            for (b, (&g, &w)) in dyr.iter().zip(ar).enumerate() {
                dxs[taps[w as usize] as usize * ld + b] += g;
            }
        }
        Ok(())
    }
}
