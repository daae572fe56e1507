//! Column values → text parameters (every kind), number normalisation and dotted names.
#![no_main]

use cdc_sink::apply::value::{normalise_number, to_param, Kind};
use cdc_sink::ident::parse_dotted;
use libfuzzer_sys::fuzz_target;
use serde_json::value::RawValue;

const KINDS: [Kind; 5] = [
    Kind::Scalar,
    Kind::Json,
    Kind::Geo,
    Kind::Array { json: false },
    Kind::Array { json: true },
];

fuzz_target!(|data: &[u8]| {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let kind = KINDS[usize::from(pick) % KINDS.len()];
    if let Ok(raw) = serde_json::from_str::<&RawValue>(text) {
        let _ = to_param(kind, raw);
    }
    let _ = normalise_number(text);
    if let Ok(parts) = parse_dotted(text) {
        // Quoted names parse back to the same parts.
        let quoted: Vec<String> = parts.iter().map(|p| p.quoted()).collect();
        let again = parse_dotted(&quoted.join(".")).expect("quoted names parse");
        assert_eq!(again.len(), parts.len());
        for (a, b) in again.iter().zip(&parts) {
            assert_eq!(a.raw(), b.raw());
        }
    }
});
