// The sink that receives west's changefeed and writes to east.
import { replicateTo } from "repl";

replicateTo("east", "kv.public", ["kv.public.kv"]);
