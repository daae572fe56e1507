//! Cloud-storage ndjson bodies, for a topic file and a query-feed file, with a small line limit
//! so the over-long-line path is reached too; the first byte picks the route and the limit.
#![no_main]

use cdc_sink::ident::Ident;
use cdc_sink::source::webhook::{decode, DecodeLimits, Payload, Route};
use libfuzzer_sys::fuzz_target;

mod common;

fuzz_target!(|data: &[u8]| {
    let Some((&pick, body)) = data.split_first() else {
        return;
    };
    let route = Route::Ndjson {
        schema: common::schema(),
        table: Ident::new(if pick & 2 == 0 { "t" } else { "two" }),
        query: pick & 1 == 1,
    };
    let limits = DecodeLimits {
        ndjson_line_bytes: if pick & 4 == 0 { 65_536 } else { 64 },
    };
    let pks = common::primary_keys();
    if let Ok(Payload::Mutations(rows)) = decode(&route, body, &pks, &limits) {
        for (table, _) in rows {
            assert_eq!(table.schema, common::schema());
        }
    }
});
