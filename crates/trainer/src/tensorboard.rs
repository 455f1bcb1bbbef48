//! A TensorBoard event-file writer for scalars.
//!
//! Written here instead of using `tensorboard-rs` (see ARCHITECTURE.md): that crate panics on
//! I/O errors on its own thread and truncates files created in the same second, and it pulls an
//! old protobuf. The format is small: TFRecord framing
//! `u64 len | masked_crc32c(len) | data | masked_crc32c(data)` around `Event` protobufs; the first
//! event carries `file_version = "brain.Event:2"`, scalars are `Summary.Value{tag, simple_value}`.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// Appends scalar events to one `events.out.tfevents.*` file.
#[derive(Debug)]
pub struct EventWriter {
    path: PathBuf,
    out: BufWriter<File>,
}

fn mask(crc: u32) -> u32 {
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn key(field: u32, wire: u32, out: &mut Vec<u8>) {
    varint(u64::from((field << 3) | wire), out);
}

fn bytes_field(field: u32, data: &[u8], out: &mut Vec<u8>) {
    key(field, 2, out);
    varint(data.len() as u64, out);
    out.extend_from_slice(data);
}

fn wall_time() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Encodes an `Event { wall_time, step, (file_version | summary) }`.
fn event(step: i64, body: &dyn Fn(&mut Vec<u8>)) -> Vec<u8> {
    let mut e = Vec::new();
    key(1, 1, &mut e);
    e.extend_from_slice(&wall_time().to_le_bytes());
    key(2, 0, &mut e);
    varint(step as u64, &mut e);
    body(&mut e);
    e
}

fn scalar_summary(tag: &str, value: f32) -> Vec<u8> {
    let mut v = Vec::new();
    bytes_field(1, tag.as_bytes(), &mut v);
    key(2, 5, &mut v);
    v.extend_from_slice(&value.to_le_bytes());
    let mut s = Vec::new();
    bytes_field(1, &v, &mut s);
    s
}

impl EventWriter {
    /// Creates a new event file in `dir` (created if needed). The name includes the time and
    /// process id, so writers never collide.
    ///
    /// # Errors
    /// The folder or file cannot be created.
    pub fn create(dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
        let host = host.trim();
        let path = dir.join(format!(
            "events.out.tfevents.{now}.{}.{}.bellows",
            if host.is_empty() { "localhost" } else { host },
            std::process::id()
        ));
        let file = File::options().create_new(true).write(true).open(&path)?;
        let mut w = EventWriter {
            path,
            out: BufWriter::new(file),
        };
        let first = event(0, &|e: &mut Vec<u8>| bytes_field(3, b"brain.Event:2", e));
        w.record(&first)?;
        w.out.flush()?;
        Ok(w)
    }

    /// The file being written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one scalar.
    ///
    /// # Errors
    /// The write fails.
    pub fn scalar(&mut self, tag: &str, value: f32, step: u64) -> std::io::Result<()> {
        let summary = scalar_summary(tag, value);
        let e = event(step as i64, &|e: &mut Vec<u8>| bytes_field(5, &summary, e));
        self.record(&e)
    }

    /// Flushes buffered events to the file.
    ///
    /// # Errors
    /// The write fails.
    pub fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }

    fn record(&mut self, data: &[u8]) -> std::io::Result<()> {
        let len = (data.len() as u64).to_le_bytes();
        self.out.write_all(&len)?;
        self.out
            .write_all(&mask(crc32c::crc32c(&len)).to_le_bytes())?;
        self.out.write_all(data)?;
        self.out
            .write_all(&mask(crc32c::crc32c(data)).to_le_bytes())
    }
}

