//! The ingest protocol between `producer push` and `producer serve` (docs/messages.md, "Ingest
//! over HTTP"): header names, file names the server accepts, upload ids and body checksums.
//! Pure: no I/O but reading a file to checksum it.

use std::fmt;
use std::io::Read;
use std::path::Path;
use std::str::FromStr;

use sha2::Digest;

/// Request header: the upload's id (resumable uploads; without it an upload cannot resume).
pub const UPLOAD_ID: &str = "tally-upload-id";
/// Request header: the whole file's checksum, `xxh3:<32 hex>` or `sha256:<64 hex>`.
pub const CHECKSUM: &str = "tally-checksum";
/// Request header: the file's modification time at the generator, in unix seconds; the
/// server gives the file that time (it decides the file's usage period).
pub const FILE_TIME: &str = "tally-file-time";
/// Response header: how many bytes of the upload the server holds.
pub const UPLOAD_OFFSET: &str = "upload-offset";
/// Response header of `HEAD /v1/uploads/{id}`: `receiving` or `complete`.
pub const UPLOAD_STATE: &str = "tally-upload-state";
/// Response header: the file name an upload id belongs to.
pub const UPLOAD_NAME: &str = "tally-upload-name";

/// Longest file name accepted, in bytes.
pub const NAME_BYTES_MAX: usize = 200;

/// Why a file name is refused, or `Ok` for one plain file name: 1 to [`NAME_BYTES_MAX`] bytes
/// of `A-Z a-z 0-9 . _ -`, not starting with `.` (so neither `..` nor a hidden file), and no
/// name `producer watch` would take for a temporary, partial or lock file.
pub fn check_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() || name.len() > NAME_BYTES_MAX {
        return Err("a file name has 1 to 200 bytes");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err("a file name has only the characters A-Z a-z 0-9 . _ -");
    }
    if name.starts_with('.') {
        return Err("a file name does not start with `.`");
    }
    if !crate::watch::is_candidate_name(name) {
        return Err("a file name does not end with .tmp, .part or .lock");
    }
    Ok(())
}

/// Why an upload id is refused, or `Ok`: 8 to 64 characters of `A-Z a-z 0-9 _ -`.
pub fn check_upload_id(id: &str) -> Result<(), &'static str> {
    if (8..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'))
    {
        Ok(())
    } else {
        Err("an upload id has 8 to 64 characters of A-Z a-z 0-9 _ -")
    }
}

/// Where the server keeps upload `id` of the token named `token`: ids are chosen by clients
/// (and `push` derives them from what anyone can know of a file), so each token has its own:
/// the same id from another token is another upload, and a token never reaches, learns about
/// or touches another's.
pub fn scoped_upload_id(token: &str, id: &str) -> String {
    let key = format!("{token}\0{id}");
    format!("u{:032x}", xxhash_rust::xxh3::xxh3_128(key.as_bytes()))
}

/// The id `push` gives the upload of `name` with these bytes: the same file pushed again, by
/// this client or after a restart, is the same upload (resumed, or confirmed without a second
/// announcement).
pub fn upload_id(name: &str, size: u64, checksum: &Checksum) -> String {
    let key = format!("{name}\0{size}\0{checksum}");
    format!("{:032x}", xxhash_rust::xxh3::xxh3_128(key.as_bytes()))
}

/// A checksum algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Algorithm {
    /// XXH3, 128 bits: several GB/s, against transmission and storage errors.
    Xxh3,
    /// SHA-256: slower, cryptographic.
    Sha256,
}

/// A whole file's checksum, as the `tally-checksum` header writes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checksum {
    /// The algorithm.
    pub algorithm: Algorithm,
    /// The digest, lowercase hex.
    pub hex: String,
}

impl fmt::Display for Checksum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self.algorithm {
            Algorithm::Xxh3 => "xxh3",
            Algorithm::Sha256 => "sha256",
        };
        write!(f, "{name}:{}", self.hex)
    }
}

impl FromStr for Checksum {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (name, hex) = s
            .trim()
            .split_once(':')
            .ok_or_else(|| format!("expected xxh3:<hex> or sha256:<hex>, got `{s}`"))?;
        let (algorithm, digits) = match name.to_ascii_lowercase().as_str() {
            "xxh3" => (Algorithm::Xxh3, 32),
            "sha256" | "sha-256" => (Algorithm::Sha256, 64),
            other => return Err(format!("unknown checksum algorithm `{other}`")),
        };
        let hex = hex.to_ascii_lowercase();
        if hex.len() != digits || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("a {name} checksum has {digits} hex digits"));
        }
        Ok(Self { algorithm, hex })
    }
}

