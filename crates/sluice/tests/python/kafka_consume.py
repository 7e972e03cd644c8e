"""Reads whole topics with clients nobody at Sluice wrote, printing one JSON line a record.

usage: kafka_consume.py avro|json|confluent-json BROKERS REGISTRY_URL MIN_RECORDS TOPIC...
  avro: confluent-kafka's DeserializingConsumer with AvroDeserializer for key and value,
        schemas fetched from the registry by the id in each record.
  json: the pure-Python kafka-python client; also lists the topics first.
  confluent-json: confluent-kafka's Consumer, JSON keys and values.
The confluent-kafka modes add the client settings in $KAFKA_CLIENT_CONFIG (a JSON
object: security.protocol, sasl.*, ssl.ca.location).
Reads until MIN_RECORDS were seen and no record came for 3 s (or 90 s passed).
"""
import base64
import datetime
import decimal
import json
import os
import sys
import time
import uuid

mode, brokers, registry, want = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
topics = sys.argv[5:]


def plain(v):
    if isinstance(v, dict):
        return {k: plain(x) for k, x in v.items()}
    if isinstance(v, list):
        return [plain(x) for x in v]
    if isinstance(v, bytes):
        return base64.b64encode(v).decode()
    if isinstance(v, (decimal.Decimal, uuid.UUID)):
        return str(v)
    if isinstance(v, (datetime.datetime, datetime.date, datetime.time)):
        return v.isoformat()
    return v


def emit(topic, partition, offset, key, value, headers):
    headers = {k: v.decode() if v is not None else None for k, v in (headers or [])}
    print(json.dumps({"topic": topic, "partition": partition, "offset": offset, "key": plain(key), "value": plain(value),
                      "headers": headers}, sort_keys=True))


seen, deadline, last = 0, time.time() + 90, time.time()
extra = json.loads(os.environ.get("KAFKA_CLIENT_CONFIG", "{}"))


def drain_confluent(c, decode):
    """Polls a confluent-kafka consumer (already subscribed) until the records are read."""
    global seen, last
    while time.time() < deadline:
        m = c.poll(0.5)
        if m is None:
            if seen >= want and time.time() - last > 3:
                break
            continue
        if m.error():
            print("consumer error: %s" % m.error(), file=sys.stderr)
            continue
        emit(m.topic(), m.partition(), m.offset(), decode(m.key()), decode(m.value()), m.headers())
        seen, last = seen + 1, time.time()
    c.close()


confluent = {"bootstrap.servers": brokers, "group.id": "verify-%d" % time.time_ns(),
             "auto.offset.reset": "earliest", "enable.auto.commit": False}
if mode == "confluent-json":
    from confluent_kafka import Consumer

    c = Consumer(dict(confluent, **extra))
    c.subscribe(topics)
    drain_confluent(c, lambda b: json.loads(b) if b is not None else None)
elif mode == "avro":
    from confluent_kafka import DeserializingConsumer
    from confluent_kafka.schema_registry import SchemaRegistryClient
    from confluent_kafka.schema_registry.avro import AvroDeserializer

    sr = SchemaRegistryClient({"url": registry})
    c = DeserializingConsumer(dict(confluent, **{"key.deserializer": AvroDeserializer(sr),
                                                 "value.deserializer": AvroDeserializer(sr)}, **extra))
    c.subscribe(topics)
    drain_confluent(c, lambda v: v)
else:
    from kafka import KafkaConsumer

    c = KafkaConsumer(bootstrap_servers=brokers, auto_offset_reset="earliest", enable_auto_commit=False,
                      group_id=None, consumer_timeout_ms=1000)
    listed = c.topics()
    missing = [t for t in topics if t not in listed]
    if missing:
        sys.exit("kafka-python does not list topics %s (it lists %s)" % (missing, sorted(listed)))
    c.subscribe(topics)
    while time.time() < deadline:
        got = False
        for m in c:
            got = True
            key = json.loads(m.key) if m.key is not None else None
            value = json.loads(m.value) if m.value is not None else None
            emit(m.topic, m.partition, m.offset, key, value, m.headers)
            seen, last = seen + 1, time.time()
        if not got and seen >= want and time.time() - last > 3:
            break
    c.close()
if seen < want:
    sys.exit("read %d records, expected at least %d" % (seen, want))
