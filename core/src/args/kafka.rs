//! `KafkaArgs`: how to reach Kafka (TLS, SASL), which pipeline (topic prefix), and `-X`
//! options passed to librdkafka as they are.

use clap::{Args, ValueEnum};

use super::secret::{readable, Secret};

/// How to reach Kafka, and which pipeline (topic prefix) to work on.
#[derive(Debug, Clone, Args)]
pub struct KafkaArgs {
    /// Kafka bootstrap servers (host:port, comma-separated).
    #[arg(
        long,
        env = "KAFKA_BOOTSTRAP_SERVERS",
        default_value = "127.0.0.1:19092"
    )]
    pub bootstrap_servers: String,

    /// Prefix of every topic name and consumer-group id, so several pipelines share one broker.
    #[arg(long, env = "TALLY_TOPIC_PREFIX", default_value = "tally")]
    pub topic_prefix: String,

    /// Extra librdkafka setting `key=value`, applied last (repeatable), e.g. `-X debug=eos`.
    #[arg(short = 'X', long = "kafka-option", value_parser = super::Quiet(parse_key_value))]
    pub options: Vec<(String, String)>,

    /// How to talk to the brokers.
    #[arg(long, env = "TALLY_KAFKA_SECURITY_PROTOCOL", value_enum, default_value_t = SecurityProtocol::Plaintext)]
    pub kafka_security_protocol: SecurityProtocol,

    /// CA certificate (PEM) that signed the brokers' certificates (TLS); default: the system's.
    #[arg(long, env = "TALLY_KAFKA_SSL_CA_FILE")]
    pub kafka_ssl_ca_file: Option<std::path::PathBuf>,

    /// Client certificate (PEM) for brokers that ask for one (TLS client authentication).
    #[arg(
        long,
        env = "TALLY_KAFKA_SSL_CERT_FILE",
        requires = "kafka_ssl_key_file"
    )]
    pub kafka_ssl_cert_file: Option<std::path::PathBuf>,

    /// The client certificate's private key (PEM, unencrypted).
    #[arg(
        long,
        env = "TALLY_KAFKA_SSL_KEY_FILE",
        requires = "kafka_ssl_cert_file"
    )]
    pub kafka_ssl_key_file: Option<std::path::PathBuf>,

    /// SASL mechanism (with `sasl_plaintext` or `sasl_ssl`).
    #[arg(long, env = "TALLY_KAFKA_SASL_MECHANISM", value_enum, default_value_t = SaslMechanism::ScramSha512)]
    pub kafka_sasl_mechanism: SaslMechanism,

    /// SASL user name.
    #[arg(long, env = "TALLY_KAFKA_SASL_USERNAME")]
    pub kafka_sasl_username: Option<String>,

    /// SASL password: from this env var (there is no flag, so it never shows in a process
    /// list), or from `--kafka-sasl-password-file`.
    #[arg(skip = Secret::from_env("TALLY_KAFKA_SASL_PASSWORD"))]
    pub kafka_sasl_password: Option<Secret>,

    /// File holding the SASL password (first line); wins over `TALLY_KAFKA_SASL_PASSWORD`.
    #[arg(long, env = "TALLY_KAFKA_SASL_PASSWORD_FILE")]
    pub kafka_sasl_password_file: Option<std::path::PathBuf>,
}

/// `security.protocol` of every Kafka client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SecurityProtocol {
    /// No TLS, no authentication.
    #[value(name = "plaintext")]
    Plaintext,
    /// TLS.
    #[value(name = "ssl")]
    Ssl,
    /// SASL authentication without TLS (the password travels in clear with PLAIN).
    #[value(name = "sasl_plaintext", alias = "sasl-plaintext")]
    SaslPlaintext,
    /// SASL authentication over TLS.
    #[value(name = "sasl_ssl", alias = "sasl-ssl")]
    SaslSsl,
}

