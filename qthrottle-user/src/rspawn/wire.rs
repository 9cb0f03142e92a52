//! qmail-send's spawn protocol: delivery numbers, commands, and the answers to
//! commands that cannot be run.

pub use crate::config::Wire;

/// Append a delivery number (or the concurrency announcement) as `wire`
/// carries it.
pub fn put_number(wire: Wire, out: &mut Vec<u8>, n: u16) {
    match wire {
        Wire::OneByte => out.push(n as u8),
        Wire::TwoByte => out.extend_from_slice(&n.to_le_bytes()),
    }
}

/// The most bytes kept of one field; a longer field makes the command fail as
/// qmail's spawner fails when it runs out of memory.
const MAX_FIELD: usize = 1 << 20;

/// One delivery command: the fields as they arrived, each with its NUL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    pub delnum: u16,
    /// `messid\0sender\0recipient\0`.
    pub fields: Vec<u8>,
    sender_at: usize,
    recip_at: usize,
    /// A field was too long to keep.
    pub overflow: bool,
}

impl Command {
    /// The message id, without its NUL.
    pub fn messid(&self) -> &[u8] {
        &self.fields[..self.sender_at - 1]
    }

    /// The envelope sender, without its NUL.
    #[cfg(test)]
    pub fn sender(&self) -> &[u8] {
        &self.fields[self.sender_at..self.recip_at - 1]
    }

    /// The recipient, without its NUL.
    pub fn recipient(&self) -> &[u8] {
        &self.fields[self.recip_at..self.fields.len() - 1]
    }

    /// What follows the last `@` of the recipient, if it has one.
    pub fn host(&self) -> Option<&[u8]> {
        host_of(self.recipient())
    }
}

/// What follows the last `@` of an address, if it has one.
pub fn host_of(recipient: &[u8]) -> Option<&[u8]> {
    let at = recipient.iter().rposition(|&b| b == b'@')?;
    Some(&recipient[at + 1..])
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Delnum,
    DelnumHigh,
    Messid,
    Sender,
    Recipient,
}

/// Splits the command stream into commands, across reads of any size.
#[derive(Debug)]
pub struct Parser {
    wire: Wire,
    stage: Stage,
    delnum: u16,
    fields: Vec<u8>,
    sender_at: usize,
    recip_at: usize,
    field_len: usize,
    overflow: bool,
}

impl Parser {
    pub fn new(wire: Wire) -> Self {
        Parser {
            wire,
            stage: Stage::Delnum,
            delnum: 0,
            fields: Vec::new(),
            sender_at: 0,
            recip_at: 0,
            field_len: 0,
            overflow: false,
        }
    }

    /// Consume `data`, appending each command it completes to `out`.
    pub fn feed(&mut self, data: &[u8], out: &mut Vec<Command>) {
        let mut rest = data;
        while !rest.is_empty() {
            rest = match self.stage {
                Stage::Delnum | Stage::DelnumHigh => self.number_byte(rest),
                _ => self.field_bytes(rest, out),
            };
        }
    }

