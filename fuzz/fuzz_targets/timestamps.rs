//! HLC text (`updated`, `resolved`) and `.RESOLVED` file digits. What parses prints back to text
//! that parses to the same timestamp.
#![no_main]

use cdc_sink::hlc::Hlc;
use cdc_sink::source::webhook::parse_resolved_digits;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(hlc) = text.parse::<Hlc>() {
        let printed = hlc.to_string();
        assert_eq!(printed.parse::<Hlc>().ok(), Some(hlc), "{printed}");
        // Neighbours are on the right side (the ends saturate).
        assert!(
            hlc.next() > hlc || (hlc == Hlc::MAX && hlc.next() == hlc),
            "{hlc}"
        );
        assert!(hlc.before() <= hlc, "{hlc}");
        let _ = (hlc.before(), hlc.seconds(), hlc.to_decimal());
    }
    if let Ok(hlc) = parse_resolved_digits(text) {
        assert_eq!(hlc.to_string().parse::<Hlc>().ok(), Some(hlc));
    }
});
