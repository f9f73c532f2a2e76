//! Glob patterns for names in the policy (`gpt-4o*`, `claude-*-sonnet`, `*`): `*` matches any run
//! of characters, `?` exactly one; everything else is literal and case-sensitive.

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Glob {
    pattern: Box<str>,
}

impl Glob {
    pub fn new(pattern: &str) -> Self {
        Self {
            pattern: pattern.into(),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.pattern
    }

    /// Iterative matching with one backtrack point: linear in practice, no recursion.
    pub fn matches(&self, text: &str) -> bool {
        let pattern = self.pattern.as_bytes();
        let text = text.as_bytes();
        let (mut p, mut t) = (0, 0);
        let mut star: Option<(usize, usize)> = None;
        while t < text.len() {
            match pattern.get(p) {
                Some(b'*') => {
                    star = Some((p, t));
                    p += 1;
                }
                Some(&c) if c == b'?' || c == text[t] => {
                    p += 1;
                    t += 1;
                }
                _ => match star {
                    Some((star_p, star_t)) => {
                        p = star_p + 1;
                        t = star_t + 1;
                        star = Some((star_p, star_t + 1));
                    }
                    None => return false,
                },
            }
        }
        pattern[p..].iter().all(|&c| c == b'*')
    }
}

/// Whether any of the patterns matches.
pub fn any_matches(globs: &[Glob], text: &str) -> bool {
    globs.iter().any(|glob| glob.matches(text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stars_and_question_marks() {
        let cases = [
            ("*", "anything", true),
            ("*", "", true),
            ("gpt-4o*", "gpt-4o", true),
            ("gpt-4o*", "gpt-4o-mini", true),
            ("gpt-4o*", "gpt-4", false),
            ("claude-*-sonnet", "claude-3-5-sonnet", true),
            ("claude-*-sonnet", "claude-3-5-sonnet-x", false),
            ("o?-mini", "o3-mini", true),
            ("o?-mini", "o10-mini", false),
            ("a*b*c", "aXbYbZc", true),
            ("a*b*c", "aXbYbZ", false),
            ("exact", "exact", true),
            ("exact", "Exact", false),
            ("**", "x", true),
        ];
        for (pattern, text, expected) in cases {
            assert_eq!(
                Glob::new(pattern).matches(text),
                expected,
                "{pattern} ~ {text}"
            );
        }
    }
}
