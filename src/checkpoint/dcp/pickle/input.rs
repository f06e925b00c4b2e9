//! The pickle's bytes, read through a window rather than held whole: a
//! `.metadata` of 582k chunks is 73 MB that the reader needs only once, a
//! few bytes at a time, and front to back.

use super::PickleErrorKind;
use super::machine::Step;
use std::io::Read;

/// How much is read at a time, and how much consumed input is kept before
/// it is dropped from the front of the window.
const READ_SIZE: usize = 1 << 20;

/// A forward-only reader with a window of the bytes not yet consumed.
pub(super) struct Input<'r> {
    reader: &'r mut dyn Read,
    /// The pickle's length: nothing past it is read, and no operand
    /// claiming more makes the window grow.
    len: usize,
    window: Vec<u8>,
    /// The pickle offset of `window[0]`.
    base: usize,
    /// The next byte, as an index into `window`.
    at: usize,
    ended: bool,
}

impl<'r> Input<'r> {
    pub(super) fn new(reader: &'r mut dyn Read, len: usize) -> Input<'r> {
        Input {
            reader,
            len,
            window: Vec::new(),
            base: 0,
            at: 0,
            ended: false,
        }
    }

    /// The offset of the next byte in the pickle.
    pub(super) fn position(&self) -> usize {
        self.base + self.at
    }

    /// Reads until `want` bytes are available past `at`, or the input ends.
    fn fill(&mut self, want: usize) -> Step<()> {
        if self.window.len() - self.at >= want || self.ended {
            return Ok(());
        }
        if self.at >= READ_SIZE {
            self.window.drain(..self.at);
            self.base += self.at;
            self.at = 0;
        }
        while self.window.len() - self.at < want && !self.ended {
            let have = self.window.len();
            let unread = self.len - (self.base + have);
            let more = (want - (have - self.at)).max(READ_SIZE).min(unread);
            if more == 0 {
                self.ended = true;
                break;
            }
            self.window.resize(have + more, 0);
            let read = loop {
                match self.reader.read(&mut self.window[have..]) {
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    other => break other,
                }
            };
            match read {
                Ok(0) => {
                    self.window.truncate(have);
                    self.ended = true;
                }
                Ok(n) => self.window.truncate(have + n),
                Err(e) => {
                    self.window.truncate(have);
                    return Err(PickleErrorKind::Unreadable(e.to_string()));
                }
            }
        }
        Ok(())
    }

    /// The next byte, or `None` at the end of the input.
    pub(super) fn next_byte(&mut self) -> Step<Option<u8>> {
        self.fill(1)?;
        let byte = self.window.get(self.at).copied();
        if byte.is_some() {
            self.at += 1;
        }
        Ok(byte)
    }

    /// The next `len` bytes, consumed.
    pub(super) fn take(&mut self, len: u64) -> Step<&[u8]> {
        let len = usize::try_from(len).map_err(|_| PickleErrorKind::Truncated)?;
        if len > self.len - self.position() {
            return Err(PickleErrorKind::Truncated);
        }
        self.fill(len)?;
        if self.window.len() - self.at < len {
            return Err(PickleErrorKind::Truncated);
        }
        let start = self.at;
        self.at += len;
        Ok(&self.window[start..start + len])
    }

    /// Up to `len` bytes ahead, not consumed.
    pub(super) fn peek(&mut self, len: usize) -> Step<&[u8]> {
        self.fill(len)?;
        let end = self.window.len().min(self.at + len);
        Ok(&self.window[self.at..end])
    }

    /// Consumes `len` bytes; says whether the input held them.
    pub(super) fn skip(&mut self, len: u64) -> Step<bool> {
        let mut left = len;
        while left > 0 {
            self.fill(1)?;
            let available = (self.window.len() - self.at) as u64;
            if available == 0 {
                return Ok(false);
            }
            let step = available.min(left);
            self.at += step as usize;
            left -= step;
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_across_the_window_and_keeps_offsets() {
        let data: Vec<u8> = (0..3 * READ_SIZE as u32).map(|i| i as u8).collect();
        let mut reader = &data[..];
        let mut input = Input::new(&mut reader, data.len());
        assert!(input.skip(READ_SIZE as u64 + 5).unwrap());
        assert_eq!(input.position(), READ_SIZE + 5);
        let expected: Vec<u8> = data[READ_SIZE + 5..2 * READ_SIZE + 10].to_vec();
        assert_eq!(input.take(READ_SIZE as u64 + 5).unwrap(), &expected[..]);
        assert_eq!(
            input.peek(3).unwrap(),
            &data[2 * READ_SIZE + 10..2 * READ_SIZE + 13]
        );
        assert_eq!(input.next_byte().unwrap(), Some(data[2 * READ_SIZE + 10]));
        // The consumed front was dropped: the window is not the whole input.
        assert!(input.window.len() < data.len());
        assert!(!input.skip(u64::MAX).unwrap());
        assert_eq!(input.next_byte().unwrap(), None);
        assert_eq!(input.take(1), Err(PickleErrorKind::Truncated));
    }
}
