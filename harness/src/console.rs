//! Turning the guest's console byte stream into lines, with a bound on every line: the
//! guest is untrusted, and a guest that never prints a newline must not make the host
//! buffer without limit.

use workloads::protocol::MAX_LINE;

/// Longest line kept. Protocol lines are at most `MAX_LINE`; noise lines get the same room.
pub const LINE_LIMIT: usize = MAX_LINE;

/// A piece of console output.
#[derive(Debug, PartialEq, Eq)]
pub enum ConsoleLine {
    /// A complete line, without its newline.
    Line(Vec<u8>),
    /// A line longer than `LINE_LIMIT`: its first bytes and its full length.
    Overlong { head: Vec<u8>, length: usize },
}

#[derive(Default)]
pub struct LineAssembler {
    pending: Vec<u8>,
    /// Length of the current line when it has overflowed (its head is in `pending`).
    overflow: Option<usize>,
}

impl LineAssembler {
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds bytes; returns the lines they complete.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<ConsoleLine> {
        let mut lines = Vec::new();
        for &b in bytes {
            if b == b'\n' {
                let line = std::mem::take(&mut self.pending);
                match self.overflow.take() {
                    Some(length) => lines.push(ConsoleLine::Overlong { head: line, length }),
                    None => lines.push(ConsoleLine::Line(line)),
                }
                continue;
            }
            match &mut self.overflow {
                Some(length) => *length += 1,
                None if self.pending.len() < LINE_LIMIT => self.pending.push(b),
                None => self.overflow = Some(self.pending.len() + 1),
            }
        }
        lines
    }

    /// The unterminated rest, at the end of the stream.
    pub fn finish(&mut self) -> Option<ConsoleLine> {
        let line = std::mem::take(&mut self.pending);
        match self.overflow.take() {
            Some(length) => Some(ConsoleLine::Overlong { head: line, length }),
            None if line.is_empty() => None,
            None => Some(ConsoleLine::Line(line)),
        }
    }
}

/// A line as text for logs and error messages: printable ASCII kept, the rest escaped.
pub fn printable(bytes: &[u8]) -> String {
    bytes
        .iter()
        .flat_map(|&b| std::ascii::escape_default(b))
        .map(char::from)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_lines_across_pushes() {
        let mut a = LineAssembler::new();
        assert!(a.push(b"@hvb1 he").is_empty());
        let lines = a.push(b"llo\r\nsecond\nthi");
        assert_eq!(
            lines,
            vec![
                ConsoleLine::Line(b"@hvb1 hello\r".to_vec()),
                ConsoleLine::Line(b"second".to_vec())
            ]
        );
        assert_eq!(a.finish(), Some(ConsoleLine::Line(b"thi".to_vec())));
        assert_eq!(a.finish(), None);
    }

    #[test]
    fn bounds_overlong_lines() {
        let mut a = LineAssembler::new();
        let mut input = vec![b'x'; 10 * LINE_LIMIT];
        input.push(b'\n');
        input.extend_from_slice(b"ok\n");
        let lines = a.push(&input);
        assert_eq!(lines.len(), 2);
        match &lines[0] {
            ConsoleLine::Overlong { head, length } => {
                assert_eq!(head.len(), LINE_LIMIT);
                assert_eq!(*length, 10 * LINE_LIMIT);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(lines[1], ConsoleLine::Line(b"ok".to_vec()));
        // An endless line never grows the buffer past the limit.
        for _ in 0..1000 {
            a.push(&[b'y'; 4096]);
        }
        assert!(a.pending.len() <= LINE_LIMIT);
    }

    #[test]
    fn printable_escapes_binary() {
        assert_eq!(printable(b"ok <b>\x00\xff"), "ok <b>\\x00\\xff");
    }
}
