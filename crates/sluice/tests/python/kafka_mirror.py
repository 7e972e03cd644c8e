"""Drives the two clusters of the mirror tests with Confluent's Python client.

usage:
  kafka_mirror.py create BROKERS TOPIC PARTITIONS [name=value ...]   create a topic with configs
  kafka_mirror.py describe BROKERS TOPIC                           {"partitions": n, "configs": {...}}
  kafka_mirror.py produce BROKERS TOPIC N RATE plain|txn [TAG]      N records at RATE/s; txn: transactions of
                                                                   10 records, every 4th aborted (gaps on the source)
  kafka_mirror.py dump BROKERS TOPIC MIN [SECONDS]                 every committed record, one JSON line each
  kafka_mirror.py group-read BROKERS TOPIC GROUP N                 consume N records in GROUP, commit, leave
  kafka_mirror.py group-rest BROKERS TOPIC GROUP                   consume GROUP's remaining records from its
                                                                   committed offsets (fails if it has none)
  kafka_mirror.py committed BROKERS TOPIC GROUP                    {"partition": offset} committed by GROUP
  kafka_mirror.py avro-produce BROKERS REGISTRY TOPIC N            N Avro records, Confluent's AvroSerializer
  kafka_mirror.py avro-consume BROKERS REGISTRY TOPIC N            decoded by Confluent's AvroDeserializer
Records print as {"p", "o", "k", "v", "h", "ts"} with bytes in hex.
"""
import json
import sys
import time

from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic

cmd, brokers = sys.argv[1], sys.argv[2]


def hexa(b):
    return None if b is None else b.hex()


def show(m):
    return json.dumps({"p": m.partition(), "o": m.offset(), "k": hexa(m.key()), "v": hexa(m.value()),
                       "h": [[k, hexa(v)] for k, v in (m.headers() or [])], "ts": m.timestamp()[1]})


def consumer(group, reset="earliest"):
    return Consumer({"bootstrap.servers": brokers, "group.id": group, "isolation.level": "read_committed",
                     "enable.auto.commit": False, "auto.offset.reset": reset})


def partitions(topic):
    md = AdminClient({"bootstrap.servers": brokers}).list_topics(topic, timeout=10)
    return sorted(md.topics[topic].partitions)


if cmd == "create":
    topic, n = sys.argv[3], int(sys.argv[4])
    conf = dict(a.split("=", 1) for a in sys.argv[5:])
    admin = AdminClient({"bootstrap.servers": brokers})  # held: the futures need it alive
    admin.create_topics([NewTopic(topic, n, 1, config=conf)])[topic].result(30)
elif cmd == "describe":
    topic = sys.argv[3]
    admin = AdminClient({"bootstrap.servers": brokers})
    res = ConfigResource(ConfigResource.Type.TOPIC, topic)
    cfg = admin.describe_configs([res])[res].result(30)
    print(json.dumps({"partitions": len(partitions(topic)),
                      "configs": {k: v.value for k, v in cfg.items() if v.source == 1}}))  # 1: DYNAMIC_TOPIC_CONFIG
elif cmd == "produce":
    topic, n, rate, mode = sys.argv[3], int(sys.argv[4]), float(sys.argv[5]), sys.argv[6]
    tag = sys.argv[7] if len(sys.argv) > 7 else ""
    conf = {"bootstrap.servers": brokers, "enable.idempotence": True, "linger.ms": 5}
    if mode == "txn":
        conf["transactional.id"] = "test-producer-%s-%d" % (topic, time.time_ns())
    failed = []

    def delivered(err, msg):
        if err is not None and mode != "txn":  # records of aborted transactions fail by design
            failed.append(err)

    conf["on_delivery"] = delivered
    p = Producer(conf)
    if mode == "txn":
        p.init_transactions(30)
    start, i, batch = time.time(), 0, 0
    base_ts = int(time.time() * 1000) - 3600 * 1000
    while i < n:
        if mode == "txn":
            p.begin_transaction()
        for _ in range(10 if mode == "txn" else 1):
            if i >= n:
                break
            headers = [("seq", str(i).encode()), ("empty", None), ("tag", tag.encode())]
            value = (b"%s-%d-" % (tag.encode(), i)) * (1 + i % 7)
            key = None if i % 11 == 0 else b"k%d" % (i % 37)
            # Distinct, recent timestamps (old ones would fall to the topics' retention).
            p.produce(topic, value=value, key=key, headers=headers, timestamp=base_ts + i)
            i += 1
        if mode == "txn":
            if batch % 4 == 3:
                # Delivered first: aborting with produce requests still in flight once
                # failed with INVALID_TXN_STATE on Kafka 4.4 (a fatal producer error).
                p.flush(30)
                p.abort_transaction(30)
            else:
                p.commit_transaction(30)
            batch += 1
        else:
            p.poll(0)
        ahead = i / rate - (time.time() - start)
        if ahead > 0:
            time.sleep(ahead)
    while len(p) > 0 and time.time() - start < n / rate + 120:
        p.flush(1)
    if len(p) > 0 or failed:
        raise SystemExit("produce: %d records not delivered, %d failed" % (len(p), len(failed)))
    print(json.dumps({"produced": n}))
