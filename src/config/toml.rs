//! The TOML reader of the configuration (the lexer; the schema, which keys
//! and tables exist and what they take, is `config.rs`). One reader for the
//! relay and for PID 1 (init loads the file through [`super::Config::load`]).
//! Touches nothing but the text it is given.
//!
//! The subset of TOML a configuration needs (key = value, `[table]` headers,
//! strings, integers, booleans, arrays that may span lines, comments), by
//! hand instead of serde + a TOML crate: that keeps ~100 KiB out of a binary
//! that must fit on a floppy, and lets every error name its line.

/// A value as written in the file.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Str(String),
    Int(i64),
    Bool(bool),
    Array(Vec<Value>),
}

impl Value {
    pub fn kind(&self) -> &'static str {
        match self {
            Value::Str(_) => "a string",
            Value::Int(_) => "an integer",
            Value::Bool(_) => "a boolean",
            Value::Array(_) => "an array",
        }
    }
}

/// One `key = value` with its table and line.
#[derive(Debug, Clone)]
pub struct Item {
    pub table: String,
    pub key: String,
    pub value: Value,
    pub line: usize,
}

/// What the reader hands to the schema, in file order.
#[derive(Debug)]
pub enum Event<'a> {
    /// A `[table]` header (the name, its line): the schema refuses an
    /// unknown table here, before any of its keys.
    Table(&'a str, usize),
    /// A `key = value`.
    Item(Item),
}

/// Most entries in one array (`relay_domains`, `listen`, `etrn_allow`,
/// `[status] allow`, `[network] dns`): a backup MX on a 486 serves a handful
/// of domains; a list of valid recipients belongs in the `recipients` file.
pub const MAX_ARRAY_ITEMS: usize = 1000;
/// Deepest nesting of arrays. No key takes nested arrays; the bound keeps the
/// recursive value parser off the end of PID 1's stack (`[[[[...`).
const MAX_DEPTH: usize = 4;

/// Parses the TOML subset, handing each item to `each` as soon as it is read,
/// so the first bad key stops the parse (a 1 MiB file of unknown keys never
/// becomes a 250,000-item list). One pass over the bytes: the time is linear
/// in the file's size whatever its shape (arrays over 100,000 lines included).
/// A key set twice is the Builder's to refuse (it knows the few valid keys).
///
/// Accepted: a leading UTF-8 BOM (skipped), LF or CRLF line ends, `#`
/// comments, `[table]` headers, bare keys, basic ("...") and literal ('...')
/// strings, integers, booleans, arrays (over several lines, with comments and
/// a trailing comma). Refused with the line: control characters other than
/// tab (NUL, a CR that does not end a line, ...), multi-line strings, inline
/// tables, floats, dates.
pub fn parse_toml_with(text: &str, mut each: impl FnMut(Event) -> Result<(), (usize, String)>) -> Result<(), (usize, String)> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    check_bytes(text.as_bytes())?;
    let mut lx = Lexer { s: text.as_bytes(), pos: 0, line: 1 };
    let mut table = String::new();
    let mut seen_tables: Vec<String> = Vec::new();
    loop {
        lx.skip_ws();
        lx.skip_comment();
        if lx.newline() {
            continue;
        }
        let Some(c) = lx.peek() else { return Ok(()) };
        let lineno = lx.line;
        if c == b'[' {
            table = lx.table_header(lineno, &mut seen_tables, &mut each)?;
            continue;
        }
        let item = lx.key_value(lineno, &table)?;
        each(Event::Item(item))?;
    }
}

impl<'a> Lexer<'a> {
    /// A `[table]` line: a valid name, which `each` accepts (the schema
    /// knows the tables), not seen before, alone on its line.
    fn table_header(
        &mut self,
        lineno: usize,
        seen_tables: &mut Vec<String>,
        each: &mut impl FnMut(Event) -> Result<(), (usize, String)>,
    ) -> Result<String, (usize, String)> {
        let rest = self.rest_of_line();
        let name = rest[1..]
            .split_once(']')
            .map(|(n, _)| n)
            .ok_or((lineno, "a table header must end with `]`".to_string()))?;
        self.pos += 1 + name.len() + 1;
        let name = name.trim();
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
            return Err((lineno, format!("`[{}]` is not a valid table name", clip(name))));
        }
        each(Event::Table(name, lineno))?;
        if seen_tables.iter().any(|t| t == name) {
            return Err((lineno, format!("table `[{name}]` appears twice")));
        }
        seen_tables.push(name.to_string());
        self.end_of_line().map_err(|_| (lineno, format!("unexpected text after `[{name}]`")))?;
        Ok(name.to_string())
    }

    /// A `key = value` line (the value may span lines: an array).
    fn key_value(&mut self, lineno: usize, table: &str) -> Result<Item, (usize, String)> {
        let rest = self.rest_of_line();
        let Some((key, _)) = rest.split_once('=') else {
            return Err((lineno, format!("expected `key = value`, found `{}`", clip(rest.trim()))));
        };
        self.pos += key.len() + 1;
        let key = key.trim();
        if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
            return Err((lineno, format!("`{}` is not a valid key", clip(key))));
        }
        let value = self.value(0).map_err(|(l, e)| (lineno, at_line(format!("`{key}`: {e}"), l, lineno)))?;
        self.end_of_line().map_err(|l| (lineno, at_line(format!("`{key}`: unexpected text after the value"), l, lineno)))?;
        Ok(Item { table: table.to_string(), key: key.to_string(), value, line: lineno })
    }
}

