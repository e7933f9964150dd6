//! Pieces of OpenCL C text shared by the emitters.

/// The layout comment every program carries.
pub(super) const LAYOUT_COMMENT: &str = "\
// layout: feature-major [features x batch], element (f, b) at f*ld + b;
//         weight values are one float array in the pattern's CSR order.
";

/// Helper functions every program may use.
pub(super) const HELPERS: &str = "
// sum over b < n of a[b] * c[b], eight lanes at a time
inline float sj_dot(const __global float* restrict a,
                    const __global float* restrict c,
                    const int n)
{
    float8 acc8 = (float8)(0.0f);
    int b = 0;
    for (; b + 8 <= n; b += 8)
        acc8 += vload8(0, a + b) * vload8(0, c + b);
    float4 acc4 = acc8.lo + acc8.hi;
    float acc = (acc4.x + acc4.y) + (acc4.z + acc4.w);
    for (; b < n; ++b)
        acc += a[b] * c[b];
    return acc;
}
";

/// `sj_load` and `sj_store`: `n ≤ w` batch columns as one `float{w}` vector (the lanes from
/// `n` on are zero when loading and untouched when storing, so nothing past the batch is
/// read or written). Empty for `w = 1`.
pub(super) fn vector_helpers(w: usize) -> String {
    if w <= 1 {
        return String::new();
    }
    format!(
        "
// n <= {w} batch columns from p as one vector; lanes from n on are zero
inline float{w} sj_load(const __global float* restrict p, const int n)
{{
    if (n == {w})
        return vload{w}(0, p);
    float t[{w}];
    for (int i = 0; i < {w}; ++i)
        t[i] = i < n ? p[i] : 0.0f;
    return vload{w}(0, t);
}}

// the first n <= {w} lanes of v to p
inline void sj_store(const float{w} v, __global float* restrict p, const int n)
{{
    if (n == {w}) {{
        vstore{w}(v, 0, p);
        return;
    }}
    float t[{w}];
    vstore{w}(v, 0, t);
    for (int i = 0; i < n; ++i)
        p[i] = t[i];
}}
"
    )
}

/// `__global const float* restrict NAME` (input) or `__global float* restrict NAME` (output).
pub(super) fn float_param(name: &str, output: bool) -> String {
    if output {
        format!("__global float* restrict {name}")
    } else {
        format!("__global const float* restrict {name}")
    }
}

/// The narrowest unsigned type that holds every value below `bound`: `ushort` or `uint`.
pub(super) fn index_type(bound: usize) -> (&'static str, usize) {
    if bound <= 1 << 16 {
        ("ushort", 2)
    } else {
        ("uint", 4)
    }
}

/// A `__constant` array definition, 16 values a line. An empty array gets one padding zero
/// (C has no zero-length arrays); kernels never read it.
pub(super) fn constant_table(name: &str, ty: &str, values: &[u32]) -> String {
    let n = values.len();
    let mut s = format!("__constant {ty} {name}[{}] = {{", n.max(1));
    if n == 0 {
        s.push_str(" 0 /* padding: empty */ };\n");
        return s;
    }
    for (i, v) in values.iter().enumerate() {
        if i % 16 == 0 {
            s.push_str("\n    ");
        } else {
            s.push(' ');
        }
        s.push_str(&v.to_string());
        s.push(',');
    }
    s.push_str("\n};\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_wrap_and_pad() {
        let t = constant_table("COL", "ushort", &(0..18u32).collect::<Vec<_>>());
        assert!(
            t.starts_with("__constant ushort COL[18] = {\n    0, 1,"),
            "{t}"
        );
        assert!(t.contains("15,\n    16, 17,\n};"), "{t}");
        let e = constant_table("COL", "uint", &[]);
        assert_eq!(e, "__constant uint COL[1] = { 0 /* padding: empty */ };\n");
        assert_eq!(index_type(65536), ("ushort", 2));
        assert_eq!(index_type(65537), ("uint", 4));
    }
}
