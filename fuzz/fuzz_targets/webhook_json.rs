//! Webhook bodies (`{"payload":[…],"length":N}` and `{"resolved":"…"}`) for a schema-level and a
//! table-level route; the first byte picks the route.
#![no_main]

use cdc_sink::ident::Ident;
use cdc_sink::source::webhook::{decode, DecodeLimits, Payload, Route};
use libfuzzer_sys::fuzz_target;

mod common;

fuzz_target!(|data: &[u8]| {
    let Some((&pick, body)) = data.split_first() else {
        return;
    };
    let route = Route::Webhook {
        schema: common::schema(),
        table: (pick & 1 == 1).then(|| Ident::new("t")),
    };
    let pks = common::primary_keys();
    if let Ok(Payload::Mutations(rows)) = decode(&route, body, &pks, &DecodeLimits::default()) {
        for (table, m) in rows {
            // Every accepted row names a table of the route's schema.
            assert_eq!(table.schema, common::schema());
            let _ = m.is_delete();
        }
    }
});
