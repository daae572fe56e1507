// The cdc-sink userscript API, module "cdc-sink@v1" (alias "replicator@v1").
// Printed by `cdc-sink userscript --api`. Scripts are ES modules; their top level runs once
// when cdc-sink starts.

declare module "cdc-sink@v1" {
  /** A JSON-like value. Numbers from the changefeed arrive as exact decimal strings. */
  type Value = null | boolean | number | string | Value[] | { [k: string]: Value };

  /** A row: property (column) name to value. Timestamps are RFC 3339 strings. */
  type Document = { [k: string]: any };

  /** A table name: `table`, `db.table` or `db.schema.table`, parts optionally quoted. */
  type Table = string;

  /** A column name. */
  type Column = string;

  /** A Go-style duration such as "10m", "1h30m" or "500ms". */
  type Duration = string;

  /**
   * Where and when a row comes from. In dispatch, deletesTo, map and deleteKey callbacks it is
   * frozen and shared by the rows of a table: `nanos`, `logical` and `updated` describe the
   * row being handled while its callback runs. Keep a copy (`{ ...meta }`) to remember a row's
   * time past its callback.
   */
  interface Meta {
    /** The table the row belongs to (name only). */
    table: string;
    /** The target schema, `db.schema`. */
    schema: string;
    /** HLC wall time of the change, in nanoseconds (a JS number: may be rounded). */
    nanos: number;
    /** HLC logical counter. */
    logical: number;
    /** The exact HLC as `nanos.logical` text. */
    updated: string;
    /** The source name (e.g. "kv.public") is a key set to true in dispatch callbacks. */
    [source: string]: any;
  }

  /** Documents to write, per table. An empty object or null drops the row. */
  type Routing = Record<Table, Document[]> | null | undefined;

  interface DispatchSource {
    /** Called for every upsert of the source. */
    dispatch: (doc: Document, meta: Meta) => Routing;
    /**
     * Where deletes go: a table name ("" for the row's own table), or a function of the
     * sparse key document returning key documents per table (null drops the delete).
     */
    deletesTo?: Table | ((key: Document, meta: Meta) => Routing);
    /** Accepted for compatibility. */
    recurse?: boolean;
  }

  interface TargetSource {
    /** Send every row of the source to this table. */
    target: Table;
    recurse?: boolean;
  }

  /** Configures how rows of a source (for changefeeds `db.schema`) reach tables. */
  function configureSource(name: string, props: DispatchSource | TargetSource): void;

  /** What a merge function sees. */
  interface MergeOperation {
    /** The row before the change (changefeed `diff` option), when known. */
    before?: Document;
    /** The incoming row (null for a delete). */
    proposed: Document | null;
    /** The row currently in the target (null if there is none). */
    target: Document | null;
    meta: Meta;
    /** Columns the standard merge could not reconcile (in a standardMerge fallback). */
    unmerged?: Column[];
  }

  /** Write this row, send the original mutation to the DLQ under this name, or drop it. */
  type MergeResult = { apply: Document } | { dlq: string } | { drop: true };

  type MergeFunction = (op: MergeOperation) => MergeResult;

  /** The built-in three-way merge; calls `fallback` when columns conflict. */
  function standardMerge(fallback?: MergeFunction): MergeFunction;

  interface ApplyOp {
    action: "upsert" | "delete";
    /** The new row (upserts). */
    data?: Document;
    /** The previous row, when known. */
    before?: Document;
    meta: Meta;
    /** Primary-key values, in key order. */
    pk: Value[];
  }

  interface TableOptions {
    /** Compare-and-set columns: an upsert wins only if this tuple is strictly greater. */
    cas?: Column[];
    /** Drop upserts whose column is older than now minus the duration. */
    deadlines?: { [c: Column]: Duration };
    /** Resolves CAS / deadline conflicts (needs cas or deadlines). */
    merge?: MergeFunction;
    /** Rewrite (return a document) or drop (return null) one upsert. */
    map?: (doc: Document, meta: Meta) => Document | null;
    /** Rewrite (return key values) or drop (return null or []) one delete. */
    deleteKey?: (key: Value[], meta: Meta) => Value[] | null;
    /** SQL expression replacing a column's value; `$0` is the incoming value. */
    exprs?: { [c: Column]: string };
    /** JSONB column receiving properties that match no column. */
    extras?: Column;
    /** Properties to drop (a column of that name is never written). */
    ignore?: { [c: Column]: boolean };
    /** Maximum rows per statement. */
    rowLimit?: number;
    /** Take over writing the table's rows; use getTX() inside. */
    apply?: (ops: ApplyOp[]) => Promise<any>;
  }

  /** Configures how rows are written to one target table. */
  function configureTable(table: Table, options: TableOptions): void;

  interface ColumnData {
    name: Column;
    type: string;
    primary: boolean;
    ignored: boolean;
    defaultExpr: string | null;
  }

  /** The target transaction of the running apply callback. */
  interface TargetTX {
    /** Write ops through the normal pipeline (CAS, merge, DLQ included). */
    apply(ops: ApplyOp[]): Promise<any>;
    /** Run a statement; resolves to the number of rows affected. Parameters are $1, $2, ... */
    exec(sql: string, ...params: any[]): Promise<number>;
    /** Run a query; resolves to rows as arrays (numbers as strings). */
    query(sql: string, ...params: any[]): Promise<any[][]>;
    /** The table's columns, primary key first. */
    columns(): ColumnData[];
    /** The quoted schema name. */
    schema(): string;
    /** The quoted table name. */
    table(): string;
  }

  /** Only inside a table's apply callback and the promises it starts. */
  function getTX(): TargetTX;

  /**
   * The key under which cdc-sink identifies, orders and stages `doc` as a row of `table`: the
   * JSON array text of the document's primary-key values in the table's primary-key order,
   * exactly as the staging `key` column holds it (e.g. `[1]`, `["east",9007199254740995]`;
   * values of numeric key columns as numbers, without rounding). Built the way the keys of
   * documents returned by dispatch are. Only inside dispatch, deletesTo, map, deleteKey, merge
   * and apply callbacks (a merge function knows only its own table); throws for a table not in
   * the target schema or a document missing a primary-key column.
   */
  function replicationKey(table: Table, doc: Document): string;

  /** A random (version 4) UUID. */
  function randomUUID(): string;

  /** Sets `cdc-sink start` flags by name, e.g. setOptions({ flushSize: "1000" }). */
  function setOptions(options: { [flag: string]: string }): void;
}

declare module "replicator@v1" {
  export * from "cdc-sink@v1";
}

/** Log lines go to cdc-sink's log (target cdc_sink::userscript) with the script's name. */
declare var console: {
  log(...args: any[]): void;
  info(...args: any[]): void;
  warn(...args: any[]): void;
  error(...args: any[]): void;
  debug(...args: any[]): void;
  trace(...args: any[]): void;
};
