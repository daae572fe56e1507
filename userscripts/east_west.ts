// The sink that receives east's changefeed and writes to west.
import { replicateTo } from "repl";

replicateTo("west", "kv.public", ["kv.public.kv"]);
