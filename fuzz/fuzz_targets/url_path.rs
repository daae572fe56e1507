//! Request paths: routing, form unescaping, dates and `.RESOLVED` names.
#![no_main]

use cdc_sink::source::webhook::{parse_path, Route};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(path) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(route) = parse_path(path) {
        let schema = route.schema();
        // A routed schema can be written back as a quoted name.
        let _ = schema.quoted();
        if let Route::Resolved { time, .. } = route {
            let _ = time.to_string();
        }
    }
});
