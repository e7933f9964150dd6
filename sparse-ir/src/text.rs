//! The `.sir` text format: named patterns and the kernel specs that use them.
//!
//! A [`Module`] holds one or more named [`Pattern`]s and kernel declarations ([`KernelDecl`])
//! that refer to them by name. [`Module`]'s `Display` (or [`print()`]) writes the canonical text
//! and [`parse`] (or `str::parse`) reads it back; the two round-trip exactly:
//! `parse(&print(&m)) == Ok(m)`, and `print(&parse(s)?) == s` for canonical text `s`.
//!
//! ```text
//! sparsejit-ir 1
//!
//! pattern fc1 3x4 nnz=5
//!   0: 1 3
//!   1:
//!   2: 0 1 2
//!
//! kernel fc1 op=spmm(bias,relu) pattern=fc1 batch=100 ld=112
//! kernel fc1 op=spmm_t pattern=fc1 batch=any ld=any
//!
//! pattern conv2 2x18 nnz=3
//!   0: 0 13
//!   1: 17
//!
//! kernel conv2 op=conv(bias) pattern=conv2 input=2x12x12 kernel=3 stride=1 padding=1 batch=any ld=any
//! ```
//!
//! ## Grammar
//!
//! ```text
//! file     = { blank } version { blank | pattern | kernel } ;
//! version  = "sparsejit-ir" SP "1" EOL ;
//! pattern  = "pattern" SP name SP int "x" int SP "nnz=" int EOL { blank | row } ;
//! row      = [ SP ] int ":" { SP int } EOL ;
//! kernel   = "kernel" SP name { SP attr } EOL ;
//! attr     = "op=" op | "pattern=" name | "batch=" dim | "ld=" dim
//!          | "input=" int "x" int "x" int | "kernel=" int | "stride=" int | "padding=" int ;
//! op       = "spmm" [ "(" epilogue ")" ] | "spmm_t" | "sddmm" | "dense_grad"
//!          | "conv" [ "(" epilogue ")" ] | "conv_t" | "conv_grad" | "conv_dense_grad" ;
//! epilogue = "bias" | "relu" | "bias,relu" ;
//! dim      = int | "any" ;
//! name     = ( letter | "_" ) { letter | digit | "_" | "." | "-" } ;
//! int      = digit { digit } ;
//! blank    = [ SP ] [ comment ] EOL ;
//! comment  = ( ";" | "#" ) { any character except newline } ;
//! SP       = ( " " | "\t" ) { " " | "\t" } ;
//! EOL      = [ SP ] [ comment ] ( "\n" | "\r\n" | end of input ) ;
//! ```
//!
//! And the rules the grammar does not show:
//!
//! - A pattern `ROWSxCOLS` is followed by exactly `ROWS` row lines, numbered `0, 1, …` in
//!   order; an empty row is written `  r:` with no columns. `nnz=` must equal the number of
//!   column indices in the rows. Column indices within a row are strictly increasing and below
//!   `COLS`; every pattern goes through [`Pattern::from_csr`], so it satisfies all the
//!   invariants of [`crate::verify`].
//! - Pattern names are unique in a module and follow the layer-name rule of
//!   [`crate::verify`]. A kernel names a pattern defined *above* it.
//! - A kernel line is `kernel LAYER` followed by the attributes `op`, `pattern`, `batch` and
//!   `ld`, each exactly once, in any order (canonically `op`, `pattern`, the geometry, `batch`,
//!   `ld`); the spec goes through [`KernelSpec::new`]. A convolution op also takes its
//!   geometry ([`ConvGeometry`]): `input=CxHxW kernel=K stride=S padding=P`, all four, each
//!   once; a matrix op takes none of them. Ops and dims are written as [`Op`]'s and [`Dim`]'s `Display` and
//!   read by their `FromStr`.
//!
//! The canonical text, which the printer writes, is: the version line; for every pattern an
//! empty line and the pattern (row lines indented by two spaces); then, if there are kernels,
//! an empty line and one line per kernel; single spaces, `\n` line ends, no comments.
//!
//! Errors ([`ParseError`]) give the 1-based line and column (in characters) of the problem and
//! print as `LINE:COLUMN: message`. Column indices of a pattern are checked once its last row
//! has been read, so a syntax error further down a pattern is reported before them. The parser
//! never panics and allocates nothing in proportion to numbers in the header, only to the
//! input's length.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use thiserror::Error;