    fn number_byte<'a>(&mut self, data: &'a [u8]) -> &'a [u8] {
        let byte = u16::from(data[0]);
        match (self.stage, self.wire) {
            (Stage::Delnum, Wire::TwoByte) => {
                self.delnum = byte;
                self.stage = Stage::DelnumHigh;
            }
            (Stage::Delnum, Wire::OneByte) => self.begin_fields(byte),
            _ => self.begin_fields(self.delnum | (byte << 8)),
        }
        &data[1..]
    }

    fn begin_fields(&mut self, delnum: u16) {
        self.delnum = delnum;
        self.stage = Stage::Messid;
        self.fields = Vec::new();
        self.field_len = 0;
        self.overflow = false;
    }

    fn field_bytes<'a>(&mut self, data: &'a [u8], out: &mut Vec<Command>) -> &'a [u8] {
        let (chunk, ended) = match data.iter().position(|&b| b == 0) {
            Some(nul) => (&data[..=nul], true),
            None => (data, false),
        };
        self.keep(chunk, ended);
        if ended {
            self.end_field(out);
        }
        &data[chunk.len()..]
    }

    /// Keep a piece of the current field, up to `MAX_FIELD` bytes of it.
    fn keep(&mut self, chunk: &[u8], ended: bool) {
        let body = if ended {
            &chunk[..chunk.len() - 1]
        } else {
            chunk
        };
        let room = MAX_FIELD.saturating_sub(self.field_len);
        if body.len() > room {
            self.overflow = true;
        }
        let kept = &body[..body.len().min(room)];
        self.fields.extend_from_slice(kept);
        self.field_len += kept.len();
        if ended {
            self.fields.push(0);
            self.field_len = 0;
        }
    }

    fn end_field(&mut self, out: &mut Vec<Command>) {
        match self.stage {
            Stage::Messid => {
                self.sender_at = self.fields.len();
                self.stage = Stage::Sender;
            }
            Stage::Sender => {
                self.recip_at = self.fields.len();
                self.stage = Stage::Recipient;
            }
            _ => {
                out.push(Command {
                    delnum: self.delnum,
                    fields: std::mem::take(&mut self.fields),
                    sender_at: self.sender_at,
                    recip_at: self.recip_at,
                    overflow: self.overflow,
                });
                self.stage = Stage::Delnum;
            }
        }
    }
}

/// Answers to commands that cannot be run, word for word as qmail's spawner
/// gives them.
pub mod answer {
    pub const OUT_OF_MEMORY: &[u8] = b"Zqmail-spawn out of memory. (#4.3.0)\n";
    pub const DELNUM_TOO_BIG: &[u8] = b"ZInternal error: delnum too big. (#4.3.5)\n";
    pub const DELNUM_IN_USE: &[u8] = b"ZInternal error: delnum in use. (#4.3.5)\n";
    pub const MESSID_NONNUMERIC: &[u8] = b"DInternal error: messid has nonnumerics. (#5.3.5)\n";
    pub const MESSID_TOO_LONG: &[u8] = b"DInternal error: messid too long. (#5.3.5)\n";
    pub const MESSID_TOO_SHORT: &[u8] = b"DInternal error: messid too short. (#5.3.5)\n";
    pub const NO_HOST: &[u8] = b"DSorry, address must include host name. (#5.1.3)\n";
    pub const CANNOT_OPEN: &[u8] = b"Zqmail-spawn unable to open message. (#4.3.0)\n";
    pub const CANNOT_FSTAT: &[u8] = b"Zqmail-spawn unable to fstat message. (#4.3.0)\n";
    pub const WRONG_TYPE: &[u8] = b"ZSorry, message has wrong type. (#4.3.5)\n";
    pub const WRONG_OWNER: &[u8] = b"ZSorry, message has wrong owner. (#4.3.5)\n";
    pub const CANNOT_PIPE: &[u8] = b"Zqmail-spawn unable to create pipe. (#4.3.0)\n";
    pub const CANNOT_FORK: &[u8] = b"Zqmail-spawn unable to fork. (#4.3.0)\n";
}

/// The longest message id, counting its terminating NUL.
const MESSID_MAX: usize = 100;

/// The checks qmail's spawner makes before it opens the message, in its
/// order. `in_use` tells whether a delivery number is taken.
pub fn check(cmd: &Command, concurrency: u32, in_use: bool) -> Result<(), &'static [u8]> {
    if cmd.overflow {
        return Err(answer::OUT_OF_MEMORY);
    }
    if u32::from(cmd.delnum) >= concurrency {
        return Err(answer::DELNUM_TOO_BIG);
    }
    if in_use {
        return Err(answer::DELNUM_IN_USE);
    }
    check_messid(cmd.messid())?;
    if cmd.host().is_none() {
        return Err(answer::NO_HOST);
    }
    Ok(())
}