/// Computes a checksum over everything `reader` yields.
pub fn checksum_of(algorithm: Algorithm, mut reader: impl Read) -> std::io::Result<Checksum> {
    let mut buf = vec![0u8; 1 << 20];
    let hex = match algorithm {
        Algorithm::Xxh3 => {
            let mut hasher = xxhash_rust::xxh3::Xxh3::new();
            loop {
                let n = read_some(&mut reader, &mut buf)?;
                if n == 0 {
                    break format!("{:032x}", hasher.digest128());
                }
                hasher.update(&buf[..n]);
            }
        }
        Algorithm::Sha256 => {
            let mut hasher = sha2::Sha256::new();
            loop {
                let n = read_some(&mut reader, &mut buf)?;
                if n == 0 {
                    let digest = hasher.finalize();
                    break digest.iter().map(|b| format!("{b:02x}")).collect();
                }
                hasher.update(&buf[..n]);
            }
        }
    };
    Ok(Checksum { algorithm, hex })
}

fn read_some(reader: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    loop {
        match reader.read(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// The checksum of the file at `path`.
pub fn checksum_file(algorithm: Algorithm, path: &Path) -> std::io::Result<Checksum> {
    checksum_of(algorithm, std::fs::File::open(path)?)
}

/// A `Content-Range: bytes START-END/TOTAL` (or `bytes */TOTAL`: no bytes, the total only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContentRange {
    /// First byte offset the body carries (`None` for `*`).
    pub start: Option<u64>,
    /// Last byte offset the body carries, inclusive.
    pub end: Option<u64>,
    /// The whole file's size.
    pub total: u64,
}

impl FromStr for ContentRange {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("expected `bytes START-END/TOTAL` or `bytes */TOTAL`, got `{s}`");
        let rest = s.trim().strip_prefix("bytes ").ok_or_else(bad)?;
        let (range, total) = rest.split_once('/').ok_or_else(bad)?;
        let total: u64 = total.parse().map_err(|_| bad())?;
        if range == "*" {
            return Ok(Self {
                start: None,
                end: None,
                total,
            });
        }
        let (start, end) = range.split_once('-').ok_or_else(bad)?;
        let (start, end): (u64, u64) = (
            start.parse().map_err(|_| bad())?,
            end.parse().map_err(|_| bad())?,
        );
        if start > end || end >= total {
            return Err(bad());
        }
        Ok(Self {
            start: Some(start),
            end: Some(end),
            total,
        })
    }
}

impl ContentRange {
    /// How many bytes a body with this range carries.
    pub fn carried(&self) -> u64 {
        self.start.zip(self.end).map_or(0, |(s, e)| e - s + 1)
    }
}

impl fmt::Display for ContentRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.start, self.end) {
            (Some(start), Some(end)) => write!(f, "bytes {start}-{end}/{}", self.total),
            _ => write!(f, "bytes */{}", self.total),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for good in ["a", "usage-2026-11-27T10.dat", "26593136.dat", "A_b-9.c"] {
            assert_eq!(check_name(good), Ok(()), "{good}");
        }
        let long = "a".repeat(NAME_BYTES_MAX + 1);
        for bad in [
            "", ".", "..", ".hidden", "a/b", "../x", "a\\b", "a b", "x.tmp", "x.part", "x.lock",
            "é", "a\0b", "%2e%2e", &long,
        ] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn checksums_round_trip_and_refuse_garbage() {
        let x = checksum_of(Algorithm::Xxh3, &b"hello"[..]).unwrap();
        assert_eq!(x.to_string().parse::<Checksum>().unwrap(), x);
        let s = checksum_of(Algorithm::Sha256, &b"hello"[..]).unwrap();
        assert_eq!(
            s.hex,
            "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        for bad in [
            "xxh3:12",
            "md5:00",
            "sha256",
            "xxh3:zz000000000000000000000000000000",
        ] {
            assert!(bad.parse::<Checksum>().is_err(), "{bad}");
        }
    }

    #[test]
    fn content_ranges() {
        let r: ContentRange = "bytes 10-19/20".parse().unwrap();
        assert_eq!((r.start, r.end, r.total), (Some(10), Some(19), 20));
        assert_eq!(r.to_string(), "bytes 10-19/20");
        let r: ContentRange = "bytes */0".parse().unwrap();
        assert_eq!((r.start, r.total), (None, 0));
        for bad in ["bytes 5-4/10", "bytes 0-10/10", "items 0-1/2", "bytes 0-1"] {
            assert!(bad.parse::<ContentRange>().is_err(), "{bad}");
        }
    }

    #[test]
    fn upload_ids_depend_on_name_and_bytes() {
        let c = checksum_of(Algorithm::Xxh3, &b"x"[..]).unwrap();
        let id = upload_id("a.dat", 1, &c);
        assert!(check_upload_id(&id).is_ok());
        assert_eq!(id, upload_id("a.dat", 1, &c));
        assert_ne!(id, upload_id("b.dat", 1, &c));
    }
}
