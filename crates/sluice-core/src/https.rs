//! HTTPS clients for every HTTP peer a pipeline talks to (webhooks, enrichers, search
//! services, schema registries): the authority to trust, and one line saying what is
//! wrong when a peer's certificate is refused.

use std::path::Path;

/// A client builder that trusts only the authority given (a private CA): a PEM file
/// (`ca_file`), or PEM text (`ca_pem`, for tenants, who may not name a file on the
/// server); the system's authorities when neither is. `setting` names the file
/// option in errors (`sink.webhook.ca_file`); the text option is its `ca_pem` twin.
pub fn client(ca_file: Option<&Path>, ca_pem: Option<&str>, setting: &str) -> Result<reqwest::ClientBuilder, String> {
    let builder = reqwest::Client::builder();
    let pem_setting = setting.replace("ca_file", "ca_pem");
    let (pem, what) = match (ca_file, ca_pem) {
        (None, None) => return Ok(builder),
        (Some(_), Some(_)) => return Err(format!("{setting} and {pem_setting} both name the trusted authority: give one of them")),
        (Some(ca), None) => {
            (std::fs::read(ca).map_err(|e| format!("{setting} {}: {e}", ca.display()))?, format!("{setting} {}", ca.display()))
        }
        (None, Some(text)) => (text.as_bytes().to_vec(), pem_setting),
    };
    let certs = reqwest::Certificate::from_pem_bundle(&pem)
        .ok()
        .filter(|c| !c.is_empty())
        .ok_or_else(|| format!("{what}: not a PEM certificate"))?;
    Ok(builder.tls_certs_only(certs))
}

/// Checks a private authority's settings without I/O: one of `ca_file` and `ca_pem`,
/// the text a PEM certificate, and only for an https URL. The error names the option
/// (`setting` names the file option, as for [`client`]). The file is read when the
/// client is built.
pub fn check_private_ca(https: bool, ca_file: Option<&Path>, ca_pem: Option<&str>, setting: &str) -> Result<(), String> {
    let pem_setting = setting.replace("ca_file", "ca_pem");
    if ca_file.is_some() && ca_pem.is_some() {
        return Err(format!("{setting} and {pem_setting} both name the trusted authority: give one of them"));
    }
    if !https {
        let given = if ca_file.is_some() {
            setting.to_string()
        } else if ca_pem.is_some() {
            pem_setting
        } else {
            return Ok(());
        };
        return Err(format!("{given}: only an https:// url uses it"));
    }
    if let Some(text) = ca_pem
        && reqwest::Certificate::from_pem_bundle(text.as_bytes()).map_or(true, |c| c.is_empty())
    {
        return Err(format!("{pem_setting}: not a PEM certificate: paste the authority's PEM, from -----BEGIN CERTIFICATE----- on"));
    }
    Ok(())
}

/// When a request failed because the peer's certificate was refused: one line naming
/// the peer, the cause and the fix (`ca_setting` is the option that names an
/// authority). Other failures: `None`.
pub fn certificate_refused(url: &str, e: &reqwest::Error, ca_setting: &str) -> Option<String> {
    let mut detail = String::new();
    let mut cause: Option<&dyn std::error::Error> = Some(e);
    while let Some(c) = cause {
        detail.push_str(&format!("{c} {c:?} "));
        cause = c.source();
    }
    certificate_problem(&detail, ca_setting).map(|why| format!("TLS to {url} failed: {why}"))
}

/// The certificate problems a TLS library's error text names, said for a user.
pub fn certificate_problem(detail: &str, ca_setting: &str) -> Option<String> {
    let has = |a: &str, b: &str| detail.contains(a) || detail.contains(b);
    Some(if has("UnknownIssuer", "unknown issuer") {
        format!("the server's certificate is signed by an unknown CA: set {ca_setting} to the authority that signed it")
    } else if has("NotValidForName", "not valid for name") {
        "the server's certificate is not issued for this host name (hostname mismatch): use a name in the certificate".into()
    } else if has("Expired", "expired") {
        "the server's certificate has expired".into()
    } else if has("CertificateRequired", "certificate required") {
        "the server requires a client certificate".into()
    } else {
        return None;
    })
}

/// `url` fit for a message or a log: any password in it replaced by `(set)`.
pub fn shown(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("(set)"));
            u.to_string().trim_end_matches('/').to_string()
        }
        Ok(_) => url.to_string(),
        Err(_) => "(an unparsable url)".into(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn passwords_are_not_shown() {
        assert_eq!(super::shown("https://u:secret@reg:8081/x"), "https://u:(set)@reg:8081/x");
        assert_eq!(super::shown("http://reg:8081"), "http://reg:8081");
    }

    #[test]
    fn certificate_problems_are_said_with_the_setting() {
        let why = super::certificate_problem("invalid peer certificate: UnknownIssuer", "sink.webhook.ca_file").unwrap();
        assert!(why.contains("unknown CA") && why.contains("sink.webhook.ca_file"), "{why}");
        assert!(super::certificate_problem("connection refused", "x").is_none());
        let e = super::client(Some(std::path::Path::new("/nonexistent.pem")), None, "sink.webhook.ca_file").unwrap_err();
        assert!(e.starts_with("sink.webhook.ca_file /nonexistent.pem"), "{e}");
        let e = super::client(None, Some("junk"), "sink.webhook.ca_file").unwrap_err();
        assert_eq!(e, "sink.webhook.ca_pem: not a PEM certificate");
    }

    #[test]
    fn a_private_authority_is_checked_without_io() {
        let check = |https, file: Option<&str>, pem: Option<&str>| {
            super::check_private_ca(https, file.map(std::path::Path::new), pem, "sink.search.ca_file")
        };
        assert!(check(true, Some("/nonexistent.pem"), None).is_ok(), "the file is read when the client is built");
        assert!(check(true, None, None).is_ok() && check(false, None, None).is_ok());
        let both = check(true, Some("/ca.pem"), Some("x")).unwrap_err();
        assert_eq!(both, "sink.search.ca_file and sink.search.ca_pem both name the trusted authority: give one of them");
        let junk = check(true, None, Some("junk")).unwrap_err();
        assert!(junk.starts_with("sink.search.ca_pem: not a PEM certificate: paste"), "{junk}");
        assert_eq!(check(false, None, Some("x")).unwrap_err(), "sink.search.ca_pem: only an https:// url uses it");
        assert_eq!(check(false, Some("/ca.pem"), None).unwrap_err(), "sink.search.ca_file: only an https:// url uses it");
    }
}