use crate::pattern::{Pattern, PatternError};
use crate::spec::{ConvGeometry, Dim, KernelSpec, Op};
use crate::verify::{verify_layer_name, VerifyError};

/// The first word of every `.sir` file.
pub const MAGIC: &str = "sparsejit-ir";

/// The format version this module writes and reads.
pub const VERSION: usize = 1;

/// A kernel declaration: a spec and the name of the module's pattern it uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelDecl {
    pattern: String,
    spec: KernelSpec,
}

impl KernelDecl {
    /// The name of the pattern (in the same [`Module`]) the kernel uses.
    pub fn pattern_name(&self) -> &str {
        &self.pattern
    }

    /// The kernel spec (its pattern is the module's pattern of that name).
    pub fn spec(&self) -> &KernelSpec {
        &self.spec
    }
}

/// Why a pattern or kernel could not be added to a [`Module`].
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ModuleError {
    /// The pattern name breaks the naming rule (that of layer names).
    #[error("invalid pattern name {name:?} (ASCII letters, digits, `_`, `.`, `-`, starting with a letter or `_`)")]
    PatternName {
        /// The rejected name.
        name: String,
    },
    /// A pattern of this name is already in the module.
    #[error("duplicate pattern name {name:?}")]
    DuplicatePattern {
        /// The name.
        name: String,
    },
    /// A kernel names a pattern that is not in the module.
    #[error("unknown pattern {name:?}")]
    UnknownPattern {
        /// The name.
        name: String,
    },
    /// The kernel spec breaks an invariant of [`crate::verify`].
    #[error(transparent)]
    Spec(#[from] VerifyError),
}

/// A `.sir` module: named patterns, in order, and kernel declarations that use them.
#[derive(Clone, Default)]
pub struct Module {
    patterns: Vec<(String, Arc<Pattern>)>,
    index: HashMap<String, usize>,
    kernels: Vec<KernelDecl>,
}

impl PartialEq for Module {
    fn eq(&self, other: &Self) -> bool {
        // `index` is derived from `patterns`.
        self.patterns == other.patterns && self.kernels == other.kernels
    }
}

impl Eq for Module {}

impl fmt::Debug for Module {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Module")
            .field("patterns", &self.patterns)
            .field("kernels", &self.kernels)
            .finish()
    }
}

impl Module {
    /// An empty module.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a pattern under `name` (unique in the module, following the layer-name rule) and
    /// returns the shared pattern that kernels will hold.
    pub fn add_pattern(
        &mut self,
        name: impl Into<String>,
        pattern: impl Into<Arc<Pattern>>,
    ) -> Result<Arc<Pattern>, ModuleError> {
        let name = name.into();
        if verify_layer_name(&name).is_err() {
            return Err(ModuleError::PatternName { name });
        }
        if self.index.contains_key(&name) {
            return Err(ModuleError::DuplicatePattern { name });
        }
        let pattern = pattern.into();
        self.index.insert(name.clone(), self.patterns.len());
        self.patterns.push((name, Arc::clone(&pattern)));
        Ok(pattern)
    }

    /// Adds a kernel for `layer` using the module's pattern `pattern`, checked by
    /// [`KernelSpec::new`].
    pub fn add_kernel(
        &mut self,
        layer: impl Into<String>,
        op: Op,
        pattern: &str,
        batch: Dim,
        ld: Dim,
    ) -> Result<&KernelDecl, ModuleError> {
        self.push_kernel(layer.into(), op, pattern, None, batch, ld)
    }

    /// Adds a convolution kernel for `layer` using the module's pattern `pattern`, checked by
    /// [`KernelSpec::conv`].
    pub fn add_conv_kernel(
        &mut self,
        layer: impl Into<String>,
        op: Op,
        pattern: &str,
        geometry: ConvGeometry,
        batch: Dim,
        ld: Dim,
    ) -> Result<&KernelDecl, ModuleError> {
        self.push_kernel(layer.into(), op, pattern, Some(geometry), batch, ld)
    }

    fn push_kernel(
        &mut self,
        layer: String,
        op: Op,
        pattern: &str,
        geometry: Option<ConvGeometry>,
        batch: Dim,
        ld: Dim,
    ) -> Result<&KernelDecl, ModuleError> {
        let shared = self
            .pattern(pattern)
            .ok_or_else(|| ModuleError::UnknownPattern {
                name: pattern.to_string(),
            })?
            .clone();
        let spec = KernelSpec::with_geometry(layer, op, shared, geometry, batch, ld)?;
        self.kernels.push(KernelDecl {
            pattern: pattern.to_string(),
            spec,
        });
        Ok(self.kernels.last().expect("just pushed"))
    }