/// Reads back the `(tag, step, value)` scalars of an event file, verifying every CRC
/// (used by tests and by `bellows` tooling to inspect runs).
///
/// # Errors
/// A truncated record or a CRC mismatch, naming the byte offset.
pub fn read_scalars(path: &Path) -> std::io::Result<Vec<(String, u64, f32)>> {
    let bytes = std::fs::read(path)?;
    let bad = |at: usize, m: &str| {
        std::io::Error::new(std::io::ErrorKind::InvalidData, format!("offset {at}: {m}"))
    };
    let mut out = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let head = bytes
            .get(at..at + 12)
            .ok_or_else(|| bad(at, "truncated header"))?;
        let len = u64::from_le_bytes(head[..8].try_into().map_err(|_| bad(at, "header"))?) as usize;
        if u32::from_le_bytes(head[8..12].try_into().map_err(|_| bad(at, "header"))?)
            != mask(crc32c::crc32c(&head[..8]))
        {
            return Err(bad(at, "length crc mismatch"));
        }
        let data = bytes
            .get(at + 12..at + 12 + len)
            .ok_or_else(|| bad(at, "truncated data"))?;
        let crc = bytes
            .get(at + 12 + len..at + 16 + len)
            .ok_or_else(|| bad(at, "truncated crc"))?;
        if u32::from_le_bytes(crc.try_into().map_err(|_| bad(at, "crc"))?)
            != mask(crc32c::crc32c(data))
        {
            return Err(bad(at, "data crc mismatch"));
        }
        decode_event(data, &mut out).ok_or_else(|| bad(at, "malformed event"))?;
        at += 16 + len;
    }
    Ok(out)
}

fn read_varint(d: &[u8], at: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *d.get(*at)?;
        *at += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b < 0x80 {
            return Some(v);
        }
    }
    None
}

/// Iterates `(field, wire, payload)` of a protobuf message; payload is the raw bytes or varint.
fn fields(d: &[u8]) -> Option<Vec<(u32, &[u8], u64)>> {
    let mut at = 0;
    let mut out = Vec::new();
    while at < d.len() {
        let k = read_varint(d, &mut at)?;
        let (field, wire) = ((k >> 3) as u32, k & 7);
        match wire {
            0 => out.push((field, &d[at..at], read_varint(d, &mut at)?)),
            1 => {
                out.push((field, d.get(at..at + 8)?, 0));
                at += 8;
            }
            2 => {
                let n = read_varint(d, &mut at)? as usize;
                out.push((field, d.get(at..at + n)?, 0));
                at += n;
            }
            5 => {
                out.push((field, d.get(at..at + 4)?, 0));
                at += 4;
            }
            _ => return None,
        }
    }
    Some(out)
}

fn decode_event(d: &[u8], out: &mut Vec<(String, u64, f32)>) -> Option<()> {
    let f = fields(d)?;
    let step = f.iter().find(|x| x.0 == 2).map_or(0, |x| x.2);
    for (_, summary, _) in f.iter().filter(|x| x.0 == 5) {
        for (_, value, _) in fields(summary)?.iter().filter(|x| x.0 == 1) {
            let vf = fields(value)?;
            let tag = vf
                .iter()
                .find(|x| x.0 == 1)
                .map(|x| String::from_utf8_lossy(x.1).into_owned())?;
            let v = vf
                .iter()
                .find(|x| x.0 == 2)
                .map(|x| f32::from_le_bytes(x.1.try_into().unwrap_or([0; 4])))?;
            out.push((tag, step, v));
        }
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scalars_round_trip_with_valid_crcs() {
        let dir = std::env::temp_dir().join(format!("bellows-tb-{}", std::process::id()));
        let mut w = EventWriter::create(&dir).expect("create");
        w.scalar("train/loss", 2.5, 1).expect("write");
        w.scalar("train/lr", 1e-3, 300).expect("write");
        w.flush().expect("flush");
        let got = read_scalars(w.path()).expect("read");
        assert_eq!(
            got,
            vec![
                ("train/loss".into(), 1, 2.5),
                ("train/lr".into(), 300, 1e-3)
            ]
        );
        // A flipped byte must be detected.
        let mut bytes = std::fs::read(w.path()).expect("read");
        let n = bytes.len();
        bytes[n - 6] ^= 1;
        std::fs::write(w.path(), bytes).expect("write");
        assert!(read_scalars(w.path()).is_err());
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn crc32c_mask_matches_tensorflow() {
        // TensorFlow's masked crc of the empty string's crc (0) is 0xa282ead8.
        assert_eq!(mask(0), 0xa282_ead8);
        // crc32c("123456789") = 0xe3069283 (the standard check value).
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
    }
}
