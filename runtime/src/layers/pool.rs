//! [`MaxPool2d`]: non-overlapping max pooling.

use super::{batch_of, check_matrix, Layer, Shape};
use crate::error::{Result, RuntimeError};
use crate::tensor::Matrix;
use crate::weights::WeightGradMode;

/// Max pooling over `k × k` windows with stride `k` (PyTorch's `max_pool2d(x, k)`: the
/// output is `⌊H/k⌋ × ⌊W/k⌋`; ties go to the first maximum in row-major window order).
///
/// No argmax is stored: the backward pass finds, per output, the first window position whose
/// input equals the output (both loops are branch-free selects that vectorise).
#[derive(Debug)]
pub struct MaxPool2d {
    name: String,
    input: Shape,
    output: Shape,
    k: usize,
    dims: Option<(usize, usize)>,
    /// Scratch of the backward pass: the gradient not yet routed, per column.
    pending: Vec<f32>,
    /// Input rows outside every window (when `k` does not divide the height or width).
    uncovered: Vec<u32>,
    /// `taps[o·k² + w]`: the input row of window position `w` of output row `o`.
    taps: Vec<u32>,
    /// The input is a ReLU's output: the input gradient is zero where it is not positive.
    relu_input: bool,
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
        let mut covered = vec![false; input.features()];
        for &t in &taps {
            covered[t as usize] = true;
        }
        let uncovered = (0..input.features() as u32)
            .filter(|&r| !covered[r as usize])
            .collect();
        Ok(MaxPool2d {
            name: name.to_string(),
            input,
            output,
            k,
            dims: None,
            pending: Vec::new(),
            uncovered,
            taps,
            relu_input: false,
        })
    }
}

impl Layer for MaxPool2d {
    fn mask_relu_input_grad(&mut self) -> bool {
        self.relu_input = true;
        true
    }

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
        self.pending = vec![0.0; batch];
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
            yr[..batch].copy_from_slice(&x.row(taps[0] as usize)[..batch]);
            for &tap in &taps[1..] {
                for (out, &v) in yr[..batch].iter_mut().zip(&x.row(tap as usize)[..batch]) {
                    *out = if v > *out { v } else { *out };
                }
            }
            yr[batch..].fill(0.0);
        }
        Ok(())
    }

    fn backward(
        &mut self,
        x: &Matrix,
        y: &Matrix,
        dy: &mut Matrix,
        dx: Option<&mut Matrix>,
        _mode: WeightGradMode,
    ) -> Result<()> {
        let (batch, ld) = batch_of(&self.name, self.dims)?;
        check_matrix(&self.name, "input", x, self.input.features(), batch, ld)?;
        check_matrix(&self.name, "output", y, self.output.features(), batch, ld)?;
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
        for &r in &self.uncovered {
            dx.row_mut(r as usize).fill(0.0);
        }
        let kk = self.k * self.k;
        let relu = self.relu_input;
        let pending = &mut self.pending[..batch];
        for o in 0..self.output.features() {
            let taps = &self.taps[o * kk..(o + 1) * kk];
            let yr = &y.row(o)[..batch];
            pending.copy_from_slice(&dy.row(o)[..batch]);
            for &tap in taps {
                let xr = &x.row(tap as usize)[..batch];
                let dxr = dx.row_mut(tap as usize);
                // Windows do not overlap: each input row belongs to one window and is
                // written once. The first input equal to the maximum takes the gradient.
                for ((d, p), (&v, &m)) in dxr[..batch]
                    .iter_mut()
                    .zip(pending.iter_mut())
                    .zip(xr.iter().zip(yr))
                {
                    // Arithmetic rather than selects, so that it vectorises.
                    // With a ReLU before, a window whose maximum is 0 passes nothing back,
                    // as the ReLU's own mask would have made of it.
                    let hit = f32::from(u8::from(v == m) & u8::from(!relu || v > 0.0));
                    *d = *p * hit;
                    *p -= *d;
                }
                dxr[batch..].fill(0.0);
            }
        }
        Ok(())
    }
}