    /// The pattern called `name`, if any.
    pub fn pattern(&self, name: &str) -> Option<&Arc<Pattern>> {
        self.index.get(name).map(|&i| &self.patterns[i].1)
    }

    /// The patterns with their names, in the order they were added.
    pub fn patterns(&self) -> impl ExactSizeIterator<Item = (&str, &Arc<Pattern>)> + '_ {
        self.patterns.iter().map(|(n, p)| (n.as_str(), p))
    }

    /// The kernel declarations, in the order they were added.
    pub fn kernels(&self) -> &[KernelDecl] {
        &self.kernels
    }
}

/// Writes the canonical text (see the module doc).
impl fmt::Display for Module {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{MAGIC} {VERSION}")?;
        for (name, pattern) in &self.patterns {
            writeln!(f)?;
            write_pattern(f, name, pattern)?;
        }
        if !self.kernels.is_empty() {
            writeln!(f)?;
            for k in &self.kernels {
                let s = &k.spec;
                write!(
                    f,
                    "kernel {} op={} pattern={} ",
                    s.layer(),
                    s.op(),
                    k.pattern
                )?;
                if let Some(g) = s.geometry() {
                    write!(f, "{g} ")?;
                }
                writeln!(f, "batch={} ld={}", s.batch(), s.ld())?;
            }
        }
        Ok(())
    }
}

/// Parses `.sir` text (see [`parse`]).
impl FromStr for Module {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse(s)
    }
}

fn write_pattern(f: &mut impl fmt::Write, name: &str, p: &Pattern) -> fmt::Result {
    writeln!(
        f,
        "pattern {name} {}x{} nnz={}",
        p.rows(),
        p.cols(),
        p.nnz()
    )?;
    for r in 0..p.rows() {
        write!(f, "  {r}:")?;
        for c in p.row(r) {
            write!(f, " {c}")?;
        }
        writeln!(f)?;
    }
    Ok(())
}

/// The canonical text of `module`; the same as `module.to_string()`.
pub fn print(module: &Module) -> String {
    module.to_string()
}

/// A complete `.sir` file holding one pattern called `name`: the version line, an empty line
/// and the pattern. `name` should follow the naming rule, or the text will not parse back.
pub fn print_pattern(name: &str, pattern: &Pattern) -> String {
    let mut out = format!("{MAGIC} {VERSION}\n\n");
    write_pattern(&mut out, name, pattern).expect("writing to a String cannot fail");
    out
}

/// A `.sir` parse error: where (1-based line and column, in characters) and what.
#[derive(Debug, Clone, PartialEq, Error)]
#[error("{line}:{column}: {kind}")]
pub struct ParseError {
    /// 1-based line.
    pub line: usize,
    /// 1-based column, counted in characters.
    pub column: usize,
    /// What is wrong.
    pub kind: ParseErrorKind,
}

