//! Fuzzes the `.sir` parser: it must never panic, and whatever it accepts must print to text
//! that parses back to the same module and prints identically (the round-trip property).
#![no_main]

use libfuzzer_sys::fuzz_target;
use sparse_ir::text;

fuzz_target!(|data: &[u8]| {
    let Ok(input) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(module) = text::parse(input) {
        let printed = text::print(&module);
        let again = match text::parse(&printed) {
            Ok(m) => m,
            Err(e) => panic!("printed module does not parse: {e}\n{printed}"),
        };
        assert_eq!(again, module, "print → parse changed the module");
        assert_eq!(text::print(&again), printed, "printing is not stable");
    }
});
