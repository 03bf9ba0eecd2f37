//! Splits a byte stream into consecutive JSON values, as SPDK's JSON-RPC server does: requests
//! need no newline framing, may arrive split across reads, and several may share one read.
//!
//! A small incremental scanner finds where each top-level value ends (tracking strings, escapes
//! and bracket depth, never rescanning a byte), then serde_json parses exactly that slice. The
//! scanner does not validate; serde_json does. Memory is bounded: a value still incomplete after
//! `max_value` bytes is an error, and the caller closes the connection.

use serde_json::Value;

/// Why the stream cannot go on. After either error the connection is closed: there is no
/// reliable way to find the start of the next value.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StreamError {
    /// The bytes of one value are not valid JSON.
    #[error("{0}")]
    Parse(String),
    /// No complete value within the limit.
    #[error("no complete JSON value within {0} bytes")]
    TooLarge(usize),
    /// The peer closed the stream in the middle of a value.
    #[error("incomplete JSON value at end of input")]
    Truncated,
}

/// What the scanner is inside of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scan {
    /// Between values (skipping whitespace).
    Between,
    /// Inside an object or array, `depth` brackets deep.
    Container {
        depth: usize,
        in_string: bool,
        escape: bool,
    },
    /// Inside a top-level string.
    TopString { escape: bool },
    /// Inside a top-level number or literal (`12`, `true`, or garbage).
    TopScalar,
}

/// An incremental JSON value splitter with a size bound.
#[derive(Debug)]
pub struct JsonStream {
    buf: Vec<u8>,
    /// Start of the value being scanned (bytes before it are consumed).
    start: usize,
    /// Next byte to scan.
    pos: usize,
    state: Scan,
    max_value: usize,
}

fn is_delimiter(b: u8) -> bool {
    matches!(
        b,
        b' ' | b'\t' | b'\n' | b'\r' | b'{' | b'}' | b'[' | b']' | b'"' | b',' | b':'
    )
}

impl JsonStream {
    /// A stream that refuses values longer than `max_value` bytes.
    pub fn new(max_value: usize) -> Self {
        JsonStream {
            buf: Vec::new(),
            start: 0,
            pos: 0,
            state: Scan::Between,
            max_value,
        }
    }

