"""Drives Sluice's schema registry with Confluent's own Python client (confluent-kafka)."""
import struct
import sys

from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
from confluent_kafka.schema_registry.error import SchemaRegistryError
from confluent_kafka.serialization import MessageField, SerializationContext

url = sys.argv[1]
client = SchemaRegistryClient({"url": url})
passed = 0


def check(name, cond):
    global passed
    if not cond:
        print(f"FAILED: {name}")
        sys.exit(1)
    passed += 1


def expect_error(name, code, fn):
    try:
        fn()
    except SchemaRegistryError as e:
        check(f"{name} (got {e.error_code})", e.error_code == code)
        return
    check(f"{name}: no error", False)


V1 = '{"type":"record","name":"Order","namespace":"shop","fields":[{"name":"id","type":"long"},{"name":"email","type":"string"}]}'
V2 = '{"type":"record","name":"Order","namespace":"shop","fields":[{"name":"id","type":"long"},{"name":"email","type":"string"},{"name":"note","type":["null","string"],"default":null}]}'
V3 = '{"type":"record","name":"Order","namespace":"shop","fields":[{"name":"id","type":"long"},{"name":"email","type":"string"},{"name":"qty","type":"int"}]}'

subject = "orders-value"
id1 = client.register_schema(subject, Schema(V1, "AVRO"))
check("same schema, same id", client.register_schema(subject, Schema(V1, "AVRO")) == id1)
latest = client.get_latest_version(subject)
check("latest is version 1", latest.version == 1 and latest.schema_id == id1)

# Confluent wire format end to end: magic byte 0, 4-byte id, Avro body.
ser = AvroSerializer(client, V1)
ctx = SerializationContext("orders", MessageField.VALUE)
payload = ser({"id": 7, "email": "a@example.com"}, ctx)
check("magic byte", payload[0] == 0)
check("schema id in header", struct.unpack(">I", payload[1:5])[0] == id1)
de = AvroDeserializer(client)
check("round trip", de(payload, ctx) == {"id": 7, "email": "a@example.com"})

check("optional field is BACKWARD compatible", client.test_compatibility(subject, Schema(V2, "AVRO")))
id2 = client.register_schema(subject, Schema(V2, "AVRO"))
check("new schema, new id", id2 != id1)
check("required field is not BACKWARD compatible", not client.test_compatibility(subject, Schema(V3, "AVRO")))
expect_error("incompatible registration", 409, lambda: client.register_schema(subject, Schema(V3, "AVRO")))
client.set_compatibility(subject, "NONE")
check("subject config", client.get_compatibility(subject) == "NONE")
client.register_schema(subject, Schema(V3, "AVRO"))
check("three versions", client.get_versions(subject) == [1, 2, 3])
check("lookup", client.lookup_schema(subject, Schema(V2, "AVRO")).version == 2)
check("subjects", subject in client.get_subjects())
check("schema by id", '"note"' in client.get_schema(id2).schema_str)

# Tenants: a context has its own ids and subjects.
tenant_subject = ":.acme:orders-value"
tid = client.register_schema(tenant_subject, Schema(V3, "AVRO"))
check("ids start again in a new context", tid == 1)
check("tenant subject listed", tenant_subject in client.get_subjects())
check("tenant latest", client.get_latest_version(tenant_subject).schema_id == tid)

expect_error("invalid schema", 42201, lambda: client.register_schema("bad-value", Schema('{"type":"recrd"}', "AVRO")))
expect_error("unknown subject", 40401, lambda: client.get_latest_version("nope-value"))
expect_error("permanent delete needs soft delete", 40405, lambda: client.delete_subject(subject, permanent=True))
check("soft delete", client.delete_subject(subject) == [1, 2, 3])
check("deleted subject hidden", subject not in client.get_subjects())
client.delete_subject(subject, permanent=True)

# Concurrent registrations of one subject: the same schema always gets one id, and
# compatible new schemas get distinct versions, with no errors.
from concurrent.futures import ThreadPoolExecutor

conc = "concurrent-value"
schemas = [
    '{"type":"record","name":"C","fields":[{"name":"id","type":"long"}'
    + "".join(f',{{"name":"f{j}","type":["null","string"],"default":null}}' for j in range(i))
    + "]}"
    for i in range(6)
]


def register(s):
    return SchemaRegistryClient({"url": url}).register_schema(conc, Schema(s, "AVRO"))


with ThreadPoolExecutor(max_workers=12) as pool:
    same = list(pool.map(register, [schemas[0]] * 12))
check("concurrent same schema, one id", len(set(same)) == 1)
client.set_compatibility(conc, "NONE")
with ThreadPoolExecutor(max_workers=6) as pool:
    ids = list(pool.map(register, schemas[1:] * 2))
check("concurrent distinct schemas, distinct ids", len(set(ids)) == 5)
check("versions without gaps", client.get_versions(conc) == [1, 2, 3, 4, 5, 6])
print(f"{passed} passed, 0 failed")
