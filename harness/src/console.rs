//! Turning the guest's console byte stream into lines, with a bound on every line: the
//! guest is untrusted, and a guest that never prints a newline must not make the host
//! buffer without limit.

use workloads::protocol::{decode_event, Event, Hello, Sample, MAX_LINE};

// The bounded channel every backend sends its guest's messages on (the VMM's own, which
// QEMU's and Xen's readers share), where the session reads them.
pub use vmm::{guest_channel, GuestSender, CHANNEL_CAPACITY};

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

#[derive(Default, Debug)]
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

/// Whether a terminal could act on `c` rather than show it: C0 and C1 controls (ESC, CSI
/// 0x9b, BEL, CR, ...), DEL, and the bidirectional overrides that reorder what follows.
fn acts_on_terminal(c: char) -> bool {
    c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// Text that came from the guest, safe to print: every character a terminal could act on
/// is escaped (`\u{1b}`, `\r`), the rest kept.
pub fn escape_text(text: &str) -> String {
    if !text.chars().any(acts_on_terminal) {
        return text.to_string();
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if acts_on_terminal(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// Every text field of a guest's event, escaped (`escape_text`).
fn escape_event(event: Event) -> Event {
    let e = |s: String| escape_text(&s);
    match event {
        Event::Hello(h) => Event::Hello(Hello {
            signature: e(h.signature),
            cpu_vendor: e(h.cpu_vendor),
            tsc_source: e(h.tsc_source),
            ..h
        }),
        Event::Sample(s) => Event::Sample(Sample {
            params: e(s.params),
            ..s
        }),
        Event::Skip { workload, reason } => Event::Skip {
            workload,
            reason: e(reason),
        },
        Event::Result {
            workload,
            status,
            reason,
        } => Event::Result {
            workload,
            status,
            reason: reason.map(e),
        },
        Event::Note {
            workload,
            key,
            value,
        } => Event::Note {
            workload,
            key: e(key),
            value: e(value),
        },
        other @ (Event::Start(_) | Event::Crash(_) | Event::End(_)) => other,
    }
}

/// The one way a guest's console line enters the host: decoded strictly, and every text it
/// carries escaped, so no later print of a note, reason or name can reach a terminal raw.
/// `Err` holds the reason the line was refused, escaped too.
pub fn decode(line: &[u8]) -> Result<Option<Event>, String> {
    decode_event(line)
        .map(|event| event.map(escape_event))
        .map_err(|e| escape_text(&e.to_string()))
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
    fn guest_text_is_escaped_where_it_enters() {
        assert_eq!(escape_text("plain: ok é"), "plain: ok é");
        assert_eq!(
            escape_text("a\x1b[2Jb\x07c\rd\u{9b}31m\u{202e}"),
            "a\\u{1b}[2Jb\\u{7}c\\rd\\u{9b}31m\\u{202e}"
        );
        let line = workloads::protocol::LineBuilder::new(workloads::protocol::LineKind::Note)
            .text("w", "cpu.idle")
            .text("k", "k\x1b")
            .text("v", "\x1b[2J\x07\r\u{9b}")
            .finish()
            .to_vec();
        match decode(&line[..line.len() - 1]) {
            Ok(Some(Event::Note { key, value, .. })) => {
                assert_eq!(key, "k\\u{1b}");
                assert!(!value.chars().any(acts_on_terminal), "{value:?}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn printable_escapes_binary() {
        assert_eq!(printable(b"ok <b>\x00\xff"), "ok <b>\\x00\\xff");
    }
}
