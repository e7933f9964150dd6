//! Fuzzes the mask-file readers: `parse_npy` and `parse_safetensors` must never panic on any
//! bytes, and whatever they accept must survive a write → read round trip (compared by the
//! encoded bytes, so NaN payloads count too), as must the mask built from it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sparse_ir::mask_io::{
    encode_npy, encode_safetensors, parse_npy, parse_safetensors, parse_safetensors_all,
    safetensors_names, NdArray,
};

/// The array's canonical bytes (a `.npy` encoding), for bitwise comparison.
fn canon(a: &NdArray) -> Vec<u8> {
    encode_npy(a).expect("a parsed array encodes")
}

/// A mask built from a parsed array writes back to the same pattern.
fn check_mask(a: &NdArray) {
    if let Ok(pattern) = a.to_pattern() {
        let back = NdArray::from_pattern(&pattern, &a.shape).expect("pattern fits its shape");
        assert_eq!(back.to_pattern().expect("written mask reads"), pattern);
    }
}

fuzz_target!(|data: &[u8]| {
    // .npy
    if let Ok(a) = parse_npy(data) {
        let bytes = canon(&a);
        let again = parse_npy(&bytes).expect("encoded .npy parses");
        assert_eq!(canon(&again), bytes, ".npy round trip changed the array");
        check_mask(&a);
    }

    // safetensors: every tensor by name, then all at once
    if let Ok(names) = safetensors_names(data) {
        for name in names.iter().take(16) {
            if let Ok(a) = parse_safetensors(data, name) {
                check_mask(&a);
            }
        }
    }
    let _ = parse_safetensors(data, "fc1.mask");
    if let Ok(all) = parse_safetensors_all(data) {
        let named: Vec<(&str, &NdArray)> = all.iter().map(|(n, a)| (n.as_str(), a)).collect();
        let bytes = encode_safetensors(&named).expect("parsed tensors encode");
        let again = parse_safetensors_all(&bytes).expect("encoded safetensors parse");
        assert_eq!(again.len(), all.len());
        for ((n1, a1), (n2, a2)) in all.iter().zip(&again) {
            assert_eq!(n1, n2);
            assert_eq!(canon(a1), canon(a2), "safetensors round trip changed {n1}");
            let single = parse_safetensors(data, n1).expect("listed tensor parses alone");
            assert_eq!(canon(&single), canon(a1));
        }
    }
});
