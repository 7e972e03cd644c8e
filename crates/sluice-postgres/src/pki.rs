//! A throwaway certificate authority for tests and benchmarks, made with the `openssl`
//! command: a CA and a second one nobody trusts, server certificates for `localhost`
//! and for another name (`elsewhere`), a client certificate for role `certuser`, and a
//! Kafka broker's keystore (the `localhost` key and certificate in one PEM file). The
//! servers of [`crate::cluster`] can read what they need of it.

use std::path::PathBuf;
use std::process::Command;

pub struct Pki {
    dir: PathBuf,
}

impl Pki {
    pub fn make() -> std::io::Result<Pki> {
        let dir = tempfile::Builder::new().prefix("sluice-pki-").tempdir()?.keep();
        let run = |args: &[&str]| -> std::io::Result<()> {
            let out = Command::new("openssl").args(args).current_dir(&dir).output()?;
            if !out.status.success() {
                return Err(std::io::Error::other(format!("openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr))));
            }
            Ok(())
        };
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
        for ca in ["ca", "other-ca"] {
            let (key, pem, subj) = (format!("{ca}.key"), format!("{ca}.pem"), format!("/CN=sluice test {ca}"));
            run(&[&["req", "-x509"][..], &ec, &["-keyout", &key, "-out", &pem, "-days", "2", "-subj", &subj]].concat())?;
        }
        let leaf = |name: &str, cn: &str, ext: &str| -> std::io::Result<()> {
            std::fs::write(dir.join(format!("{name}.ext")), ext)?;
            let (key, csr, pem, ext) = (format!("{name}.key"), format!("{name}.csr"), format!("{name}.pem"), format!("{name}.ext"));
            run(&[&["req"][..], &ec, &["-keyout", &key, "-out", &csr, "-subj", &format!("/CN={cn}")]].concat())?;
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
                &ext,
            ])
        };
        let server = "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n";
        leaf("server", "localhost", &format!("{server}subjectAltName=DNS:localhost\n"))?;
        let keystore = [std::fs::read(dir.join("server.key"))?, std::fs::read(dir.join("server.pem"))?].concat();
        std::fs::write(dir.join("kafka-keystore.pem"), keystore)?;
        leaf("elsewhere", "db.elsewhere.test", &format!("{server}subjectAltName=DNS:db.elsewhere.test\n"))?;
        leaf("client", "certuser", "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=clientAuth\n")?;
        // A server run as another user (`postgres` when this runs as root) reads its
        // files here, and refuses a key others can read.
        let owner = crate::cluster::run_as();
        for f in std::fs::read_dir(&dir)? {
            let p = f?.path();
            let mode = if p.extension().is_some_and(|e| e == "key") { 0o600 } else { 0o644 };
            std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(mode))?;
            if let Some(owner) = owner
                && p.file_name().is_some_and(|n| n == "server.key" || n == "elsewhere.key")
                && !Command::new("chown").arg(owner).arg(&p).status()?.success()
            {
                return Err(std::io::Error::other(format!("could not chown {} to {owner}", p.display())));
            }
        }
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
        Ok(Pki { dir })
    }

    pub fn path(&self, f: &str) -> PathBuf {
        self.dir.join(f)
    }
}