    /// Appends received bytes. Consumed bytes are dropped first, so the buffer holds at most
    /// one partial value plus this read.
    pub fn feed(&mut self, data: &[u8]) {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.pos -= self.start;
            self.start = 0;
        }
        self.buf.extend_from_slice(data);
    }

    /// Bytes of a value received but not yet complete (0 between values).
    pub fn pending(&self) -> usize {
        if self.state == Scan::Between {
            0
        } else {
            self.buf.len() - self.start
        }
    }

    /// The next complete value, if the buffered bytes hold one.
    pub fn next_value(&mut self) -> Option<Result<Value, StreamError>> {
        while self.pos < self.buf.len() {
            let b = self.buf[self.pos];
            self.pos += 1;
            match &mut self.state {
                Scan::Between => match b {
                    b' ' | b'\t' | b'\n' | b'\r' => self.start = self.pos,
                    b'{' | b'[' => {
                        self.state = Scan::Container {
                            depth: 1,
                            in_string: false,
                            escape: false,
                        }
                    }
                    b'"' => self.state = Scan::TopString { escape: false },
                    b'}' | b']' | b',' | b':' => return Some(self.parse_upto(self.pos)),
                    _ => self.state = Scan::TopScalar,
                },
                Scan::Container {
                    depth,
                    in_string,
                    escape,
                } => {
                    if *in_string {
                        if *escape {
                            *escape = false;
                        } else if b == b'\\' {
                            *escape = true;
                        } else if b == b'"' {
                            *in_string = false;
                        }
                    } else {
                        match b {
                            b'"' => *in_string = true,
                            b'{' | b'[' => *depth += 1,
                            b'}' | b']' => {
                                *depth -= 1;
                                if *depth == 0 {
                                    return Some(self.parse_upto(self.pos));
                                }
                            }
                            _ => {}
                        }
                    }
                }
                Scan::TopString { escape } => {
                    if *escape {
                        *escape = false;
                    } else if b == b'\\' {
                        *escape = true;
                    } else if b == b'"' {
                        return Some(self.parse_upto(self.pos));
                    }
                }
                Scan::TopScalar => {
                    if is_delimiter(b) {
                        // The delimiter belongs to whatever comes next.
                        self.pos -= 1;
                        return Some(self.parse_upto(self.pos));
                    }
                }
            }
        }
        if self.pending() > self.max_value {
            return Some(Err(StreamError::TooLarge(self.max_value)));
        }
        None
    }

    /// Call at end of input: a trailing number or literal is complete now; anything else
    /// partial is truncated.
    pub fn finish(&mut self) -> Option<Result<Value, StreamError>> {
        match self.state {
            Scan::Between => None,
            Scan::TopScalar => Some(self.parse_upto(self.buf.len())),
            _ => Some(Err(StreamError::Truncated)),
        }
    }

    fn parse_upto(&mut self, end: usize) -> Result<Value, StreamError> {
        let r = serde_json::from_slice(&self.buf[self.start..end])
            .map_err(|e| StreamError::Parse(e.to_string()));
        self.start = end;
        self.pos = end;
        self.state = Scan::Between;
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn all(s: &mut JsonStream) -> Vec<Result<Value, StreamError>> {
        std::iter::from_fn(|| s.next_value()).collect()
    }

    #[test]
    fn values_without_newlines_and_several_per_read() {
        let mut s = JsonStream::new(1 << 20);
        s.feed(br#"{"a":1}{"b":[1,2,{"c":"}]"}]}  [3] "x" 12 true"#);
        let v = all(&mut s);
        assert_eq!(v.len(), 5, "{v:?}");
        assert_eq!(v[0], Ok(json!({"a": 1})));
        assert_eq!(v[1], Ok(json!({"b": [1, 2, {"c": "}]"}]})));
        assert_eq!(v[2], Ok(json!([3])));
        assert_eq!(v[3], Ok(json!("x")));
        assert_eq!(v[4], Ok(json!(12)));
        // `true` at the very end may still be growing ("truex"?): only EOF completes it.
        assert_eq!(s.finish(), Some(Ok(json!(true))));
    }

    #[test]
    fn split_at_every_byte() {
        let text = br#"{"jsonrpc":"2.0","method":"m","params":{"s":"a\"b\\","n":[1,{"x":null}]},"id":7}[{"id":1},{"id":2}]"#;
        let mut s = JsonStream::new(1 << 20);
        let mut got = Vec::new();
        for b in text.iter() {
            s.feed(std::slice::from_ref(b));
            got.extend(all(&mut s));
        }
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].as_ref().unwrap()["params"]["s"], json!("a\"b\\"));
        assert_eq!(got[1], Ok(json!([{"id": 1}, {"id": 2}])));
        assert_eq!(s.pending(), 0);
        assert_eq!(s.finish(), None);
    }

    #[test]
    fn garbage_is_a_parse_error() {
        for bad in [
            &b"}"[..],
            b"{\"a\":}",
            b"nonsense ",
            b"{]",
            b"[1,]",
            b"\xff\xfe{}",
            b"{\"a\":\"\xff\"}",
        ] {
            let mut s = JsonStream::new(1024);
            s.feed(bad);
            let r = s.next_value().or_else(|| s.finish());
            assert!(
                matches!(r, Some(Err(StreamError::Parse(_)))),
                "{:?}: {r:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn truncated_and_oversized() {
        let mut s = JsonStream::new(1024);
        s.feed(br#"{"method":"x","params":{"#);
        assert_eq!(s.next_value(), None);
        assert_eq!(s.finish(), Some(Err(StreamError::Truncated)));

        let mut s = JsonStream::new(1024);
        s.feed(b"{\"a\":\"");
        let mut err = None;
        for _ in 0..100 {
            s.feed(&[b'x'; 100]);
            if let Some(r) = s.next_value() {
                err = Some(r);
                break;
            }
        }
        assert_eq!(err, Some(Err(StreamError::TooLarge(1024))));
        assert!(
            s.buf.len() < 1024 + 200,
            "buffer kept growing: {}",
            s.buf.len()
        );
    }

    #[test]
    fn whitespace_and_consumed_bytes_do_not_accumulate() {
        let mut s = JsonStream::new(64);
        for _ in 0..10_000 {
            s.feed(b" \n{\"id\":1}\t");
            assert_eq!(all(&mut s), vec![Ok(json!({"id": 1}))]);
        }
        assert!(s.buf.len() < 64);
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_crash() {
        let mut s = JsonStream::new(1 << 20);
        let deep = "[".repeat(100_000) + &"]".repeat(100_000);
        s.feed(deep.as_bytes());
        assert!(matches!(s.next_value(), Some(Err(StreamError::Parse(_)))));
    }
}