/// What is wrong in a `.sir` text. Strings named `found` describe what was found instead:
/// a quoted token, `end of line` or `end of input`.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum ParseErrorKind {
    /// The text does not start with the version line.
    #[error("expected the version line `{MAGIC} {VERSION}`, found {found}")]
    MissingVersion {
        /// What came instead.
        found: String,
    },
    /// The version line names a version this parser does not read.
    #[error("unsupported format version {version} (this parser reads version {VERSION})")]
    UnsupportedVersion {
        /// The version in the file.
        version: usize,
    },
    /// A line starts with a word that is not a keyword.
    #[error("unknown keyword {found} (expected `pattern` or `kernel`)")]
    UnknownKeyword {
        /// The word.
        found: String,
    },
    /// Something other than a whole number where one is expected.
    #[error("bad number for {what}: {found} ({reason})")]
    BadNumber {
        /// What the number is (`rows`, `column index`, …).
        what: &'static str,
        /// The text found.
        found: String,
        /// Why it is not accepted.
        reason: &'static str,
    },
    /// A required element of a line is missing or malformed.
    #[error("expected {expected}, found {found}")]
    Expected {
        /// What the grammar requires here.
        expected: &'static str,
        /// What came instead.
        found: String,
    },
    /// Extra text after a complete line.
    #[error("trailing garbage {found} after the end of the {what} line")]
    TrailingGarbage {
        /// The line kind (`version`, `pattern`).
        what: &'static str,
        /// The first extra token.
        found: String,
    },
    /// A pattern name breaks the naming rule.
    #[error("invalid pattern name {name:?} (ASCII letters, digits, `_`, `.`, `-`, starting with a letter or `_`)")]
    PatternName {
        /// The name.
        name: String,
    },
    /// A second pattern with a name already used.
    #[error("duplicate pattern name {name:?} (first defined on line {first_line})")]
    DuplicatePattern {
        /// The name.
        name: String,
        /// Where the first one is.
        first_line: usize,
    },
    /// A row line with another number than the next row's.
    #[error("pattern {pattern}: expected row {expected}, found row {found} (rows are listed in order, each once)")]
    RowOutOfOrder {
        /// The pattern.
        pattern: String,
        /// The next row number.
        expected: usize,
        /// The number found.
        found: usize,
    },
    /// A pattern ends (another line or the end of input) before all its rows are listed.
    #[error("pattern {pattern} declares {rows} rows but lists only {listed}; found {found} where row {listed} should be")]
    MissingRows {
        /// The pattern.
        pattern: String,
        /// Rows in the header.
        rows: usize,
        /// Rows listed.
        listed: usize,
        /// What came instead.
        found: String,
    },
    /// A row line after a pattern's last row, or before any pattern.
    #[error("row line {found} outside a pattern (more rows than the pattern header declares?)")]
    RowOutsidePattern {
        /// The row label.
        found: String,
    },
    /// The header's `nnz=` differs from the number of column indices listed.
    #[error(
        "pattern {pattern}: header says nnz={header} but its rows hold {actual} column indices"
    )]
    NnzMismatch {
        /// The pattern.
        pattern: String,
        /// The header's count.
        header: usize,
        /// The count in the rows.
        actual: usize,
    },
    /// The pattern breaks an invariant of [`crate::verify`] (column out of range, unsorted or
    /// duplicate columns, size).
    #[error("pattern {pattern}: {source}")]
    InvalidPattern {
        /// The pattern.
        pattern: String,
        /// The error of [`Pattern::from_csr`].
        source: PatternError,
    },
    /// A kernel names a pattern not defined above it.
    #[error("unknown pattern {name:?} (a kernel's pattern must be defined above it)")]
    UnknownPattern {
        /// The name.
        name: String,
    },
    /// A kernel attribute other than `op`, `pattern`, `batch`, `ld` and the geometry's.
    #[error("unknown kernel attribute {key:?} (expected op, pattern, batch, ld, or for a convolution input, kernel, stride, padding)")]
    UnknownAttribute {
        /// The key.
        key: String,
    },
    /// A kernel attribute given twice.
    #[error("kernel attribute `{key}` given twice")]
    DuplicateAttribute {
        /// The key.
        key: &'static str,
    },
    /// A kernel attribute missing.
    #[error("kernel attribute `{key}=` missing")]
    MissingAttribute {
        /// The key.
        key: &'static str,
    },
    /// The `op=` value is not an op.
    #[error("{message}")]
    BadOp {
        /// The message of [`Op`]'s `FromStr`.
        message: String,
    },
    /// A `batch=` or `ld=` value is neither a number nor `any`.
    #[error("{key}: {message}")]
    BadDim {
        /// `batch` or `ld`.
        key: &'static str,
        /// The message of [`Dim`]'s `FromStr`.
        message: String,
    },
    /// A geometry attribute's value is malformed (`input=` is `CxHxW`, the others a number).
    #[error("{key}: expected {expected}, got {found}")]
    BadGeometry {
        /// `input`, `kernel`, `stride` or `padding`.
        key: &'static str,
        /// What the value should look like.
        expected: &'static str,
        /// The value, quoted.
        found: String,
    },
    /// The kernel spec breaks an invariant of [`crate::verify`] (layer name, batch, ld).
    #[error("kernel {layer:?}: {source}")]
    InvalidKernel {
        /// The layer name.
        layer: String,
        /// The error of [`KernelSpec::new`].
        source: VerifyError,
    },
}

/// Parses `.sir` text into a [`Module`], checking everything (see the module doc).
pub fn parse(text: &str) -> Result<Module, ParseError> {
    let mut parser = Parser {
        module: Module::new(),
        state: State::Version,
        pattern_lines: HashMap::new(),
    };
    let mut eof = (1, 1);
    for (i, raw) in text.split('\n').enumerate() {
        let raw = raw.strip_suffix('\r').unwrap_or(raw);
        let line = Line::new(i + 1, raw);
        eof = (i + 1, raw.chars().count() + 1);
        if !line.toks.is_empty() {
            parser.line(&line)?;
        }
    }
    parser.finish(eof)
}

