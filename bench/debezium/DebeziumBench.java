// Debezium's Postgres connector in the embedded engine (Debezium's own async engine,
// JSON converter without schemas), driven by `sluice-bench debezium` against the same
// slot settings, WAL and broker as Sluice. Two consumers, as a Debezium user would write
// them:
//   null   counts the change events of the table and drops them;
//   kafka  sends them to Kafka as Debezium Server's Kafka sink does: every record of a
//          batch sent, the batch waited for, then marked processed.
// With --expect N it exits after the N-th change, printing one JSON line with its own
// timings, CPU seconds and peak RSS; without, it runs until killed (the lag runs).
//
// Not part of Sluice: compiled by the bench command into a cache outside the clone.

import io.debezium.engine.ChangeEvent;
import io.debezium.engine.DebeziumEngine;
import io.debezium.engine.format.Json;
import java.lang.management.ManagementFactory;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.HashMap;
import java.util.List;
import java.util.Map;
import java.util.Properties;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.Future;
import java.util.concurrent.atomic.AtomicLong;
import org.apache.kafka.clients.producer.KafkaProducer;
import org.apache.kafka.clients.producer.ProducerRecord;
import org.apache.kafka.clients.producer.RecordMetadata;
import org.apache.kafka.common.serialization.StringSerializer;

public class DebeziumBench {
    static final long START_NS = System.nanoTime();

    public static void main(String[] args) throws Exception {
        Map<String, String> a = new HashMap<>();
        for (int i = 0; i + 1 < args.length; i += 2) {
            a.put(args[i].replaceFirst("^--", ""), args[i + 1]);
        }
        String mode = a.getOrDefault("mode", "null");
        long expect = Long.parseLong(a.getOrDefault("expect", "0"));
        String table = a.getOrDefault("table", "public.bench");

        Properties p = new Properties();
        p.setProperty("name", "bench");
        p.setProperty("connector.class", "io.debezium.connector.postgresql.PostgresConnector");
        p.setProperty("offset.storage", "org.apache.kafka.connect.storage.MemoryOffsetBackingStore");
        p.setProperty("offset.flush.interval.ms", "1000");
        p.setProperty("database.hostname", a.getOrDefault("host", "127.0.0.1"));
        p.setProperty("database.port", a.get("port"));
        p.setProperty("database.user", a.get("user"));
        p.setProperty("database.password", a.get("password"));
        p.setProperty("database.dbname", a.get("database"));
        p.setProperty("topic.prefix", a.getOrDefault("prefix", "dbz"));
        p.setProperty("plugin.name", "pgoutput");
        p.setProperty("slot.name", a.get("slot"));
        p.setProperty("publication.name", a.get("publication"));
        p.setProperty("publication.autocreate.mode", "disabled");
        p.setProperty("snapshot.mode", "no_data");
        p.setProperty("table.include.list", table);
        p.setProperty("converter.schemas.enable", "false");
        p.setProperty("key.converter.schemas.enable", "false");
        p.setProperty("value.converter.schemas.enable", "false");

        AtomicLong seen = new AtomicLong();
        long[] firstNs = {0};
        CountDownLatch done = new CountDownLatch(1);
        String topic = a.getOrDefault("topic", "dbz.public.bench");
        KafkaProducer<String, String> producer = null;
        if (mode.equals("kafka")) {
            Properties kp = new Properties();
            kp.setProperty("bootstrap.servers", a.get("brokers"));
            kp.setProperty("acks", "all");
            kp.setProperty("compression.type", a.getOrDefault("compression", "none"));
            producer = new KafkaProducer<>(kp, new StringSerializer(), new StringSerializer());
        } else if (!mode.equals("null")) {
            throw new IllegalArgumentException("--mode: null or kafka, not " + mode);
        }
        KafkaProducer<String, String> out = producer;

        DebeziumEngine.ChangeConsumer<ChangeEvent<String, String>> consumer = (records, committer) -> {
            List<Future<RecordMetadata>> sent = new ArrayList<>(records.size());
            long changes = 0;
            for (ChangeEvent<String, String> r : records) {
                if (r.value() == null) {
                    continue; // a tombstone
                }
                changes++;
                if (out != null) {
                    sent.add(out.send(new ProducerRecord<>(topic, r.key(), r.value())));
                }
            }
            for (Future<RecordMetadata> f : sent) {
                try {
                    f.get();
                } catch (Exception e) {
                    throw new RuntimeException("kafka send failed", e);
                }
            }
            for (ChangeEvent<String, String> r : records) {
                committer.markProcessed(r);
            }
            committer.markBatchFinished();
            if (changes > 0 && firstNs[0] == 0) {
                firstNs[0] = System.nanoTime();
            }
            if (expect > 0 && seen.addAndGet(changes) >= expect) {
                done.countDown();
            }
        };

        DebeziumEngine<ChangeEvent<String, String>> engine =
                DebeziumEngine.create(Json.class).using(p).notifying(consumer).build();
        ExecutorService ex = Executors.newSingleThreadExecutor();
        ex.execute(engine);
        if (expect == 0) {
            ex.awaitTermination(365, java.util.concurrent.TimeUnit.DAYS);
            return;
        }
        done.await();
        long end = System.nanoTime();
        double cpu = ((com.sun.management.OperatingSystemMXBean) ManagementFactory.getOperatingSystemMXBean())
                .getProcessCpuTime() / 1e9;
        System.out.printf(
                "{\"changes\": %d, \"seconds_from_start\": %.3f, \"seconds_first_to_last\": %.3f, \"cpu_s\": %.3f, \"peak_rss_mb\": %.1f}%n",
                seen.get(), (end - START_NS) / 1e9, (end - firstNs[0]) / 1e9, cpu, peakRssMb());
        System.out.flush();
        Runtime.getRuntime().halt(0); // the measurement is taken; no orderly shutdown to wait for
    }

    static double peakRssMb() throws Exception {
        for (String l : Files.readAllLines(Path.of("/proc/self/status"))) {
            if (l.startsWith("VmHWM:")) {
                return Double.parseDouble(l.substring(6).trim().split("\\s+")[0]) / 1024.0;
            }
        }
        return -1;
    }
}
