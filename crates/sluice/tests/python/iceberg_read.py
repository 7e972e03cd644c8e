"""Reads an Iceberg table the way another engine would, to check what Sluice wrote.

Usage: iceberg_read.py CATALOG_URI WAREHOUSE CATALOG_NAME NAMESPACE TABLE
       iceberg_read.py --time-duckdb METADATA_LOCATION   (sluice-bench iceberg)

Two readers nobody here wrote:
- DuckDB's Iceberg extension (wheels from PyPI, loaded from their files: nothing is
  downloaded) scans the table's current metadata, applying equality deletes itself;
- pyiceberg opens the SQL catalog, the metadata, the manifest list and the manifests,
  and pyarrow reads the Parquet files; equality deletes are applied here by the spec's
  rule (a delete file removes the rows with equal values in its equality columns from
  data files of a strictly lower sequence number), because pyiceberg 0.12's scan does
  not apply them yet.
Prints one JSON object: the rows (pyiceberg + the rule), DuckDB's rows, the snapshot
count, the current snapshot's summary, and what pyiceberg's own scan returned (its
rows, or the error it raised).
"""

import json
import os
import sys

import duckdb
import duckdb_extension_avro
import duckdb_extension_iceberg

import pyarrow.parquet as pq
from pyiceberg.catalog.sql import SqlCatalog
from pyiceberg.manifest import DataFileContent


def local(path):
    return path[len("file://"):] if path.startswith("file://") else path


def plain(v):
    if hasattr(v, "isoformat"):
        return v.isoformat()
    if isinstance(v, bytes):
        return v.hex()
    if v is not None and type(v).__name__ == "Decimal":
        return str(v)
    return v


def duckdb_connection():
    def ext(mod, name):
        return os.path.join(os.path.dirname(mod.__file__), f"extensions/v{duckdb.__version__}/{name}.duckdb_extension")

    con = duckdb.connect(config={"allow_unsigned_extensions": "true", "autoinstall_known_extensions": "false"})
    con.execute(f"LOAD '{ext(duckdb_extension_avro, 'avro')}'")
    con.execute(f"LOAD '{ext(duckdb_extension_iceberg, 'iceberg')}'")
    return con


def duckdb_rows(metadata_location):
    con = duckdb_connection()
    cur = con.execute("SELECT * FROM iceberg_scan(?)", [local(metadata_location)])
    names = [d[0] for d in cur.description]
    return [{n: plain(v) for n, v in zip(names, row)} for row in cur.fetchall()]


def time_duckdb(metadata_location):
    """Times DuckDB's scan of the whole table (for sluice-bench iceberg)."""
    import time

    con = duckdb_connection()
    t = time.monotonic()
    rows, size = con.execute("SELECT count(*), sum(length(payload)) FROM iceberg_scan(?)", [local(metadata_location)]).fetchone()
    print(json.dumps({"seconds": time.monotonic() - t, "rows": rows, "payload_bytes": size}))


def main():
    if sys.argv[1] == "--time-duckdb":
        time_duckdb(sys.argv[2])
        return
    uri, warehouse, name, namespace, table = sys.argv[1:6]
    catalog = SqlCatalog(name, uri=uri, warehouse=warehouse)
    t = catalog.load_table((namespace, table))
    snap = t.current_snapshot()
    out = {"snapshots": len(t.metadata.snapshots), "summary": {}, "rows": [], "data_files": 0, "delete_files": 0}
    if snap is None:
        print(json.dumps(out))
        return
    out["summary"] = {k: v for k, v in snap.summary.additional_properties.items()} | {"operation": str(snap.summary.operation)}
    schema = t.schema()
    out["schema"] = [f"{f.field_id}:{f.name}:{f.field_type}" for f in schema.fields]
    data, deletes = [], []
    for manifest in snap.manifests(t.io):
        for entry in manifest.fetch_manifest_entry(t.io, discard_deleted=True):
            f = entry.data_file
            seq = entry.sequence_number
            if f.content == DataFileContent.DATA:
                data.append((seq, pq.read_table(local(f.file_path)).to_pylist()))
            elif f.content == DataFileContent.EQUALITY_DELETES:
                cols = [schema.find_field(i).name for i in f.equality_ids]
                keys = {tuple(r[c] for c in cols) for r in pq.read_table(local(f.file_path)).to_pylist()}
                deletes.append((seq, cols, keys))
            else:
                raise SystemExit(f"unexpected content {f.content}")
    out["data_files"], out["delete_files"] = len(data), len(deletes)
    rows = []
    for seq, file_rows in data:
        for r in file_rows:
            if any(dseq > seq and tuple(r[c] for c in cols) in keys for dseq, cols, keys in deletes):
                continue
            rows.append({k: plain(v) for k, v in r.items()})
    out["rows"] = rows
    out["duckdb"] = duckdb_rows(t.metadata_location)
    try:
        scanned = t.scan().to_arrow().to_pylist()
        out["scan"] = [{k: plain(v) for k, v in r.items()} for r in scanned]
    except Exception as e:  # noqa: BLE001 - reported to the test, which decides
        out["scan_error"] = f"{type(e).__name__}: {e}"
    print(json.dumps(out, default=str))


if __name__ == "__main__":
    main()
