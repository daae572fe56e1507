// Shared by the webhook targets: the tables whose primary keys the decoder may look up.
use cdc_sink::ident::{Ident, Schema, Table};
use std::collections::HashMap;

pub fn schema() -> Schema {
    Schema::new("kv", "public")
}

pub fn primary_keys() -> HashMap<Table, Vec<Ident>> {
    let mut pks = HashMap::new();
    pks.insert(Table::new(schema(), "t"), vec![Ident::new("k")]);
    pks.insert(
        Table::new(schema(), "two"),
        vec![Ident::new("a"), Ident::new("B")],
    );
    pks
}