/// A whitespace-separated word and its 1-based column.
#[derive(Clone, Copy)]
struct Tok<'a> {
    text: &'a str,
    col: usize,
}

impl<'a> Tok<'a> {
    /// The part of the token after its first `skip` bytes (a char boundary), with its column.
    fn tail(self, skip: usize) -> Tok<'a> {
        Tok {
            text: &self.text[skip..],
            col: self.col + self.text[..skip].chars().count(),
        }
    }

    fn quoted(self) -> String {
        format!("{:?}", self.text)
    }
}

/// One line, comment removed, split into tokens.
struct Line<'a> {
    number: usize,
    toks: Vec<Tok<'a>>,
    /// The column where a missing next token would start.
    end_col: usize,
}

impl<'a> Line<'a> {
    fn new(number: usize, raw: &'a str) -> Self {
        let content = match raw.find([';', '#']) {
            Some(i) => &raw[..i],
            None => raw,
        };
        let mut toks = Vec::new();
        let mut start: Option<(usize, usize)> = None; // (byte, column) of the current token
        for (col, (byte, ch)) in (1..).zip(content.char_indices()) {
            let space = ch == ' ' || ch == '\t';
            match (space, start) {
                (true, Some((b, c))) => {
                    toks.push(Tok {
                        text: &content[b..byte],
                        col: c,
                    });
                    start = None;
                }
                (false, None) => start = Some((byte, col)),
                _ => {}
            }
        }
        if let Some((b, c)) = start {
            toks.push(Tok {
                text: &content[b..],
                col: c,
            });
        }
        let end_col = toks
            .last()
            .map_or(1, |t: &Tok<'_>| t.col + t.text.chars().count() + 1);
        Line {
            number,
            toks,
            end_col,
        }
    }

    fn err(&self, col: usize, kind: ParseErrorKind) -> ParseError {
        ParseError {
            line: self.number,
            column: col,
            kind,
        }
    }

    fn at(&self, tok: Tok<'_>, kind: ParseErrorKind) -> ParseError {
        self.err(tok.col, kind)
    }

    /// Token `i`, or an `Expected` error at the end of the line.
    fn need(&self, i: usize, expected: &'static str) -> Result<Tok<'a>, ParseError> {
        self.toks.get(i).copied().ok_or_else(|| {
            self.err(
                self.end_col,
                ParseErrorKind::Expected {
                    expected,
                    found: "end of line".into(),
                },
            )
        })
    }

    /// Fails on any token from `i` on.
    fn no_more(&self, i: usize, what: &'static str) -> Result<(), ParseError> {
        match self.toks.get(i) {
            Some(&t) => Err(self.at(
                t,
                ParseErrorKind::TrailingGarbage {
                    what,
                    found: t.quoted(),
                },
            )),
            None => Ok(()),
        }
    }
}

/// A decimal number made of ASCII digits only.
fn number(line: &Line<'_>, tok: Tok<'_>, what: &'static str) -> Result<usize, ParseError> {
    let bad = |reason| {
        line.at(
            tok,
            ParseErrorKind::BadNumber {
                what,
                found: tok.quoted(),
                reason,
            },
        )
    };
    if tok.text.is_empty() || !tok.text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad("expected decimal digits"));
    }
    tok.text.parse().map_err(|_| bad("too large"))
}

/// A pattern whose header has been read and whose rows are being read.
struct Block {
    name: String,
    header_line: usize,
    name_col: usize,
    nnz_col: usize,
    rows: usize,
    cols: usize,
    nnz: usize,
    row_ptr: Vec<u32>,
    col_idx: Vec<u32>,
    /// (line, column) of each column index, for errors.
    places: Vec<(usize, usize)>,
}

enum State {
    Version,
    Top,
    Rows(Block),
}

struct Parser {
    module: Module,
    state: State,
    pattern_lines: HashMap<String, usize>,
}

