"""Reads an Iceberg table the way another engine would, to check what Sluice wrote.

Usage: iceberg_read.py CATALOG_URI WAREHOUSE CATALOG_NAME NAMESPACE TABLE
       (CATALOG_URI: a SQL catalog's database URL, or a REST catalog's http:// URL)
       iceberg_read.py --time-duckdb METADATA_LOCATION   (sluice-bench iceberg)

Two readers nobody here wrote:
- DuckDB's Iceberg extension (wheels from PyPI, loaded from their files: nothing is
  downloaded) scans the table's current metadata, applying equality deletes itself;
- pyiceberg opens the SQL catalog, the metadata, the manifest list and the manifests,
  and pyarrow reads the Parquet files; equality deletes are applied here by the spec's
  rule (a delete file removes the rows with equal values in its equality columns from
  data files of a strictly lower sequence number), because pyiceberg 0.12's scan does
  not apply them yet.
With SLUICE_S3_ENDPOINT set (an S3-compatible server, path-style, the tests' static
credentials), both readers read the files from object storage.
Prints one JSON object: the rows (pyiceberg + the rule), DuckDB's rows, the snapshot
count, the current snapshot's summary, and what pyiceberg's own scan returned (its
rows, or the error it raised).
"""

import json
import os
import sys

import duckdb
import duckdb_extension_avro
import duckdb_extension_httpfs
import duckdb_extension_iceberg

import pyarrow.parquet as pq
from pyiceberg.catalog.sql import SqlCatalog
from pyiceberg.manifest import DataFileContent


S3_ENDPOINT = os.environ.get("SLUICE_S3_ENDPOINT")
S3_KEY, S3_SECRET = "sluice", "sluice-secret"


def local(path):
    return path[len("file://"):] if path.startswith("file://") else path


def catalog_properties():
    if not S3_ENDPOINT:
        return {}
    return {
        "s3.endpoint": S3_ENDPOINT,
        "s3.access-key-id": S3_KEY,
        "s3.secret-access-key": S3_SECRET,
        "s3.region": "us-east-1",
        "s3.path-style-access": "true",
    }


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
    if S3_ENDPOINT:
        con.execute(f"LOAD '{ext(duckdb_extension_httpfs, 'httpfs')}'")
        host = S3_ENDPOINT.split("://", 1)[1]
        con.execute(
            f"CREATE SECRET s3 (TYPE s3, KEY_ID '{S3_KEY}', SECRET '{S3_SECRET}', ENDPOINT '{host}', "
            "URL_STYLE 'path', USE_SSL false, REGION 'us-east-1')"
        )
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


def read_parquet(io, path):
    """A Parquet file's rows, read through pyiceberg's FileIO (local or S3)."""
    with io.new_input(path).open() as f:
        return pq.read_table(f).to_pylist()


def main():
    if sys.argv[1] == "--time-duckdb":
        time_duckdb(sys.argv[2])
        return
    uri, warehouse, name, namespace, table = sys.argv[1:6]
    if uri.startswith("http"):
        from pyiceberg.catalog.rest import RestCatalog

        catalog = RestCatalog(name, uri=uri, **catalog_properties())
    else:
        catalog = SqlCatalog(name, uri=uri, warehouse=warehouse, **catalog_properties())
    t = catalog.load_table((namespace, table))
    snap = t.current_snapshot()
    out = {"snapshots": len(t.metadata.snapshots), "summary": {}, "rows": [], "data_files": 0, "delete_files": 0}
    if snap is None:
        print(json.dumps(out))
        return
    out["summary"] = {k: v for k, v in snap.summary.additional_properties.items()} | {"operation": str(snap.summary.operation)}
    history = sorted(t.metadata.snapshots, key=lambda s: s.sequence_number)
    out["summaries"] = [dict(s.summary.additional_properties) for s in history]
    schema = t.schema()
    out["schema"] = [f"{f.field_id}:{f.name}:{f.field_type}" for f in schema.fields]
    out["partition_spec"] = [f"{f.name}:{f.transform}" for f in t.spec().fields]
    out["sort_order"] = [f"{schema.find_field(f.source_id).name}:{f.direction}" for f in t.sort_order().fields]
    out["data_paths"] = []
    data, deletes = [], []
    for manifest in snap.manifests(t.io):
        for entry in manifest.fetch_manifest_entry(t.io, discard_deleted=True):
            f = entry.data_file
            seq = entry.sequence_number
            if f.content == DataFileContent.DATA:
                out["data_paths"].append(f.file_path)
                data.append((seq, read_parquet(t.io, f.file_path)))
            elif f.content == DataFileContent.EQUALITY_DELETES:
                cols = [schema.find_field(i).name for i in f.equality_ids]
                keys = {tuple(r[c] for c in cols) for r in read_parquet(t.io, f.file_path)}
                deletes.append((seq, cols, keys))
            else:
                raise SystemExit(f"unexpected content {f.content}")
    out["data_files"], out["delete_files"] = len(data), len(deletes)
    # Whether each data file's rows follow the table's first sort field.
    order = t.sort_order().fields
    if order:
        col, desc = schema.find_field(order[0].source_id).name, "DESC" in str(order[0].direction).upper()
        vals = [[r[col] for r in rows if r[col] is not None] for _, rows in data]
        out["files_sorted"] = all(v == sorted(v, reverse=desc) for v in vals)
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
