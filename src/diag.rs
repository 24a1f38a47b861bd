//! Diagnostics for machine files: a message, labelled spans into the file, help text.
//!
//! Every stage that judges a machine file (loading, schema, semantic validation, lowering, the
//! reconciler) reports through [`Diag`]; [`Report`] binds them to the file's text and renders
//! them with miette, all at once.

use std::fmt;
use std::ops::Range;
use std::sync::Arc;

use miette::{
    Diagnostic, GraphicalReportHandler, GraphicalTheme, LabeledSpan, NamedSource, Severity,
    SourceCode,
};
use serde::Serialize;

/// A labelled byte range of the machine file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Label {
    pub span: Range<usize>,
    pub text: Option<String>,
}

/// One problem in a machine file. `labels[0]`, when present, is the primary location.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Diag {
    /// Stable identifier, e.g. `vmm::duplicate`; documented in docs/machine-format.md.
    pub code: &'static str,
    pub message: String,
    pub labels: Vec<Label>,
    pub help: Option<String>,
    /// Warnings are printed but do not make a file invalid.
    pub warning: bool,
}

impl Diag {
    pub fn error(code: &'static str, message: impl Into<String>) -> Diag {
        Diag {
            code,
            message: message.into(),
            labels: Vec::new(),
            help: None,
            warning: false,
        }
    }
    pub fn warning(code: &'static str, message: impl Into<String>) -> Diag {
        Diag {
            warning: true,
            ..Diag::error(code, message)
        }
    }
    /// Adds a label; the first one added is the primary location.
    pub fn label(mut self, span: Range<usize>, text: impl Into<String>) -> Diag {
        let text = text.into();
        self.labels.push(Label {
            span,
            text: (!text.is_empty()).then_some(text),
        });
        self
    }
    pub fn help(mut self, help: impl Into<String>) -> Diag {
        self.help = Some(help.into());
        self
    }
    pub fn primary_span(&self) -> Option<Range<usize>> {
        self.labels.first().map(|l| l.span.clone())
    }
}

/// A list of diagnostics, in the order found.
pub type Diags = Vec<Diag>;

/// The most diagnostics a report keeps; the rest are only counted (a broken file of 1 MiB can
/// have 100,000 problems, and nobody reads past the first screens).
pub const MAX_SHOWN: usize = 100;

/// Lines longer than this are not quoted in rendered diagnostics.
pub const MAX_SNIPPET_LINE: usize = 500;

/// Diagnostics bound to the text they point into.
#[derive(Debug, Clone)]
pub struct Report {
    pub source: Arc<NamedSource<String>>,
    /// The first [`MAX_SHOWN`] diagnostics.
    pub diags: Diags,
    /// (errors, warnings) found beyond those.
    pub omitted: (usize, usize),
}

/// 1-based line and column (in characters) of a byte offset.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    LineIndex::new(text).line_col(text, offset)
}

/// Start offsets of the lines of a text, for many line/column lookups.
#[derive(Debug)]
pub struct LineIndex(Vec<usize>);

impl LineIndex {
    pub fn new(text: &str) -> LineIndex {
        let mut starts = vec![0];
        starts.extend(text.match_indices('\n').map(|(i, _)| i + 1));
        LineIndex(starts)
    }

    pub fn line_col(&self, text: &str, offset: usize) -> (usize, usize) {
        let offset = floor_char_boundary(text, offset.min(text.len()));
        let line = self.0.partition_point(|&s| s <= offset);
        let start = self.0[line - 1];
        (line, text[start..offset].chars().count() + 1)
    }
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// Machine-readable form of one diagnostic (`--message-format json`).
#[derive(Debug, Serialize)]
pub struct JsonDiag<'a> {
    pub file: &'a str,
    pub severity: &'static str,
    pub code: &'static str,
    pub message: &'a str,
    pub line: Option<usize>,
    pub column: Option<usize>,
    pub labels: Vec<JsonLabel<'a>>,
    pub help: Option<&'a str>,
}

#[derive(Debug, Serialize)]
pub struct JsonLabel<'a> {
    pub line: usize,
    pub column: usize,
    pub start: usize,
    pub end: usize,
    pub text: Option<&'a str>,
}

impl Report {
    pub fn new(name: &str, text: String, mut diags: Diags) -> Report {
        // A parser that cannot recover says the same thing at the same place again and again.
        diags.dedup_by(|a, b| {
            a.code == b.code && a.message == b.message && a.primary_span() == b.primary_span()
        });
        let rest = diags.split_off(diags.len().min(MAX_SHOWN));
        let warnings = rest.iter().filter(|d| d.warning).count();
        Report {
            source: Arc::new(NamedSource::new(name, text)),
            diags,
            omitted: (rest.len() - warnings, warnings),
        }
    }
    /// Diagnostics found, shown or not.
    pub fn total(&self) -> usize {
        self.diags.len() + self.omitted.0 + self.omitted.1
    }
    /// The line that says how many diagnostics are not shown, if any are not.
    pub fn omitted_line(&self) -> Option<String> {
        let n = self.omitted.0 + self.omitted.1;
        (n > 0).then(|| {
            format!(
                "… and {n} more problem{} not shown (the first {MAX_SHOWN} are)",
                if n == 1 { "" } else { "s" }
            )
        })
    }
    pub fn text(&self) -> &str {
        self.source.inner()
    }
    pub fn error_count(&self) -> usize {
        self.diags.iter().filter(|d| !d.warning).count() + self.omitted.0
    }

