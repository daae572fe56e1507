//! Behaviour of the userscript layer without a database: configuration capture, dispatch,
//! map, merge, errors and worker replacement.

use super::*;
use crate::apply::merge::{ConflictMeta, Row};
use crate::hlc::Hlc;
use std::path::PathBuf;

/// Writes `files` into a fresh directory; the first one is the main script.
fn files(list: &[(&str, &str)]) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    for (name, text) in list {
        std::fs::write(dir.path().join(name), text).expect("write");
    }
    let main = dir.path().join(list[0].0);
    (dir, main)
}

fn load(list: &[(&str, &str)]) -> (tempfile::TempDir, Userscript) {
    let (dir, main) = files(list);
    let s = Userscript::load(&main, &["flushSize", "bestEffortOnly"])
        .unwrap_or_else(|e| panic!("load: {e}"));
    (dir, s)
}

fn load_err(list: &[(&str, &str)]) -> ScriptError {
    let (_dir, main) = files(list);
    Userscript::load(&main, &["flushSize"]).expect_err("the script must not load")
}

fn kv() -> Schema {
    Schema::new("kv", "public")
}

fn table(name: &str) -> Table {
    Table::new(kv(), name)
}

fn info() -> SchemaInfo {
    schema_from_specs(
        &kv(),
        &[
            "kv=k:INT8:pk,v:TEXT,_source:TEXT,_timestamp:TIMESTAMPTZ".to_string(),
            "audit=id:INT8:pk,k:INT8,what:TEXT".to_string(),
            "byname=name:TEXT:pk,region:TEXT:pk,k:INT8".to_string(),
        ],
    )
    .unwrap()
}

fn up(k: i64, after: &str) -> Mutation {
    Mutation {
        time: Hlc::new(1_000 + k, 0),
        key: format!("[{k}]"),
        after: Some(after.to_string()),
        before: None,
    }
}

fn del(k: i64) -> Mutation {
    Mutation {
        time: Hlc::new(2_000 + k, 0),
        key: format!("[{k}]"),
        after: None,
        before: None,
    }
}

fn rendered(out: &[(Table, Mutation)]) -> Vec<String> {
    out.iter()
        .map(|(t, m)| match &m.after {
            Some(a) => format!("{} {} {a}", t.name, m.key),
            None => format!("{} {} delete", t.name, m.key),
        })
        .collect()
}

const SEED_REPL: &str = r#"import * as api from "cdc-sink@v1";
import { Document, Table } from "cdc-sink@v1";

export function replicateTo(region: string, schema: string, tables: string[]) {
    console.log("configureSource " + schema)
    api.configureSource(schema, {
        dispatch: (doc: Document, meta: Document): Record<Table, Document[]> => {
            console.trace(JSON.stringify(doc), JSON.stringify(meta));
            let ret: Record<Table, Document[]> = {};
            if (doc._source !== region) {
                console.log("Processing " + doc.k + "(" + typeof doc.k + "):" + doc._source)
                ret[meta.table as string] = [doc];
            } else {
                console.log("Skipping " + doc.k + ":" + doc._source)
            }
            return ret
        },
        deletesTo: ""
    })

    for (let table of tables) {
        console.log("configureTable " + table)
        api.configureTable(table, {
            cas: ['_timestamp'],
            merge: api.standardMerge(() => ({ dlq: table }))
        })}
}
"#;

const SEED_INIT: &str =
    "import {replicateTo} from \"repl\";\nreplicateTo('west','kv.public', ['kv.public.kv'])\n";