/// `sasl.mechanisms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SaslMechanism {
    /// PLAIN (only over TLS in production).
    #[value(name = "PLAIN")]
    Plain,
    /// SCRAM-SHA-256.
    #[value(name = "SCRAM-SHA-256")]
    ScramSha256,
    /// SCRAM-SHA-512.
    #[value(name = "SCRAM-SHA-512")]
    ScramSha512,
}

impl KafkaArgs {
    /// Plaintext access to `bootstrap_servers` for pipeline `topic_prefix`, nothing else set
    /// (tests, tools).
    pub fn plaintext(bootstrap_servers: &str, topic_prefix: &str) -> Self {
        Self {
            bootstrap_servers: bootstrap_servers.to_owned(),
            topic_prefix: topic_prefix.to_owned(),
            options: Vec::new(),
            kafka_security_protocol: SecurityProtocol::Plaintext,
            kafka_ssl_ca_file: None,
            kafka_ssl_cert_file: None,
            kafka_ssl_key_file: None,
            kafka_sasl_mechanism: SaslMechanism::ScramSha512,
            kafka_sasl_username: None,
            kafka_sasl_password: None,
            kafka_sasl_password_file: None,
        }
    }

    /// The librdkafka settings for TLS and SASL (password included: never log them).
    pub fn security_settings(&self) -> anyhow::Result<Vec<(&'static str, String)>> {
        let mut out = Vec::new();
        let (tls, sasl) = match self.kafka_security_protocol {
            SecurityProtocol::Plaintext => (false, false),
            SecurityProtocol::Ssl => (true, false),
            SecurityProtocol::SaslPlaintext => (false, true),
            SecurityProtocol::SaslSsl => (true, true),
        };
        let protocol = self
            .kafka_security_protocol
            .to_possible_value()
            .map(|v| v.get_name().to_owned())
            .unwrap_or_default();
        out.push(("security.protocol", protocol));
        if tls {
            let files = [
                ("ssl.ca.location", &self.kafka_ssl_ca_file),
                ("ssl.certificate.location", &self.kafka_ssl_cert_file),
                ("ssl.key.location", &self.kafka_ssl_key_file),
            ];
            for (key, file) in files {
                if let Some(path) = file {
                    readable(path)?;
                    out.push((key, path.display().to_string()));
                }
            }
        }
        if sasl {
            let mechanism = self
                .kafka_sasl_mechanism
                .to_possible_value()
                .map(|v| v.get_name().to_owned())
                .unwrap_or_default();
            out.push(("sasl.mechanisms", mechanism));
            let user = self
                .kafka_sasl_username
                .clone()
                .filter(|u| !u.is_empty())
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "--kafka-sasl-username (TALLY_KAFKA_SASL_USERNAME) is required with SASL"
                    )
                })?;
            out.push(("sasl.username", user));
            let password = match &self.kafka_sasl_password_file {
                Some(path) => Secret::from_file(path)?,
                None => self.kafka_sasl_password.clone().ok_or_else(|| {
                    anyhow::anyhow!("TALLY_KAFKA_SASL_PASSWORD or --kafka-sasl-password-file is required with SASL")
                })?,
            };
            out.push(("sasl.password", password.expose().to_owned()));
        }
        Ok(out)
    }
}

/// `key=value`; the value of a secret key is registered for scrubbing, and an error never
/// echoes the argument (a mistyped `sasl.password:…` is a secret too).
fn parse_key_value(s: &str) -> Result<(String, String), String> {
    let Some((k, v)) = s.split_once('=') else {
        crate::redact::register(s.trim());
        return Err("expected key=value (no `=` in it)".to_owned());
    };
    let (k, v) = (k.trim(), v.trim());
    if crate::redact::is_secret_key(k) {
        crate::redact::register(v);
    }
    Ok((k.to_owned(), v.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kafka_options() {
        assert_eq!(
            parse_key_value("debug = eos").unwrap(),
            ("debug".to_owned(), "eos".to_owned())
        );
        assert!(parse_key_value("nokey").is_err());
    }
}
