use std::fmt;

use serde::Serialize;

/// One thing wrong with a policy file, located as precisely as the parser allows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PolicyError {
    /// Where in the document, e.g. `routes[1].upstream` (empty for whole-file problems).
    pub path: String,
    /// 1-based line and column, when known.
    pub line: Option<u64>,
    pub column: Option<u64>,
    pub message: String,
}

impl PolicyError {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            line: None,
            column: None,
            message: message.into(),
        }
    }

    pub fn at(mut self, location: serde_saphyr::Location) -> Self {
        if location != serde_saphyr::Location::UNKNOWN {
            self.line = Some(location.line());
            self.column = Some(location.column());
        }
        self
    }
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.line, self.column) {
            (Some(line), Some(column)) => write!(f, "{line}:{column}: ")?,
            (Some(line), None) => write!(f, "{line}: ")?,
            _ => f.write_str(" ")?,
        }
        if !self.path.is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        f.write_str(&self.message)
    }
}

/// Every error found in one pass over a policy file.
#[derive(Debug, Clone, thiserror::Error, Serialize)]
pub struct PolicyErrors {
    pub file: String,
    pub errors: Vec<PolicyError>,
}

impl fmt::Display for PolicyErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let count = self.errors.len();
        write!(
            f,
            "{}: {count} error{}",
            self.file,
            if count == 1 { "" } else { "s" }
        )?;
        for error in &self.errors {
            write!(f, "\n  {}:{error}", self.file)?;
        }
        Ok(())
    }
}