impl Parser {
    fn line(&mut self, line: &Line<'_>) -> Result<(), ParseError> {
        let first = line.toks[0];
        match &mut self.state {
            State::Version => {
                if first.text != MAGIC {
                    return Err(line.at(
                        first,
                        ParseErrorKind::MissingVersion {
                            found: first.quoted(),
                        },
                    ));
                }
                let v = line.need(1, "the format version number")?;
                let version = number(line, v, "format version")?;
                if version != VERSION {
                    return Err(line.at(v, ParseErrorKind::UnsupportedVersion { version }));
                }
                line.no_more(2, "version")?;
                self.state = State::Top;
                Ok(())
            }
            State::Rows(block) => {
                if !first.text.starts_with(|c: char| c.is_ascii_digit()) {
                    return Err(line.at(
                        first,
                        ParseErrorKind::MissingRows {
                            pattern: block.name.clone(),
                            rows: block.rows,
                            listed: block.row_ptr.len() - 1,
                            found: first.quoted(),
                        },
                    ));
                }
                read_row(block, line)?;
                if block.row_ptr.len() == block.rows + 1 {
                    self.finish_pattern()?;
                }
                Ok(())
            }
            State::Top => match first.text {
                "pattern" => self.header(line),
                "kernel" => self.kernel(line),
                t if t.starts_with(|c: char| c.is_ascii_digit()) => Err(line.at(
                    first,
                    ParseErrorKind::RowOutsidePattern {
                        found: first.quoted(),
                    },
                )),
                _ => Err(line.at(
                    first,
                    ParseErrorKind::UnknownKeyword {
                        found: first.quoted(),
                    },
                )),
            },
        }
    }

    fn header(&mut self, line: &Line<'_>) -> Result<(), ParseError> {
        let name = line.need(1, "a pattern name")?;
        if verify_layer_name(name.text).is_err() {
            return Err(line.at(
                name,
                ParseErrorKind::PatternName {
                    name: name.text.to_string(),
                },
            ));
        }
        if let Some(&first_line) = self.pattern_lines.get(name.text) {
            return Err(line.at(
                name,
                ParseErrorKind::DuplicatePattern {
                    name: name.text.to_string(),
                    first_line,
                },
            ));
        }
        let shape = line.need(2, "the shape ROWSxCOLS")?;
        let Some(x) = shape.text.find('x') else {
            return Err(line.at(
                shape,
                ParseErrorKind::Expected {
                    expected: "the shape ROWSxCOLS",
                    found: shape.quoted(),
                },
            ));
        };
        let rows_tok = Tok {
            text: &shape.text[..x],
            col: shape.col,
        };
        let cols_tok = shape.tail(x + 1);
        let rows = number(line, rows_tok, "rows")?;
        let cols = number(line, cols_tok, "cols")?;
        for (what, value, tok) in [("rows", rows, rows_tok), ("cols", cols, cols_tok)] {
            if u32::try_from(value).is_err() {
                return Err(line.at(
                    tok,
                    ParseErrorKind::InvalidPattern {
                        pattern: name.text.to_string(),
                        source: VerifyError::Size { what, value }.into(),
                    },
                ));
            }
        }
        let nnz_tok = line.need(3, "`nnz=N`")?;
        let Some(nnz_val) = nnz_tok.text.strip_prefix("nnz=") else {
            return Err(line.at(
                nnz_tok,
                ParseErrorKind::Expected {
                    expected: "`nnz=N`",
                    found: nnz_tok.quoted(),
                },
            ));
        };
        let nnz = number(
            line,
            nnz_tok.tail(nnz_tok.text.len() - nnz_val.len()),
            "nnz",
        )?;
        line.no_more(4, "pattern header")?;
        self.pattern_lines
            .insert(name.text.to_string(), line.number);
        self.state = State::Rows(Block {
            name: name.text.to_string(),
            header_line: line.number,
            name_col: name.col,
            nnz_col: nnz_tok.col,
            rows,
            cols,
            nnz,
            row_ptr: vec![0],
            col_idx: Vec::new(),
            places: Vec::new(),
        });
        if rows == 0 {
            self.finish_pattern()?;
        }
        Ok(())
    }