    /// Renders every diagnostic with miette's graphical handler, which shows the lines the
    /// labels point into. A file with a line longer than [`MAX_SNIPPET_LINE`] is rendered
    /// without them (one such line, quoted by each diagnostic, would be megabytes of output).
    pub fn render(&self, color: bool, width: usize) -> String {
        if self.text().lines().any(|l| l.len() > MAX_SNIPPET_LINE) {
            return self.render_plain();
        }
        let theme = if color {
            GraphicalTheme::unicode()
        } else {
            GraphicalTheme::unicode_nocolor()
        };
        let handler = GraphicalReportHandler::new_themed(theme).with_width(width);
        let mut out = String::new();
        for d in &self.diags {
            let r = Rendered {
                diag: d,
                source: &self.source,
            };
            // Writing to a String cannot fail.
            let _ = handler.render_report(&mut out, &r);
        }
        if let Some(l) = self.omitted_line() {
            out.push_str(&l);
            out.push('\n');
        }
        out
    }

    /// Each diagnostic as its message, the places of its labels and its help.
    fn render_plain(&self) -> String {
        use std::fmt::Write;
        let text = self.text();
        let index = LineIndex::new(text);
        let mut out = String::new();
        for d in &self.diags {
            let mark = if d.warning { '⚠' } else { '×' };
            let _ = writeln!(out, "{}\n\n  {mark} {}", d.code, d.message);
            for l in &d.labels {
                let (line, col) = index.line_col(text, l.span.start);
                let _ = writeln!(
                    out,
                    "    at {}:{line}:{col}{}",
                    self.source.name(),
                    l.text
                        .as_deref()
                        .map(|t| format!(": {t}"))
                        .unwrap_or_default()
                );
            }
            if let Some(h) = &d.help {
                let _ = writeln!(out, "  help: {h}");
            }
            out.push('\n');
        }
        if let Some(l) = self.omitted_line() {
            out.push_str(&l);
            out.push('\n');
        }
        out
    }

    pub fn json(&self) -> Vec<JsonDiag<'_>> {
        let text = self.text();
        let index = LineIndex::new(text);
        self.diags
            .iter()
            .map(|d| {
                let labels: Vec<JsonLabel<'_>> = d
                    .labels
                    .iter()
                    .map(|l| {
                        let (line, column) = index.line_col(text, l.span.start);
                        JsonLabel {
                            line,
                            column,
                            start: l.span.start,
                            end: l.span.end,
                            text: l.text.as_deref(),
                        }
                    })
                    .collect();
                JsonDiag {
                    file: self.source.name(),
                    severity: if d.warning { "warning" } else { "error" },
                    code: d.code,
                    message: &d.message,
                    line: labels.first().map(|l| l.line),
                    column: labels.first().map(|l| l.column),
                    help: d.help.as_deref(),
                    labels,
                }
            })
            .collect()
    }
}

/// One diagnostic seen through miette.
struct Rendered<'a> {
    diag: &'a Diag,
    source: &'a NamedSource<String>,
}

impl fmt::Debug for Rendered<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.diag.message)
    }
}

impl fmt::Display for Rendered<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.diag.message)
    }
}

impl std::error::Error for Rendered<'_> {}

impl Diagnostic for Rendered<'_> {
    fn code<'b>(&'b self) -> Option<Box<dyn fmt::Display + 'b>> {
        Some(Box::new(self.diag.code))
    }
    fn severity(&self) -> Option<Severity> {
        Some(if self.diag.warning {
            Severity::Warning
        } else {
            Severity::Error
        })
    }
    fn help<'b>(&'b self) -> Option<Box<dyn fmt::Display + 'b>> {
        self.diag
            .help
            .as_ref()
            .map(|h| Box::new(h) as Box<dyn fmt::Display>)
    }
    fn source_code(&self) -> Option<&dyn SourceCode> {
        if self.diag.labels.is_empty() {
            None
        } else {
            Some(self.source)
        }
    }
    fn labels(&self) -> Option<Box<dyn Iterator<Item = LabeledSpan> + '_>> {
        if self.diag.labels.is_empty() {
            return None;
        }
        Some(Box::new(self.diag.labels.iter().enumerate().map(
            |(i, l)| {
                let len = l.span.end.saturating_sub(l.span.start);
                if i == 0 {
                    LabeledSpan::new_primary_with_span(l.text.clone(), (l.span.start, len))
                } else {
                    LabeledSpan::new_with_span(l.text.clone(), (l.span.start, len))
                }
            },
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_col_counts_chars() {
        let t = "a = 1\nbé = 2\n";
        assert_eq!(line_col(t, 0), (1, 1));
        assert_eq!(line_col(t, 6), (2, 1));
        assert_eq!(line_col(t, 9), (2, 3)); // after the two-byte é
        assert_eq!(line_col(t, 999), (3, 1));
    }

    #[test]
    fn renders_all_diagnostics_with_positions() {
        let text = "memory = \"64Q\"\nvcpus = 0\n".to_string();
        let r = Report::new(
            "m.toml",
            text,
            vec![
                Diag::error("vmm::a", "bad size")
                    .label(9..14, "here")
                    .help("use M"),
                Diag::error("vmm::b", "bad count").label(23..24, ""),
            ],
        );
        let out = r.render(false, 80);
        assert!(out.contains("[m.toml:1:10]"), "{out}");
        assert!(out.contains("[m.toml:2:9]"), "{out}");
        assert!(out.contains("help: use M"), "{out}");
        assert_eq!(r.error_count(), 2);
    }
}
