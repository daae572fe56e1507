// Active-active in the newer style: the table's apply callback filters the batch and hands
// the rest to the normal pipeline (compare-and-set on _timestamp, standard merge, DLQ).
//
// Deletes are kept only when the changefeed sent a `before` image (option `diff`), so that a
// delete can be checked against the row it removes.
import * as api from "cdc-sink@v1";
import { ApplyOp } from "cdc-sink@v1";

const REGION = "west";
const TABLE = "kv.public.kv";

api.configureTable(TABLE, {
  cas: ["_timestamp"],
  merge: api.standardMerge(() => ({ dlq: "kv" })),
  apply: async (ops: ApplyOp[]) => {
    const keep = ops.filter((op) =>
      op.action === "delete" ? op.before != null : op.data?._source !== REGION,
    );
    if (keep.length > 0) {
      await api.getTX().apply(keep);
    }
  },
});
