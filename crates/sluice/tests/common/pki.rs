//! A throwaway certificate authority for the TLS tests, made with the `openssl`
//! command.

use std::path::PathBuf;
use std::process::Command;

/// A certificate authority, a second one nobody trusts, server certificates for
/// `localhost` and for another name, and a client certificate for role `certuser`.
pub struct Pki {
    dir: PathBuf,
}

impl Pki {
    pub fn make() -> Pki {
        let dir = tempfile::Builder::new().prefix("sluice-pki-").tempdir().unwrap().keep();
        let run = |args: &[&str]| {
            let out = Command::new("openssl").args(args).current_dir(&dir).output().expect("run openssl");
            assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        };
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
        for ca in ["ca", "other-ca"] {
            let (key, pem, subj) = (format!("{ca}.key"), format!("{ca}.pem"), format!("/CN=sluice test {ca}"));
            run(&[&["req", "-x509"][..], &ec, &["-keyout", &key, "-out", &pem, "-days", "2", "-subj", &subj]].concat());
        }
        let leaf = |name: &str, cn: &str, ext: &str| {
            std::fs::write(dir.join(format!("{name}.ext")), ext).unwrap();
            let (key, csr, pem) = (format!("{name}.key"), format!("{name}.csr"), format!("{name}.pem"));
            run(&[&["req"][..], &ec, &["-keyout", &key, "-out", &csr, "-subj", &format!("/CN={cn}")]].concat());
            run(&[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &pem,
                "-days",
                "2",
                "-extfile",
                &format!("{name}.ext"),
            ]);
        };
        let server = "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n";
        leaf("server", "localhost", &format!("{server}subjectAltName=DNS:localhost\n"));
        // A Kafka broker's keystore: its key and certificate in one PEM file.
        let keystore = [std::fs::read(dir.join("server.key")).unwrap(), std::fs::read(dir.join("server.pem")).unwrap()].concat();
        std::fs::write(dir.join("kafka-keystore.pem"), keystore).unwrap();
        leaf("elsewhere", "db.elsewhere.test", &format!("{server}subjectAltName=DNS:db.elsewhere.test\n"));
        leaf("client", "certuser", "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=clientAuth\n");
        // The server (run as `postgres` when the tests run as root) reads its files
        // here, and refuses a key others can read.
        let as_root = Command::new("id").arg("-u").output().is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
        let owner = if Command::new("id").arg("postgres").output().is_ok_and(|o| o.status.success()) { "postgres" } else { "nobody" };
        for f in std::fs::read_dir(&dir).unwrap() {
            let p = f.unwrap().path();
            let mode = if p.extension().is_some_and(|e| e == "key") { 0o600 } else { 0o644 };
            std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(mode)).unwrap();
            if as_root && p.file_name().is_some_and(|n| n == "server.key" || n == "elsewhere.key") {
                assert!(Command::new("chown").arg(owner).arg(&p).status().unwrap().success());
            }
        }
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        Pki { dir }
    }

    pub fn path(&self, f: &str) -> PathBuf {
        self.dir.join(f)
    }
}
