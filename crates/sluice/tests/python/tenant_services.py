"""Confluent's SchemaRegistryClient and AvroSerializer/Deserializer, and opensearch-py,
against `sluice server`'s registry and search service with a tenant's token (Basic auth,
as these clients send it). Prints one JSON object of what each client saw.

usage: tenant_services.py SERVER_URL TENANT TOKEN CA_FILE
  SERVER_URL is https://; CA_FILE the PEM of the authority that signed its certificate.
"""
import json
import sys

from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
from confluent_kafka.schema_registry.error import SchemaRegistryError
from confluent_kafka.serialization import MessageField, SerializationContext
from opensearchpy import OpenSearch
from opensearchpy.exceptions import AuthorizationException, AuthenticationException

url, tenant, token, ca = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
seen = {}

# The registry: plain subject names, as any producer uses them.
sr = SchemaRegistryClient({"url": url + "/registry", "basic.auth.user.info": f"{tenant}:{token}", "ssl.ca.location": ca})
schema = Schema(json.dumps({"type": "record", "name": "Order", "fields": [{"name": "id", "type": "long"},
                                                                          {"name": "who", "type": "string"}]}), "AVRO")
seen["registered_id"] = sr.register_schema("orders-value", schema)
ser = AvroSerializer(sr, schema.schema_str)
de = AvroDeserializer(sr)
ctx = SerializationContext("orders", MessageField.VALUE)
seen["round_trip"] = de(ser({"id": 7, "who": tenant}, ctx), ctx)
seen["subjects"] = sr.get_subjects()
seen["latest_version"] = sr.get_latest_version("orders-value").version
try:
    sr.get_latest_version(":.other:orders-value")
    seen["other_context"] = "visible"
except SchemaRegistryError as e:
    seen["other_context"] = e.http_status_code

bad = SchemaRegistryClient({"url": url + "/registry", "basic.auth.user.info": f"{tenant}:not-a-token", "ssl.ca.location": ca})
try:
    bad.get_subjects()
    seen["bad_token"] = "accepted"
except SchemaRegistryError as e:
    seen["bad_token"] = e.http_status_code

# The search service: the tenant's indices are named <tenant>.<name>.
es = OpenSearch(hosts=[url + "/search"], http_auth=(tenant, token), timeout=30, use_ssl=True, verify_certs=True, ca_certs=ca)
index = f"{tenant}.orders"
es.indices.create(index=index, body={"mappings": {"properties": {"who": {"type": "keyword"}}}})
es.index(index=index, id="1", body={"who": tenant}, refresh=True)
seen["hits"] = es.search(index=index, body={"query": {"term": {"who": tenant}}})["hits"]["total"]["value"]
seen["cat"] = sorted(r["index"] for r in es.cat.indices(format="json"))
for name in ("other.orders", "orders", "*"):
    try:
        es.search(index=name, body={"query": {"match_all": {}}})
        seen[f"search {name}"] = "visible"
    except AuthorizationException as e:
        seen[f"search {name}"] = e.status_code
try:
    OpenSearch(hosts=[url + "/search"], http_auth=(tenant, "not-a-token"), use_ssl=True, ca_certs=ca).search(index=index)
    seen["search bad_token"] = "accepted"
except AuthenticationException as e:
    seen["search bad_token"] = e.status_code
print(json.dumps(seen, sort_keys=True))
