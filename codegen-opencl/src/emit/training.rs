//! The training program: the parts of an SGD step that are not sparse ops (the loss and its
//! gradient, the ReLU mask with the bias gradient, the optimiser update, the momentum of
//! inactive weights), so that a training loop can keep weights, momentum and activations on
//! the device. Like the generic `csr` program it depends on nothing but the device, so it is
//! built once per device.
//!
//! The arithmetic is the host runtime's, operation for operation, and `FP_CONTRACT` is off
//! (Rust never fuses `a·b + c`), so the two differ only where the device's `exp`/`log` or
//! summation order differ. Every kernel is one-dimensional, one work-item per row, column
//! or element, and guards the work-items past its extent.

/// Work-items per work-group of every training kernel.
pub const TRAINING_LOCAL_SIZE: usize = 64;

/// `relu_bias_grad(y, dy, bias_grad, rows, batch, ld, relu)`: one work-item per row.
pub const RELU_BIAS_GRAD: &str = "relu_bias_grad";
/// `nll_grad(logits, labels, grad, loss, classes, n, batch, ld)`: one work-item per column.
pub const NLL_GRAD: &str = "nll_grad";
/// `sgd(w, g, buf, n, lr, mu, wd, nesterov)`: one work-item per element.
pub const SGD: &str = "sgd";
/// `momentum_accumulate(m, g, n, factor)`: one work-item per element.
pub const MOMENTUM_ACCUMULATE: &str = "momentum_accumulate";
/// `gather(src, index, dst, n, src_len)`: one work-item per element of `dst`.
pub const GATHER: &str = "gather";

/// The OpenCL C source of the training program.
pub fn training_library() -> String {
    TRAINING_SOURCE.to_string()
}

const TRAINING_SOURCE: &str = r#"// sparsejit OpenCL C: the training program. Everything of an SGD step that is not a sparse
// op, so that weights, momentum and activations stay on the device between steps. It does
// not depend on any pattern: built once per device.
// Activations are feature-major [features x ld]: element (f, b) at f*ld + b; columns
// batch..ld are padding that no kernel reads or writes.
#pragma OPENCL FP_CONTRACT OFF

// The ReLU mask and the bias gradient of one layer, one work-item per row r:
// dy[r,b] = 0 where y[r,b] <= 0 (or NaN) when relu != 0; bias_grad[r] = sum over b < batch.
__kernel void relu_bias_grad(__global const float *y, __global float *dy,
                             __global float *bias_grad, int rows, int batch, int ld,
                             int relu)
{
    int r = get_global_id(0);
    if (r >= rows) return;
    __global const float *out = y + r * ld;
    __global float *d = dy + r * ld;
    float sum = 0.0f;
    for (int b = 0; b < batch; ++b) {
        float g = d[b];
        if (relu != 0 && !(out[b] > 0.0f)) {
            g = 0.0f;
            d[b] = 0.0f;
        }
        sum += g;
    }
    bias_grad[r] = sum;
}

// Log-softmax + negative log-likelihood, one work-item per column b < batch:
// loss[b] = logsumexp(z[.,b]) - z[label_b, b] for b < n (NaN for a label >= classes), and
// grad[c,b] = (softmax(z[.,b])_c - [c == label_b]) / n, zero in the columns n..batch.
__kernel void nll_grad(__global const float *logits, __global const uint *labels,
                       __global float *grad, __global float *loss, int classes, int n,
                       int batch, int ld)
{
    int b = get_global_id(0);
    if (b >= batch) return;
    if (b >= n) {
        for (int c = 0; c < classes; ++c) grad[c * ld + b] = 0.0f;
        return;
    }
    float m = logits[b];
    for (int c = 1; c < classes; ++c) m = fmax(m, logits[c * ld + b]);
    float s = 0.0f;
    for (int c = 0; c < classes; ++c) s += exp(logits[c * ld + b] - m);
    float lse = m + log(s);
    float inv_n = 1.0f / (float)n;
    uint label = labels[b];
    for (int c = 0; c < classes; ++c) {
        float g = exp(logits[c * ld + b] - lse) * inv_n;
        if ((uint)c == label) g = g - inv_n;
        grad[c * ld + b] = g;
    }
    loss[b] = label < (uint)classes ? lse - logits[label * ld + b] : NAN;
}

// SGD with momentum mu and weight decay wd, one work-item per element:
// g' = g + wd*w; buf = mu*buf + g'; w -= lr*(g' + mu*buf) (Nesterov) or lr*buf.
__kernel void sgd(__global float *w, __global const float *g, __global float *buf, int n,
                  float lr, float mu, float wd, int nesterov)
{
    int i = get_global_id(0);
    if (i >= n) return;
    float gi = g[i] + wd * w[i];
    float m = mu * buf[i] + gi;
    buf[i] = m;
    w[i] = w[i] - (nesterov != 0 ? lr * (gi + mu * m) : lr * m);
}

// The momentum of every entry from a dense gradient: m = factor*m + g (factor = mu^k,
// with the decay of the k-1 steps that computed no dense gradient folded in).
__kernel void momentum_accumulate(__global float *m, __global const float *g, int n,
                                  float factor)
{
    int i = get_global_id(0);
    if (i >= n) return;
    m[i] = factor * m[i] + g[i];
}

// dst[k] = src[index[k]] (an index past src_len gives NaN): the gradient of the active
// entries, in CSR order, from the dense gradient.
__kernel void gather(__global const float *src, __global const uint *index,
                     __global float *dst, int n, int src_len)
{
    int k = get_global_id(0);
    if (k >= n) return;
    uint i = index[k];
    dst[k] = i < (uint)src_len ? src[i] : NAN;
}
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_library_defines_every_kernel_once_and_turns_contraction_off() {
        let source = training_library();
        for name in [RELU_BIAS_GRAD, NLL_GRAD, SGD, MOMENTUM_ACCUMULATE, GATHER] {
            let decl = format!("__kernel void {name}(");
            assert_eq!(source.matches(&decl).count(), 1, "{name}");
        }
        assert!(source.contains("#pragma OPENCL FP_CONTRACT OFF"));
    }
}