    /// Builds the pattern of the current block once all its rows are read.
    fn finish_pattern(&mut self) -> Result<(), ParseError> {
        let State::Rows(block) = std::mem::replace(&mut self.state, State::Top) else {
            return Ok(());
        };
        let at = |(line, column): (usize, usize), kind| ParseError { line, column, kind };
        let header = (block.header_line, block.name_col);
        let actual = block.col_idx.len();
        let places = block.places;
        let pattern = Pattern::from_csr(block.rows, block.cols, block.row_ptr, block.col_idx)
            .map_err(|source| {
                let place = match &source {
                    PatternError::Invalid(
                        VerifyError::ColOutOfRange { index, .. }
                        | VerifyError::ColNotSortedUnique { index, .. },
                    ) => places.get(*index).copied().unwrap_or(header),
                    _ => header,
                };
                at(
                    place,
                    ParseErrorKind::InvalidPattern {
                        pattern: block.name.clone(),
                        source,
                    },
                )
            })?;
        if block.nnz != actual {
            return Err(at(
                (block.header_line, block.nnz_col),
                ParseErrorKind::NnzMismatch {
                    pattern: block.name,
                    header: block.nnz,
                    actual,
                },
            ));
        }
        self.module
            .add_pattern(block.name.clone(), pattern)
            .map_err(|e| {
                // Name and uniqueness were checked at the header; kept for safety.
                let kind = match e {
                    ModuleError::DuplicatePattern { name } => ParseErrorKind::DuplicatePattern {
                        name,
                        first_line: block.header_line,
                    },
                    _ => ParseErrorKind::PatternName { name: block.name },
                };
                at(header, kind)
            })?;
        Ok(())
    }

    fn kernel(&mut self, line: &Line<'_>) -> Result<(), ParseError> {
        let layer = line.need(1, "a layer name")?;
        if layer.text.contains('=') {
            return Err(line.at(
                layer,
                ParseErrorKind::Expected {
                    expected: "a layer name",
                    found: layer.quoted(),
                },
            ));
        }
        const KEYS: [&str; 8] = [
            "op", "pattern", "batch", "ld", "input", "kernel", "stride", "padding",
        ];
        let mut values: [Option<Tok<'_>>; 8] = [None; 8];
        for &tok in &line.toks[2..] {
            let Some(eq) = tok.text.find('=') else {
                return Err(line.at(
                    tok,
                    ParseErrorKind::Expected {
                        expected: "an attribute KEY=VALUE",
                        found: tok.quoted(),
                    },
                ));
            };
            let key = &tok.text[..eq];
            let Some(slot) = KEYS.iter().position(|&k| k == key) else {
                return Err(line.at(
                    tok,
                    ParseErrorKind::UnknownAttribute {
                        key: key.to_string(),
                    },
                ));
            };
            if values[slot].is_some() {
                return Err(line.at(tok, ParseErrorKind::DuplicateAttribute { key: KEYS[slot] }));
            }
            values[slot] = Some(tok.tail(eq + 1));
        }
        let mut got = [Tok { text: "", col: 0 }; 4];
        for (slot, value) in values.iter().enumerate().take(4) {
            got[slot] = value.ok_or_else(|| {
                line.err(
                    line.end_col,
                    ParseErrorKind::MissingAttribute { key: KEYS[slot] },
                )
            })?;
        }
        let [op_tok, pattern_tok, batch_tok, ld_tok] = got;
        let op: Op = op_tok
            .text
            .parse()
            .map_err(|message| line.at(op_tok, ParseErrorKind::BadOp { message }))?;
        if self.module.pattern(pattern_tok.text).is_none() {
            return Err(line.at(
                pattern_tok,
                ParseErrorKind::UnknownPattern {
                    name: pattern_tok.text.to_string(),
                },
            ));
        }
        let dim = |tok: Tok<'_>, key| {
            tok.text
                .parse::<Dim>()
                .map_err(|message| line.at(tok, ParseErrorKind::BadDim { key, message }))
        };
        let batch = dim(batch_tok, "batch")?;
        let ld = dim(ld_tok, "ld")?;
        let geometry = Self::geometry(line, &values[4..])?;
        self.module
            .push_kernel(
                layer.text.to_string(),
                op,
                pattern_tok.text,
                geometry,
                batch,
                ld,
            )
            .map_err(|e| match e {
                ModuleError::Spec(source) => {
                    let tok = match source {
                        VerifyError::BatchZero { .. } => batch_tok,
                        VerifyError::LdTooSmall { .. } => ld_tok,
                        VerifyError::ConvOpGeometry { .. } => op_tok,
                        VerifyError::ConvGeometry { .. } => values[4].unwrap_or(op_tok),
                        _ => layer,
                    };
                    line.at(
                        tok,
                        ParseErrorKind::InvalidKernel {
                            layer: layer.text.to_string(),
                            source,
                        },
                    )
                }
                _ => line.at(
                    pattern_tok,
                    ParseErrorKind::UnknownPattern {
                        name: pattern_tok.text.to_string(),
                    },
                ),
            })?;
        Ok(())
    }