elif cmd == "dump":
    topic, want = sys.argv[3], int(sys.argv[4])
    limit = float(sys.argv[5]) if len(sys.argv) > 5 else 120
    c = consumer("dump-%d" % time.time_ns())
    c.assign([TopicPartition(topic, p, 0) for p in partitions(topic)])
    seen, deadline, last = 0, time.time() + limit, time.time()
    while time.time() < deadline and not (seen >= want and time.time() - last > 3):
        m = c.poll(0.2)
        if m is None:
            continue
        if m.error():
            if m.error().code() == KafkaError._PARTITION_EOF:
                continue
            raise SystemExit("dump: %s" % m.error())
        print(show(m))
        seen, last = seen + 1, time.time()
    c.close()
elif cmd == "group-read":
    # Reads about N/partitions records of each partition (so every partition gets a
    # committed offset mid-way), then commits the group's positions and leaves.
    topic, group, n = sys.argv[3], sys.argv[4], int(sys.argv[5])
    parts = partitions(topic)
    quota = -(-n // len(parts))
    c = consumer(group)
    c.assign([TopicPartition(topic, p, 0) for p in parts])
    got, nxt, deadline = {p: 0 for p in parts}, {}, time.time() + 60
    while any(v < quota for v in got.values()) and time.time() < deadline:
        m = c.poll(0.5)
        if m is None or m.error():
            continue
        if got[m.partition()] >= quota:
            continue
        print(show(m))
        got[m.partition()] += 1
        nxt[m.partition()] = m.offset() + 1
        if got[m.partition()] == quota:
            c.pause([TopicPartition(topic, m.partition())])
    if any(v < quota for v in got.values()):
        raise SystemExit("group-read: only %s records of %d per partition" % (got, quota))
    # Right after the last record read of each partition (not the client's position,
    # which records polled after the quota moved on).
    c.commit(offsets=[TopicPartition(topic, p, o) for p, o in nxt.items()], asynchronous=False)
    c.close()
elif cmd == "group-rest":
    topic, group = sys.argv[3], sys.argv[4]
    c = consumer(group, reset="error")
    c.subscribe([topic])
    deadline, last = time.time() + 60, time.time()
    while time.time() < deadline and time.time() - last < 5:
        m = c.poll(0.5)
        if m is None:
            continue
        if m.error():
            raise SystemExit("group-rest: %s" % m.error())
        print(show(m))
        last = time.time()
    c.close()
elif cmd == "committed":
    topic, group = sys.argv[3], sys.argv[4]
    c = consumer(group)
    got = c.committed([TopicPartition(topic, p) for p in partitions(topic)], timeout=10)
    print(json.dumps({str(tp.partition): tp.offset for tp in got if tp.offset >= 0}))
    c.close()
elif cmd in ("avro-produce", "avro-consume"):
    from confluent_kafka import DeserializingConsumer, SerializingProducer
    from confluent_kafka.schema_registry import SchemaRegistryClient
    from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
    from confluent_kafka.serialization import StringDeserializer, StringSerializer

    registry, topic, n = sys.argv[3], sys.argv[4], int(sys.argv[5])
    sr = SchemaRegistryClient({"url": registry})
    if cmd == "avro-produce":
        schema = json.dumps({"type": "record", "name": "Order", "namespace": "shop", "fields": [
            {"name": "id", "type": "long"}, {"name": "item", "type": "string"},
            {"name": "qty", "type": ["null", "int"], "default": None}]})
        p = SerializingProducer({"bootstrap.servers": brokers, "key.serializer": StringSerializer(),
                                 "value.serializer": AvroSerializer(sr, schema)})
        for i in range(n):
            p.produce(topic, key="o%d" % i, value={"id": i, "item": "item %d" % i, "qty": None if i % 3 else i})
        p.flush(30)
    else:
        c = DeserializingConsumer({"bootstrap.servers": brokers, "group.id": "avro-%d" % time.time_ns(),
                                   "isolation.level": "read_committed", "auto.offset.reset": "earliest",
                                   "key.deserializer": StringDeserializer(), "value.deserializer": AvroDeserializer(sr)})
        c.subscribe([topic])
        got, deadline = 0, time.time() + 60
        while got < n and time.time() < deadline:
            try:
                m = c.poll(0.5)
            except Exception as e:  # ConsumeError
                if "UNKNOWN_TOPIC_OR_PART" in str(e):
                    time.sleep(0.5)
                    continue  # not created by the mirror yet
                raise
            if m is None:
                continue
            print(json.dumps({"key": m.key(), "value": m.value()}))
            got += 1
        c.close()
else:
    raise SystemExit("unknown command " + cmd)
