"""Decodes Confluent-framed Avro records (hex, one per line) with Confluent's own deserializer."""
import json
import sys

from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer
from confluent_kafka.serialization import MessageField, SerializationContext

client = SchemaRegistryClient({"url": sys.argv[1]})
de = AvroDeserializer(client)
ctx = SerializationContext("shop.public.kinds", MessageField.VALUE)
for line in open(sys.argv[2]):
    print(json.dumps(de(bytes.fromhex(line.strip()), ctx), default=str, sort_keys=True))