#[tokio::test]
async fn the_seed_scripts_load_unchanged_and_drop_local_rows() {
    let (_d, s) = load(&[("init.ts", SEED_INIT), ("repl.ts", SEED_REPL)]);
    assert_eq!(
        s.captured().describe(),
        "source kv.public: dispatch, deletesTo \"\"\ntable kv.public.kv: cas [_timestamp], merge standard(fallback)\n"
    );
    let muts = vec![
        (table("kv"), up(1, r#"{"k":1,"v":"a","_source":"east"}"#)),
        (table("kv"), up(2, r#"{"k":2,"v":"b","_source":"west"}"#)),
        (table("kv"), del(3)),
    ];
    let out = s.dispatch(&kv(), &info(), muts).await.unwrap();
    assert_eq!(
        rendered(&out),
        [
            r#"kv [1] {"k":1,"v":"a","_source":"east"}"#,
            "kv [3] delete"
        ]
    );
    let cfg = s.table_config(&table("kv")).expect("kv is configured");
    assert_eq!(cfg.cas, vec![Ident::new("_timestamp")]);
    // The fallback runs in the script and names the DLQ after the table.
    let merge = cfg.merge.expect("a merge function");
    let c = Conflict {
        before: Some(row(r#"{"k":1,"v":"old","_timestamp":"1"}"#)),
        proposed: Some(row(r#"{"k":1,"v":"mine","_timestamp":"2"}"#)),
        target: Some(row(r#"{"k":1,"v":"theirs","_timestamp":"3"}"#)),
        meta: ConflictMeta {
            table: table("kv"),
            time: Hlc::new(5, 0),
            primary_key: vec!["k".into()],
        },
        unmerged: vec![],
    };
    let r = merge.0.merge(vec![c]).await.unwrap();
    assert_eq!(r, vec![Resolution::Dlq("kv.public.kv".into())]);
}

#[tokio::test]
async fn the_shipped_userscripts_load() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("userscripts");
    for (file, region) in [("east_west.ts", "west"), ("west_east.ts", "east")] {
        let s = Userscript::load(&dir.join(file), &[]).unwrap_or_else(|e| panic!("{file}: {e}"));
        let muts = vec![
            (table("kv"), up(1, r#"{"k":1,"_source":"east"}"#)),
            (table("kv"), up(2, r#"{"k":2,"_source":"west"}"#)),
        ];
        let out = s.dispatch(&kv(), &info(), muts).await.unwrap();
        assert_eq!(out.len(), 1, "{file}");
        assert!(!out[0].1.after.as_ref().unwrap().contains(region), "{file}");
    }
    let s = Userscript::load(&dir.join("apply_style.ts"), &[]).unwrap();
    assert!(s.has_apply(&table("kv")));
    assert_eq!(
        s.captured().describe(),
        "table kv.public.kv: cas [_timestamp], merge standard(fallback), apply\n"
    );
}

fn row(j: &str) -> Row {
    serde_json::from_str(j).unwrap()
}

#[test]
fn typescript_configuration_is_captured() {
    let main = r#"import * as api from "cdc-sink@v1";
import type { Document } from "cdc-sink@v1";
import settings from "./settings.json";
import { tables } from "tables";
import { region } from "./lib/region";

api.setOptions({ flushSize: settings.flush, bestEffortOnly: true });
api.configureSource("kv.public", {
  dispatch: (doc: Document) => ({ kv: [doc] }),
  deletesTo: (key: Document) => ({ audit: [{ id: key.k }] }),
  recurse: true,
});
for (const t of tables) {
  api.configureTable(t, {
    cas: ["_timestamp", "version"],
    deadlines: { _timestamp: "1h30m" },
    exprs: { v: "lower($0)" },
    extras: "extra",
    ignore: { junk: true, kept: false },
    rowLimit: 50,
    merge: api.standardMerge(),
  });
}
api.configureTable("audit", { map: (d: Document) => d, deleteKey: (k: any[]) => k, merge: (op: any) => ({ drop: true }) });
api.configureSource("other.public", { target: "kv.public.sink" });
console.log("region", region);
"#;
    // A nested directory.
    let (dir, main_path) = files(&[
        ("main.ts", main),
        ("settings.json", r#"{"flush": "100"}"#),
        (
            "tables.ts",
            "export const tables: string[] = [\"kv.public.kv\", \"byname\"];\n",
        ),
    ]);
    std::fs::create_dir(dir.path().join("lib")).unwrap();
    std::fs::write(
        dir.path().join("lib/region.ts"),
        "export const region: string = \"west\";\n",
    )
    .unwrap();
    let s = Userscript::load(&main_path, &["flushSize", "bestEffortOnly"]).unwrap();
    assert_eq!(
        s.captured().describe(),
        "option flushSize = \"100\"\n\
         option bestEffortOnly = \"true\"\n\
         source kv.public: dispatch, deletesTo function, recurse\n\
         source other.public: target \"kv.public.sink\"\n\
         table kv.public.kv: cas [_timestamp, version], deadlines {_timestamp=1h30m0s}, exprs {v=\"lower($0)\"}, extras extra, ignore [junk], rowLimit 50, merge standard\n\
         table byname: cas [_timestamp, version], deadlines {_timestamp=1h30m0s}, exprs {v=\"lower($0)\"}, extras extra, ignore [junk], rowLimit 50, merge standard\n\
         table audit: merge function, map, deleteKey\n"
    );
    assert_eq!(
        s.options(),
        [
            ("flushSize".to_string(), "100".to_string()),
            ("bestEffortOnly".to_string(), "true".to_string())
        ]
    );
    let cfg = s.table_config(&table("kv")).unwrap();
    assert_eq!(cfg.row_limit, Some(50));
    assert_eq!(
        cfg.deadlines,
        vec![(Ident::new("_timestamp"), Duration::from_secs(5400))]
    );
    assert!(cfg.merge.is_some());
    assert_eq!(s.table_configs().len(), 3);
}

#[test]
fn javascript_with_the_new_module_name_and_a_circular_import_is_captured() {
    let a = r#"import { configureTable, configureSource } from "replicator@v1";
import { b, later } from "./b.js";
export const a = "a";
configureSource("kv.public", { target: "kv" });
configureTable("kv", { cas: [b], rowLimit: later() });
"#;
    let b = r#"import { a } from "./a.js";
export const b = "version";
export function later() { return a === "a" ? 7 : 0; }
"#;
    let (_d, s) = load(&[("a.js", a), ("b.js", b)]);
    assert_eq!(
        s.captured().describe(),
        "source kv.public: target \"kv\"\ntable kv: cas [version], rowLimit 7\n"
    );
}

#[tokio::test]
async fn dispatch_fans_out_drops_and_routes_deletes_through_a_function() {
    let main = r#"import * as api from "cdc-sink@v1";
api.configureSource("kv.public", {
  dispatch: (doc, meta) => {
    if (doc.v === "drop") return null;
    if (doc.v === "empty") return {};
    if (meta["kv.public"] !== true || meta.table !== "kv" || meta.schema !== "kv.public") throw new Error("bad meta");
    return {
      kv: [doc],
      audit: [{ id: doc.k, k: doc.k, what: "upsert " + meta.updated }],
      "kv.public.byname": [{ name: "n" + doc.k, region: "east", k: doc.k }, { name: "m" + doc.k, region: "west", k: doc.k }],
    };
  },
  deletesTo: (key, meta) => key.k === "9" ? null : { audit: [{ id: key.k }] },
});
"#;
    let (_d, s) = load(&[("main.js", main)]);
    let muts = vec![
        (table("kv"), up(1, r#"{"k":1,"v":"x"}"#)),
        (table("kv"), up(2, r#"{"k":2,"v":"drop"}"#)),
        (table("kv"), up(3, r#"{"k":3,"v":"empty"}"#)),
        (table("kv"), del(4)),
        (table("kv"), del(9)),
    ];
    let out = s.dispatch(&kv(), &info(), muts).await.unwrap();
    assert_eq!(
        rendered(&out),
        [
            r#"kv [1] {"k":1,"v":"x"}"#,
            r#"audit [1] {"id":1,"k":1,"what":"upsert 1001.0000000000"}"#,
            r#"byname ["n1","east"] {"k":1,"name":"n1","region":"east"}"#,
            r#"byname ["m1","west"] {"k":1,"name":"m1","region":"west"}"#,
            "audit [4] delete",
        ]
    );
    // Rows keep their time.
    assert!(out.iter().take(4).all(|(_, m)| m.time == Hlc::new(1001, 0)));
    assert_eq!(out[4].1.time, Hlc::new(2004, 0));
}

#[tokio::test]
async fn meta_describes_each_row_and_cannot_be_changed() {
    let main = r#"import * as api from "cdc-sink@v1";
let kept;
api.configureSource("kv.public", {
  dispatch: (doc, meta) => {
    let refused = false;
    try { meta.table = "other"; } catch (e) { refused = e instanceof TypeError; }
    const seen = JSON.stringify(meta) + " " + Object.keys(meta).join(",") + " " + Object.isFrozen(meta) + " " + refused;
    const before = kept ? kept.updated : "-";
    kept = { ...meta };
    return { audit: [{ id: doc.k, what: seen + " " + meta.nanos + "/" + meta.logical + " " + before }] };
  },
});
"#;
    let (_d, s) = load(&[("main.js", main)]);
    let muts = vec![
        (table("kv"), up(1, r#"{"k":1}"#)),
        (
            table("kv"),
            Mutation {
                time: Hlc::new(1_700_000_000_000_000_123, 7),
                ..up(2, r#"{"k":2}"#)
            },
        ),
    ];
    let out = s.dispatch(&kv(), &info(), muts).await.unwrap();
    let what = |i: usize| -> String {
        let doc: serde_json::Value =
            serde_json::from_str(out[i].1.after.as_ref().unwrap()).unwrap();
        doc["what"].as_str().unwrap().to_string()
    };
    let keys = "table,schema,nanos,logical,updated,kv.public true true";
    assert_eq!(
        what(0),
        format!(
            r#"{{"table":"kv","schema":"kv.public","nanos":1001,"logical":0,"updated":"1001.0000000000","kv.public":true}} {keys} 1001/0 -"#
        )
    );
    // The second row's meta tells its own time; a copy made in the first keeps the first's.
    assert_eq!(
        what(1),
        format!(
            r#"{{"table":"kv","schema":"kv.public","nanos":1700000000000000000,"logical":7,"updated":"1700000000000000123.0000000007","kv.public":true}} {keys} 1700000000000000000/7 1001.0000000000"#
        )
    );
}

#[tokio::test]
async fn replication_keys_are_the_staged_keys_in_dispatch_and_map() {
    let main = r#"import * as api from "cdc-sink@v1";
api.configureSource("kv.public", {
  dispatch: (doc) => ({
    audit: [{ id: doc.k, what: api.replicationKey("kv", doc) + " " + api.replicationKey("kv.public.byname", { region: "east", name: "n" + doc.k, k: doc.k }) }],
  }),
  deletesTo: (key) => ({ audit: [{ id: api.replicationKey("kv", key) === "[4]" ? "44" : "0" }] }),
});
api.configureTable("audit", {
  map: (doc) => ({ ...doc, what: doc.what + " " + api.replicationKey("audit", doc) }),
  deleteKey: (key) => [String(api.replicationKey("kv", { k: key[0] }).length)],
});
"#;
    let (_d, s) = load(&[("main.js", main)]);
    let big = Mutation {
        key: "[9007199254740995]".into(),
        ..up(0, r#"{"k":9007199254740995,"v":"x"}"#)
    };
    let out = s
        .dispatch(
            &kv(),
            &info(),
            vec![(table("kv"), big), (table("kv"), del(4))],
        )
        .await
        .unwrap();
    assert_eq!(
        rendered(&out),
        [
            r#"audit [9007199254740995] {"id":9007199254740995,"what":"[9007199254740995] [\"n9007199254740995\",\"east\"]"}"#,
            "audit [44] delete",
        ]
    );
    // The key a dispatch returns is the key replicationKey names.
    assert_eq!(out[0].1.key, "[9007199254740995]");
    let mapped = s
        .map(
            &table("audit"),
            &info(),
            vec![
                Mutation {
                    key: "[7]".into(),
                    ..up(7, r#"{"id":7,"what":"w"}"#)
                },
                del(12345),
            ],
        )
        .await
        .unwrap();
    assert_eq!(
        mapped[0].after.as_deref(),
        Some(r#"{"id":7,"what":"w [7]"}"#)
    );
    assert_eq!(mapped[1].key, "[7]", "[12345] is 7 characters");
}

#[tokio::test]
async fn replication_key_errors_name_the_table_or_column() {
    let main = r#"import * as api from "cdc-sink@v1";
api.configureSource("kv.public", {
  dispatch: (doc) => {
    if (doc.v === "unknown") api.replicationKey("nowhere", doc);
    if (doc.v === "nokey") api.replicationKey("byname", { name: "a" });
    if (doc.v === "notadoc") api.replicationKey("kv", [1]);
    return { kv: [doc] };
  },
});
"#;
    let (_d, s) = load(&[("main.js", main)]);
    for (v, want) in [
        (
            "unknown",
            "replicationKey: table kv.public.nowhere is not in the target schema",
        ),
        (
            "nokey",
            "replicationKey: the document has no value for primary-key column region of kv.public.byname",
        ),
        ("notadoc", "replicationKey: the document must be a plain object"),
    ] {
        let e = s
            .dispatch(
                &kv(),
                &info(),
                vec![(table("kv"), up(1, &format!(r#"{{"k":1,"v":"{v}"}}"#)))],
            )
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains(want), "{v}: {e}");
        assert!(e.contains("main.js:"), "names the script line: {e}");
    }
    // Outside a callback there is no batch, so no schema to know keys from.
    let e = load_err(&[(
        "main.js",
        "import * as api from \"cdc-sink@v1\";\napi.replicationKey(\"kv\", { k: 1 });\n",
    )])
    .to_string();
    assert!(
        e.contains("replicationKey() is only available inside dispatch"),
        "{e}"
    );
}

#[tokio::test]
async fn documents_changed_in_place_are_converted_again() {
    let main = r#"import * as api from "cdc-sink@v1";
api.configureSource("kv.public", {
  dispatch: (doc) => {
    if (doc.v === "set") doc.v = "changed";
    if (doc.v === "add") doc.extra = "1";
    if (doc.v === "remove") delete doc.v;
    return { kv: [doc], audit: [doc] };
  },
});
"#;
    let (_d, s) = load(&[("main.js", main)]);
    let muts = ["keep", "set", "add", "remove"]
        .iter()
        .enumerate()
        .map(|(i, v)| {
            (
                table("kv"),
                up(i as i64, &format!(r#"{{"v":"{v}","id":{i},"k":{i}}}"#)),
            )
        })
        .collect();
    let out = s.dispatch(&kv(), &info(), muts).await.unwrap();
    assert_eq!(
        rendered(&out),
        [
            r#"kv [0] {"v":"keep","id":0,"k":0}"#,
            r#"audit [0] {"v":"keep","id":0,"k":0}"#,
            r#"kv [1] {"id":1,"k":1,"v":"changed"}"#,
            r#"audit [1] {"id":1,"k":1,"v":"changed"}"#,
            r#"kv [2] {"extra":"1","id":2,"k":2,"v":"add"}"#,
            r#"audit [2] {"extra":"1","id":2,"k":2,"v":"add"}"#,
            r#"kv [3] {"id":3,"k":3}"#,
            r#"audit [3] {"id":3,"k":3}"#,
        ]
    );
}

#[tokio::test]
async fn dispatch_errors_name_the_missing_key_or_unknown_table() {
    let main = r#"import * as api from "cdc-sink@v1";
api.configureSource("kv.public", { dispatch: (doc) => doc.v === "nokey" ? { audit: [{ k: 1 }] } : { nowhere: [doc] } });
"#;
    let (_d, s) = load(&[("main.js", main)]);
    let e = s
        .dispatch(
            &kv(),
            &info(),
            vec![(table("kv"), up(1, r#"{"k":1,"v":"nokey"}"#))],
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("omitted value for PK column id of kv.public.audit"),
        "{e}"
    );
    let e = s
        .dispatch(
            &kv(),
            &info(),
            vec![(table("kv"), up(1, r#"{"k":1,"v":"x"}"#))],
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("kv.public.nowhere, which is not in the target schema"),
        "{e}"
    );
}

#[tokio::test]
async fn exact_integers_survive_and_numbers_arrive_as_strings() {
    let main = r#"import * as api from "cdc-sink@v1";
api.configureSource("kv.public", {
  dispatch: (doc) => {
    if (typeof doc.k !== "string" || doc.k !== "9007199254740995") throw new Error("k is " + typeof doc.k);
    return { kv: [{ ...doc, v: typeof doc.j.n + api.randomUUID().length }] };
  },
});
"#;
    let (_d, s) = load(&[("main.js", main)]);
    let m = Mutation {
        key: "[9007199254740995]".into(),
        ..up(
            0,
            r#"{"k":9007199254740995,"j":{"n":12345678901234567890.5}}"#,
        )
    };
    let out = s
        .dispatch(&kv(), &info(), vec![(table("kv"), m)])
        .await
        .unwrap();
    assert_eq!(out[0].1.key, "[9007199254740995]");
    assert_eq!(
        out[0].1.after.as_deref(),
        Some(r#"{"j":{"n":12345678901234567890.5},"k":9007199254740995,"v":"string36"}"#)
    );
}

#[tokio::test]
async fn microsecond_timestamps_parse_as_dates() {
    let main = r#"import * as api from "cdc-sink@v1";
api.configureSource("kv.public", {
  dispatch: (doc) => {
    const d = new Date(doc._timestamp);
    const p = Date.parse(doc._timestamp);
    return { kv: [{ k: doc.k, v: String(d.getTime()) + " " + String(p) + " " + (d instanceof Date) + " " + d.toISOString() }] };
  },
});
"#;
    let (_d, s) = load(&[("main.js", main)]);
    let out = s
        .dispatch(
            &kv(),
            &info(),
            vec![(
                table("kv"),
                up(1, r#"{"k":1,"_timestamp":"2024-02-23T23:39:22.135792Z"}"#),
            )],
        )
        .await
        .unwrap();
    assert_eq!(
        out[0].1.after.as_deref(),
        Some(r#"{"k":1,"v":"1708731562135 1708731562135 true 2024-02-23T23:39:22.135Z"}"#)
    );
}

#[tokio::test]
async fn map_rewrites_upserts_and_delete_key_rewrites_deletes() {
    let main = r#"import * as api from "cdc-sink@v1";
api.configureTable("kv", {
  map: (doc, meta) => doc.v === "drop" ? null : doc.v === "keep" ? doc : { ...doc, v: doc.v.toUpperCase() + "@" + meta.table },
  deleteKey: (key) => key[0] === "2" ? null : key[0] === "3" ? [] : [String(Number(key[0]) * 10)],
});
"#;
    let (_d, s) = load(&[("main.js", main)]);
    assert!(s.has_map(&table("kv")) && !s.has_map(&table("audit")));
    let muts = vec![
        up(1, r#"{"k":1,"v":"a"}"#),
        up(5, r#"{"k":5,"v":"drop"}"#),
        up(6, r#"{"v":"keep", "k":6}"#),
        del(1),
        del(2),
        del(3),
    ];
    let out = s.map(&table("kv"), &info(), muts).await.unwrap();
    let got: Vec<String> = out
        .iter()
        .map(|m| format!("{} {}", m.key, m.after.as_deref().unwrap_or("delete")))
        .collect();
    // A document handed back untouched keeps its text byte for byte.
    assert_eq!(
        got,
        [
            r#"[1] {"k":1,"v":"A@kv"}"#,
            r#"[6] {"v":"keep", "k":6}"#,
            "[10] delete"
        ]
    );
    // Tables without hooks pass through without the engine.
    let same = s.map(&table("audit"), &info(), vec![del(7)]).await.unwrap();
    assert_eq!(same, vec![del(7)]);
}

#[tokio::test]
async fn merge_functions_are_called_through_the_merger_trait() {
    let main = r#"import * as api from "cdc-sink@v1";
api.configureTable("kv", {
  cas: ["_timestamp"],
  merge: (op) => {
    if (op.proposed.v === "dlq") return { dlq: "kv-" + op.meta.table + api.replicationKey("kv", op.target) };
    if (op.proposed.v === "drop") return { drop: true };
    return { apply: { ...op.target, v: op.target.v + "+" + op.proposed.v } };
  },
});
api.configureTable("audit", {
  cas: ["id"],
  merge: api.standardMerge((op) => ({ dlq: "unmerged:" + op.unmerged.join(",") })),
});
"#;
    let (_d, s) = load(&[("main.js", main)]);
    let conflict = |t: &str, before: Option<&str>, proposed: &str, target: &str| Conflict {
        before: before.map(row),
        proposed: Some(row(proposed)),
        target: Some(row(target)),
        meta: ConflictMeta {
            table: table(t),
            time: Hlc::new(9, 1),
            primary_key: vec!["k".into()],
        },
        unmerged: vec![],
    };
    let m = s.table_config(&table("kv")).unwrap().merge.unwrap();
    let r =
        m.0.merge(vec![
            conflict("kv", None, r#"{"k":1,"v":"dlq"}"#, r#"{"k":1,"v":"t"}"#),
            conflict("kv", None, r#"{"k":1,"v":"drop"}"#, r#"{"k":1,"v":"t"}"#),
            conflict("kv", None, r#"{"k":1,"v":"p"}"#, r#"{"k":1,"v":"t","n":5}"#),
        ])
        .await
        .unwrap();
    assert_eq!(
        r,
        vec![
            Resolution::Dlq("kv-kv[1]".into()),
            Resolution::Drop,
            Resolution::Apply(row(r#"{"k":1,"v":"t+p","n":5}"#)),
        ]
    );
    let m = s.table_config(&table("audit")).unwrap().merge.unwrap();
    let r =
        m.0.merge(vec![
            // Disjoint changes merge natively, without the script.
            conflict(
                "audit",
                Some(r#"{"id":1,"a":"x","b":"y"}"#),
                r#"{"id":1,"a":"x2","b":"y"}"#,
                r#"{"id":1,"a":"x","b":"y2"}"#,
            ),
            conflict(
                "audit",
                Some(r#"{"id":1,"a":"x","b":"y"}"#),
                r#"{"id":1,"a":"p","b":"q"}"#,
                r#"{"id":1,"a":"t","b":"u"}"#,
            ),
        ])
        .await
        .unwrap();
    assert_eq!(
        r,
        vec![
            Resolution::Apply(row(r#"{"id":1,"a":"x2","b":"y2"}"#)),
            Resolution::Dlq("unmerged:a,b".into()),
        ]
    );
}

#[tokio::test]
async fn get_tx_outside_an_apply_callback_fails_clearly() {
    let main = r#"import * as api from "cdc-sink@v1";
api.configureSource("kv.public", { dispatch: (doc) => { api.getTX(); return null; } });
"#;
    let (_d, s) = load(&[("main.js", main)]);
    let e = s
        .dispatch(&kv(), &info(), vec![(table("kv"), up(1, r#"{"k":1}"#))])
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("getTX() is only available inside a table's apply callback"),
        "{e}"
    );
    let e = load_err(&[(
        "top.js",
        "import * as api from \"cdc-sink@v1\";\napi.getTX();\n",
    )])
    .to_string();
    assert!(e.contains("getTX() is only available"), "{e}");
}

#[tokio::test]
async fn runtime_errors_point_at_typescript_lines() {
    let main = r#"import * as api from "cdc-sink@v1";
interface Row {
  k: string;
  v?: string;
}

type Maybe = Row | null;

api.configureSource("kv.public", {
  dispatch: (doc: any): any => {
    const r: Maybe = doc as Row;
    if (r!.v === "boom") {
      throw new Error("kaboom");
    }
    return { kv: [doc] };
  },
});
"#;
    let (_d, s) = load(&[("pos.ts", main)]);
    let e = s
        .dispatch(
            &kv(),
            &info(),
            vec![(table("kv"), up(1, r#"{"k":1,"v":"boom"}"#))],
        )
        .await
        .unwrap_err();
    let text = e.to_string();
    assert!(text.contains("pos.ts:13:"), "{text}");
    assert!(
        text.contains("kaboom") && text.contains("dispatch of kv.public.kv"),
        "{text}"
    );
}

#[test]
fn load_errors_name_the_file_line_and_column() {
    let e = load_err(&[
        ("main.ts", "import { f } from \"./lib\";\nf();\n"),
        ("lib.ts", "export function f() {\n  let x: = 1;\n}\n"),
    ]);
    let text = e.to_string();
    assert!(text.contains("lib.ts:2:"), "{text}");
    let e = load_err(&[
        (
            "main.ts",
            "import { nope } from \"./lib\";\nconsole.log(nope);\n",
        ),
        ("lib.ts", "export const yes = 1;\n"),
    ])
    .to_string();
    assert!(e.contains("main.ts") && e.contains("nope"), "{e}");
    let e = load_err(&[(
        "main.ts",
        "import { x } from \"./missing\";\nconsole.log(x);\n",
    )])
    .to_string();
    assert!(e.contains("cannot find module \"./missing\""), "{e}");
    let e = load_err(&[(
        "main.ts",
        "import x from \"../outside\";\nconsole.log(x);\n",
    )])
    .to_string();
    assert!(e.contains("outside the script's directory"), "{e}");
    let e = load_err(&[("main.ts", "const a = 1;\n\nthrow new Error(\"top\");\n")]).to_string();
    assert!(e.contains("main.ts:3:") && e.contains("top"), "{e}");
    let e = load_err(&[(
        "main.ts",
        "import * as api from \"cdc-sink@v1\";\napi.setOptions({ noSuchFlag: \"1\" });\n",
    )])
    .to_string();
    assert!(e.contains("unknown flag \"noSuchFlag\""), "{e}");
    let e = load_err(&[(
        "main.ts",
        "import * as api from \"cdc-sink@v1\";\napi.configureTable(\"kv\", { cass: [] });\n",
    )])
    .to_string();
    assert!(e.contains("unknown option cass"), "{e}");
}

#[tokio::test]
async fn a_script_that_throws_or_loops_fails_its_batch_and_the_next_one_works() {
    let main = r#"import * as api from "cdc-sink@v1";
api.configureSource("kv.public", {
  dispatch: (doc) => {
    if (doc.v === "throw") throw new TypeError("nope");
    if (doc.v === "loop") { while (true) {} }
    if (doc.v === "recurse") { const f = (n) => f(n + 1) + 1; return f(0); }
    return { kv: [doc] };
  },
});
"#;
    let (_d, s) = load(&[("main.js", main)]);
    for v in ["throw", "loop", "recurse"] {
        let r = s
            .dispatch(
                &kv(),
                &info(),
                vec![(table("kv"), up(1, &format!(r#"{{"k":1,"v":"{v}"}}"#)))],
            )
            .await;
        assert!(r.is_err(), "{v}");
        let ok = s
            .dispatch(
                &kv(),
                &info(),
                vec![(table("kv"), up(2, r#"{"k":2,"v":"fine"}"#))],
            )
            .await
            .unwrap();
        assert_eq!(ok.len(), 1, "after {v}");
    }
}

#[tokio::test]
async fn a_worker_that_misses_its_deadline_is_replaced() {
    let main = r#"import * as api from "cdc-sink@v1";
api.configureSource("kv.public", {
  dispatch: (doc) => {
    if (doc.v === "slow") { let n = 0; for (let i = 0; i < 100; i++) { for (let j = 0; j < 1000000; j++) { n++; } } }
    return { kv: [doc] };
  },
});
"#;
    let (_d, path) = files(&[("main.js", main)]);
    let opts = RuntimeOptions {
        deadline: Duration::from_millis(300),
        ..RuntimeOptions::default()
    };
    let s = Userscript::load_with(&path, &[], opts).unwrap();
    let e = s
        .dispatch(
            &kv(),
            &info(),
            vec![(table("kv"), up(1, r#"{"k":1,"v":"slow"}"#))],
        )
        .await
        .unwrap_err();
    assert!(matches!(e, ScriptError::Timeout { .. }), "{e}");
    assert!(e.is_retryable());
    assert_eq!(s.replaced_workers(), 1);
    // The loop limit ends the abandoned job; its schema is refused until then.
    let deadline = Instant::now() + Duration::from_secs(120);
    while s.stuck_workers() > 0 {
        assert!(Instant::now() < deadline, "the abandoned job never ended");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ok = s
        .dispatch(
            &kv(),
            &info(),
            vec![(table("kv"), up(2, r#"{"k":2,"v":"fast"}"#))],
        )
        .await
        .unwrap();
    assert_eq!(ok.len(), 1);
}

#[tokio::test]
async fn a_worker_over_its_memory_budget_is_replaced_between_batches() {
    let main = r#"import * as api from "cdc-sink@v1";
let calls = 0;
api.configureSource("kv.public", { dispatch: (doc) => { calls++; return { kv: [{ ...doc, v: String(calls) }] }; } });
"#;
    let (_d, path) = files(&[("main.js", main)]);
    let opts = RuntimeOptions {
        memory_budget: 1,
        // Every job grows the heap past one byte; the watchdog may see one while it runs.
        on_abort: record_abort,
        ..RuntimeOptions::default()
    };
    let s = Userscript::load_with(&path, &[], opts).unwrap();
    for k in 0..3 {
        let out = s
            .dispatch(
                &kv(),
                &info(),
                vec![(table("kv"), up(k, &format!(r#"{{"k":{k}}}"#)))],
            )
            .await
            .unwrap();
        // Each batch runs on a fresh engine: the script's globals start over.
        assert_eq!(
            out[0].1.after.as_deref(),
            Some(format!(r#"{{"k":{k},"v":"1"}}"#).as_str())
        );
    }
    assert!(s.replaced_workers() >= 2);
}

#[tokio::test]
async fn target_sources_and_plain_tables_need_no_engine() {
    let main = r#"import * as api from "cdc-sink@v1";
api.configureSource("kv.public", { target: "audit" });
api.configureTable("kv", { cas: ["_timestamp"], merge: api.standardMerge() });
"#;
    let (_d, s) = load(&[("main.js", main)]);
    let out = s
        .dispatch(
            &kv(),
            &info(),
            vec![(table("kv"), up(1, r#"{"k":1}"#)), (table("kv"), del(2))],
        )
        .await
        .unwrap();
    assert_eq!(rendered(&out), [r#"audit [1] {"k":1}"#, "audit [2] delete"]);
    assert!(!s.has_map(&table("kv")) && !s.has_apply(&table("kv")));
    assert!(!s.has_dispatch(&Schema::new("other", "public")));
    // Unconfigured sources pass through.
    let other = Schema::new("other", "public");
    let m = vec![(Table::new(other.clone(), "t"), up(1, r#"{"k":1}"#))];
    assert_eq!(s.dispatch(&other, &info(), m.clone()).await.unwrap(), m);
}

fn assert_send_sync<T: Send + Sync + Clone>(_: &T) {}
fn assert_send<T: Send>(_: T) {}

/// The handle is shared across tasks and its futures run on the multi-threaded runtime.
#[allow(dead_code, unreachable_code, clippy::diverging_sub_expression)]
fn the_handle_and_its_futures_are_send(
    s: Userscript,
    conn: &mut PgConnection,
    a: &Applier,
    t: Table,
    i: SchemaInfo,
) {
    assert_send_sync(&s);
    assert_send(s.dispatch(&kv(), &i, vec![]));
    assert_send(s.map(&t, &i, vec![]));
    assert_send(s.merge(false, vec![]));
    assert_send(s.apply(&t, &[], conn, a));
}

/// A dispatch that backtracks for ever on `"a" × n + "!"`, and passes other rows through.
const REDOS: &str = r#"import * as api from "cdc-sink@v1";
api.configureSource("kv.public", {
  dispatch: (doc) => { if (/^(a+)+$/.test(doc.v)) { return {}; } return { kv: [doc] }; },
});
api.configureSource("other.public", { dispatch: (doc) => ({ t: [doc] }) });
"#;

fn redos_row(n: usize) -> Vec<(Table, Mutation)> {
    let v = format!("{}!", "a".repeat(n));
    vec![(table("kv"), up(1, &format!(r#"{{"k":1,"v":"{v}"}}"#)))]
}

#[tokio::test]
async fn a_runaway_loop_is_stopped_by_the_loop_limit_with_a_clear_error() {
    let main = r#"import * as api from "cdc-sink@v1";
api.configureSource("kv.public", { dispatch: (doc) => { while (true) {} } });
"#;
    let (_d, path) = files(&[("main.js", main)]);
    let opts = RuntimeOptions {
        deadline: Duration::from_secs(120),
        ..RuntimeOptions::default()
    };
    let s = Userscript::load_with(&path, &[], opts).unwrap();
    let start = Instant::now();
    let e = s
        .dispatch(&kv(), &info(), vec![(table("kv"), up(1, r#"{"k":1}"#))])
        .await
        .unwrap_err();
    let took = start.elapsed();
    assert!(matches!(e, ScriptError::Js { .. }), "{e}");
    assert!(!e.is_retryable());
    assert!(e.to_string().contains("loop limit"), "{e}");
    assert_eq!(s.replaced_workers(), 0);
    assert_eq!(s.stuck_workers(), 0);
    eprintln!("while(true) stopped after {took:?}");
}

#[tokio::test]
async fn a_backtracking_regex_is_abandoned_and_its_schema_fails_fast_while_others_run() {
    let (_d, path) = files(&[("main.js", REDOS)]);
    let opts = RuntimeOptions {
        deadline: Duration::from_millis(300),
        stuck_abort: Duration::ZERO,
        ..RuntimeOptions::default()
    };
    let s = Userscript::load_with(&path, &[], opts).unwrap();
    // Long enough to outlast the deadline, short enough to end during the test.
    let e = s.dispatch(&kv(), &info(), redos_row(25)).await.unwrap_err();
    assert!(matches!(e, ScriptError::Timeout { .. }), "{e}");
    assert_eq!(s.stuck_workers(), 1);
    assert_eq!(s.replaced_workers(), 1);
    // Retries of the stuck schema fail at once and start no thread.
    for _ in 0..5 {
        let start = Instant::now();
        let e = s.dispatch(&kv(), &info(), redos_row(25)).await.unwrap_err();
        assert!(matches!(e, ScriptError::Stuck { .. }), "{e}");
        assert!(e.is_retryable());
        assert!(start.elapsed() < Duration::from_millis(100));
    }
    assert_eq!(s.replaced_workers(), 1);
    // Another schema runs on the replacement worker meanwhile.
    let other = Schema::new("other", "public");
    let other_info = schema_from_specs(&other, &["t=k:INT8:pk".to_string()]).unwrap();
    let row = vec![(Table::new(other.clone(), "t"), up(1, r#"{"k":1}"#))];
    assert_eq!(s.dispatch(&other, &other_info, row).await.unwrap().len(), 1);
    // Once the abandoned job ends, its thread stops and the schema works again.
    let deadline = Instant::now() + Duration::from_secs(300);
    while s.stuck_workers() > 0 {
        assert!(Instant::now() < deadline, "the abandoned job never ended");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ok = s
        .dispatch(
            &kv(),
            &info(),
            vec![(table("kv"), up(2, r#"{"k":2,"v":"b"}"#))],
        )
        .await
        .unwrap();
    assert_eq!(ok.len(), 1);
}

static ABORTS: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

fn record_abort(reason: &str) {
    ABORTS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .push(reason.to_string());
}

fn aborts_mentioning(what: &str) -> usize {
    ABORTS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .iter()
        .filter(|r| r.contains(what))
        .count()
}

/// Runs the backtracking script on a row of database `db` under `opts` until the job misses
/// its deadline; the engine thread keeps running it (keep what it returns until the test ends).
async fn redos_times_out(db: &str, opts: RuntimeOptions) -> (tempfile::TempDir, Userscript) {
    let main = REDOS.replace("kv.public", &format!("{db}.public"));
    let (dir, path) = files(&[("main.js", &main)]);
    let s = Userscript::load_with(&path, &[], opts).unwrap();
    let schema = Schema::new(db, "public");
    let row = vec![(
        Table::new(schema.clone(), "kv"),
        up(1, &format!(r#"{{"k":1,"v":"{}!"}}"#, "a".repeat(25))),
    )];
    let e = s.dispatch(&schema, &info(), row).await.unwrap_err();
    assert!(matches!(e, ScriptError::Timeout { .. }), "{e}");
    (dir, s)
}

#[tokio::test]
async fn more_stuck_workers_than_allowed_abort_the_process() {
    let opts = RuntimeOptions {
        deadline: Duration::from_millis(200),
        max_stuck: 0,
        stuck_abort: Duration::ZERO,
        on_abort: record_abort,
        ..RuntimeOptions::default()
    };
    let _kept = redos_times_out("abort_many", opts).await;
    assert_eq!(aborts_mentioning("--userscriptMaxStuck 0"), 1);
}

#[tokio::test]
async fn a_worker_stuck_too_long_aborts_the_process() {
    let opts = RuntimeOptions {
        deadline: Duration::from_millis(200),
        stuck_abort: Duration::from_millis(300),
        on_abort: record_abort,
        ..RuntimeOptions::default()
    };
    let _kept = redos_times_out("abort_late", opts).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while aborts_mentioning("(schema abort_late.public) is still running") == 0 {
        assert!(Instant::now() < deadline, "no abort");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_job_growing_its_heap_past_the_budget_aborts_the_process() {
    let main = r#"import * as api from "cdc-sink@v1";
api.configureSource("abort_mem.public", { dispatch: (doc) => {
  const keep = [];
  for (let i = 0; i < 40; i++) { keep.push(new Array(100000).fill(i)); }
  return { kv: [doc] };
} });
"#;
    let (_d, path) = files(&[("main.js", main)]);
    let opts = RuntimeOptions {
        deadline: Duration::from_secs(120),
        memory_budget: 16 << 20,
        on_abort: record_abort,
        ..RuntimeOptions::default()
    };
    let s = Userscript::load_with(&path, &[], opts).unwrap();
    let schema = Schema::new("abort_mem", "public");
    let row = vec![(Table::new(schema.clone(), "kv"), up(1, r#"{"k":1}"#))];
    // The job itself ends (about 64 MB); what matters is that the watchdog saw it grow.
    let _ = s.dispatch(&schema, &info(), row).await;
    assert_eq!(
        aborts_mentioning("(schema abort_mem.public) allocated"),
        1,
        "{:?}",
        ABORTS
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    );
}