fn check_messid(messid: &[u8]) -> Result<(), &'static [u8]> {
    let numeric = messid
        .iter()
        .enumerate()
        .all(|(i, &b)| b.is_ascii_digit() || (i > 0 && b == b'/'));
    if !numeric {
        return Err(answer::MESSID_NONNUMERIC);
    }
    if messid.len() + 1 > MESSID_MAX {
        return Err(answer::MESSID_TOO_LONG);
    }
    if messid.is_empty() {
        return Err(answer::MESSID_TOO_SHORT);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(wire: Wire, data: &[u8]) -> Vec<Command> {
        let mut parser = Parser::new(wire);
        let mut out = Vec::new();
        for byte in data {
            parser.feed(std::slice::from_ref(byte), &mut out);
        }
        out
    }

    #[test]
    fn splits_one_byte_commands_fed_a_byte_at_a_time() {
        let cmds = parse(Wire::OneByte, b"\x0712/345\0a@b\0c@d.e\0\x0312\0\0x\0");
        assert_eq!(cmds.len(), 2);
        assert_eq!(cmds[0].delnum, 7);
        assert_eq!(cmds[0].messid(), b"12/345");
        assert_eq!(cmds[0].sender(), b"a@b");
        assert_eq!(cmds[0].recipient(), b"c@d.e");
        assert_eq!(cmds[0].host(), Some(&b"d.e"[..]));
        assert_eq!(cmds[1].sender(), b"");
        assert_eq!(cmds[1].host(), None);
    }

    #[test]
    fn reads_two_byte_numbers_little_endian() {
        let cmds = parse(Wire::TwoByte, b"\x34\x121\0\0x@y\0");
        assert_eq!(cmds[0].delnum, 0x1234);
    }

    #[test]
    fn checks_in_qmail_order() {
        let cmd = |data: &[u8]| parse(Wire::OneByte, data).remove(0);
        let ok = cmd(b"\x011\0s\0r@h\0");
        assert_eq!(check(&ok, 120, false), Ok(()));
        assert_eq!(check(&ok, 1, false), Err(answer::DELNUM_TOO_BIG));
        assert_eq!(check(&ok, 120, true), Err(answer::DELNUM_IN_USE));
        let slash_first = cmd(b"\x01/1\0s\0r@h\0");
        assert_eq!(
            check(&slash_first, 120, false),
            Err(answer::MESSID_NONNUMERIC)
        );
        let empty = cmd(b"\x01\0s\0r@h\0");
        assert_eq!(check(&empty, 120, false), Err(answer::MESSID_TOO_SHORT));
        assert_eq!(
            check(&cmd(b"\x011\0s\0rh\0"), 120, false),
            Err(answer::NO_HOST)
        );
    }

    #[test]
    fn message_id_counts_its_nul() {
        let with_len = |n: usize| {
            let mut data = vec![1u8];
            data.extend(std::iter::repeat_n(b'1', n));
            data.extend_from_slice(b"\0s\0r@h\0");
            parse(Wire::OneByte, &data).remove(0)
        };
        assert_eq!(check(&with_len(99), 120, false), Ok(()));
        assert_eq!(
            check(&with_len(100), 120, false),
            Err(answer::MESSID_TOO_LONG)
        );
    }

    #[test]
    fn an_endless_field_fails_as_out_of_memory() {
        let mut parser = Parser::new(Wire::OneByte);
        let mut out = Vec::new();
        parser.feed(b"\x011\0", &mut out);
        parser.feed(&vec![b'x'; MAX_FIELD + 5], &mut out);
        parser.feed(b"\0r@h\0", &mut out);
        assert_eq!(check(&out[0], 120, false), Err(answer::OUT_OF_MEMORY));
        assert_eq!(out[0].sender().len(), MAX_FIELD);
    }
}
