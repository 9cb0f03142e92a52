//! Frames between the spawner and its workers over a stream socket: a
//! 4-byte length, a 2-byte delivery number, and a payload. To a worker the
//! payload is `messid\0sender\0recipient\0`; from it, the report.

const HEADER: usize = 6;

/// Append one frame to `out`.
pub fn put(out: &mut Vec<u8>, id: u16, payload: &[u8]) {
    let len = u32::try_from(payload.len() + 2).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&id.to_le_bytes());
    out.extend_from_slice(payload);
}

/// The first whole frame in `buf`: its delivery number, its payload, and how
/// many bytes it takes.
pub fn next(buf: &[u8]) -> Option<(u16, &[u8], usize)> {
    let len = u32::from_le_bytes(buf.get(..4)?.try_into().ok()?) as usize;
    let total = 4 + len.max(2);
    let frame = buf.get(..total)?;
    let id = u16::from_le_bytes([frame[4], frame[5]]);
    Some((id, &frame[HEADER..], total))
}

/// Frames arriving in pieces.
#[derive(Debug, Default)]
pub struct Reader {
    buf: Vec<u8>,
    start: usize,
}

impl Reader {
    /// Room to read into: the caller appends bytes to this vector.
    pub fn buffer(&mut self) -> &mut Vec<u8> {
        if self.start > 0 && self.start * 2 >= self.buf.len() {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        &mut self.buf
    }

    /// The next whole frame, if one has arrived.
    pub fn frame(&mut self) -> Option<(u16, &[u8])> {
        let (id, _, total) = next(&self.buf[self.start..])?;
        let at = self.start;
        self.start += total;
        Some((id, &self.buf[at + HEADER..at + total]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_survive_being_split_anywhere() {
        let mut wire = Vec::new();
        put(&mut wire, 7, b"1\0a@b\0c@d\0");
        put(&mut wire, 65_535, b"");
        let mut reader = Reader::default();
        let mut got = Vec::new();
        for byte in &wire {
            reader.buffer().push(*byte);
            while let Some((id, payload)) = reader.frame() {
                got.push((id, payload.to_vec()));
            }
        }
        assert_eq!(got, [(7, b"1\0a@b\0c@d\0".to_vec()), (65_535, Vec::new())]);
    }
}