/// Adds "(line N)" to a value's error found on another line than its key's.
fn at_line(msg: String, line: usize, key_line: usize) -> String {
    if line == key_line { msg } else { format!("{msg} (line {line})") }
}

/// Text for an error message: at most 60 characters, anything but printable
/// ASCII written as `\u{...}`, so an invisible character (a BOM, a NUL from an
/// escape) shows. (Not `escape_debug`: its Unicode tables cost the floppy KBs.)
pub(crate) fn clip(s: &str) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    for c in s.chars().take(60) {
        if c == ' ' || c.is_ascii_graphic() {
            out.push(c);
        } else {
            let _ = write!(out, "\\u{{{:x}}}", c as u32);
        }
    }
    if s.chars().nth(60).is_some() {
        out.push_str("...");
    }
    out
}

/// Refuses the bytes TOML refuses anywhere (tab aside, control characters
/// are not allowed even in comments and strings), naming the line: binary
/// garbage, NUL bytes, a CR that does not end a line (a file half converted
/// between Mac and DOS line ends).
fn check_bytes(s: &[u8]) -> Result<(), (usize, String)> {
    let mut line = 1;
    for (i, &b) in s.iter().enumerate() {
        match b {
            b'\n' => line += 1,
            b'\t' => {}
            b'\r' if s.get(i + 1) == Some(&b'\n') => {}
            b'\r' => return Err((line, "a carriage return (CR) that does not end a line; save the file with LF or CRLF line ends".into())),
            0 => return Err((line, "a NUL byte (is this a binary file?)".into())),
            0..=0x1f | 0x7f => return Err((line, format!("control character 0x{b:02X} (is this a binary file?)"))),
            _ => {}
        }
    }
    Ok(())
}

/// A cursor over the whole text; `line` counts the line ends passed.
struct Lexer<'a> {
    s: &'a [u8],
    pos: usize,
    line: usize,
}

