// Active-active replication between two regions (the seed demo's logic).
//
// Rows carry `_source` (the region that wrote them) and `_timestamp` (when, plus a margin).
// A sink applying to region R drops rows whose `_source` is R: they are R's own writes
// coming back. Conflicts are settled by `_timestamp` (compare-and-set); a stale row that the
// standard three-way merge cannot reconcile goes to the dead-letter table, named after the
// table.
import * as api from "cdc-sink@v1";
import { Document, Table } from "cdc-sink@v1";

export function replicateTo(region: string, schema: string, tables: string[]) {
  console.log("configureSource " + schema);
  api.configureSource(schema, {
    dispatch: (doc: Document, meta: Document): Record<Table, Document[]> => {
      let ret: Record<Table, Document[]> = {};
      if (doc._source !== region) {
        ret[meta.table as string] = [doc];
      }
      return ret;
    },
    deletesTo: "",
  });

  for (let table of tables) {
    console.log("configureTable " + table);
    api.configureTable(table, {
      cas: ["_timestamp"],
      merge: api.standardMerge(() => ({ dlq: table })),
    });
  }
}