    /// The geometry attributes (`input`, `kernel`, `stride`, `padding`, in that order): none,
    /// or all four well formed.
    fn geometry(
        line: &Line<'_>,
        toks: &[Option<Tok<'_>>],
    ) -> Result<Option<ConvGeometry>, ParseError> {
        const KEYS: [&str; 4] = ["input", "kernel", "stride", "padding"];
        if toks.iter().all(Option::is_none) {
            return Ok(None);
        }
        let mut got = [Tok { text: "", col: 0 }; 4];
        for (slot, tok) in toks.iter().enumerate() {
            got[slot] = tok.ok_or_else(|| {
                line.err(
                    line.end_col,
                    ParseErrorKind::MissingAttribute { key: KEYS[slot] },
                )
            })?;
        }
        let [input, kernel, stride, padding] = got;
        let read = |tok: Tok<'_>, key: &'static str, expected: &'static str, text: &str| {
            text.bytes()
                .all(|b| b.is_ascii_digit())
                .then(|| text.parse::<usize>().ok())
                .flatten()
                .ok_or_else(|| {
                    line.at(
                        tok,
                        ParseErrorKind::BadGeometry {
                            key,
                            expected,
                            found: tok.quoted(),
                        },
                    )
                })
        };
        let dims: Vec<&str> = input.text.split('x').collect();
        let channels_hw = "CHANNELSxHEIGHTxWIDTH";
        let [c, h, w] = dims[..] else {
            return Err(line.at(
                input,
                ParseErrorKind::BadGeometry {
                    key: "input",
                    expected: channels_hw,
                    found: input.quoted(),
                },
            ));
        };
        Ok(Some(ConvGeometry {
            in_channels: read(input, "input", channels_hw, c)?,
            height: read(input, "input", channels_hw, h)?,
            width: read(input, "input", channels_hw, w)?,
            kernel: read(kernel, "kernel", "a whole number", kernel.text)?,
            stride: read(stride, "stride", "a whole number", stride.text)?,
            padding: read(padding, "padding", "a whole number", padding.text)?,
        }))
    }

    fn finish(mut self, (line, column): (usize, usize)) -> Result<Module, ParseError> {
        let at = |kind| ParseError { line, column, kind };
        match &self.state {
            State::Version => Err(at(ParseErrorKind::MissingVersion {
                found: "end of input".into(),
            })),
            State::Rows(block) => Err(at(ParseErrorKind::MissingRows {
                pattern: block.name.clone(),
                rows: block.rows,
                listed: block.row_ptr.len() - 1,
                found: "end of input".into(),
            })),
            State::Top => Ok(std::mem::take(&mut self.module)),
        }
    }
}

/// Reads one row line (`R: C C …`) into the block.
fn read_row(block: &mut Block, line: &Line<'_>) -> Result<(), ParseError> {
    let first = line.toks[0];
    let Some(colon) = first.text.find(':') else {
        return Err(line.err(
            first.col + first.text.chars().count(),
            ParseErrorKind::Expected {
                expected: "`:` after the row number",
                found: line
                    .toks
                    .get(1)
                    .map_or_else(|| "end of line".into(), |t| t.quoted()),
            },
        ));
    };
    let label = Tok {
        text: &first.text[..colon],
        col: first.col,
    };
    let row = number(line, label, "row number")?;
    let expected = block.row_ptr.len() - 1;
    if row != expected {
        return Err(line.at(
            label,
            ParseErrorKind::RowOutOfOrder {
                pattern: block.name.clone(),
                expected,
                found: row,
            },
        ));
    }
    let rest = first.tail(colon + 1);
    let cols = (!rest.text.is_empty())
        .then_some(rest)
        .into_iter()
        .chain(line.toks[1..].iter().copied());
    for tok in cols {
        let col = number(line, tok, "column index")?;
        let col = u32::try_from(col).map_err(|_| {
            line.at(
                tok,
                ParseErrorKind::BadNumber {
                    what: "column index",
                    found: tok.quoted(),
                    reason: "too large",
                },
            )
        })?;
        block.col_idx.push(col);
        block.places.push((line.number, tok.col));
    }
    let nnz = u32::try_from(block.col_idx.len()).map_err(|_| {
        line.at(
            first,
            ParseErrorKind::InvalidPattern {
                pattern: block.name.clone(),
                source: VerifyError::Size {
                    what: "nnz",
                    value: block.col_idx.len(),
                }
                .into(),
            },
        )
    })?;
    block.row_ptr.push(nnz);
    Ok(())
}