impl<'a> Lexer<'a> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.pos).copied()
    }

    fn skip_ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t')) {
            self.pos += 1;
        }
    }

    /// Skips a `#` comment up to (not including) the line end.
    fn skip_comment(&mut self) {
        if self.peek() == Some(b'#') {
            while !matches!(self.peek(), None | Some(b'\n' | b'\r')) {
                self.pos += 1;
            }
        }
    }

    /// Consumes one line end (LF or CRLF: `check_bytes` made every CR one).
    fn newline(&mut self) -> bool {
        match self.peek() {
            Some(b'\n') => self.pos += 1,
            Some(b'\r') => self.pos += 2,
            _ => return false,
        }
        self.line += 1;
        true
    }

    /// Blanks, a comment, then the end of the line or of the file.
    fn end_of_line(&mut self) -> Result<(), usize> {
        self.skip_ws();
        self.skip_comment();
        if self.newline() || self.peek().is_none() { Ok(()) } else { Err(self.line) }
    }

    /// The rest of the current line (the text is valid UTF-8 and the cut is
    /// at an ASCII byte, so this is a `str`).
    fn rest_of_line(&self) -> &'a str {
        let end = self.s[self.pos..].iter().position(|&c| c == b'\n' || c == b'\r').map_or(self.s.len(), |n| self.pos + n);
        std::str::from_utf8(&self.s[self.pos..end]).unwrap_or("")
    }

    fn value(&mut self, depth: usize) -> Result<Value, (usize, String)> {
        self.skip_ws();
        let line = self.line;
        let err = |m: &str| Err((line, m.to_string()));
        match self.peek() {
            None | Some(b'\n' | b'\r' | b'#') => err("a value is missing"),
            Some(b'"') => self.basic_string().map(Value::Str).map_err(|e| (line, e)),
            Some(b'\'') => {
                if self.s[self.pos..].starts_with(b"'''") {
                    return err("multi-line strings ('''...''') are not supported");
                }
                let start = self.pos + 1;
                let Some(len) = self.s[start..].iter().position(|&c| c == b'\'' || c == b'\n' || c == b'\r') else {
                    return err("a string is not closed with `'`");
                };
                if self.s[start + len] != b'\'' {
                    return err("a string is not closed with `'` on its line");
                }
                self.pos = start + len + 1;
                Ok(Value::Str(String::from_utf8_lossy(&self.s[start..start + len]).into_owned()))
            }
            Some(b'[') => {
                if depth >= MAX_DEPTH {
                    return err(&format!("arrays nested deeper than {MAX_DEPTH} levels"));
                }
                self.pos += 1;
                let mut v = Vec::new();
                loop {
                    self.skip_blank();
                    match self.peek() {
                        Some(b']') => {
                            self.pos += 1;
                            return Ok(Value::Array(v));
                        }
                        None => return Err((self.line, "an array is not closed with `]`".into())),
                        _ => {}
                    }
                    if v.len() == MAX_ARRAY_ITEMS {
                        return Err((self.line, format!("an array has more than {MAX_ARRAY_ITEMS} entries")));
                    }
                    v.push(self.value(depth + 1)?);
                    self.skip_blank();
                    match self.peek() {
                        Some(b',') => self.pos += 1,
                        Some(b']') => {}
                        None => return Err((self.line, "an array is not closed with `]`".into())),
                        _ => return Err((self.line, "array items must be separated by `,`".into())),
                    }
                }
            }
            Some(b'{') => err("inline tables ({...}) are not supported"),
            Some(_) => {
                let start = self.pos;
                while !matches!(self.peek(), None | Some(b',' | b']' | b' ' | b'\t' | b'\n' | b'\r' | b'#')) {
                    self.pos += 1;
                }
                let word = std::str::from_utf8(&self.s[start..self.pos]).unwrap_or("");
                match word {
                    "true" => Ok(Value::Bool(true)),
                    "false" => Ok(Value::Bool(false)),
                    w => {
                        let digits = w.strip_prefix(['+', '-']).unwrap_or(w);
                        let number = !digits.is_empty() && digits.bytes().all(|c| c.is_ascii_digit() || c == b'_');
                        match w.replace('_', "").parse::<i64>() {
                            Ok(n) if number => Ok(Value::Int(n)),
                            _ if number => err(&format!("`{}` is too large a number", clip(w))),
                            _ => err(&format!("`{}` is not a value (strings need quotes)", clip(w))),
                        }
                    }
                }
            }
        }
    }

    /// Blanks, comments and line ends between array items.
    fn skip_blank(&mut self) {
        loop {
            self.skip_ws();
            self.skip_comment();
            if !self.newline() {
                return;
            }
        }
    }

    /// A "basic string" with TOML's escapes; it ends on its own line.
    fn basic_string(&mut self) -> Result<String, String> {
        if self.s[self.pos..].starts_with(b"\"\"\"") {
            return Err("multi-line strings (\"\"\"...\"\"\") are not supported".into());
        }
        self.pos += 1; // opening quote
        let mut out = String::new();
        loop {
            let c = match self.peek() {
                None | Some(b'\n' | b'\r') => return Err("a string is not closed with `\"` on its line".into()),
                Some(c) => c,
            };
            self.pos += 1;
            match c {
                b'"' => return Ok(out),
                b'\\' => {
                    let e = self.peek().ok_or("a string is not closed with `\"`")?;
                    self.pos += 1;
                    match e {
                        b'"' => out.push('"'),
                        b'\\' => out.push('\\'),
                        b'n' => out.push('\n'),
                        b't' => out.push('\t'),
                        b'r' => out.push('\r'),
                        b'b' => out.push('\u{8}'),
                        b'f' => out.push('\u{c}'),
                        b'u' | b'U' => {
                            let n = if e == b'u' { 4 } else { 8 };
                            let hex = self.s.get(self.pos..self.pos + n).and_then(|h| std::str::from_utf8(h).ok()).unwrap_or("");
                            let ch = u32::from_str_radix(hex, 16).ok().filter(|_| hex.len() == n).and_then(char::from_u32);
                            out.push(ch.ok_or_else(|| format!("`\\{}{}` is not a Unicode escape", e as char, clip(hex)))?);
                            self.pos += n;
                        }
                        _ => return Err(format!("unknown escape `\\{}` in a string", clip(&String::from_utf8_lossy(&[e])))),
                    }
                }
                _ => {
                    // copy the whole UTF-8 sequence (the text is valid UTF-8)
                    let start = self.pos - 1;
                    while self.peek().is_some_and(|b| (b & 0xC0) == 0x80) {
                        self.pos += 1;
                    }
                    out.push_str(std::str::from_utf8(&self.s[start..self.pos]).unwrap_or("\u{fffd}"));
                }
            }
        }
    }
}

