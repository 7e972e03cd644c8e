//! Throwaway Apache Kafka brokers for tests, benchmarks and demos: a real single-node
//! KRaft broker (combined broker + controller) on free ports, from the jars that
//! `.ci/install-deps` fetches from Maven Central.
//!
//! As with the throwaway Postgres clusters, a small shell supervisor owns the JVM and
//! waits on a pipe held by this process: when this process exits, even by `kill -9`,
//! the pipe closes and the supervisor kills the broker and removes its directory, so no
//! broker outlives the tests that made it.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

/// Where `.ci/install-deps` puts the broker's jars (override: `SLUICE_KAFKA_LIBS`).
const DEFAULT_LIBS: &str = "/var/cache/sluice/kafka-4.4.0/libs";

pub struct TempBroker {
    addr: String,
    /// `localhost:port` of the SASL_SSL listener, when started with one.
    secure_addr: Option<String>,
    dir: PathBuf,
    supervisor: Child,
    control: Option<ChildStdin>,
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl TempBroker {
    /// Formats a new KRaft log directory and starts the broker; returns once it
    /// accepts connections. `extra_conf` lines are appended to `server.properties`
    /// (later keys win), with `{port}` standing for the plaintext listener's port.
    pub fn start(extra_conf: &[&str]) -> std::io::Result<TempBroker> {
        Self::start_with(extra_conf, None)
    }

    /// [`TempBroker::start`] with a second listener, SASL_SSL with SCRAM-SHA-512, on
    /// `localhost`: `keystore` is a PEM file holding the broker's private key and
    /// certificate chain, `users` the SCRAM users (name, password) it knows.
    pub fn start_secured(extra_conf: &[&str], keystore: &std::path::Path, users: &[(&str, &str)]) -> std::io::Result<TempBroker> {
        Self::start_with(extra_conf, Some((keystore, users)))
    }

    fn start_with(extra_conf: &[&str], secured: Option<(&std::path::Path, &[(&str, &str)])>) -> std::io::Result<TempBroker> {
        let libs = std::env::var("SLUICE_KAFKA_LIBS").unwrap_or_else(|_| DEFAULT_LIBS.into());
        if !std::path::Path::new(&libs).join("kafka_2.13-4.4.0.jar").exists() {
            return Err(std::io::Error::other(format!("no Apache Kafka jars in {libs}: run .ci/install-deps (or set SLUICE_KAFKA_LIBS)")));
        }
        let classpath = format!("{libs}/*");
        let dir = tempfile::Builder::new().prefix("sluice-kafka-").tempdir()?.keep();
        let (port, controller) = (free_port()?, free_port()?);
        let addr = format!("127.0.0.1:{port}");
        // The secured listener: clients verify the certificate against `localhost`.
        let (mut listeners, mut advertised, mut map, mut secure_addr) =
            (format!("PLAINTEXT://{addr},CONTROLLER://127.0.0.1:{controller}"), format!("PLAINTEXT://{addr}"), String::new(), None);
        let mut format_args: Vec<String> = Vec::new();
        if let Some((_, users)) = secured {
            let sport = free_port()?;
            listeners.push_str(&format!(",SASL_SSL://127.0.0.1:{sport}"));
            advertised.push_str(&format!(",SASL_SSL://localhost:{sport}"));
            map = ",SASL_SSL:SASL_SSL".into();
            secure_addr = Some(format!("localhost:{sport}"));
            for (name, password) in users {
                format_args.extend(["--add-scram".into(), format!("SCRAM-SHA-512=[name={name},password={password}]")]);
            }
        }
        let mut conf = format!(
            "process.roles=broker,controller\n\
             node.id=1\n\
             controller.quorum.voters=1@127.0.0.1:{controller}\n\
             listeners={listeners}\n\
             advertised.listeners={advertised}\n\
             controller.listener.names=CONTROLLER\n\
             listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT{map}\n\
             inter.broker.listener.name=PLAINTEXT\n\
             log.dirs={logs}\n\
             offsets.topic.replication.factor=1\n\
             offsets.topic.num.partitions=4\n\
             transaction.state.log.replication.factor=1\n\
             transaction.state.log.min.isr=1\n\
             transaction.state.log.num.partitions=4\n\
             share.coordinator.state.topic.replication.factor=1\n\
             share.coordinator.state.topic.min.isr=1\n\
             group.initial.rebalance.delay.ms=0\n\
             num.partitions=1\n",
            logs = dir.join("data").display(),
        );
        if let Some((keystore, _)) = secured {
            conf.push_str(&format!(
                "sasl.enabled.mechanisms=SCRAM-SHA-512\n\
                 listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;\n\
                 ssl.keystore.type=PEM\n\
                 ssl.keystore.location={}\n",
                keystore.display()
            ));
        }
        for line in extra_conf {
            conf.push_str(&line.replace("{port}", &port.to_string()));
            conf.push('\n');
        }
        let props = dir.join("server.properties");
        std::fs::write(&props, conf)?;

        let java = std::env::var("JAVA").unwrap_or_else(|_| "java".into());
        let out = Command::new(&java)
            .args(["-Dorg.slf4j.simpleLogger.defaultLogLevel=warn", "-cp", &classpath, "kafka.tools.StorageTool", "format"])
            .args(["-t", "MkU3OEVBNTcwNTJENDM2Qk", "-c"])
            .arg(&props)
            .args(&format_args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| std::io::Error::other(format!("run {java} (install a JRE 17+): {e}")))?;
        if !out.status.success() {
            return Err(std::io::Error::other(format!(
                "kafka-storage format failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        // The supervisor: starts the JVM, waits for its stdin (our pipe) to close,
        // then kills the broker and removes the directory.
        let script = r#"
            "$JAVA" $KAFKA_HEAP -XX:+UseSerialGC -Dorg.slf4j.simpleLogger.defaultLogLevel=warn \
                -cp "$CP" kafka.Kafka "$DIR/server.properties" >"$DIR/broker.log" 2>&1 </dev/null &
            pid=$!
            echo $pid >"$DIR/broker.pid"
            cat >/dev/null
            kill -9 $pid 2>/dev/null
            wait $pid 2>/dev/null
            rm -rf "$DIR"
        "#;
        let mut supervisor = Command::new("sh")
            .args(["-c", script])
            .env("JAVA", &java)
            .env("CP", &classpath)
            .env("DIR", &dir)
            .env("KAFKA_HEAP", std::env::var("SLUICE_KAFKA_HEAP").unwrap_or_else(|_| "-Xms128m -Xmx768m".into()))
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let control = supervisor.stdin.take();
        let mut broker = TempBroker { addr, secure_addr, dir, supervisor, control };
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::net::TcpStream::connect(&broker.addr).is_err() {
            if Instant::now() > deadline {
                let log = std::fs::read_to_string(broker.dir.join("broker.log")).unwrap_or_default();
                broker.stop();
                return Err(std::io::Error::other(format!("the Kafka broker did not listen within 60 s:\n{log}")));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(broker)
    }

    /// `host:port` of the broker's PLAINTEXT listener.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// `localhost:port` of the SASL_SSL listener ([`TempBroker::start_secured`]).
    pub fn secure_addr(&self) -> Option<&str> {
        self.secure_addr.as_deref()
    }

    /// The JVM's process id (tests stop and continue it to make the broker hang).
    pub fn pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.dir.join("broker.pid")).ok()?.trim().parse().ok()
    }

    /// The broker's own log (warnings and errors).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("broker.log")).unwrap_or_default()
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.control.take() {
            let _ = c.write_all(b"");
            drop(c); // EOF: the supervisor kills the broker and cleans up
        }
        let _ = self.supervisor.wait();
    }
}

impl Drop for TempBroker {
    fn drop(&mut self) {
        self.stop();
    }
}
